"""The Triton backend tested directly through its kernel contract (dylora_kernels.triton.forward/backward/variants);
the shared suite in test_ops.py also runs the ops against backend="triton".

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16 only (the
interpreter's bf16 tl.dot is wrong), small shapes, and every variant, the TMA one included (triton 3.6's
interpreter executes tensor descriptors). The offline sm_90a compilation check runs in a subprocess. GPU checks
(no recompilation over ranks, CUDA-graph replay, large shapes in every dtype and variant) skip cleanly.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dylora_kernels
from conftest import CUDA, HAS_TRITON, per_row_ranks, reference_run, rel_err, tolerance, with_layout

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1"),
              # triton 3.6's interpreter turns 1-element arrays into loop bounds with int(): numpy warns
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if CUDA else "cpu"
ALPHA = 3.0


def backend():
    import dylora_kernels.triton as T  # imported lazily: triton only once a test runs
    return T


# --------------------------------------------------------------------------------------------
# Inputs and the float64 formula
# --------------------------------------------------------------------------------------------
def make(M, K, N, R, dtype=torch.float32, adapter_dtype=None, bias=True, base=False, weight=True, seed=0,
         device=DEVICE):
    """Random operands (B is never LoRA's zeros) and a gradient of y; scaled so that y, dx, dA, dB are O(1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    t = dict(x=rnd(M, K), weight=rnd(N, K) / K**0.5 if weight else None, bias=rnd(N) if bias else None,
             base=rnd(M, N) if base else None, lora_A=rnd(R, K) / K**0.5, lora_B=rnd(N, R), grad=rnd(M, N))
    adapter_dtype = adapter_dtype or dtype
    return {k: None if v is None else v.to(device, adapter_dtype if k.startswith("lora") else dtype)
            for k, v in t.items()}


def rank_of(kind, M, R, device=DEVICE):
    """A 0-d rank (an int kind) or per-row ranks with 1 and R present ("per_row")."""
    if kind == "per_row":
        return per_row_ranks(M, R).to(device)
    return torch.tensor(kind, device=device)


def expected(t, rank, alpha, frozen_prefix):
    """y, u, dx, dA, dB in float64 on the CPU, from the formula (base, weight=None and mixed dtypes included)."""
    d = {k: None if v is None else v.detach().cpu().double() for k, v in t.items()}
    x, W, A, B, g = d["x"], d["weight"], d["lora_A"], d["lora_B"], d["grad"]
    M, R = x.shape[0], A.shape[0]
    b = rank.cpu().long().reshape(-1).expand(M)
    slots = torch.arange(R)
    used = (slots[None, :] < b[:, None]).double()
    trained = (slots[None, :] == b[:, None] - 1).double() if frozen_prefix else used
    s = alpha / b.double()[:, None]
    u = (x @ A.t()) * used
    y = (s * u) @ B.t()
    v = (g @ B) * used
    dx = (s * v) @ A
    if W is not None:
        y, dx = y + x @ W.t(), dx + g @ W
    for extra in ("bias", "base"):
        if d[extra] is not None:
            y = y + d[extra]
    dA = (s * v * trained).t() @ x
    dB = g.t() @ (s * u * trained)
    return y, u, dx, dA, dB


def run(t, rank, frozen_prefix, variant="pointer", bwd_variant=None, alpha=ALPHA):
    """y, u, dx, dA, dB from the backend's forward and backward."""
    T = backend()
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    y, u = T.forward(x, W, t["bias"], t["base"], A, B, rank, alpha, True, variant)
    dx, dA, dB = T.backward(t["grad"], x, W, A, B, u, rank, alpha, frozen_prefix, True, True,
                            bwd_variant or ("tma" if variant == "tma" else "pointer"))
    return y, u, dx, dA, dB


def check(ours, t, rank, frozen_prefix, tol=None, alpha=ALPHA, ref=None):
    """Every output within tol of the float64 formula (or of ``ref``), in the right dtype, and exact zeros in dA/dB
    outside the trained slots."""
    tol = tol or tolerance("triton", t["x"].dtype)
    ref = ref or expected(t, rank, alpha, frozen_prefix)
    dtypes = (t["x"].dtype, torch.float32, t["x"].dtype, t["lora_A"].dtype, t["lora_B"].dtype)
    for name, out, r, dtype in zip(("y", "u", "dx", "dA", "dB"), ours, ref, dtypes):
        assert out.dtype == dtype and out.shape == r.shape, name
        assert torch.isfinite(out).all(), f"{name} has non-finite values (unwritten elements?)"
        err = rel_err(out.cpu(), r)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol}"
    M, R = t["x"].shape[0], t["lora_A"].shape[0]
    b = rank.cpu().long().reshape(-1).expand(M)
    slots = torch.arange(R)
    trained = ((slots[None, :] == b[:, None] - 1) if frozen_prefix else (slots[None, :] < b[:, None])).any(0)
    dA, dB = ours[3].cpu(), ours[4].cpu()
    assert (dA[~trained] == 0).all() and (dB[:, ~trained] == 0).all()
    assert dA[trained].abs().sum() > 0 and dB[:, trained].abs().sum() > 0


# Shapes per variant: odd sizes everywhere the variant allows them. "tma" needs 16-byte aligned rows (K, N
# multiples of 8 for fp16; M is free), "decode" M ≤ 16.
SHAPES = {"pointer": (37, 45, 29), "decode": (13, 45, 29), "tma": (37, 40, 24)}
VARIANT_DTYPES = {"pointer": (torch.float32, torch.float16), "decode": (torch.float32, torch.float16),
                  "tma": (torch.float16,)}


def variant_params():
    return [pytest.param(v, d, id=f"{v}-{str(d).removeprefix('torch.')}")
            for v, dtypes in VARIANT_DTYPES.items() for d in dtypes]


# --------------------------------------------------------------------------------------------
# Interpreter-runnable checks (also run on CUDA)
# --------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("rank_kind", [1, 4, 7, "per_row"])
@pytest.mark.parametrize("variant,dtype", variant_params())
def test_every_variant_against_float64(variant, dtype, rank_kind, frozen_prefix):
    """Forward and backward of each variant: rank 1, mid, r_max (7: not a power of two), per-row; bias and base."""
    M, K, N = SHAPES[variant]
    t = make(M, K, N, 7, dtype, base=True)
    rank = rank_of(rank_kind, M, 7)
    check(run(t, rank, frozen_prefix, variant), t, rank, frozen_prefix)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_tma_programs_walk_several_tiles(frozen_prefix):
    """The persistent TMA kernel with more output tiles than programs (in y and in dx), so each program walks
    several tiles (partial ones at the edges) in grouped order."""
    T = backend()
    M, K, N = 150, 136, 72
    t = make(M, K, N, 7, torch.float16, base=True)
    sms = T.kernels.num_sms(t["x"].device)
    block = T.kernels._configs("tma")[0].kwargs
    for cols in (N, K):  # y's and dx's output tiles
        assert triton_cdiv(M, block["BLOCK_M"]) * triton_cdiv(cols, block["BLOCK_N"]) > sms or CUDA
    for rank in (torch.tensor(6, device=DEVICE), per_row_ranks(M, 7).to(DEVICE)):
        check(run(t, rank, frozen_prefix, "tma"), t, rank, frozen_prefix)


@pytest.mark.skipif(CUDA, reason="swaps the TMA tuner for one with a fake timer; on a GPU the real one runs")
def test_tma_configs_are_chosen_by_measurement(monkeypatch, tmp_path):
    """The TMA kernel's config is the fastest candidate by the tuner's timer, remembered per key (and on disk), with
    descriptors built for that config; a config that does not compile is ruled out; during a capture nothing is
    timed or remembered. (The winner here is a FLATTEN config: its outputs are checked too.)"""
    import triton
    from triton.runtime.errors import OutOfResources

    from dylora_kernels import dispatch
    T = backend()
    H = T.hopper
    cfg = lambda bm, bn, bk, flat: triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2,
                                                      EPILOGUE_SUBTILE=True, FLATTEN=flat, LOWRANK_LAST=False,
                                                      CTAS_PER_SM=1), num_warps=4, num_stages=2)
    configs = [cfg(16, 32, 16, False), cfg(32, 32, 32, True), cfg(64, 64, 64, False)]
    names = [H._config_name(c) for c in configs]
    timed, capturing = [], [False]

    def timer(run):  # the 32x32x32 config is "fastest"; the 64x64x64 one "does not compile"
        name = names[len(timed) % 3]
        timed.append(name)
        if name == names[2]:
            raise OutOfResources(300000, 232448, "shared memory")
        run()
        return {names[0]: 2.0, names[1]: 1.0}[name]

    tuner = dispatch.Dispatcher(timer=timer, capturing=lambda: capturing[0], cache_dir=tmp_path,
                                skip=H._CONFIG_TUNER.skip)
    monkeypatch.setattr(H, "CONFIGS", configs)
    monkeypatch.setattr(H, "_prune", lambda c, args: c)
    monkeypatch.setattr(H, "_CONFIG_TUNER", tuner)
    monkeypatch.setattr(H, "_CHOSEN", {})
    t = make(70, 48, 40, 6, torch.float16)
    rank = torch.tensor(5)

    capturing[0] = True
    check(run(t, rank, False, "tma"), t, rank, False)
    assert timed == [] and H._CHOSEN == {}, "nothing is timed or remembered during a capture"
    capturing[0] = False
    check(run(t, rank, True, "tma"), t, rank, True)  # y (forward) and dx (backward): two keys
    assert timed == names * 2 and len(H._CHOSEN) == 2
    assert all(c is configs[1] for c in H._CHOSEN.values())
    on_disk = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sorted(set(on_disk.values())) == [names[1]]
    check(run(t, rank, False, "tma"), t, rank, False)
    assert len(timed) == 6, "a remembered key is not timed again"


# The TMA kernel's config variants beside the seeded one (each also compiled for sm_90a by tests/sm90_compile.py).
TMA_VARIANTS = {"flatten": dict(FLATTEN=True), "lowrank-last": dict(LOWRANK_LAST=True),
                "lowrank-last-one-store": dict(LOWRANK_LAST=True, EPILOGUE_SUBTILE=False),
                "2-per-sm": dict(CTAS_PER_SM=2), "2-per-sm-lowrank-last": dict(CTAS_PER_SM=2, LOWRANK_LAST=True)}


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=["fp16-adapters", "fp32-adapters"])
@pytest.mark.parametrize("variant", list(TMA_VARIANTS))
def test_tma_kernel_variants(variant, frozen_prefix, adapter_dtype, monkeypatch):
    """Each config variant of the TMA kernel against float64: FLATTEN (one flattened persistent loop, the low-rank
    term after the K loop with its slot blocks unrolled), LOWRANK_LAST (a per-tile K loop, the term after it from
    the first slot block loaded before it), one epilogue store per tile, two programs per SM (a grid of 2 × SMs:
    dx's 9 tiles over 8 programs). Several tiles per program, r_max over two slot blocks, ranks at and across the
    block edge, per-row ranks, bias and base, and NaN in the unused slots of A and B never reaching an output. fp16
    adapters sum the term apart (overflow), others accumulate it into the GEMM's accumulator: both paths."""
    import triton
    H = backend().hopper
    first = H.CONFIGS[0]
    flat = triton.Config({**first.kwargs, **TMA_VARIANTS[variant]}, num_warps=first.num_warps,
                         num_stages=first.num_stages)
    monkeypatch.setattr(H, "CONFIGS", [flat])
    monkeypatch.setattr(H, "_CHOSEN", {})
    M, K, N, R = 150, 136, 72, 40  # R = 40: two slot blocks of 32 (R_BLOCKS = 2)
    t = make(M, K, N, R, torch.float16, adapter_dtype, base=True)
    for rank in (torch.tensor(1), torch.tensor(32), torch.tensor(33), per_row_ranks(M, R)):
        rank = rank.to(DEVICE)
        check(run(t, rank, frozen_prefix, "tma"), t, rank, frozen_prefix)
    poisoned = dict(t, lora_A=t["lora_A"].clone(), lora_B=t["lora_B"].clone())
    poisoned["lora_A"][21:] = float("nan")
    poisoned["lora_B"][:, 21:] = float("inf")
    rank = torch.tensor(21, device=DEVICE)
    check(run(poisoned, rank, frozen_prefix, "tma"), t, rank, frozen_prefix)  # as with clean adapters
    assert H._CHOSEN and all(c is flat for c in H._CHOSEN.values())


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("variant,dtype,adapter_dtype",
                         [("pointer", torch.float16, torch.float32), ("pointer", torch.float32, torch.float16),
                          ("decode", torch.float16, torch.float32), ("tma", torch.float16, torch.float32)],
                         ids=["pointer-fp16+fp32", "pointer-fp32+fp16", "decode-fp16+fp32", "tma-fp16+fp32"])
def test_mixed_precision_adapters(variant, dtype, adapter_dtype, frozen_prefix):
    """Adapters in another dtype than x and W: y, dx in x's dtype, dA, dB in the adapters'."""
    M, K, N = SHAPES[variant]
    t = make(M, K, N, 6, dtype, adapter_dtype, base=True)
    for rank in (torch.tensor(5, device=DEVICE), per_row_ranks(M, 6).to(DEVICE)):
        check(run(t, rank, frozen_prefix, variant), t, rank, frozen_prefix, tol=1e-2)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("rank_kind", [1, 64, 65, 200, "per_row", "per_row_sorted"])
def test_r_max_200_spans_several_slot_blocks(rank_kind, frozen_prefix):
    """r_max = 200 is four slot blocks of 64: ranks at and across block edges, per-row ranks whose row blocks
    stop at different slot blocks; M large enough to split the gradient reduction over several chunks."""
    M, K, N, R = 150, 24, 18, 200
    t = make(M, K, N, R)
    if rank_kind == "per_row_sorted":
        rank = per_row_ranks(M, R, sorted_=True).to(DEVICE)
    else:
        rank = rank_of(rank_kind, M, R)
    check(run(t, rank, frozen_prefix), t, rank, frozen_prefix)


# K and N above twice the largest BLOCK_K a kernel runs with here (32 in the interpreter's configs, 64 in the TMA
# kernel's), so every K loop advances its pointers; odd where the variant allows it ("tma": 16-byte aligned rows).
STRIDED_SHAPES = {"pointer": (70, 71, 69), "decode": (13, 71, 69), "tma": (70, 136, 136)}


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
def test_strided_operands_are_read_in_place(variant, frozen_prefix):
    """Every operand a view into a NaN-filled buffer (conftest.with_layout), read through its strides, in every
    variant: x, W, grad, base row-strided, A and B row-strided, bias strided (the layouts TMA takes); and, for the
    pointer-based variants, x, W and grad column-major, A, B, bias and base column-strided."""
    M, K, N = STRIDED_SHAPES[variant]
    R = 10
    dense = make(M, K, N, R, torch.float16 if variant == "tma" else torch.float32, base=True)
    rows = {k: with_layout(v, "strided" if k == "bias" else "row-strided") for k, v in dense.items()}
    columns = {k: with_layout(v, "transposed" if k in ("x", "weight", "grad") else "strided") for k, v in dense.items()}
    one_rank, per_row = torch.tensor(6, device=DEVICE), per_row_ranks(M, R).to(DEVICE)
    for strided, ranks in [(rows, (one_rank, per_row))] + ([(columns, (per_row,))] if variant != "tma" else []):
        assert all(torch.equal(strided[k], dense[k]) for k in dense)
        assert not any(t.is_contiguous() for t in strided.values())
        assert variant in backend().variants("forward", strided["x"], strided["weight"], strided["lora_A"],
                                             strided["lora_B"])
        for rank in ranks:
            check(run(strided, rank, frozen_prefix, variant), dense, rank, frozen_prefix)


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
def test_unused_slots_never_leak(variant, frozen_prefix):
    """NaN and Inf stored in A's rows and B's columns at or beyond the largest rank change nothing (0-d rank and
    per-row ranks), and the outputs equal those from clean adapters."""
    M, K, N = SHAPES[variant]
    R = 12
    dtype = torch.float16 if variant == "tma" else torch.float32
    t = make(M, K, N, R, dtype, base=True)
    for rank in (torch.tensor(5, device=DEVICE), per_row_ranks(M, 9).to(DEVICE)):
        top = int(rank.max())
        poisoned = dict(t, lora_A=t["lora_A"].clone(), lora_B=t["lora_B"].clone())
        poisoned["lora_A"][top:] = float("nan")
        poisoned["lora_B"][:, top:] = float("inf")
        poisoned["lora_A"][top + 1:, 0] = float("-inf")
        ours = run(poisoned, rank, frozen_prefix, variant)
        check(ours, t, rank, frozen_prefix)


@pytest.fixture
def recorded_reads(monkeypatch):
    """The addresses every load of the interpreter touches (masked-off elements excluded): all loads, TMA
    descriptor loads included, go through InterpreterBuilder.create_masked_load in triton 3.6."""
    if CUDA:
        pytest.skip("records the interpreter's loads")
    import numpy as np
    from triton.runtime import interpreter
    reads = []
    load = interpreter.InterpreterBuilder.create_masked_load

    def spy(self, ptrs, mask, other, *args, **kwargs):
        reads.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].ravel().copy())
        return load(self, ptrs, mask, other, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", spy)
    return reads


def addresses(t, index):
    """The byte addresses of the elements t[index] (at their first byte)."""
    import numpy as np
    offsets = torch.arange(t.numel()).reshape(t.shape)  # contiguous t: element offsets
    return np.asarray(t.data_ptr() + offsets[index].reshape(-1).numpy() * t.element_size(), dtype=np.uint64)


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
def test_unused_slots_are_never_read(variant, frozen_prefix, recorded_reads):
    """No kernel reads a row of A or a column of B at or beyond the largest rank (forward and backward, 0-d and
    per-row ranks): every address the interpreter loads is recorded and none falls in those slots."""
    import numpy as np
    M, K, N = SHAPES[variant]
    R = 12
    t = make(M, K, N, R, torch.float16 if variant == "tma" else torch.float32, base=True)
    for rank in (torch.tensor(5, device=DEVICE), per_row_ranks(M, 9).to(DEVICE)):
        top = int(rank.max())
        forbidden = np.concatenate([addresses(t["lora_A"], (slice(top, None),)),
                                    addresses(t["lora_B"], (slice(None), slice(top, None)))])
        recorded_reads.clear()
        run(t, rank, frozen_prefix, variant)
        read = np.concatenate(recorded_reads)
        assert read.size > 0 and not np.isin(read, forbidden).any(), f"read unused slots (rank max {top})"
        used = np.concatenate([addresses(t["lora_A"], (slice(None, top),)),
                               addresses(t["lora_B"], (slice(None), slice(None, top)))])
        assert np.isin(used, read).all()  # the recorder sees the adapters' used slots


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
def test_no_out_of_bounds_reads(variant, frozen_prefix, recorded_reads, monkeypatch):
    """Every address any kernel loads lies inside an operand or a tensor the backend allocated (outputs and the
    split-M workspaces): masks hold at every edge, including the row splits and the hand-prefetched loads past
    the last block. Sizes that are no multiple of any block; M = 150 splits the gradient reduction."""
    import numpy as np
    allocated = []

    def keep(fn):
        def wrapped(*args, **kwargs):
            allocated.append(fn(*args, **kwargs))
            return allocated[-1]
        return wrapped

    monkeypatch.setattr(torch, "empty", keep(torch.empty))
    monkeypatch.setattr(torch.Tensor, "new_empty", keep(torch.Tensor.new_empty))
    M, K, N = SHAPES[variant] if variant != "pointer" else (150, 45, 29)
    t = make(M, K, N, 7, torch.float16 if variant == "tma" else torch.float32, base=True)
    for rank in (torch.tensor(4, device=DEVICE), per_row_ranks(M, 7).to(DEVICE)):
        recorded_reads.clear()
        run(t, rank, frozen_prefix, variant)
        read = np.concatenate(recorded_reads)
        inside = np.zeros(read.shape, dtype=bool)
        for tensor in [v for v in t.values() if v is not None] + [rank] + allocated:
            start = tensor.untyped_storage().data_ptr()
            inside |= (read >= start) & (read < start + tensor.untyped_storage().nbytes())
        assert inside.all(), f"{(~inside).sum()} loads outside every tensor"


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_slot_masks_are_selections(frozen_prefix):
    """NaN in the slots of u / v a row does not use (the fused GEMM) or does not train (the gradients) changes
    nothing: the kernels select (tl.where), never multiply by a 0/1 mask (0·NaN = NaN)."""
    k = backend().kernels
    M, K, N, R = 37, 19, 23, 12
    t = make(M, K, N, R, bias=False)
    rank = per_row_ranks(M, R).to(DEVICE)
    slots = torch.arange(R, device=DEVICE)
    u = torch.randn(M, R, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    used = slots < rank[:, None]
    y = k.fused_linear(t["x"], t["weight"], None, None, torch.where(used, u, float("nan")), t["lora_B"], rank,
                       ALPHA, torch.empty(M, N, device=DEVICE))
    want = t["x"] @ t["weight"].t() + (ALPHA / rank[:, None]) * torch.where(used, u, 0.0) @ t["lora_B"].t()
    tol = tolerance("triton", torch.float32)
    assert rel_err(y.cpu(), want.cpu()) <= tol
    trained = (slots == rank[:, None] - 1) if frozen_prefix else used
    dA = k.lora_grad(torch.where(trained, u, float("nan")), t["x"], rank, ALPHA, frozen_prefix,
                     torch.empty(R, K, device=DEVICE))
    want = (torch.where(trained, u, 0.0) * (ALPHA / rank[:, None])).t() @ t["x"]
    assert rel_err(dA.cpu(), want.cpu()) <= tol


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_slots_are_selected_through_the_contract(frozen_prefix):
    """The same rule through the kernel contract and the TMA kernel: backward() given a u with NaN in the slots beyond
    each row's rank (the contract says zero; it reads them only through selections) gives dB equal to float64's, and
    the TMA fused GEMM given such a u gives y equal to the pointer one's."""
    T = backend()
    M, K, N, R = 37, 40, 24, 12
    t = make(M, K, N, R, torch.float16, base=True)
    rank = per_row_ranks(M, R).to(DEVICE)
    unused = torch.arange(R, device=DEVICE) >= rank[:, None]
    y, u = T.forward(t["x"], t["weight"], t["bias"], t["base"], t["lora_A"], t["lora_B"], rank, ALPHA, True)
    assert (u[unused] == 0).all()
    poisoned = u.masked_fill(unused, float("nan"))
    dx, dA, dB = T.backward(t["grad"], t["x"], t["weight"], t["lora_A"], t["lora_B"], poisoned, rank, ALPHA,
                            frozen_prefix, True, True)
    assert torch.isfinite(dB).all()
    assert rel_err(dB.cpu(), expected(t, rank, ALPHA, frozen_prefix)[4]) <= tolerance("triton", torch.float16)
    y_tma = T.hopper.fused_linear(t["x"], t["weight"], False, t["bias"], t["base"], poisoned, t["lora_B"], rank,
                                  ALPHA, torch.empty_like(y))
    assert torch.isfinite(y_tma).all() and rel_err(y_tma.cpu(), y.cpu()) <= tolerance("triton", torch.float16)


@pytest.mark.parametrize("backend_name", ["triton", "triton-decode", "triton-tma"])
def test_int_rank_above_r_max_never_reaches_the_kernels(backend_name):
    """An int rank above r_max (or below 1) is refused on the host for the Triton backends too (ValueError), before
    a kernel is launched."""
    t = make(13, 40, 24, 6, torch.float16)
    for rank in (7, 0, 300):
        with pytest.raises(ValueError, match=r"rank must be in \[1, r_max\] = \[1, 6\], got"):
            dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank, ALPHA,
                                         backend=backend_name)


@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_out_of_range_ranks_give_nan(variant, per_row):
    """A rank outside [1, R] (0, R + 1, -1 in int8, 255 in uint8, 2**32 + 1 in int64, which would wrap into range
    in 32 bits) gives NaN in that row of y, u and dx, and NaN in dA and dB, never garbage; the other rows are
    right."""
    M, K, N = SHAPES[variant]
    R = 6
    dtype = torch.float16 if variant == "tma" else torch.float32
    t = make(M, K, N, R, dtype)
    T = backend()
    bad_values = [(0, torch.int64), (R + 1, torch.int64), (-1, torch.int8), (255, torch.uint8),
                  (2**32 + 1, torch.int64)]
    for value, rank_dtype in bad_values:
        if per_row:
            rank = per_row_ranks(M, R).to(DEVICE, rank_dtype)
            rank[M // 2] = value
            bad = torch.zeros(M, dtype=torch.bool)
            bad[M // 2] = True
        else:
            rank = torch.tensor(value, dtype=rank_dtype, device=DEVICE)
            bad = torch.ones(M, dtype=torch.bool)
        for frozen_prefix in (False, True):
            y, u, dx, dA, dB = (o.cpu() for o in run(t, rank, frozen_prefix, variant))
            for name, out in (("y", y), ("u", u), ("dx", dx)):
                assert torch.isnan(out[bad]).all(), f"{name}: rank {value} ({rank_dtype}) row not NaN"
                assert not torch.isnan(out[~bad]).any(), f"{name}: NaN outside the bad row"
            assert torch.isnan(dA).any() and torch.isnan(dB).any(), f"rank {value}: dA/dB not NaN"
            if per_row:
                good = ~bad
                ref = expected({k: (v[good] if k in ("x", "base", "grad") and v is not None else v)
                                for k, v in t.items()}, rank.cpu()[good], ALPHA, frozen_prefix)
                assert rel_err(y[good], ref[0]) <= tolerance("triton", dtype)
    assert T.variants("forward", t["x"], t["weight"], t["lora_A"], t["lora_B"])[0] == "pointer"


@pytest.mark.parametrize("variant", ["pointer", "decode"])
def test_no_fp16_overflow_the_formula_does_not_have(variant):
    """x = W = A = [[1]], B = [[1e-3]], alpha = 1e5 in fp16: y = 1 + 1e5·1e-3 = 101 (alpha/b times u would be 1e5,
    beyond fp16, if it were cast before the dot); the gradients stay finite likewise."""
    one = torch.ones(1, 1, dtype=torch.float16, device=DEVICE)
    t = dict(x=one, weight=one, bias=None, base=None, lora_A=one, lora_B=one * 1e-3, grad=one * 0.1)
    rank = torch.tensor(1, device=DEVICE)
    for frozen_prefix in (False, True):
        y, u, dx, dA, dB = run(t, rank, frozen_prefix, variant, "pointer", alpha=1e5)
        assert abs(float(y) - 101) < 0.5 and abs(float(dx) - 10.1) < 0.05
        assert abs(float(dA) - 10.0) < 0.05 and abs(float(dB) - 1e4) < 10


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("variant", ["pointer", "decode"])
def test_without_weight(variant):
    """weight=None: no GEMM; y = base + bias + the low-rank term, dx = the low-rank part only."""
    M, K, N = SHAPES[variant]
    t = make(M, K, N, 7, base=True, weight=False)
    for rank in (torch.tensor(3, device=DEVICE), per_row_ranks(M, 7).to(DEVICE)):
        for frozen_prefix in (False, True):
            check(run(t, rank, frozen_prefix, variant), t, rank, frozen_prefix)
    assert backend().variants("forward", t["x"], None, t["lora_A"], t["lora_B"]) == ["pointer", "decode"][
        :2 if M <= 16 else 1]


@pytest.mark.usefixtures("poisoned_allocations")
def test_skipped_outputs_and_inference():
    """need_u=False (decode: u empty), compute_dx=False (dx empty), compute_lora=False (dA, dB empty): the rest is
    unchanged; base is read, never written."""
    T = backend()
    M, K, N = SHAPES["decode"]
    t = make(M, K, N, 5, base=True)
    rank = torch.tensor(4, device=DEVICE)
    base_before = t["base"].clone()
    y_ref, u_ref, dx_ref, dA_ref, dB_ref = expected(t, rank, ALPHA, True)
    y, u = T.forward(t["x"], t["weight"], t["bias"], t["base"], t["lora_A"], t["lora_B"], rank, ALPHA, False,
                     "decode")
    assert u.numel() == 0 and rel_err(y.cpu(), y_ref) <= tolerance("triton", torch.float32)
    assert torch.equal(t["base"], base_before)
    _, u = T.forward(t["x"], t["weight"], t["bias"], t["base"], t["lora_A"], t["lora_B"], rank, ALPHA, True)
    args = (t["grad"], t["x"], t["weight"], t["lora_A"], t["lora_B"], u, rank, ALPHA, True)
    dx, dA, dB = T.backward(*args, False, True)
    tol = tolerance("triton", torch.float32)
    assert dx.numel() == 0 and rel_err(dA.cpu(), dA_ref) <= tol and rel_err(dB.cpu(), dB_ref) <= tol
    dx, dA, dB = T.backward(*args, True, False)
    assert dA.numel() == 0 and dB.numel() == 0 and rel_err(dx.cpu(), dx_ref) <= tol
    assert all(o.numel() == 0 for o in T.backward(*args, False, False))


@pytest.mark.parametrize("rank_dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_any_integer_rank_dtype(rank_dtype):
    """The kernels load the rank as whatever integer type it is: the same numbers as int64 (bit for bit in the
    interpreter; on a GPU the rank's dtype is part of the autotune key, so another config may be chosen and
    the tf32 sums differ by rounding)."""
    M, K, N = SHAPES["decode"]
    t = make(M, K, N, 9)
    for rank in (torch.tensor(4), per_row_ranks(M, 9)):
        for variant in ("pointer", "decode"):
            for frozen_prefix in (False, True):
                want = run(t, rank.to(DEVICE), frozen_prefix, variant)
                got = run(t, rank.to(DEVICE, rank_dtype), frozen_prefix, variant)
                if CUDA:
                    assert all(rel_err(a, b) <= tolerance("triton", torch.float32) for a, b in zip(got, want))
                else:
                    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --------------------------------------------------------------------------------------------
# Adapter dropout (the mask generated in the kernels: kernels._dropout_keep, reference.dropout_keep's contract)
# --------------------------------------------------------------------------------------------
def expected_dropout(t, rank, alpha, frozen_prefix, p, seed):
    """y, u, dx, dA, dB in float64 with adapter dropout, from the formula with reference.dropout_keep's mask:
    u = (x ⊙ keep)·A[:b]ᵀ (unscaled), s = alpha/((1 − p)·b); v = g·B (no mask), dx = g·W + keep ⊙ (s·v·A),
    dA = (s·v)ᵀ·(x ⊙ keep), dB = gᵀ·(s·u)."""
    from dylora_kernels import reference
    d = {k: None if v is None else v.detach().cpu().double() for k, v in t.items()}
    x, W, A, B, g = d["x"], d["weight"], d["lora_A"], d["lora_B"], d["grad"]
    (M, K), R = x.shape, A.shape[0]
    keep = reference.dropout_keep(seed, M, K, p).double()
    b = rank.cpu().long().reshape(-1).expand(M)
    slots = torch.arange(R)
    used = (slots[None, :] < b[:, None]).double()
    trained = (slots[None, :] == b[:, None] - 1).double() if frozen_prefix else used
    s = alpha / (1 - p) / b.double()[:, None]
    u = ((x * keep) @ A.t()) * used
    y = (s * u) @ B.t()
    v = (g @ B) * used
    dx = keep * ((s * v) @ A)
    if W is not None:
        y, dx = y + x @ W.t(), dx + g @ W
    for extra in ("bias", "base"):
        if d[extra] is not None:
            y = y + d[extra]
    return y, u, dx, (s * v * trained).t() @ (x * keep), g.t() @ (s * u * trained)


def run_dropout(t, rank, frozen_prefix, p, seed, variant="pointer", alpha=ALPHA):
    T = backend()
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    seed_t = torch.tensor(seed, dtype=torch.int64, device=x.device)
    y, u = T.forward(x, W, t["bias"], t["base"], A, B, rank, alpha, True, variant, dropout_p=p, dropout_seed=seed_t)
    dx, dA, dB = T.backward(t["grad"], x, W, A, B, u, rank, alpha, frozen_prefix, True, True,
                            "tma" if variant == "tma" else "pointer", dropout_p=p, dropout_seed=seed_t)
    return y, u, dx, dA, dB


def check_dropout(t, rank, frozen_prefix, p, seed, variant="pointer"):
    ours = run_dropout(t, rank, frozen_prefix, p, seed, variant)
    check(ours, t, rank, frozen_prefix, ref=expected_dropout(t, rank, ALPHA, frozen_prefix, p, seed))
    return ours


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("rank_kind", [1, 7, "per_row"])
@pytest.mark.parametrize("variant,dtype", variant_params())
def test_dropout_every_variant_against_float64(variant, dtype, rank_kind, frozen_prefix):
    """Adapter dropout in each variant (pointer; decode, M ≤ 16; tma: its forward, dx by the pointer kernel) against
    the float64 formula with the reference mask: K = 45 (not a multiple of 4 or of BLOCK_K) or 40 (tma), rank 1,
    r_max, per-row; frozen prefix with one rank runs the one-slot GEMV for dA and the folded dB column."""
    M, K, N = SHAPES[variant]
    t = make(M, K, N, 7, dtype, base=True)
    rank = rank_of(rank_kind, M, 7)
    y, u = check_dropout(t, rank, frozen_prefix, 0.3, 2**40 + 7, variant)[:2]
    keep = __import__("dylora_kernels").reference.dropout_keep(2**40 + 7, M, K, 0.3)
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("shape", [(37, 3, 11), (21, 4, 9), (33, 64, 17), (9, 97, 13)],
                         ids=["K3", "K4", "K64", "K97"])
@pytest.mark.parametrize("p", [0.1, 0.75])
def test_dropout_shapes_and_thresholds(shape, p):
    """K below, at and above 4 and BLOCK_K (one Philox call spans rows when K % 4 ≠ 0), p whose threshold is ≥ 2³¹
    (passed as its int32 bits), pointer and decode, one rank and per-row ranks."""
    M, K, N = shape
    t = make(M, K, N, 5, bias=False)
    for variant in ("pointer", "decode") if M <= 16 else ("pointer",):
        for rank in (rank_of(3, M, 5), rank_of("per_row", M, 5)):
            for frozen_prefix in (False, True):
                check_dropout(t, rank, frozen_prefix, p, 99, variant)


@pytest.mark.usefixtures("poisoned_allocations")
def test_dropout_split_gradients():
    """Several split-M partials (M = 200) with dropout: dA's partials mask x by the absolute row; deterministic."""
    T = backend()
    M, K, N, R = 200, 24, 20, 8
    splits, _ = T.kernels.split_rows(M, 1, T.kernels.num_sms(torch.device(DEVICE)))
    assert splits > 1
    t = make(M, K, N, R)
    for rank in (torch.tensor(5, device=DEVICE), per_row_ranks(M, R).to(DEVICE)):
        for frozen_prefix in (False, True):
            first = check_dropout(t, rank, frozen_prefix, 0.2, 3)
            assert all(torch.equal(a, b) for a, b in zip(first, run_dropout(t, rank, frozen_prefix, 0.2, 3)))


def test_dropout_prunes_the_fused_tiles_that_spill():
    """Under DROPOUT the fused kernel keeps only tiles of at most DROPOUT_MAX_TILE[DROPOUT_VEC4] elements (larger ones
    spill registers on sm_90a, tests/sm90_compile.py): one Philox call per element (K % 4 != 0) leaves the BLOCK_M =
    16 candidates for large shapes, one per 4 elements (DROPOUT_VEC4) every tile up to 128x128 (128x256 spills);
    without DROPOUT nothing changes."""
    import triton
    T = backend()
    cfg = lambda bm, bn: triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8))
    configs = [cfg(32, 32), cfg(128, 256), cfg(64, 128), cfg(16, 128), cfg(16, 64)]
    x = torch.empty(4, 4)
    args = dict(x_ptr=x, z_ptr=x, R=8, M_BUCKET=4096, N_BUCKET=4096, K_BUCKET=4096)
    tiles = lambda kept: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept]
    assert tiles(T.kernels._prune_for("fused", False, configs, args)) == [(128, 256), (64, 128)]
    assert tiles(T.kernels._prune_for("fused", False, configs, args, DROPOUT=True)) == [(16, 128), (16, 64)]
    assert tiles(T.kernels._prune_for("fused", False, configs, args, DROPOUT=True, DROPOUT_VEC4=False)) == \
        [(16, 128), (16, 64)]
    assert tiles(T.kernels._prune_for("fused", False, configs, args, DROPOUT=True, DROPOUT_VEC4=True)) == [(64, 128)]
    grad = [triton.Config(dict(BLOCK_M=m, BLOCK_K=k)) for m, k in ((32, 32), (64, 128), (128, 128), (64, 64))]
    grad_args = dict(q_ptr=x, p_ptr=x, R=8, M_BUCKET=4096, N_BUCKET=4096, K_BUCKET=4096)
    blocks = lambda kept: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) for c in kept]
    assert blocks(T.kernels._prune_for("grad", False, grad, grad_args, DROPOUT=True)) == [(64, 64)]
    assert blocks(T.kernels._prune_for("grad", False, grad, grad_args, DROPOUT=True, DROPOUT_VEC4=True)) == \
        [(64, 128), (128, 128), (64, 64)]
    assert tiles(T.kernels._prune_for("fused", False, configs, {**args, "M_BUCKET": 16}, DROPOUT=True)) == \
        [(16, 128), (16, 64)]


def test_dropout_changes_only_the_low_rank_term():
    """p > 0 leaves the base GEMM alone (y − low-rank term = x·Wᵀ + bias) and differs from p = 0; a seed of 2⁶³ − 1
    (the key's high word) works."""
    M, K, N, R = 13, 45, 29, 6
    t = make(M, K, N, R)
    rank = rank_of(4, M, R)
    ours = check_dropout(t, rank, False, 0.5, 2**63 - 1)
    plain = run(t, rank, False)
    assert not torch.allclose(ours[0], plain[0]) and not torch.allclose(ours[1], plain[1])


if HAS_TRITON:
    import triton
    import triton.language as tl

    from dylora_kernels.triton import kernels as _kernels

    @triton.jit
    def _tile_mask(seed_ptr, out_ptr, m0, k0, K, threshold, BM: tl.constexpr, BK: tl.constexpr, VEC4: tl.constexpr):
        """The int8 keep mask of rows m0 + [0, BM) × columns k0 + [0, BK) of an (M, K) x, by kernels._dropout_keep
        (VEC4: one Philox call per 4 elements)."""
        offs_m = m0 + tl.arange(0, BM)
        offs_k = tl.arange(0, BK)
        keep = _kernels._dropout_keep(tl.load(seed_ptr), offs_m, k0, K, threshold, BK, VEC4)
        tl.store(out_ptr + tl.arange(0, BM)[:, None] * BK + offs_k[None, :], keep.to(tl.int8))

    @triton.jit
    def _whole_mask(seed_ptr, out_ptr, M, K, threshold, BM: tl.constexpr, BK: tl.constexpr, VEC4: tl.constexpr):
        """The int8 keep mask of an (M, K) x, one (BM, BK) tile per program, by kernels._dropout_keep."""
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        k0 = tl.program_id(1) * BK
        offs_k = k0 + tl.arange(0, BK)
        keep = _kernels._dropout_keep(tl.load(seed_ptr), offs_m, k0, K, threshold, BK, VEC4)
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@pytest.mark.parametrize("M,K", [(37, 52), (5, 4), (19, 64), (37, 45), (6, 3), (11, 50)],
                         ids=["K52", "K4", "K64", "K45", "K3", "K50"])
def test_dropout_mask_helper_both_paths(M, K):
    """kernels._dropout_keep against reference.dropout_keep over a whole (M, K) mask, tile by tile (tiles of 4, 16 and
    32 columns; ragged edges in both dimensions): the per-element path for every K, the one-call-per-4-elements path
    (DROPOUT_VEC4, the column blocks interleaving the 4 outputs of each call) where K % 4 == 0, which is when the
    launchers choose it (kernels._dropout_launch)."""
    from dylora_kernels import reference
    T = backend()
    seed, p = 2**40 + 11, 0.45
    seed_t, threshold = T.kernels.dropout_args(p, torch.tensor(seed))
    want = reference.dropout_keep(seed, M, K, p)
    vec4 = lambda dropout: T.kernels._dropout_launch(dropout, K)[2]["DROPOUT_VEC4"]
    assert vec4((seed_t, threshold)) == (K % 4 == 0) and not vec4(None)
    for vec4 in (False, True) if K % 4 == 0 else (False,):
        for BM, BK in ((16, 16), (8, 32), (4, 4)):
            out = torch.full((M, K), -1, dtype=torch.int8, device=DEVICE)
            _whole_mask[(-(-M // BM), -(-K // BK))](seed_t.to(DEVICE), out, M, K, threshold, BM=BM, BK=BK, VEC4=vec4)
            assert torch.equal(out.cpu().bool(), want) and out.min() >= 0, (vec4, BM, BK)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dropout_mask_helper_uses_64_bit_element_indices(p):
    """kernels._dropout_keep on a tiny tile whose rows lie past 2³² elements (e = m·K + k crosses 2³² inside the tile
    and reaches 2³⁵): the mask equals the reference rule on those e (Philox counter e >> 2 with a nonzero high word,
    lane e & 3). A 32-bit e would wrap and draw other counters."""
    from dylora_kernels import reference
    T = backend()
    BM, BK, seed = 4, 8, 12345
    # K odd: rows start at every lane of a Philox call (per element); K = 4100: one call per 4 elements, at k0 = 12
    for K, k0, vec4, m0 in [(4099, 0, False, 2**32 // 4099 - 1), (4099, 0, False, 2**35 // 4099),
                            (4100, 12, True, 2**32 // 4100 - 1), (4100, 12, True, 2**35 // 4100)]:
        seed_t, threshold = T.kernels.dropout_args(p, torch.tensor(seed))
        out = torch.empty(BM, BK, dtype=torch.int8, device=DEVICE)
        _tile_mask[(1,)](seed_t.to(DEVICE), out, m0, k0, K, threshold, BM=BM, BK=BK, VEC4=vec4)
        e = ((np.uint64(m0) + np.arange(BM, dtype=np.uint64))[:, None] * np.uint64(K)
             + np.uint64(k0) + np.arange(BK, dtype=np.uint64))
        draws = np.stack(reference.philox4x32(e.reshape(-1) >> np.uint64(2), seed), axis=-1)
        r = np.take_along_axis(draws, (e.reshape(-1) & np.uint64(3)).astype(np.int64)[:, None], axis=1)[:, 0]
        want = torch.from_numpy((r >= reference.dropout_threshold(p)).reshape(BM, BK))
        assert int(e.max()) >= 2**32 and int(e.min()) < 2**35
        assert torch.equal(out.cpu().bool(), want), (K, m0)


def test_split_gradients_are_deterministic_and_split():
    """The split-M gradient partials are reduced in a fixed order: two runs agree bit for bit. The shape splits
    the reduction over several chunks (checked), in both modes and for per-row ranks."""
    T = backend()
    M, K, N, R = 200, 24, 20, 8
    splits, rows = T.kernels.split_rows(M, 1, T.kernels.num_sms(torch.device(DEVICE)))
    assert splits > 1 and splits * rows >= M
    t = make(M, K, N, R)
    for rank in (torch.tensor(5, device=DEVICE), per_row_ranks(M, R).to(DEVICE)):
        for frozen_prefix in (False, True):
            first = run(t, rank, frozen_prefix)
            check(first, t, rank, frozen_prefix)
            assert all(torch.equal(a, b) for a, b in zip(first, run(t, rank, frozen_prefix)))


@pytest.mark.parametrize("R", [8, 40, 64])
@pytest.mark.parametrize("one_slot", [False, True], ids=["full", "one-slot"])
def test_finish_sums_blocks_of_splits(R, one_slot):
    """The finish kernel against float64 with more splits than one load holds (BLOCK_S splits per tile: several
    tiles, the last one partial), a K that is not a multiple of BLOCK_K, and the output strided as dB's transpose:
    alpha·Σ_s part[s] in fixed order (two runs agree bit for bit); one-slot: row b-1 only, every other row exactly
    0, all NaN for an out-of-range rank."""
    k = backend().kernels
    _, BLOCK_K, BLOCK_S = k.finish_blocks(R, one_slot)
    S, K = 2 * BLOCK_S + 3, BLOCK_K + 5
    g = torch.Generator().manual_seed(3)
    part = torch.randn(S, K, generator=g) if one_slot else torch.randn(S, R, K, generator=g)
    part = part.to(DEVICE)
    n_parts = S - 1  # the last split is not summed
    want = ALPHA * part[:n_parts].double().sum(0)
    for b in ([1, R // 2, R] if one_slot else [R]):
        rank = torch.tensor(b, device=DEVICE)
        out = torch.full((K, R), float("nan"), device=DEVICE).t()  # (R, K) with unit stride along R, as dB.t()
        k.finish(part, n_parts, rank, ALPHA, one_slot, out)
        if one_slot:
            assert rel_err(out[b - 1], want) <= 1e-6
            assert (out[torch.arange(R, device=DEVICE) != b - 1] == 0).all()
        else:
            assert rel_err(out, want) <= 1e-6
        again = torch.empty_like(out)
        assert torch.equal(out, k.finish(part, n_parts, rank, ALPHA, one_slot, again))
    if one_slot:
        out = torch.zeros(R, K, device=DEVICE)
        assert k.finish(part, n_parts, torch.tensor(R + 1, device=DEVICE), ALPHA, True, out).isnan().all()


def test_variants_offer_only_what_can_run():
    T = backend()
    t = make(37, 40, 24, 8, torch.float16)
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    assert T.variants("forward", x, W, A, B) == ["pointer", "tma"]
    assert T.variants("backward", x, W, A, B) == ["pointer", "tma"]
    assert T.variants("forward", x[:16], W, A, B) == ["pointer", "decode", "tma"]
    assert T.variants("forward", x[:0], W, A, B) == ["pointer"]
    assert T.variants("forward", x.float(), W.float(), A, B) == ["pointer"]  # TMA: 16-bit only
    odd = make(37, 44, 20, 8, torch.float16)  # rows of 88 bytes: not 16-byte aligned
    assert T.variants("forward", odd["x"], odd["weight"], odd["lora_A"], odd["lora_B"]) == ["pointer"]
    assert T.variants("forward", x[:, 1:33], W[:, :32], A, B) == ["pointer"]  # x's base pointer misaligned
    wide_A, wide_B = torch.zeros(65, 40, dtype=torch.float16), torch.zeros(24, 65, dtype=torch.float16)
    assert "decode" not in T.variants("forward", x[:4], W, wide_A, wide_B)  # r_max above the decode cap
    with pytest.raises(ValueError):
        T.variants("sideways", x, W, A, B)


def test_autotuners_time_configs_briefly():
    """Every autotuned kernel times its configs with the package's short benchmark (the first call of a new shape
    stays within its budget; triton's default would take 125 ms per config), and that benchmark keeps triton's
    quantile interface."""
    from dylora_kernels.triton import hopper, kernels
    tuners = [l.tuner for l in [*kernels._launch.values(), hopper._LAUNCH] if hasattr(l.tuner, "configs")]
    assert len(tuners) == 5  # shrink, fused, decode, grad, gemv (finish has one config; tma has its own tuner)
    assert all(t.do_bench is kernels.autotune_bench for t in tuners)
    seen = {}
    fake = lambda fn, warmup, rep, quantiles: seen.update(warmup=warmup, rep=rep, quantiles=quantiles) or [1.0]
    with pytest.MonkeyPatch.context() as m:
        m.setattr("triton.testing.do_bench", fake)
        kernels.autotune_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert seen == dict(warmup=5, rep=20, quantiles=(0.5, 0.2, 0.8))


def test_empty_batch():
    """M = 0: empty y, u and dx; all-zero dA and dB."""
    t = make(0, 16, 12, 5)
    for rank in (torch.tensor(3, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE)):
        for frozen_prefix in (False, True):
            y, u, dx, dA, dB = run(t, rank, frozen_prefix)
            assert y.shape == (0, 12) and u.shape == (0, 5) and dx.shape == (0, 16)
            assert (dA == 0).all() and (dB == 0).all()


def test_kernels_compile_for_h100():
    """Compiled for sm_90a with triton's bundled ptxas (no GPU needed): every kernel, every autotune config, the
    layouts the launchers use; shared memory, register spills, pipelined main loops, TMA + wgmma in the Hopper
    kernel (tests/sm90_compile.py). Runs in a subprocess without the interpreter, which would otherwise stand in
    for the compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode == 77:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]


@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_torch_compile_fullgraph_no_recompile_on_rank_change(per_row):
    """torch.compile(fullgraph=True) forward + backward through the ops on the Triton kernels (CUDA, or the
    interpreter on CPU); new rank values of the same shape reuse the one compiled graph."""
    import torch._dynamo.testing

    from conftest import make_inputs
    M, K, N, r_max = 64, 48, 40, 16
    inputs = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=counter)
    def step(x, weight, bias, lora_A, lora_B, rank):
        return dylora_kernels.dylora_linear(x, weight, bias, lora_A, lora_B, rank, ALPHA, frozen_prefix=True,
                                            backend="triton")

    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for seed, b in enumerate((r_max, 1, 5)):
        rank = (per_row_ranks(M, b, seed=seed) if per_row else torch.tensor(b)).to(DEVICE)
        leaves = {k: v.clone().requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in inputs.items()}
        y = step(*leaves.values(), rank)
        y.backward(g)
        ours = (y.detach(), leaves["x"].grad, leaves["lora_A"].grad, leaves["lora_B"].grad)
        ref = reference_run(inputs, rank, ALPHA, True, g.double().cpu())
        for out, r in zip(ours, ref):
            assert rel_err(out.cpu(), r) <= tolerance("triton", torch.float32)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------
# GPU checks
# --------------------------------------------------------------------------------------------
def compiled_kernel_count():
    """Compiled binaries in the JIT caches of every kernel, and the autotuners' cached choices."""
    T = backend()
    k = T.kernels
    tuners = (k._shrink_kernel, k._fused_linear_kernel, k._decode_kernel, k._lora_grad_kernel,
              k._frozen_gemv_kernel)
    jits = [t.fn for t in tuners] + [k._finish_kernel, T.hopper._fused_linear_tma_kernel]
    binaries = sum(len(cache[0]) for fn in jits for cache in fn.device_caches.values())
    return binaries, sum(len(t.cache) for t in tuners) + len(T.hopper._CHOSEN)


@gpu
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_no_compilation_over_ranks(per_row):
    """Every rank 1..r_max, both modes, every variant: not one new compiled kernel after the warm-up."""
    M, K, N, R = 300, 256, 200, 64
    t = make(M, K, N, R, torch.bfloat16)
    small = make(8, K, N, R, torch.bfloat16)
    rank = (per_row_ranks(M, R) if per_row else torch.tensor(1)).cuda()

    def all_variants(rank):
        for frozen_prefix in (False, True):
            run(t, rank, frozen_prefix, "pointer")
            run(t, rank, frozen_prefix, "tma")
            run(small, rank[:8] if per_row else rank, frozen_prefix, "decode")

    all_variants(rank)  # warm-up: compiles and autotunes once per mode and variant
    torch.cuda.synchronize()
    before = compiled_kernel_count()
    for b in range(1, R + 1):
        all_variants((torch.randint(1, b + 1, (M,)) if per_row else torch.tensor(b)).cuda())
    torch.cuda.synchronize()
    assert compiled_kernel_count() == before


@gpu
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_cuda_graph_replays_after_rank_changes_in_place(per_row, frozen_prefix):
    """Capture forward + backward once; change the rank tensor in place; each replay matches float64."""
    M, K, N, R = 130, 96, 80, 24
    t = make(M, K, N, R)
    rank = (per_row_ranks(M, R) if per_row else torch.tensor(R)).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compilation and autotuning
        run(t, rank, frozen_prefix)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(t, rank, frozen_prefix)
    for seed, b in enumerate((1, 7, R)):
        rank.copy_(per_row_ranks(M, b, seed=seed) if per_row else torch.tensor(b))
        graph.replay()
        torch.cuda.synchronize()
        check(outs, t, rank, frozen_prefix)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rank_kind,frozen_prefix", [(37, False), (37, True), ("per_row", True)],
                         ids=["b37-full", "b37-frozen", "per-row-frozen"])
def test_large_shapes_against_float64(dtype, rank_kind, frozen_prefix):
    """Sizes that take the autotuned (non-small) configs, partial tiles at every edge, every variant that applies:
    ≤ 1e-2 for bf16/fp16, ≤ 2e-3 for fp32 (tf32 dots) against float64."""
    M, K, N, R = 2051, 2064, 1552, 64
    t = make(M, K, N, R, dtype, base=True)
    rank = rank_of(rank_kind, M, R, "cuda")
    T = backend()
    for variant in T.variants("forward", t["x"], t["weight"], t["lora_A"], t["lora_B"]):
        check(run(t, rank, frozen_prefix, variant), t, rank, frozen_prefix)
    small = make(9, K, N, R, dtype)
    check(run(small, rank[:9] if rank.dim() else rank, frozen_prefix, "decode"), small,
          rank[:9] if rank.dim() else rank, frozen_prefix)
