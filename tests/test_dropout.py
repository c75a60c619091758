"""Fused adapter dropout (PEFT's lora_dropout): the base sees x, the low-rank term sees dropout(x).

The mask is a pure function of (seed, M, K, p) (``reference.dropout_keep``), so every backend and the float64
reference draw the same one: comparing a backend's output and gradients with the reference's autograd through the
materialised mask checks that the forward and the backward use that same mask. Statistics (keep rate, the
1/(1 − p) scale) are checked on the mask and on the op's mean over seeds.
"""
import math

import numpy as np
import pytest
import torch

import dylora_kernels
from dylora_kernels import reference
from dylora_kernels.ops import _C

from conftest import BACKENDS, HAS_EXTENSION, backend_dtype_params, device_of, make_inputs, per_row_ranks, rel_err, \
    tolerance

needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")


def run(inputs, rank, alpha, frozen_prefix, backend, grad_out, p, seed, delta=False):
    """y, dx, dA, dB of one call with adapter dropout (the delta op when ``delta``: base = x·Wᵀ given)."""
    leaves = {k: v.detach().clone().requires_grad_(k in ("x", "lora_A", "lora_B"))
              for k, v in inputs.items() if v is not None}
    if not inputs["x"].is_contiguous():  # keep the caller's layout
        leaves["x"] = inputs["x"].detach().requires_grad_(True)
    x, A, B = leaves["x"], leaves["lora_A"], leaves["lora_B"]
    if delta:
        base = torch.nn.functional.linear(x.detach(), leaves["weight"], leaves.get("bias"))
        y = dylora_kernels.dylora_delta(x, A, B, rank, alpha, frozen_prefix=frozen_prefix, base=base, backend=backend,
                                        dropout_p=p, dropout_seed=seed)
    else:
        y = dylora_kernels.dylora_linear(x, leaves["weight"], leaves.get("bias"), A, B, rank, alpha,
                                         frozen_prefix=frozen_prefix, backend=backend, dropout_p=p, dropout_seed=seed)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad, A.grad, B.grad


def reference_run(inputs, rank, alpha, frozen_prefix, grad_out, p, seed, delta=False):
    cpu64 = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    rank = rank.cpu() if isinstance(rank, torch.Tensor) else rank
    return run(cpu64, rank, alpha, frozen_prefix, "reference", grad_out.double().cpu(), p, seed, delta)


# --------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**62 - 1])
def test_philox_matches_the_published_known_answers(seed):
    """Philox4x32-10's known-answer vectors (Random123, kat_vectors) for the key/counter cases our (counter, seed)
    layout can express: counter (0, 0, 0, 0) and key (0, 0) → 6627e8d5 e169c58d bc57ac4c 9b00dbd8; then the
    reference must agree with itself across seeds (a smoke check that the seed reaches the key)."""
    draws = reference.philox4x32(np.zeros(1, dtype=np.uint64), 0)
    assert [int(d[0]) for d in draws] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert reference.dropout_keep(seed, 3, 5, 0.5).shape == (3, 5)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 4), (5, 129)])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("seed", [1, 12345, 2**62 + 5])
def test_cpp_mask_is_the_reference_mask(shape, p, seed):
    """The C++ generator (csrc/dropout.h) draws exactly reference.dropout_keep's mask, for any strides."""
    M, K = shape
    x = torch.randn(M, 2 * K, dtype=torch.float64)[:, ::2] + 3.0  # strided, no zeros
    out = _C.dropout_keep(x, torch.tensor(seed), p)
    keep = reference.dropout_keep(seed, M, K, p)
    assert torch.equal(out != 0, keep)
    assert torch.equal(out[keep], x[keep])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keep_rate_and_independence(p):
    """Keep rate 1 − p within 5σ over 2·10⁵ elements; different seeds give (almost) independent masks."""
    n_rows, K = 400, 500
    keep = reference.dropout_keep(11, n_rows, K, p)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    other = reference.dropout_keep(12, n_rows, K, p)
    both = (keep & other).float().mean().item()  # independent: (1 − p)²
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    # neighbours that share one Philox call are not correlated either
    flat = keep.reshape(-1, 4).float()
    corr = np.corrcoef(flat[:, 0].numpy(), flat[:, 1].numpy())[0, 1]
    assert abs(corr) < 5 / math.sqrt(flat.shape[0])


# --------------------------------------------------------------------------------------------
# The ops against the float64 reference (same seed → same mask)
# --------------------------------------------------------------------------------------------
CASES = [  # (x shape, N, r_max, rank kind, frozen_prefix, bias, delta)
    ((9, 21), 18, 6, "mid", True, True, False),
    ((2, 5, 19), 13, 5, "per_row", False, False, False),
    ((11, 17), 23, 8, "1", False, True, True),
    ((6, 33), 10, 4, "r_max", True, False, True),
    ((3, 4, 16), 16, 7, "per_row", True, True, False),
]


def _rank(kind, r_max, rows, device):
    if kind == "1":
        return 1
    if kind == "r_max":
        return r_max
    if kind == "mid":
        return torch.tensor((r_max + 1) // 2, device=device)
    return per_row_ranks(rows, r_max).to(device)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_dropout_forward_backward_match_reference(backend, dtype, case, p):
    """y, dx, dA and dB with adapter dropout equal autograd through the reference's materialised mask (float64), for
    every backend: the forward's and the backward's masks are the same one. Frozen-prefix gradients stay exactly zero
    outside the trained slot."""
    x_shape, N, r_max, kind, frozen, bias, delta = CASES[case]
    device = device_of(backend)
    inputs = make_inputs(x_shape, N, r_max, bias, "contiguous", dtype, device, seed=case)
    rows = math.prod(x_shape[:-1])
    rank = _rank(kind, r_max, rows, device)
    grad_out = torch.randn(*x_shape[:-1], N, generator=torch.Generator().manual_seed(case + 50)).to(device)
    seed = 1000 + case
    got = run(inputs, rank, 1.7, frozen, backend, grad_out, p, seed, delta)
    want = reference_run(inputs, rank, 1.7, frozen, grad_out, p, seed, delta)
    tol = tolerance(backend, dtype)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g, w) < tol, (name, rel_err(g, w))
    # the dropout changed something (a mask that is all ones would pass the above with the wrong scale too)
    no_drop = reference_run(inputs, rank, 1.7, frozen, grad_out, 0.0, None, delta)
    assert rel_err(want[2], no_drop[2]) > 1e-3


@needs_ext
@pytest.mark.parametrize("layout", ["strided", "row-strided", "transposed"])
def test_dropout_with_strided_x(layout):
    """The mask is a function of the element's (m, k), not of its address: any x layout gives the same result."""
    from conftest import with_layout
    inputs = make_inputs((12, 20), 9, 5, True, "contiguous", torch.float64, "cpu", seed=3)
    strided = dict(inputs, x=with_layout(inputs["x"], layout))
    g = torch.randn(12, 9, dtype=torch.float64)
    want = run(inputs, 3, 2.0, False, "cpp", g, 0.3, 99)
    got = run(strided, 3, 2.0, False, "cpp", g, 0.3, 99)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("path", ["device_rank", "lean"])
def test_aten_paths_with_dropout(path):
    """The device-rank and lean compositions (what CUDA runs as "cublas"), run here on CPU tensors."""
    inputs = make_inputs((10, 14), 12, 6, True, "contiguous", torch.float64, "cpu", seed=4)
    x, W, bias, A, B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    rank = per_row_ranks(10, 6)
    seed = torch.tensor(77)
    fwd, bwd = getattr(_C, f"forward_{path}"), getattr(_C, f"backward_{path}")
    y, u = fwd(x, W, bias, None, A, B, rank, 1.5, True, 0.25, seed)
    g = torch.randn(10, 12, dtype=torch.float64)
    for frozen in (False, True):
        dx, dA, dB = bwd(g, x, W, A, B, u, rank, 1.5, frozen, True, True, 0.25, seed)
        want = reference_run(inputs, rank, 1.5, frozen, g, 0.25, 77)
        for name, a, w in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), want):
            assert rel_err(a, w) < 1e-12, (path, frozen, name)


@needs_ext
def test_gradcheck_with_a_fixed_seed():
    """Finite differences with a fixed mask: every input in full mode, x in frozen-prefix mode (A and B get DyLoRA's
    truncated gradient there on purpose)."""
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    W, bias = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    A = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for rank in (3, torch.tensor([1, 4, 2, 3, 4])):
        fn = lambda x, A, B: dylora_kernels.dylora_linear(x, W, bias, A, B, rank, 2.0, dropout_p=0.4, dropout_seed=5)
        assert torch.autograd.gradcheck(fn, (x, A, B))
        frozen = lambda x: dylora_kernels.dylora_linear(x, W, bias, A, B, rank, 2.0, frozen_prefix=True,
                                                        dropout_p=0.4, dropout_seed=5)
        assert torch.autograd.gradcheck(frozen, (x,))


# --------------------------------------------------------------------------------------------
# Contract: p = 0, determinism, statistics of the op, validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_p_zero_is_exactly_no_dropout(backend):
    device = device_of(backend)
    inputs = make_inputs((8, 16), 12, 4, True, "contiguous", torch.float32, device, seed=1)
    g = torch.randn(8, 12).to(device)
    plain = run(inputs, 2, 1.0, True, backend, g, 0.0, None)
    for seed in (None, 3):
        same = run(inputs, 2, 1.0, True, backend, g, 0.0, seed)
        for a, b in zip(plain, same):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fixed_seed_is_deterministic_and_seeds_differ(backend):
    device = device_of(backend)
    inputs = make_inputs((8, 16), 12, 4, False, "contiguous", torch.float32, device, seed=2)
    g = torch.randn(8, 12).to(device)
    first = run(inputs, 4, 1.0, False, backend, g, 0.5, 21)
    again = run(inputs, 4, 1.0, False, backend, g, 0.5, torch.tensor(21))
    other = run(inputs, 4, 1.0, False, backend, g, 0.5, 22)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)
    drawn = run(inputs, 4, 1.0, False, backend, g, 0.5, None)
    torch.manual_seed(5)
    redrawn = run(inputs, 4, 1.0, False, backend, g, 0.5, None)
    assert torch.equal(drawn[0], redrawn[0]) and torch.equal(drawn[2], redrawn[2])
    assert not torch.equal(drawn[0], run(inputs, 4, 1.0, False, backend, g, 0.5, None)[0])  # a new draw


@needs_ext
def test_mean_over_seeds_is_the_undropped_term():
    """dropout(x) is unbiased: the low-rank term averaged over many masks approaches the term without dropout (the
    1/(1 − p) scale is right), with the spread the keep rate predicts."""
    torch.manual_seed(0)
    x, A, B = torch.randn(4, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64), torch.randn(5, 3)
    B = B.double()
    exact = dylora_kernels.dylora_delta(x, A, B, 3, 3.0)
    n = 400
    mean = sum(dylora_kernels.dylora_delta(x, A, B, 3, 3.0, dropout_p=0.3, dropout_seed=s) for s in range(n)) / n
    assert rel_err(mean, exact) < 0.1  # the per-sample relative spread is ~sqrt(p/(1−p)/K·...) ≈ 0.6; /sqrt(400)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 1.5])
def test_bad_dropout_p_is_refused(p):
    x, A, B = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        dylora_kernels.dylora_delta(x, A, B, 1, 1.0, dropout_p=p)


@pytest.mark.parametrize("p,seed,error", [("0.1", None, TypeError), (True, None, TypeError),
                                          (0.1, 1.5, TypeError), (0.1, torch.tensor([1, 2]), TypeError),
                                          (0.1, torch.tensor(1.0), TypeError), (0.1, 2**64, ValueError)])
def test_bad_dropout_arguments_are_refused(p, seed, error):
    x, A, B = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(error, match="dropout"):
        dylora_kernels.dylora_delta(x, A, B, 1, 1.0, dropout_p=p, dropout_seed=seed)


def test_alpha_over_one_minus_p_must_stay_finite():
    x, A, B = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="not finite in float32"):
        dylora_kernels.dylora_delta(x, A, B, 1, 3e38, dropout_p=0.5)


# --------------------------------------------------------------------------------------------
# torch.library and torch.compile
# --------------------------------------------------------------------------------------------
@needs_ext
def test_opcheck_with_dropout():
    x, W = torch.randn(6, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    A = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(3)
    torch.library.opcheck(torch.ops.dylora.linear.default,
                          (x, W, None, None, A, B, torch.tensor(2), 1.0, True, "cpp", 0.2, seed))
    y, u = torch.ops.dylora.forward(x, W, None, None, A.detach(), B.detach(), torch.tensor(2), 1.0, True, "cpp", 0.2,
                                    seed)
    torch.library.opcheck(torch.ops.dylora.forward.default,
                          (x, W, None, None, A.detach(), B.detach(), torch.tensor(2), 1.0, True, "cpp", 0.2, seed))
    torch.library.opcheck(torch.ops.dylora.backward.default,
                          (torch.randn(6, 5, dtype=torch.float64), x, W, A.detach(), B.detach(), u, torch.tensor(2),
                           1.0, False, True, True, "cpp", 0.2, seed))


@needs_ext
def test_compiled_training_step_draws_a_new_mask_each_call():
    """torch.compile(fullgraph=True) of a DyLoRALinear with dropout: no graph break, a new seed drawn inside the graph
    on every call (outputs differ), and eval mode (no dropout) equals the eager layer."""
    torch.manual_seed(0)
    layer = dylora_kernels.DyLoRALinear(16, 12, 4, 8.0, dropout=0.25)
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16)
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)
    a.sum().backward()
    layer.eval()
    torch.testing.assert_close(compiled(x), dylora_kernels.dylora_linear(x, layer.weight, layer.bias, layer.lora_A,
                                                                         layer.lora_B, 4, 8.0))


# --------------------------------------------------------------------------------------------
# Modules and model helpers
# --------------------------------------------------------------------------------------------
def test_layer_dropout_only_in_training():
    torch.manual_seed(0)
    layer = dylora_kernels.DyLoRALinear(10, 6, 3, 4.0, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 10)
    plain = dylora_kernels.dylora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 3, 4.0)
    assert not torch.allclose(layer(x), plain)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    seed = torch.randint(1 << 62, (), dtype=torch.int64)  # what the layer drew
    torch.testing.assert_close(y, dylora_kernels.dylora_linear(x, layer.weight, layer.bias, layer.lora_A,
                                                               layer.lora_B, 3, 4.0, dropout_p=0.5, dropout_seed=seed))
    layer.eval()
    torch.testing.assert_close(layer(x), plain)
    assert "dropout=0.5" in repr(layer)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        dylora_kernels.DyLoRALinear(10, 6, 3, 4.0, dropout=1.0)


def test_inject_with_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    dylora_kernels.inject(model, ["0", "2"], r_max=4, alpha=4.0, dropout=0.1)
    assert all(m.dropout == 0.1 for m in model if isinstance(m, dylora_kernels.DyLoRALinear))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="linear layers only"):
        dylora_kernels.inject(conv, ["0"], r_max=2, alpha=1.0, dropout=0.1)


@needs_ext
def test_no_mask_and_no_dropped_copy_is_saved_for_backward():
    """What autograd keeps between forward and backward (saved_tensors_hooks): the fused op saves x, the adapters, u,
    the rank and the seed — no (M, K) mask and no dropout(x); dropout + op saves both (PEFT's lora_dropout path).
    Saving x itself keeps a reference to the layer's input (no new memory where the model keeps it anyway, as when
    q, k and v share it); the mask and dropout(x) are new tensors of x's size."""
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    W, A, B = torch.randn(40, 48), torch.randn(8, 48, requires_grad=True), torch.randn(40, 8, requires_grad=True)

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn().sum().backward()
        return kept

    fused = saved(lambda: dylora_kernels.dylora_linear(x, W, None, A, B, 4, 8.0, dropout_p=0.2))
    peer = saved(lambda: dylora_kernels.dylora_delta(torch.nn.functional.dropout(x, 0.2), A, B, 4, 8.0,
                                                     base=torch.nn.functional.linear(x, W)))
    x_sized = lambda ts: [t for t in ts if t.shape == x.shape]
    assert len(x_sized(fused)) == 1 and x_sized(fused)[0] is x  # x itself, nothing derived from it
    assert len(x_sized(peer)) >= 2  # dropout's mask (bool on CUDA, x's dtype on CPU) and dropout(x)
    assert all(t is not x for t in x_sized(peer))  # both new tensors
