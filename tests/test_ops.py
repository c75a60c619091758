"""The dylora ops against the float64 reference, on every backend this machine has (conftest.BACKENDS)."""
import pytest
import torch

import dylora_kernels
from conftest import (BACKENDS, backend_dtype_params, device_of, make_inputs, pick_rank, reference_run, rel_err,
                      run, tolerance, trained_slots)

# (x shape, N, r_max, bias, x layout): odd sizes, a 3-D input (a view of every other row), M = 1, r_max = 1 and
# r_max not a power of 2, a column-strided x (conftest.with_layout: views of NaN-filled buffers).
CASES = [
    ((37, 45), 29, 7, True, "contiguous"),
    ((2, 9, 33), 20, 12, False, "row-strided"),
    ((1, 16), 24, 1, True, "contiguous"),
    ((70, 40), 52, 33, False, "strided"),
]
CASE_IDS = ["37x45x29-r7", "2x9x33x20-r12-3d-row-strided", "1x16x24-r1", "70x40x52-r33-strided"]
RANKS = ["1", "mid", "r_max", "per_row"]


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("rank_kind", RANKS)
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_matches_float64_reference(backend, dtype, case, rank_kind, frozen_prefix):
    x_shape, N, r_max, bias, layout = case
    device = device_of(backend)
    inputs = make_inputs(x_shape, N, r_max, bias, layout, dtype, device)
    rows = inputs["x"].numel() // x_shape[-1]
    rank = pick_rank(rank_kind, r_max, rows, device)
    grad_out = torch.randn(*x_shape[:-1], N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = 3.0

    ours = run(inputs, rank, alpha, frozen_prefix, backend, grad_out.to(device))
    ref = reference_run(inputs, rank, alpha, frozen_prefix, grad_out)

    tol = tolerance(backend, dtype)
    for name, out, expected in zip(("y", "dx", "dA", "dB"), ours, ref):
        assert out.dtype == dtype and out.shape == expected.shape, name
        assert torch.isfinite(out).all(), f"{name} has non-finite values (unwritten elements?)"
        assert rel_err(out.cpu(), expected) <= tol, f"{name}: rel err {rel_err(out.cpu(), expected):.2e} > {tol}"
    # Slots outside the trained ones get exactly zero gradient (frozen prefix: all but b-1).
    untouched = ~trained_slots(rank, r_max, rows, frozen_prefix)
    dA, dB = ours[2].cpu(), ours[3].cpu()
    assert (dA[untouched] == 0).all() and (dB[:, untouched] == 0).all()
    assert dA[~untouched].abs().sum() > 0 and dB[:, ~untouched].abs().sum() > 0


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("wrt", [("lora_A", "lora_B"), ("weight", "bias")], ids=["x-frozen", "base-unfrozen"])
def test_gradients_of_other_leaf_sets(backend, dtype, wrt):
    """x without requires_grad: the dx GEMM is skipped and dA/dB are unchanged. An unfrozen base
    layer: dW = gᵀx and dbias = Σ g, computed only then."""
    device = device_of(backend)
    inputs = make_inputs((19, 24), 31, 8, True, "contiguous", dtype, device)
    g = torch.randn(19, 31, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = run(inputs, 5, 2.0, False, backend, g.to(device), wrt)
    ref = reference_run(inputs, 5, 2.0, False, g, wrt)
    for name, out, expected in zip(wrt, ours[1:], ref[1:]):
        assert rel_err(out.cpu(), expected) <= tolerance(backend, dtype), name


def test_gradcheck_float64_cpp():
    """Finite differences agree with the C++ backward in full mode (every input) and, in frozen-prefix
    mode, for x (its gradient is the true one; A and B get DyLoRA's truncated gradient on purpose)."""
    g = torch.Generator().manual_seed(4)
    x, W, bias = torch.randn(7, 9, generator=g), torch.randn(5, 9, generator=g), torch.randn(5, generator=g)
    A, B = torch.randn(4, 9, generator=g), torch.randn(5, 4, generator=g)
    inputs = [t.double().requires_grad_(True) for t in (x, W, bias, A, B)]
    for rank in (3, torch.tensor([1, 4, 2, 3, 4, 1, 2])):
        f = lambda x, W, bias, A, B: dylora_kernels.dylora_linear(x, W, bias, A, B, rank, 2.0, backend="cpp")
        assert torch.autograd.gradcheck(f, inputs)
        frozen = lambda x: dylora_kernels.dylora_linear(x, *inputs[1:], rank, 2.0, frozen_prefix=True, backend="cpp")
        assert torch.autograd.gradcheck(frozen, inputs[:1])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_opcheck(backend, per_row):
    """torch.library.opcheck on the three ops: the linear op (with a weight, and as the delta op with a
    base), forward (with and without u) and backward (every combination of outputs)."""
    device = device_of(backend)
    dtype = torch.float32
    inputs = make_inputs((13, 24), 20, 6, True, "contiguous", dtype, device)
    rank = torch.tensor([1, 6, 3] * 4 + [2], device=device) if per_row else torch.tensor(4, device=device)
    x, W, bias, A, B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    base = torch.randn(13, 20, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_(True)
    for t in (x, A, B):
        t.requires_grad_(True)
    for frozen_prefix in (False, True):
        torch.library.opcheck(torch.ops.dylora.linear.default,
                              (x, W, bias, None, A, B, rank, 2.0, frozen_prefix, backend))
        torch.library.opcheck(torch.ops.dylora.linear.default,
                              (x, None, None, base, A, B, rank, 2.0, frozen_prefix, backend))
    # forward and backward are the linear op's internal kernels (its autograd calls them): no autograd.
    x, A, B = x.detach(), A.detach(), B.detach()
    for need_u in (False, True):
        torch.library.opcheck(torch.ops.dylora.forward.default, (x, W, bias, None, A, B, rank, 2.0, need_u, backend))
    y, u = torch.ops.dylora.forward(x, W, bias, None, A, B, rank, 2.0, True, backend)
    g = torch.randn_like(y)
    for frozen_prefix in (False, True):
        for compute_dx, compute_lora in ((False, True), (True, False), (True, True)):
            torch.library.opcheck(torch.ops.dylora.backward.default,
                                  (g, x, W, A, B, u, rank, 2.0, frozen_prefix,
                                   compute_dx, compute_lora, backend))
