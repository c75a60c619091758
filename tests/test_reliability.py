"""What a differential fuzz found, each as a test that failed before the fix: non-finite values in
unused slots, fp16 overflow of the scale, invalid device ranks; and a seeded randomized differential
test over shapes, strides, rank forms and dtypes against the float64 reference.

Backends: every one this machine runs (conftest.BACKENDS: C++; Triton on CUDA or in the interpreter),
the reference itself, and the ATen composition's device-rank path (what the "cublas" backend runs
for a rank tensor on the GPU) called on CPU tensors through dylora_kernels._C.
"""
import os

import pytest
import torch

import dylora_kernels
from dylora_kernels import reference
from conftest import (BACKENDS, HAS_EXTENSION, HAS_TRITON, device_of, make_inputs, per_row_ranks, reference_run,
                      rel_err, run, tolerance)

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
# Seeded randomized differential test
# --------------------------------------------------------------------------------------------
def random_case(rng: torch.Generator, dtypes):
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]
    size = lambda low: int(torch.randint(low, 40, (1,), generator=rng))
    M, K, N = pick([0, 1, size(1), size(1)]), pick([0, size(1), size(1), size(1)]), size(1)
    r_max = int(torch.randint(1, 13, (1,), generator=rng))
    lead = pick([(M,), (1, M), (2, M // 2 + 1)])
    layout = pick(["contiguous", "strided", "transposed" if len(lead) == 1 else "contiguous"])
    rank_kind = pick(["int", "0-d", "per-row", "int8", "uint8"])
    return dict(lead=lead, K=K, N=N, r_max=r_max, layout=layout, rank_kind=rank_kind,
                bias=bool(pick([0, 1])), frozen_prefix=bool(pick([0, 1])), dtype=pick(dtypes),
                alpha=float(pick([0.0, 0.5, 16.0, 1e4])), seed=int(torch.randint(1 << 30, (1,), generator=rng)))


def make_case(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    shape, K, N, r_max = (*case["lead"], case["K"]), case["K"], case["N"], case["r_max"]
    rows = int(torch.tensor(case["lead"]).prod())
    x = torch.randn(*shape, generator=g)
    if case["layout"] == "strided":
        x = torch.randn(*shape[:-1], 2 * K, generator=g)[..., ::2]
    elif case["layout"] == "transposed":
        x = x.t().contiguous().t()
    tensors = dict(x=x, weight=torch.randn(N, K, generator=g) / max(K, 1) ** 0.5,
                   bias=torch.randn(N, generator=g) if case["bias"] else None,
                   lora_A=torch.randn(r_max, K, generator=g) / max(K, 1) ** 0.5, lora_B=torch.randn(N, r_max, generator=g))
    kind = case["rank_kind"]
    b = int(torch.randint(1, r_max + 1, (1,), generator=g))
    if kind == "int":
        rank = b
    elif kind == "per-row":
        rank = torch.randint(1, r_max + 1, (rows,), generator=g)
    else:
        rank = torch.tensor(b, dtype={"0-d": torch.int64, "int8": torch.int8, "uint8": torch.uint8}[kind])
    moved = {k: None if v is None else v.to(device, case["dtype"]) for k, v in tensors.items()}
    if isinstance(rank, torch.Tensor):
        rank = rank.to(device)
    return moved, rank, rows


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_randomized_differential(backend):
    """FUZZ_CASES seeded random cases (DYLORA_FUZZ_CASES to change; CI runs 300 on C++ and 60 in the Triton
    interpreter): shapes from 0 to 39 (empty batches and K = 0 included), 2-D and 3-D inputs, contiguous /
    strided / column-major x, bias or not, ranks as int / 0-d / per-row / int8 / uint8, both modes, alpha
    from 0 to 1e4, every dtype the backend has. y, dx, dA, dB against float64; untrained slots exactly 0."""
    device, dtypes = BACKENDS[backend]
    rng = torch.Generator().manual_seed(20261128)
    cases = FUZZ_CASES if backend == "cpp" or device == "cuda" else max(FUZZ_CASES // 5, 10)  # the interpreter is slow
    for i in range(cases):
        case = random_case(rng, dtypes)
        inputs, rank, rows = make_case(case, device)
        out_shape = (*case["lead"], case["N"])
        grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(i)).to(device, case["dtype"])
        ours = run(inputs, rank, case["alpha"], case["frozen_prefix"], backend, grad)
        expected = reference_run(inputs, rank, case["alpha"], case["frozen_prefix"], grad)
        ref_rank = rank.cpu() if isinstance(rank, torch.Tensor) else rank
        tol = tolerance(backend, case["dtype"])
        for what, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
            if ref.numel() and ref.abs().max() >= torch.finfo(case["dtype"]).max / 2:
                continue  # the exact value does not fit the dtype (fp16 with alpha = 1e4): inf is right
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
