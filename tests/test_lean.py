"""The lean composition (csrc/prep.h): what the GPU build's "cublas" plan runs for a rank tensor on the GPU, here on
CPU tensors (its prep pass is a CPU loop over the element rules the CUDA kernel shares). Against the float64
reference: y, u, dx, dA, dB for shared and per-row ranks, both modes, bias/base, mixed-precision adapters, strided
operands; untrained slots exactly zero. The NaN rules (unused slots, invalid ranks) are in test_reliability."""
import pytest
import torch

from dylora_kernels import ops, reference
from conftest import make_inputs, per_row_ranks, rel_err

_C = ops._C
pytestmark = pytest.mark.skipif(_C is None, reason="needs the C++ extension")


def reference_grads(x, w, bias, base, A, B, rank, alpha, frozen, grad):
    leaves = [t.detach().double().clone().requires_grad_() for t in (x, A, B)]
    y = reference.dylora_linear(leaves[0], w.double(), None if bias is None else bias.double(), leaves[1], leaves[2],
                                rank, alpha, frozen, base=None if base is None else base.double())
    y.backward(grad.double())
    return y.detach(), *(leaf.grad for leaf in leaves)


@pytest.mark.parametrize("dtype, adapter_dtype, tol", [(torch.float64, torch.float64, 1e-12),
                                                       (torch.float32, torch.float32, 1e-5),
                                                       (torch.bfloat16, torch.float32, 1e-2),
                                                       (torch.float32, torch.float64, 1e-5)],
                         ids=["fp64", "fp32", "bf16-fp32-adapters", "fp32-fp64-adapters"])
@pytest.mark.parametrize("rank_kind", ["0-d", "per-row"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("extras", ["bias", "base", "strided"])
def test_lean_matches_reference(dtype, adapter_dtype, tol, rank_kind, frozen, extras):
    M, K, N, r_max = 19, 23, 17, 7
    t = make_inputs((M, K), N, r_max, extras == "bias", "contiguous", torch.float64, "cpu", seed=3)
    x, w = t["x"].to(dtype), t["weight"].to(dtype)
    bias = None if t["bias"] is None else t["bias"].to(dtype)
    A, B = t["lora_A"].to(adapter_dtype), t["lora_B"].to(adapter_dtype)
    base = torch.randn(M, N, dtype=torch.float64).to(dtype) if extras == "base" else None
    if extras == "strided":  # x with a row stride, B column-major: read in place
        x = torch.randn(M, 2 * K, dtype=torch.float64).to(dtype)[:, ::2]
        B = B.t().contiguous().t()
    rank = torch.tensor(4) if rank_kind == "0-d" else per_row_ranks(M, r_max, seed=5)
    grad = torch.randn(M, N, dtype=torch.float64).to(dtype)
    alpha = 2.5
    y, u = _C.forward_lean(x, w, bias, base, A, B, rank, alpha, True)
    dx, dA, dB = _C.backward_lean(grad, x, w, A, B, u, rank, alpha, frozen, True, True)
    ref = reference_grads(x, w, bias, base, A, B, rank, alpha, frozen, grad)
    for name, out, expected in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), ref):
        assert out.dtype == (adapter_dtype if name in ("dA", "dB") else dtype), name
        assert rel_err(out, expected) <= tol, (name, rel_err(out, expected))
    b = rank.reshape(-1).expand(M)
    slots = torch.arange(r_max)
    used = slots[None, :] < b[:, None]
    assert u.dtype == ops.intermediate_dtype(dtype, adapter_dtype) and (u[~used] == 0).all()
    assert rel_err(u[used], (x.double() @ A.double().t())[used]) <= tol
    trained = ((slots[None, :] == b[:, None] - 1) if frozen else used).any(0)
    assert (dA[~trained] == 0).all() and (dB[:, ~trained] == 0).all()


@pytest.mark.parametrize("compute_dx, compute_lora", [(True, False), (False, True), (False, False)])
def test_lean_backward_computes_only_what_is_asked(compute_dx, compute_lora):
    t = make_inputs((9, 8), 6, 4, False, "contiguous", torch.float32, "cpu")
    rank = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1, 2])
    _, u = _C.forward_lean(t["x"], t["weight"], None, None, t["lora_A"], t["lora_B"], rank, 1.0, True)
    grad = torch.randn(9, 6)
    dx, dA, dB = _C.backward_lean(grad, t["x"], t["weight"], t["lora_A"], t["lora_B"], u, rank, 1.0, False,
                                  compute_dx, compute_lora)
    full = _C.backward_lean(grad, t["x"], t["weight"], t["lora_A"], t["lora_B"], u, rank, 1.0, False, True, True)
    assert (dx.numel() > 0) == compute_dx and (dA.numel() > 0) == compute_lora and (dB.numel() > 0) == compute_lora
    for out, whole, wanted in zip((dx, dA, dB), full, (compute_dx, compute_lora, compute_lora)):
        if wanted:
            assert torch.equal(out, whole)


def test_lean_without_u_and_with_empty_batch():
    t = make_inputs((5, 8), 6, 4, True, "contiguous", torch.float32, "cpu")
    y, u = _C.forward_lean(t["x"], t["weight"], t["bias"], None, t["lora_A"], t["lora_B"], torch.tensor(2), 1.0, False)
    assert u.numel() == 0 and y.shape == (5, 6)
    empty = t["x"][:0]
    y, u = _C.forward_lean(empty, t["weight"], t["bias"], None, t["lora_A"], t["lora_B"], torch.zeros(0, dtype=torch.long),
                           1.0, True)
    assert y.shape == (0, 6) and u.shape == (0, 4)
