"""What a differential fuzz found, each as a test that failed before the fix: non-finite values in
unused slots, fp16 overflow of the scale, invalid device ranks; and a seeded randomized differential
test over shapes, strides, rank forms and dtypes against the float64 reference.

Backends: every one this machine runs (conftest.BACKENDS: C++; Triton on CUDA or in the interpreter),
the reference itself, and the ATen composition's device-rank path (what the "cublas" backend runs
for a rank tensor on the GPU) called on CPU tensors through dylora_kernels._C.
"""
import itertools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dylora_kernels
from dylora_kernels import reference
from conftest import (BACKENDS, HAS_EXTENSION, HAS_TRITON, LAYOUTS, device_of, make_inputs, per_row_ranks,
                      reference_run, rel_err, run, tolerance, trained_slots, with_layout)

_C = dylora_kernels.ops._C

ALPHA = 3.0
FUZZ_CASES = int(os.environ.get("DYLORA_FUZZ_CASES", "300"))


def composition_path(forward, backward):
    """y, dx, dA, dB from one of the ATen composition's device-rank paths (the rank never read on the host): the
    ATen-ops one ("aten-device-rank": CUDA tensors in a CPU build) or the lean one ("lean": the prep kernel of the
    GPU build; its CPU loop here)."""
    def path(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, grad):
        y, u = forward(x, weight, bias, None, lora_A, lora_B, rank, alpha, True)
        dx, dA, dB = backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, True, True)
        return y, dx, dA, dB
    return path


DEVICE_RANK_PATHS = {} if not HAS_EXTENSION else {
    "aten-device-rank": composition_path(_C.forward_device_rank, _C.backward_device_rank),
    "lean": composition_path(_C.forward_lean, _C.backward_lean)}


def public_api(backend):
    """y, dx, dA, dB through dylora_linear with ``backend`` (conftest.run), in composition_path's signature."""
    def call(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, grad):
        inputs = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
        return run(inputs, rank, alpha, frozen_prefix, backend, grad)
    return call


PATHS = {name: public_api(name) for name in BACKENDS} | {"reference": public_api("reference")} | DEVICE_RANK_PATHS


def path_params(dtypes=(torch.float32,)):
    params = []
    for name in PATHS:
        device = "cpu" if name == "reference" or name in DEVICE_RANK_PATHS else device_of(name)
        for dtype in dtypes:
            if name in BACKENDS and dtype not in BACKENDS[name][1]:
                continue
            params.append(pytest.param(name, device, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}"))
    return params


@pytest.mark.parametrize("name,device,dtype", path_params())
@pytest.mark.parametrize("rank_kind", ["int", "0-d", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_unused_slots_never_reach_outputs(name, device, dtype, rank_kind, frozen_prefix, poison):
    """NaN/Inf in A[b:] and B[:, b:] (b the largest rank in use) change nothing: y, dx, dA and dB equal
    those of clean adapters, and the gradient of every untrained slot is exactly zero."""
    if rank_kind == "int" and name in DEVICE_RANK_PATHS:
        pytest.skip("the device-rank path takes rank tensors")
    M, K, N, r_max = 21, 18, 15, 9
    inputs = make_inputs((M, K), N, r_max, True, "contiguous", dtype, device)
    rank = {"int": 4, "0-d": torch.tensor(6, device=device),
            "per-row": per_row_ranks(M, 7).to(device)}[rank_kind]
    b_max = int(torch.as_tensor(rank).max())
    poisoned = dict(inputs)
    poisoned["lora_A"] = inputs["lora_A"].clone()
    poisoned["lora_B"] = inputs["lora_B"].clone()
    poisoned["lora_A"][b_max:] = poison
    poisoned["lora_B"][:, b_max:] = poison
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ours = PATHS[name](*(poisoned[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), rank, ALPHA,
                       frozen_prefix, grad)
    expected = reference_run(inputs, rank, ALPHA, frozen_prefix, grad)
    tol = tolerance(name if name in BACKENDS else "cpp", dtype)
    for what, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
        assert torch.isfinite(out).all(), f"{what}: a non-finite value from an unused slot leaked through"
        assert rel_err(out.cpu(), ref) <= tol, what
    assert (ours[2][b_max:] == 0).all() and (ours[3][:, b_max:] == 0).all()


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
def test_the_reported_case():
    """r_max = 2, rank 1, A = [[1], [nan]], B = [[1, nan]], x = W = [[1]]: y = 1 + 1·1 = 2, per-row too."""
    x = W = torch.ones(1, 1)
    A, B = torch.tensor([[1.0], [float("nan")]]), torch.tensor([[1.0, float("nan")]])
    for backend in ("cpp", "reference"):
        for rank in (1, torch.tensor(1), torch.tensor([1])):
            y = dylora_kernels.dylora_linear(x, W, None, A, B, rank, 1.0, backend=backend)
            assert y.item() == 2.0, (backend, rank)


@pytest.mark.parametrize("name,device,dtype", [p for p in path_params((torch.float16,))])
@pytest.mark.parametrize("rank_kind", ["0-d", "per-row"])
def test_no_fp16_overflow_from_the_scale(name, device, dtype, rank_kind):
    """x = W = A = [[1]], B = [[1e-3]], alpha = 1e5 in fp16: y = 1 + 1e5·1e-3 = 101 exactly in the
    formula (scale applied last); scaling u by alpha/b before an fp16 product would give inf. With
    g = 1e-3 every gradient is finite too (dx = 0.101, dA = 0.1, dB = 100), where scaling u or v
    before a product would overflow."""
    x = W = A = torch.ones(1, 1, device=device, dtype=dtype)
    B = torch.full((1, 1), 1e-3, device=device, dtype=dtype)
    rank = torch.tensor(1, device=device) if rank_kind == "0-d" else torch.tensor([1], device=device)
    grad = torch.full((1, 1), 1e-3, device=device, dtype=dtype)
    y, dx, dA, dB = PATHS[name](x, W, None, A, B, rank, 1e5, False, grad)
    assert abs(y.item() - 101.0) < 0.2, y.item()
    for what, g, expected in (("dx", dx, 0.101), ("dA", dA, 0.1), ("dB", dB, 100.0)):
        assert torch.isfinite(g).all() and abs(g.item() / expected - 1) < 2e-2, (what, g.item())


def large_alpha_case(M, K, N, r_max, dtype, alpha, seed=0):
    """Random inputs with B scaled by 1/alpha (every exact output finite) and a gradient large enough that
    alpha·g alone overflows float16."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    t = dict(x=rnd(M, K), weight=rnd(N, K) / K**0.5, bias=rnd(N), lora_A=rnd(r_max, K) / (4 * K**0.5),
             lora_B=rnd(N, r_max) / alpha)
    grad = rnd(M, N)
    grad *= 1.5 * torch.finfo(torch.float16).max / alpha / grad.abs().max()  # alpha·max|g| = 1.5 × fp16's max
    return {k: v.to(dtype) for k, v in t.items()}, grad.to(dtype)


@pytest.mark.parametrize("name,device,dtype", path_params((torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("shape,rank_kind", [((2, 17, 7, 7), "per-row uint8 sorted"), ((1, 1, 7, 7), "one rank"),
                                             ((2, 17, 7, 7), "one rank")], ids=["per-row", "M=K=1", "one-rank"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_large_alpha_in_16_bits(name, device, dtype, shape, rank_kind, frozen_prefix):
    """Issue #22: alpha = 3e4 with B scaled by 1/alpha and a gradient with alpha·g beyond fp16's range: y, dx, dA
    and dB are finite and match float64 wherever the exact value fits (the reference used to multiply g by alpha
    in fp16 before its backward products)."""
    M, K, N, r_max = shape
    alpha = 3e4
    t, grad = large_alpha_case(M, K, N, r_max, dtype, alpha)
    rank = per_row_ranks(M, r_max, sorted_=True).to(torch.uint8) if rank_kind.startswith("per-row") else 1
    rank = rank.to(device) if isinstance(rank, torch.Tensor) else torch.tensor(rank, device=device)
    assert (alpha * grad.double()).abs().max() > torch.finfo(torch.float16).max  # what the old ordering overflowed
    expected = reference_run(t, rank, alpha, frozen_prefix, grad)
    t = {k: v.to(device) for k, v in t.items()}
    ours = PATHS[name](t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank, alpha, frozen_prefix,
                       grad.to(device))
    tol = tolerance(name if name in BACKENDS else "cpp", dtype)
    for what, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
        fits = ref.abs() < torch.finfo(dtype).max / 2
        assert fits.any() and torch.isfinite(out.cpu()[fits]).all(), (what, out)
        assert rel_err(torch.where(fits, out.cpu(), 0), torch.where(fits, ref, 0)) <= tol, what


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_cpu_rank_tensors_are_checked_on_every_backend(backend):
    """A CPU rank tensor out of [1, r_max] raises the documented ValueError, and an int rank out of range the host
    check's, whatever the backend (the Triton interpreter used to give NaN rows), before anything is computed."""
    if backend not in BACKENDS and backend != "reference":
        pytest.skip(f"no {backend} backend on this machine")
    if device_of(backend if backend in BACKENDS else "cpp") != "cpu":
        pytest.skip("CPU tensors")
    M, K, N, r_max = 6, 16, 8, 4
    t = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, "cpu")
    call = lambda rank: dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank,
                                                     2.0, backend=backend)
    assert call(torch.tensor([1, 2, 3, 4, 4, 1])).shape == (M, N)
    bad = [torch.tensor([1, 2, 0, 4, 4, 1]), torch.tensor([1, 2, 3, 5, 4, 1]), torch.tensor([1, 2, 3, 4, 255, 1],
           dtype=torch.uint8), torch.tensor([1, -1, 3, 4, 4, 1], dtype=torch.int8), torch.tensor(5), torch.tensor(0),
           torch.tensor([1, 2, 3, 4, 2**32 + 1, 1])]
    for rank in bad:
        with pytest.raises(ValueError, match=r"rank values must be in \[1, r_max\] = \[1, 4\], got"):
            call(rank)
    for rank in (0, r_max + 1):
        with pytest.raises(ValueError, match=r"rank must be in \[1, r_max\] = \[1, 4\], got"):
            call(rank)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_3d_input_that_no_view_flattens(backend):
    """A 3-D x whose rows cannot be flattened by a view (the two leading dimensions swapped): the op flattens it
    (a copy), y and dx come back in x's shape and match float64."""
    if backend != "reference" and (backend not in BACKENDS or device_of(backend) != "cpu"):
        pytest.skip(f"no {backend} backend on CPU here")
    t = make_inputs((5, 3, 24), 20, 6, True, "contiguous", torch.float32, "cpu")
    t["x"] = t["x"].transpose(0, 1)  # (3, 5, 24): x.view(-1, 24) raises
    with pytest.raises(RuntimeError):
        t["x"].view(-1, 24)
    grad = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(1))
    for rank in (4, per_row_ranks(15, 6)):
        ours = run(t, rank, 2.0, False, backend, grad)
        expected = reference_run(t, rank, 2.0, False, grad)
        for what, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
            assert out.shape == ref.shape and rel_err(out, ref) <= tolerance(backend, torch.float32), what


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["aten-device-rank", "lean"])
def test_device_rank_path_selects_slots(dtype, path):
    """The ATen composition with the rank on the device (what "cublas" runs; here on CPU tensors): u comes back
    exactly zero beyond each row's rank, and a backward given a u with NaN there (and NaN in A and B beyond the
    largest rank) still matches float64 with exact zeros outside the trained slots: the masks select (where),
    never multiply (0·NaN = NaN)."""
    M, K, N, r_max = 19, 12, 9, 8
    t = make_inputs((M, K), N, r_max, True, "contiguous", dtype, "cpu")
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    for rank in (torch.tensor(3), per_row_ranks(M, 6)):
        top = int(rank.max())
        A, B = t["lora_A"].clone(), t["lora_B"].clone()
        A[top:], B[:, top:] = float("nan"), float("nan")
        used = torch.arange(r_max) < rank.reshape(-1, 1)
        forward, backward = ((_C.forward_device_rank, _C.backward_device_rank) if path == "aten-device-rank"
                             else (_C.forward_lean, _C.backward_lean))
        y, u = forward(t["x"], t["weight"], t["bias"], None, A, B, rank, ALPHA, True)
        assert torch.equal(u[~used.expand_as(u)], torch.zeros_like(u[~used.expand_as(u)]))
        poisoned_u = torch.where(used, u, float("nan"))
        for frozen_prefix in (False, True):
            dx, dA, dB = backward(grad, t["x"], t["weight"], A, B, poisoned_u, rank, ALPHA, frozen_prefix, True, True)
            expected = reference_run(t, rank, ALPHA, frozen_prefix, grad)
            for what, out, ref in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), expected):
                assert torch.isfinite(out).all() and rel_err(out, ref) <= tolerance("cpp", dtype), (what, rank)
            trained = trained_slots(rank, r_max, M, frozen_prefix)
            assert (dA[~trained] == 0).all() and (dB[:, ~trained] == 0).all()


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
@pytest.mark.parametrize("path", ["aten-device-rank", "lean"])
def test_invalid_device_ranks_poison_their_rows(path):
    """A rank tensor on the device is never read on the host: rows whose rank is outside [1, r_max]
    come out NaN (y, dx, and the gradients they feed), never garbage; the other rows are exact."""
    M, K, N, r_max = 6, 8, 5, 4
    t = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, "cpu")
    rank = torch.tensor([1, 0, 4, 5, 2, -3])
    bad = torch.tensor([False, True, False, True, False, True])
    grad = torch.randn(M, N)
    device_rank_path = DEVICE_RANK_PATHS[path]
    y, dx, dA, dB = device_rank_path(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank, ALPHA, False, grad)
    assert torch.isnan(y[bad]).all() and torch.isnan(dx[bad]).all()
    assert torch.isnan(dA).any() and torch.isnan(dB).any()
    good = ~bad
    ref = reference.dylora_linear(t["x"][good].double(), t["weight"].double(), t["bias"].double(),
                                  t["lora_A"].double(), t["lora_B"].double(), rank[good], ALPHA)
    assert rel_err(y[good], ref) <= 1e-5
    for r in (0, 5):  # one shared rank out of range: everything NaN
        y, dx, dA, dB = device_rank_path(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], torch.tensor(r),
                                         ALPHA, True, grad)
        assert torch.isnan(y).all() and torch.isnan(dx).all() and torch.isnan(dA).any() and torch.isnan(dB).any()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_invalid_ranks_poison_triton_rows():
    """The Triton kernels read the rank on the device too: the same rule, folded into the kernels."""
    from dylora_kernels import triton as tk

    device = device_of("triton")
    M, K, N, r_max = 6, 16, 8, 4
    t = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, device)
    rank = torch.tensor([1, 0, 4, 5, 2, -3], device=device)
    bad = torch.tensor([False, True, False, True, False, True])
    y, u = tk.forward(t["x"], t["weight"], t["bias"], None, t["lora_A"], t["lora_B"], rank, ALPHA, True)
    grad = torch.randn(M, N, device=device)
    dx, dA, dB = tk.backward(grad, t["x"], t["weight"], t["lora_A"], t["lora_B"], u, rank, ALPHA, False, True, True)
    y, dx = y.cpu(), dx.cpu()
    assert torch.isnan(y[bad]).all() and torch.isnan(dx[bad]).all() and torch.isfinite(y[~bad]).all()
    assert torch.isnan(dA).any() and torch.isnan(dB).any()


# --------------------------------------------------------------------------------------------
# 16-bit CPU GEMM operands: packed before they reach torch's GEMM (issue #22)
# --------------------------------------------------------------------------------------------
class GemmOperands(TorchDispatchMode):
    """Records the two factors of every ATen GEMM (mm, addmm, addmm_, addmm.out) dispatched while active. The C++
    kernels call ATen through the dispatcher, so this sees what reaches torch's CPU GEMM; ops that run other ops
    inside (dylora::forward) are seen as one call, so the C++ composition is entered through _C."""

    FACTORS = {torch.ops.aten.mm: slice(0, 2), torch.ops.aten.addmm: slice(1, 3), torch.ops.aten.addmm_: slice(1, 3)}

    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FACTORS:
            self.operands += args[self.FACTORS[func.overloadpacket]]
        return func(*args, **(kwargs or {}))


def packed(t):
    return t.is_contiguous() or t.t().is_contiguous()


def nan_padded(t, layout):
    """t as a view of a NaN-filled buffer: "row-step-2", "row-step-3", "column-padded" (the issue's views)."""
    return with_layout(t, "column-padded") if layout == "column-padded" else with_layout(t, "row-strided", int(layout[-1]))


VIEWS = ["row-step-2", "row-step-3", "column-padded"]


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
@pytest.mark.parametrize("layout", VIEWS)
def test_bf16_views_of_nan_buffers(layout):
    """Issue #22's case: M = 26, K = 11, N = 16, bf16, x every other (or third) row of a buffer whose skipped rows
    hold NaN, or rows padded with NaN; the gradient of y and the weight in the same kind of view. torch 2.13's CPU
    bf16 GEMM gives NaN for such an x on some CPUs (plain F.linear); here y, dx, dA and dB are finite and match
    float64 through the function (one rank, per-row ranks, both modes) and the module."""
    M, K, N, r_max, alpha = 26, 11, 16, 8, 3.0
    t = make_inputs((M, K), N, r_max, True, "contiguous", torch.bfloat16, "cpu")
    t = dict(t, x=nan_padded(t["x"], layout), weight=with_layout(t["weight"], "column-padded"))
    grad = nan_padded(torch.randn(M, N, generator=torch.Generator().manual_seed(1)).bfloat16(), layout)
    whole_buffer = lambda v: torch.empty(0, dtype=v.dtype).set_(v.untyped_storage())
    for v in (t["x"], grad, t["weight"]):  # views that skip NaN
        assert not v.is_contiguous() and torch.isnan(whole_buffer(v)).any() and torch.isfinite(v).all()
    for rank, frozen_prefix in ((5, False), (per_row_ranks(M, r_max), True), (per_row_ranks(M, r_max), False)):
        expected = reference_run(t, rank, alpha, frozen_prefix, grad)
        for what, out, ref in zip(("y", "dx", "dA", "dB"), run(t, rank, alpha, frozen_prefix, "cpp", grad), expected):
            assert torch.isfinite(out).all() and rel_err(out, ref) <= tolerance("cpp", torch.bfloat16), (what, rank)
    layer = dylora_kernels.DyLoRALinear(K, N, r_max, alpha).to(torch.bfloat16)
    with torch.no_grad():
        for name in ("weight", "bias", "lora_A", "lora_B"):
            getattr(layer, name).copy_(t[name])
    layer.set_rank(per_row_ranks(M, r_max, seed=3))
    x = t["x"].detach().requires_grad_(True)
    layer(x).backward(grad)
    expected = reference_run(t, layer.rank_tensor.clone(), alpha, True, grad)
    for what, out, ref in zip(("dx", "dA", "dB"), (x.grad, layer.lora_A.grad, layer.lora_B.grad), expected[1:]):
        assert torch.isfinite(out).all() and rel_err(out, ref) <= tolerance("cpp", torch.bfloat16), what


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the C++ extension")
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_16bit_gemm_operands_are_packed(adapter_dtype):
    """The guard itself, whatever this CPU's GEMM does: every 16-bit operand the C++ composition hands to torch's
    CPU GEMM (forward, backward, one rank with b < r_max so B[:, :b] is a column slice, per-row ranks, both modes;
    the dW GEMM of an unfrozen base) is row- or column-major packed, for x, the gradient and the weight in every
    view above; a packed bf16 x (row- or column-major) and an fp32 x in any view reach the GEMM uncopied."""
    M, K, N, r_max, alpha = 26, 11, 16, 8, 3.0
    base = make_inputs((M, K), N, r_max, True, "contiguous", torch.bfloat16, "cpu")
    base["lora_A"], base["lora_B"] = base["lora_A"].to(adapter_dtype), base["lora_B"].to(adapter_dtype)
    g0 = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).bfloat16()
    for layout, dtype in itertools.product([*VIEWS, "strided", "contiguous", "transposed"],
                                           (torch.bfloat16, torch.float32)):
        t = {k: None if v is None else v.to(dtype if k in ("x", "weight", "bias") else v.dtype) for k, v in base.items()}
        view = (lambda v: nan_padded(v, layout)) if layout in VIEWS else (lambda v: with_layout(v, layout))
        x, grad, W = view(t["x"]), view(g0.to(dtype)), with_layout(t["weight"], "column-padded")
        for rank, frozen_prefix in itertools.product((torch.tensor(5), per_row_ranks(M, r_max)), (False, True)):
            with GemmOperands() as spy:
                y, u = _C.forward(x, W, t["bias"], None, t["lora_A"], t["lora_B"], rank, alpha, True)
                _C.backward(grad, x, W, t["lora_A"], t["lora_B"], u, rank, alpha, frozen_prefix, True, True)
            assert spy.operands and all(packed(o) for o in spy.operands if o.dtype == torch.bfloat16), layout
            if dtype == torch.float32 or packed(x):  # nothing copied where nothing needs it
                assert any(o.data_ptr() == x.data_ptr() and o.stride() == x.stride() for o in spy.operands), layout
        x, W = x.detach().requires_grad_(True), W.detach().requires_grad_(True)
        y = dylora_kernels.dylora_linear(x, W, t["bias"], t["lora_A"], t["lora_B"], 5, alpha, backend="cpp")
        with GemmOperands() as spy:
            y.backward(grad)  # dW = gᵀ·x in the autograd kernel
        assert spy.operands and all(packed(o) for o in spy.operands if o.dtype == torch.bfloat16), layout
        assert rel_err(W.grad, grad.double().t() @ x.detach().double()) <= tolerance("cpp", dtype)


# --------------------------------------------------------------------------------------------
# Seeded randomized differential test
# --------------------------------------------------------------------------------------------
# alpha near each dtype's largest value (x dtype; float32 bounds alpha itself for 16-bit inputs), drawn with B scaled
# by 1/alpha so the low-rank term stays representable: only an ordering that overflows where the result does not
# fails (alpha·g in fp16, issue #22).
ALPHA_NEAR_LIMIT = {torch.float16: 3e4, torch.bfloat16: 1e36, torch.float32: 1e36, torch.float64: 1e300}


def random_case(rng: torch.Generator, dtypes, forced=None):
    """A random case; ``forced`` = (layout, dtype, near_limit) fixes those and draws M, K >= 2 (a really strided x)."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]
    size = lambda low: int(torch.randint(low, 40, (1,), generator=rng))
    if forced is None:
        M, K = pick([0, 1, size(1), size(1)]), pick([0, size(1), size(1), size(1)])
    else:
        M, K = size(2), size(2)
    N = size(1)
    r_max = int(torch.randint(1, 13, (1,), generator=rng))
    lead = pick([(M,), (1, M), (2, M // 2 + 1)])
    layout = pick([layout for layout in LAYOUTS if layout != "transposed" or len(lead) == 1])
    rank_kind = pick(["int", "0-d", "per-row", "int8", "uint8"])
    dtype = pick(dtypes)
    alpha = pick([0.0, 0.5, 16.0, 1e4, ALPHA_NEAR_LIMIT[dtype]])
    if forced is not None:
        layout, dtype, near_limit = forced
        lead = (M,) if layout == "transposed" else lead
        alpha = ALPHA_NEAR_LIMIT[dtype] if near_limit else pick([0.5, 16.0])
    return dict(lead=lead, K=K, N=N, r_max=r_max, layout=layout, rank_kind=rank_kind,
                bias=bool(pick([0, 1])), frozen_prefix=bool(pick([0, 1])), dtype=dtype, alpha=float(alpha),
                seed=int(torch.randint(1 << 30, (1,), generator=rng)))


def make_case(case, device):
    """The case's inputs in its dtype on ``device``, x in its layout (conftest.with_layout: the memory the view
    skips is NaN), a gradient of y in the same layout, and the rank."""
    g = torch.Generator().manual_seed(case["seed"])
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    shape, K, N, r_max = (*case["lead"], case["K"]), case["K"], case["N"], case["r_max"]
    rows = int(torch.tensor(case["lead"]).prod())
    near_limit = case["alpha"] == ALPHA_NEAR_LIMIT[case["dtype"]]
    tensors = dict(x=rnd(*shape), weight=rnd(N, K) / max(K, 1) ** 0.5, bias=rnd(N) if case["bias"] else None,
                   lora_A=rnd(r_max, K) / max(K, 1) ** 0.5,
                   lora_B=rnd(N, r_max) / (case["alpha"] if near_limit else 1.0),
                   grad=rnd(*case["lead"], N))
    kind = case["rank_kind"]
    b = int(torch.randint(1, r_max + 1, (1,), generator=g))
    if kind == "int":
        rank = b
    elif kind == "per-row":
        rank = torch.randint(1, r_max + 1, (rows,), generator=g)
    else:
        rank = torch.tensor(b, dtype={"0-d": torch.int64, "int8": torch.int8, "uint8": torch.uint8}[kind])
    moved = {k: None if v is None else v.to(device, case["dtype"]) for k, v in tensors.items()}
    grad = with_layout(moved.pop("grad"), case["layout"])
    moved["x"] = with_layout(moved["x"], case["layout"])
    if isinstance(rank, torch.Tensor):
        rank = rank.to(device)
    return moved, rank, rows, grad


FUZZ_BACKENDS = {**{name: spec for name, spec in BACKENDS.items()},
                 "reference": ("cpu", (torch.float32, torch.float64, torch.bfloat16, torch.float16))}


@pytest.mark.parametrize("backend", list(FUZZ_BACKENDS))
def test_randomized_differential(backend):
    """FUZZ_CASES seeded random cases (DYLORA_FUZZ_CASES to change; CI runs 300 on C++, 60 in the Triton
    interpreter and 60 on the reference): shapes from 0 to 39 (empty batches and K = 0 included), 2-D and 3-D
    inputs, x and the gradient of y contiguous / column-strided / row-strided / column-padded / column-major (views
    of NaN-filled buffers), bias or not, ranks as int / 0-d / per-row / int8 / uint8, both modes, alpha from 0 to
    near the dtype's limit (B scaled by 1/alpha there), every dtype the backend has. y, dx, dA, dB against float64;
    untrained slots exactly 0. The first cases walk every layout × dtype with M, K >= 2 (every other one with alpha
    near the dtype's limit), so the draw covers them whatever the seed; the rest are drawn freely."""
    device, dtypes = FUZZ_BACKENDS[backend]
    rng = torch.Generator().manual_seed(20261206)
    cases = FUZZ_CASES if backend == "cpp" or device == "cuda" else max(FUZZ_CASES // 5, 10)  # interpreter: slow
    walk = [(layout, dtype, j % 2 == 1) for j, (dtype, layout) in enumerate(itertools.product(dtypes, LAYOUTS))]
    for i in range(cases):
        case = random_case(rng, dtypes, walk[i] if i < len(walk) else None)
        inputs, rank, rows, grad = make_case(case, device)
        ours = run(inputs, rank, case["alpha"], case["frozen_prefix"], backend, grad)
        expected = reference_run(inputs, rank, case["alpha"], case["frozen_prefix"], grad)
        ref_rank = rank.cpu() if isinstance(rank, torch.Tensor) else rank
        tol = tolerance(backend, case["dtype"])
        for what, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
            if ref.numel() and ref.abs().max() >= torch.finfo(case["dtype"]).max / 2:
                continue  # the exact value does not fit the dtype (dB = alpha·gᵀu with a large alpha): inf is right
            assert out.shape == ref.shape and torch.isfinite(out).all(), (i, case, what)
            if ref.numel() and ref.abs().max() > 0:
                assert rel_err(out.cpu(), ref) <= tol, (i, case, what, rel_err(out.cpu(), ref))
            else:
                assert (out == 0).all(), (i, case, what)
        r_max = case["r_max"]
        b = torch.as_tensor(ref_rank).reshape(-1).long().expand(rows) if rows else torch.zeros(0, dtype=torch.long)
        slots = torch.arange(r_max)
        trained = ((slots == b[:, None] - 1) if case["frozen_prefix"] else (slots < b[:, None])).any(0)
        assert (ours[2].cpu()[~trained] == 0).all() and (ours[3].cpu()[:, ~trained] == 0).all(), (i, case)


def test_reference_per_row_rank_with_k_zero():
    """K = 0 with one rank per row: y = bias (the reference used to fail in x.reshape(-1, 0))."""
    x, W, bias = torch.randn(2, 3, 0), torch.randn(4, 0), torch.randn(4)
    A, B = torch.randn(2, 0), torch.randn(4, 2)
    y = reference.dylora_linear(x, W, bias, A, B, torch.tensor([1, 2, 2, 1, 1, 2]), 2.0)
    assert torch.equal(y, bias.expand(2, 3, 4))
