"""Bad input is refused before any kernel runs, with an error naming the argument and what is allowed."""
import math

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
    (dict(lora_A=torch.randn(R, K + 1)), ValueError, r"lora_A must have shape \(r_max, K\) with K = 8"),
    (dict(lora_B=torch.randn(N, R + 1)), ValueError, r"lora_B must have shape \(N, r_max\) = \(5, 4\)"),
    (dict(lora_B=torch.randn(N + 1, R)), ValueError, r"lora_B must have shape \(N, r_max\) = \(5, 4\)"),
    (dict(bias=torch.randn(N + 1)), ValueError, r"bias must have shape \(N,\) = \(5,\)"),
    (dict(lora_A=torch.randn(0, K), lora_B=torch.randn(N, 0)), ValueError, r"r_max = 0"),
    (dict(x=torch.randn(M, K, dtype=torch.float64)), TypeError, r"must share one dtype"),
    (dict(lora_B=torch.randn(N, R, dtype=torch.bfloat16)), TypeError, r"must share one dtype"),
    (dict(x=torch.randn(M, K).half(), weight=torch.randn(N, K).half(), bias=torch.randn(N).half(),
          lora_A=torch.randn(R, K).half(), lora_B=torch.randn(N, R).half(), backend="cpp"),
     TypeError, r"backend='cpp' supports dtypes float32, float64, bfloat16; got torch.float16"),
    (dict(x=torch.randint(0, 3, (M, K))), TypeError, r"must share one dtype"),
    (dict(weight=torch.randn(N, K, device="meta")), ValueError, r"must be on one device"),
    (dict(rank=torch.tensor([1] * M, device="meta")), ValueError, r"rank tensor must be on x's device"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a finite number \(a Python or NumPy scalar\), got nan"),
    (dict(alpha=math.inf), ValueError, r"alpha must be a finite number \(a Python or NumPy scalar\), got inf"),
    (dict(alpha="2"), ValueError, r"alpha must be a finite number \(a Python or NumPy scalar\), got '2'"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'cpp', 'triton', 'reference'\), got 'cuda'"),
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
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        call(backend="triton")


def test_good_input_passes():  # the baseline the table above perturbs
    assert call().shape == (M, N)
    empty_k = call(x=torch.randn(M, 0), weight=torch.randn(N, 0), lora_A=torch.randn(R, 0))
    assert torch.equal(empty_k, good()["bias"].expand(M, N))  # K = 0: y = bias
    assert call(rank=torch.tensor([1, 2, 3, 4, 4, 1])).shape == (M, N)
    assert call(bias=None, backend="reference").shape == (M, N)
