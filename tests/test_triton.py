"""Triton-specific checks (the shared correctness suite in test_ops.py also runs against backend="triton").

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest) and only the
small interpreter checks below run; the GPU checks (no recompilation over ranks, CUDA-graph replay
after an in-place rank change, torch.compile, large shapes in every dtype) skip cleanly.
"""
import os
import subprocess
import sys

import pytest
import torch

import dylora_kernels
from conftest import (CUDA, HAS_TRITON, make_inputs, per_row_ranks, reference_run, rel_err, run, tolerance,
                      trained_slots)

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1"),
              # triton 3.6's interpreter turns 1-element arrays into loop bounds with int(): numpy warns
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICE = "cuda" if CUDA else "cpu"
ALPHA = 3.0


def kernels():
    from dylora_kernels.triton import kernels  # imported lazily: triton only once the test runs
    return kernels


def random_inputs(M, K, N, r_max, dtype, device=DEVICE, bias=True, seed=0):
    """conftest.make_inputs for a contiguous 2-D x."""
    return make_inputs((M, K), N, r_max, bias, "contiguous", dtype, device, seed)


def ops_run(inputs, rank, frozen_prefix, grad_out):
    """y, dx, dA, dB from the two ops called directly (the operands keep whatever strides they have)."""
    x, W, bias, A, B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    y, u = torch.ops.dylora.forward(x, W, bias, None, A, B, rank, ALPHA, True, "triton")
    dx, dA, dB = torch.ops.dylora.backward(grad_out, x, W, A, B, u, rank, ALPHA, frozen_prefix, True, True, "triton")
    return y, dx, dA, dB


def assert_matches_reference(ours, inputs, rank, frozen_prefix, grad_out, tol):
    ref = reference_run(inputs, rank, ALPHA, frozen_prefix, grad_out.double().cpu())
    for name, out, expected in zip(("y", "dx", "dA", "dB"), ours, ref):
        err = rel_err(out.cpu(), expected)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol}"
    r_max, rows = inputs["lora_A"].shape[0], inputs["x"].shape[0]
    untouched = ~trained_slots(rank, r_max, rows, frozen_prefix)
    dA, dB = ours[2].cpu(), ours[3].cpu()
    assert (dA[untouched] == 0).all() and (dB[:, untouched] == 0).all()


def as_rank(rank, device):
    return rank.to(device) if isinstance(rank, torch.Tensor) else torch.tensor(rank, device=device)


# --------------------------------------------------------------------------------------------
# Interpreter-runnable checks (also run on CUDA)
# --------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("rank", [1, 64, 65, 256, "per_row", "per_row_sorted"])
def test_r_max_256_spans_several_slot_blocks(rank, frozen_prefix):
    """r_max = 256 is four slot blocks of 64: ranks at and across block edges, per-row ranks whose
    row blocks stop at different slot blocks."""
    M, K, N, r_max = 40, 24, 18, 256
    inputs = random_inputs(M, K, N, r_max, torch.float32)
    if isinstance(rank, str):
        rank = per_row_ranks(M, r_max, sorted_=rank.endswith("sorted"))
    rank = as_rank(rank, DEVICE)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = ops_run(inputs, rank, frozen_prefix, grad_out)
    assert_matches_reference(ours, inputs, rank, frozen_prefix, grad_out, tolerance("triton", torch.float32))


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_strided_operands_are_read_in_place(frozen_prefix):
    """x and W transposed views, A and B column-strided, bias strided: all read through their strides."""
    M, K, N, r_max = 33, 20, 27, 10
    dense = random_inputs(M, K, N, r_max, torch.float32)
    every_other = lambda t, dim: t.repeat_interleave(2, dim)[(slice(None),) * dim + (slice(None, None, 2),)]
    strided = {"x": dense["x"].t().contiguous().t(),            # column-major: strides (1, M)
               "weight": dense["weight"].t().contiguous().t(),  # column-major
               "bias": every_other(dense["bias"], 0),           # stride 2
               "lora_A": every_other(dense["lora_A"], 1),       # strides (2K, 2)
               "lora_B": every_other(dense["lora_B"], 0)}       # strides (2 r_max, 1)
    assert all(torch.equal(strided[k], dense[k]) for k in dense)
    assert not any(t.is_contiguous() for t in strided.values())
    rank = per_row_ranks(M, r_max).to(DEVICE)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = ops_run(strided, rank, frozen_prefix, grad_out)
    assert_matches_reference(ours, dense, rank, frozen_prefix, grad_out, tolerance("triton", torch.float32))


@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_slots_beyond_the_rank_never_leak(frozen_prefix):
    """The kernels mask the slots themselves: NaN in u/v slots a row does not use changes nothing."""
    k = kernels()
    M, K, N, r_max = 37, 19, 23, 12
    t = random_inputs(M, K, N, r_max, torch.float32, bias=False)
    rank = per_row_ranks(M, r_max).to(DEVICE)
    slots = torch.arange(r_max, device=DEVICE)
    u = torch.randn(M, r_max, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    clean_u = torch.where(slots < rank[:, None], u, 0.0)
    nan_u = torch.where(slots < rank[:, None], u, float("nan"))
    y = k.fused_linear(t["x"], t["weight"], None, nan_u, t["lora_B"], rank, ALPHA, torch.empty(M, N, device=DEVICE))
    expected = t["x"] @ t["weight"].t() + (ALPHA / rank[:, None]) * clean_u @ t["lora_B"].t()
    tol = tolerance("triton", torch.float32)
    assert rel_err(y.cpu(), expected.cpu()) <= tol
    trained = (slots == rank[:, None] - 1) if frozen_prefix else (slots < rank[:, None])
    nan_p = torch.where(trained, u, float("nan"))
    dA = k.lora_grad(nan_p, t["x"], rank, ALPHA, frozen_prefix, torch.empty(r_max, K, device=DEVICE))
    expected = (torch.where(trained, u, 0.0) * (ALPHA / rank[:, None])).t() @ t["x"]
    assert rel_err(dA.cpu(), expected.cpu()) <= tol


@pytest.mark.parametrize("rank_dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_rank_dtype(rank_dtype):
    """The kernels load the rank as whatever integer type it is: the same numbers as int64."""
    M, K, N, r_max = 21, 17, 15, 9
    inputs = random_inputs(M, K, N, r_max, torch.float32)
    grad_out = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for rank in (torch.tensor(4), per_row_ranks(M, r_max)):
        expected = ops_run(inputs, rank.to(DEVICE), True, grad_out)
        ours = ops_run(inputs, rank.to(DEVICE, rank_dtype), True, grad_out)
        for a, b in zip(ours, expected):
            assert torch.equal(a, b)


def test_empty_batch():
    """M = 0: empty y and dx, all-zero dA and dB (nothing launches over rows)."""
    inputs = random_inputs(0, 16, 12, 5, torch.float32)
    for rank in (torch.tensor(3, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE)):
        y, dx, dA, dB = ops_run(inputs, rank, False, torch.empty(0, 12, device=DEVICE))
        assert y.shape == (0, 12) and dx.shape == (0, 16)
        assert (dA == 0).all() and (dB == 0).all()


def test_kernels_compile_for_h100_and_pipeline():
    """Compiled for sm_90 with triton's bundled ptxas (no GPU needed): no compile error, every loop's
    loads pipelined, bf16 large configs within shared memory. Runs in a subprocess without the
    interpreter, which would otherwise stand in for the compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode == 77:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_torch_compile_fullgraph_no_recompile_on_rank_change(per_row):
    """torch.compile(fullgraph=True) forward + backward through the Triton kernels (CUDA, or the
    interpreter on CPU); new rank values of the same shape reuse the one compiled graph."""
    import torch._dynamo.testing

    M, K, N, r_max = 64, 48, 40, 16
    inputs = random_inputs(M, K, N, r_max, torch.float32)
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
        assert_matches_reference(ours, inputs, rank, True, g, tolerance("triton", torch.float32))
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------
# GPU checks
# --------------------------------------------------------------------------------------------
def compiled_kernel_count():
    """Compiled binaries in the JIT caches of the three kernels, and the autotuners' cached choices."""
    k = kernels()
    tuners = (k._shrink_kernel, k._fused_linear_kernel, k._lora_grad_kernel)
    binaries = sum(len(cache[0]) for t in tuners for cache in t.fn.device_caches.values())
    return binaries, sum(len(t.cache) for t in tuners)


@gpu
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
def test_no_compilation_over_ranks(per_row):
    """Every rank 1..r_max, in both modes, forward and backward: not one new compiled kernel."""
    M, K, N, r_max = 300, 256, 200, 64
    inputs = random_inputs(M, K, N, r_max, torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    rank = (per_row_ranks(M, r_max) if per_row else torch.tensor(1)).cuda()
    for frozen_prefix in (False, True):  # warm-up: compiles and autotunes once per mode
        ops_run(inputs, rank, frozen_prefix, g)
    torch.cuda.synchronize()
    before = compiled_kernel_count()
    for b in range(1, r_max + 1):
        rank = (torch.randint(1, b + 1, (M,)) if per_row else torch.tensor(b)).cuda()
        for frozen_prefix in (False, True):
            ops_run(inputs, rank, frozen_prefix, g)
    torch.cuda.synchronize()
    assert compiled_kernel_count() == before


@gpu
@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_cuda_graph_replays_after_rank_changes_in_place(per_row, frozen_prefix):
    """Capture forward + backward once; change the rank tensor in place; each replay matches float64."""
    M, K, N, r_max = 130, 96, 80, 24
    inputs = random_inputs(M, K, N, r_max, torch.float32)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).cuda()
    rank = (per_row_ranks(M, r_max) if per_row else torch.tensor(r_max)).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compilation and autotuning
        ops_run(inputs, rank, frozen_prefix, g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = ops_run(inputs, rank, frozen_prefix, g)
    for seed, b in enumerate((1, 7, r_max)):
        rank.copy_(per_row_ranks(M, b, seed=seed) if per_row else torch.tensor(b))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(outs, inputs, rank, frozen_prefix, g, tolerance("triton", torch.float32))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rank,frozen_prefix", [(37, False), ("per_row", True)], ids=["b37-full", "per-row-frozen"])
def test_large_shapes_against_float64(dtype, rank, frozen_prefix):
    """Sizes that take the autotuned (non-small) configs, partial tiles at every edge: ≤ 1e-2 for
    bf16/fp16, ≤ 2e-3 for fp32 (tf32 dots) against float64."""
    M, K, N, r_max = 2051, 2064, 1552, 64
    inputs = random_inputs(M, K, N, r_max, dtype)
    rank = as_rank(per_row_ranks(M, r_max) if rank == "per_row" else rank, "cuda")
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    ours = ops_run(inputs, rank, frozen_prefix, g)
    ref64 = {k: None if v is None else v.double() for k, v in inputs.items()}  # float64 on the GPU: fast
    ref = run(ref64, rank, ALPHA, frozen_prefix, "reference", g.double())
    for name, out, expected in zip(("y", "dx", "dA", "dB"), ours, ref):
        assert out.dtype == dtype and torch.isfinite(out).all(), name
        assert rel_err(out, expected) <= tolerance("triton", dtype), f"{name}: {rel_err(out, expected):.2e}"

