"""Bad input is refused before any kernel runs, with an error naming the argument and what is allowed."""
import importlib.util
import math
import os

import pytest
import torch

import dylora_kernels

M, K, N, R = 6, 8, 5, 4


def good():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(M, K, generator=g), weight=torch.randn(N, K, generator=g),
                bias=torch.randn(N, generator=g), lora_A=torch.randn(R, K, generator=g),
                lora_B=torch.randn(N, R, generator=g), rank=2, alpha=2.0)


def call(**overrides):
    kwargs = {**good(), **overrides}
    args = [kwargs.pop(k) for k in ("x", "weight", "bias", "lora_A", "lora_B", "rank", "alpha")]
    return dylora_kernels.dylora_linear(*args, **kwargs)


BAD = [
    (dict(rank=0), ValueError, r"rank must be in \[1, r_max\] = \[1, 4\], got 0"),
    (dict(rank=5), ValueError, r"rank must be in \[1, r_max\] = \[1, 4\], got 5"),
    (dict(rank=torch.tensor(5)), ValueError, r"rank values must be in \[1, r_max\] = \[1, 4\]"),
    (dict(rank=torch.tensor([1, 2, 0, 1, 1, 1])), ValueError, r"rank values must be in \[1, r_max\]"),
    (dict(rank=torch.tensor([1, 2, 3])), ValueError, r"one rank per row .*\(6 rows\), got shape \(3,\)"),
    (dict(rank=torch.tensor([[1, 2]])), ValueError, r"0-d or 1-D"),
    (dict(rank=torch.tensor(2.0)), TypeError, r"rank tensor must have an integer dtype, got torch.float32"),
    (dict(rank=torch.tensor(True)), TypeError, r"integer dtype, got torch.bool"),
    (dict(rank=2.0), TypeError, r"rank must be an int or an integer tensor, got float"),
    (dict(rank=True), TypeError, r"rank must be an int or an integer tensor, got bool"),
    (dict(x=torch.randn(M, K + 1)), ValueError, r"x must have shape \(\.\.\., K\) with K = weight.shape\[1\] = 8"),
    (dict(weight=torch.randn(N, K, 1)), ValueError, r"weight must be 2-D"),
    (dict(lora_A=torch.randn(R, K + 1)), ValueError, r"lora_A must have shape \(r_max, K\) with K = weight.shape\[1\] = 8"),
    (dict(lora_B=torch.randn(N, R + 1)), ValueError, r"lora_B must have shape \(N, r_max\) = \(5, 4\)"),
    (dict(lora_B=torch.randn(N + 1, R)), ValueError, r"lora_B must have shape \(N, r_max\) = \(5, 4\)"),
    (dict(bias=torch.randn(N + 1)), ValueError, r"bias must have shape \(N,\) = \(5,\)"),
    (dict(lora_A=torch.randn(0, K), lora_B=torch.randn(N, 0)), ValueError, r"r_max = 0"),
    (dict(x=torch.randn(M, K, dtype=torch.float64)), TypeError, r"x, weight, bias and base must share one dtype"),
    (dict(lora_B=torch.randn(N, R, dtype=torch.bfloat16)), TypeError, r"lora_A and lora_B must share one dtype"),
    (dict(x=torch.randn(M, K).half(), weight=torch.randn(N, K).half(), bias=torch.randn(N).half(),
          lora_A=torch.randn(R, K).half(), lora_B=torch.randn(N, R).half(), backend="cpp"),
     TypeError, r"backend='cpp' on cpu supports dtypes float32, float64, bfloat16; got x torch.float16"),
    (dict(x=torch.randint(0, 3, (M, K))), TypeError, r"must share one dtype"),
    # backend="auto" resolves first, then runs the same dtype checks (it used to skip them)
    (dict(x=torch.randn(M, K).half(), weight=torch.randn(N, K).half(), bias=torch.randn(N).half()),
     TypeError, r"backend='cpp' on cpu supports dtypes .*; got x torch.float16"),
    (dict(lora_A=torch.randn(R, K).half(), lora_B=torch.randn(N, R).half()),
     TypeError, r"backend='cpp' on cpu supports dtypes .*; got lora_A torch.float16"),
    (dict(x=torch.randint(0, 3, (M, K)), weight=torch.randint(0, 3, (N, K)), bias=torch.randint(0, 3, (N,)),
          lora_A=torch.randint(0, 3, (R, K)), lora_B=torch.randint(0, 3, (N, R))),
     TypeError, r"supports dtypes .*; got x torch.int64"),
    (dict(x=torch.randn(M, K, dtype=torch.complex64), weight=torch.randn(N, K, dtype=torch.complex64),
          bias=torch.randn(N, dtype=torch.complex64), lora_A=torch.randn(R, K, dtype=torch.complex64),
          lora_B=torch.randn(N, R, dtype=torch.complex64)),
     TypeError, r"supports dtypes .*; got x torch.complex64"),
    (dict(frozen_prefix="no"), TypeError, r"frozen_prefix must be a bool, got str 'no'"),
    (dict(frozen_prefix=None), TypeError, r"frozen_prefix must be a bool, got NoneType None"),
    (dict(frozen_prefix=1), TypeError, r"frozen_prefix must be a bool, got int 1"),
    (dict(weight=torch.randn(N, K, device="meta")), ValueError, r"must be on one device"),
    (dict(rank=torch.tensor([1] * M, device="meta")), ValueError, r"rank tensor must be on x's device"),
    (dict(rank=torch.tensor(9, dtype=torch.int8)), ValueError, r"rank values must be in \[1, r_max\] = \[1, 4\], got 9"),
    (dict(rank=torch.tensor(2, dtype=torch.uint16)), TypeError, r"rank tensor must have an integer dtype"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a finite real number, got nan"),
    (dict(alpha=math.inf), ValueError, r"alpha must be a finite real number, got inf"),
    (dict(alpha=10**400), ValueError, r"alpha must be a finite real number, got 1000000"),
    (dict(alpha=1e300), ValueError, r"alpha = 1e\+300 is not finite in float32, the kernels' accumulator"),
    (dict(alpha="2"), ValueError, r"alpha must be a finite real number \(a Python or NumPy scalar, a 0-d NumPy "
                                  r"array or a 0-d CPU tensor\), got '2'"),
    (dict(alpha=torch.tensor([2.0])), ValueError, r"alpha tensor must be a real 0-d tensor"),
    (dict(alpha=torch.tensor(2.0, device="meta")), TypeError, r"alpha is a tensor on meta: reading it would "
                                                              r"synchronise"),
    (dict(alpha=True), ValueError, r"alpha must be a finite real number"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'cpp', 'cublas', 'triton', "
                                       r"'triton-tma', 'triton-decode', 'reference'\), got 'cuda'"),
    (dict(backend="cublas"), ValueError, r"backend='cublas' runs on CUDA tensors, got x on cpu; on CPU use 'cpp'"),
    (dict(x=[[1.0] * K]), TypeError, r"x must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("overrides,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused(overrides, error, message):
    before = {k: v.clone() for k, v in {**good(), **overrides}.items() if isinstance(v, torch.Tensor)
              and v.device.type != "meta"}
    with pytest.raises(error, match=message):
        call(**overrides)
    after = {**good(), **overrides}
    for k, v in before.items():  # nothing was modified
        assert torch.equal(after[k], v)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs triton and CUDA tensors"):
        call(backend="triton")


def test_delta_bad_input_is_refused():
    """dylora_delta runs the same checks; its base must have x's shape with the last dimension N."""
    kwargs = good()
    x, A, B = kwargs["x"], kwargs["lora_A"], kwargs["lora_B"]
    with pytest.raises(ValueError, match=r"base must have x's shape with the last dimension N = 5: \(6, 5\), got \(6, 4\)"):
        dylora_kernels.dylora_delta(x, A, B, 2, 2.0, base=torch.randn(M, N - 1))
    with pytest.raises(TypeError, match=r"x, weight, bias and base must share one dtype"):
        dylora_kernels.dylora_delta(x, A, B, 2, 2.0, base=torch.randn(M, N, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K\) with K = lora_A.shape\[1\] = 8"):
        dylora_kernels.dylora_delta(torch.randn(M, K + 1), A, B, 2, 2.0)


def test_accepted_scalar_types():
    """What wrappers hold: NumPy integers as rank, alpha as a NumPy scalar, a 0-d NumPy array or a 0-d CPU
    tensor (a device tensor is refused above: reading it would sync), narrow integer rank dtypes whose
    values exceed nothing even when r_max exceeds their range."""
    import numpy as np

    expected = call()
    for alpha in (np.float32(2.0), np.array(2.0), torch.tensor(2.0), torch.tensor(2), 2):
        assert torch.equal(call(alpha=alpha), expected)
    for rank in (np.int64(2), np.int8(2), torch.tensor(2, dtype=torch.int8), torch.tensor(2, dtype=torch.uint8)):
        assert torch.equal(call(rank=rank), expected)
    wide = dict(lora_A=torch.randn(300, K), lora_B=torch.randn(N, 300))
    for rank, reference in ((torch.tensor(5, dtype=torch.int8), 5), (torch.tensor(100, dtype=torch.uint8), 100),
                            (torch.tensor([100, 5, 1, 2, 3, 4], dtype=torch.uint8), None)):
        ours = call(rank=rank, **wide)
        ref_rank = reference if reference is not None else rank.long()
        torch.testing.assert_close(ours, call(rank=ref_rank, backend="reference", **wide))
    assert call(alpha=1e300, x=good()["x"].double(), weight=good()["weight"].double(), bias=good()["bias"].double(),
                lora_A=good()["lora_A"].double(), lora_B=good()["lora_B"].double()).isfinite().all()


def test_good_input_passes():  # the baseline the table above perturbs
    assert call().shape == (M, N)
    empty_k = call(x=torch.randn(M, 0), weight=torch.randn(N, 0), lora_A=torch.randn(R, 0))
    assert torch.equal(empty_k, good()["bias"].expand(M, N))  # K = 0: y = bias
    assert call(rank=torch.tensor([1, 2, 3, 4, 4, 1])).shape == (M, N)
    assert call(bias=None, backend="reference").shape == (M, N)


def test_adapter_dtypes_are_checked_on_every_entry():
    """The adapters' dtype rules through dylora_delta and the Triton backend as well (a second guard beside the table
    above): lora_A and lora_B share one dtype, and it must be one the backend computes in."""
    kwargs = good()
    x, A, B = kwargs["x"], kwargs["lora_A"], kwargs["lora_B"]
    with pytest.raises(TypeError, match=r"lora_A and lora_B must share one dtype, got torch.float32 and torch.float64"):
        dylora_kernels.dylora_delta(x, A, B.double(), 2, 2.0)
    with pytest.raises(TypeError, match=r"backend='cpp' on cpu supports dtypes .*; got lora_A torch.float16"):
        dylora_kernels.dylora_delta(x, A.half(), B.half(), 2, 2.0)
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(TypeError, match=r"backend='triton' on cpu supports dtypes .*; got lora_A torch.float64"):
            call(lora_A=A.double(), lora_B=B.double(), backend="triton")
