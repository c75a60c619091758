"""CUDA-only checks of the dispatch layer (skipped without a GPU): the router measures the candidates
once per key and remembers the choice across processes; CUDA-graph capture after a warm-up uses the
remembered choice and replays correctly after the rank changes in place; and the host time of one
enqueued forward. The shared suites (test_ops, test_wrappers, test_reliability) run every CUDA backend
("cublas", "triton", "auto") through conftest.BACKENDS."""
import time

import pytest
import torch

import dylora_kernels
from dylora_kernels import backends, dispatch, ops
from conftest import CUDA, make_inputs, per_row_ranks, reference_run, rel_err

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
ALPHA = 2.0


@pytest.fixture
def fresh_dispatcher(monkeypatch, tmp_path):
    d = dispatch.Dispatcher(cache_dir=tmp_path, skip=dispatch.DISPATCHER.skip)
    monkeypatch.setattr(backends, "DISPATCHER", d)
    monkeypatch.setattr(backends, "_CHOSEN", {})
    if ops._C is not None:
        ops._C.executor_clear()  # the C++ executor's plans: the next call asks the (fresh) planner
    return d


def test_auto_measures_once_per_key_and_remembers(fresh_dispatcher, tmp_path, monkeypatch):
    t = make_inputs((300, 256), 200, 16, True, "contiguous", torch.bfloat16, "cuda")
    call = lambda: dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                                torch.tensor(8, device="cuda"), ALPHA)
    start = time.perf_counter()
    first = call()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    assert len(fresh_dispatcher.timings) == 1, "the first call measures the forward candidates once"
    (times,) = fresh_dispatcher.timings.values()
    assert {"cublas", "triton"} <= set(times)
    assert torch.equal(call(), first) and len(fresh_dispatcher.timings) == 1
    print(f"first call with measurement: {first_s:.2f} s; timings {times}")
    # A new process: a new dispatcher on the same cache directory measures nothing.
    again = dispatch.Dispatcher(cache_dir=tmp_path, skip=dispatch.DISPATCHER.skip)
    monkeypatch.setattr(backends, "DISPATCHER", again)
    monkeypatch.setattr(backends, "_CHOSEN", {})
    if ops._C is not None:
        ops._C.executor_clear()
    assert torch.equal(call(), first) and again.timings == {}


def capture(step):
    """(graph, step's output inside it): one eager run on a side stream (the warm-up: the dispatcher decides there),
    then step captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.parametrize("per_row", [False, True], ids=["one-rank", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_graph_capture_after_warm_up(fresh_dispatcher, per_row, frozen_prefix):
    """Warm up eagerly (the dispatcher decides), capture forward + backward with backend="auto", then
    change the rank tensor in place: each replay matches float64."""
    M, K, N, r_max = 130, 96, 80, 24
    inputs = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, "cuda")
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).cuda()
    rank = (per_row_ranks(M, r_max) if per_row else torch.tensor(r_max)).cuda()
    leaves = {k: v.clone().requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in inputs.items()}

    def step():
        for k in ("x", "lora_A", "lora_B"):
            leaves[k].grad = None
        y = dylora_kernels.dylora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                                         leaves["lora_B"], rank, ALPHA, frozen_prefix=frozen_prefix)
        y.backward(g)
        return y

    graph, y = capture(step)
    for seed, b in enumerate((1, 7, r_max)):
        rank.copy_(per_row_ranks(M, b, seed=seed) if per_row else torch.tensor(b))
        graph.replay()
        torch.cuda.synchronize()
        ours = (y.detach(), leaves["x"].grad, leaves["lora_A"].grad, leaves["lora_B"].grad)
        ref = reference_run(inputs, rank, ALPHA, frozen_prefix, g)
        for name, out, expected in zip(("y", "dx", "dA", "dB"), ours, ref):
            assert rel_err(out.cpu(), expected) <= 2e-3, name


def test_host_time_of_one_forward(fresh_dispatcher):
    """Reported, not asserted here (bench_gpu.py prints it beside the targets): µs to enqueue one
    M = 1 forward with a 0-d device rank, no sync, after warm-up."""
    t = make_inputs((1, 4096), 4096, 64, False, "contiguous", torch.bfloat16, "cuda")
    rank = torch.tensor(32, device="cuda")
    for backend in ("auto", "cublas", "triton"):
        call = lambda: dylora_kernels.dylora_linear(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], rank, ALPHA,
                                                    backend=backend)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            call()
        host_us = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"{backend}: {host_us:.1f} µs host per forward")


@pytest.mark.parametrize("variant", ["pointer", "decode", "tma"])
def test_launches_skip_triton_python_after_the_first_call(monkeypatch, variant):
    """After the first call per key every Triton kernel launches straight from its cached binary: the
    autotuner's and the JIT's Python never run again, and the results are bitwise the same."""
    import triton

    from dylora_kernels import triton as tk

    M = 8 if variant == "decode" else 300
    t = make_inputs((M, 256), 192, 16, True, "contiguous", torch.bfloat16, "cuda")
    x, W, bias, A, B = (t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    if variant not in tk.variants("forward", x, W, A, B):
        pytest.skip(f"{variant} does not apply on this GPU")
    rank = per_row_ranks(M, 16).cuda()
    g = torch.randn(M, 192, device="cuda", dtype=torch.bfloat16)

    def call():
        y, u = tk.forward(x, W, bias, None, A, B, rank, ALPHA, True, variant=variant)
        back = tk.backward(g, x, W, A, B, u, rank, ALPHA, True, True, True,
                           variant="tma" if variant == "tma" else "pointer")
        return (y, *back)

    call()  # the first launch on a device goes through triton before the launcher can key its cache
    first = call()
    calls = []
    for cls in (triton.runtime.Autotuner, triton.runtime.JITFunction):
        original = cls.run
        monkeypatch.setattr(cls, "run", lambda self, *a, _original=original, **k: (calls.append(self), _original(self, *a, **k))[1])
    again = call()
    torch.cuda.synchronize()
    assert calls == [], f"triton's launch path ran again: {calls}"
    for a, b in zip(first, again):
        assert torch.equal(a, b)


CPP_EXECUTOR = ops._C is not None and ops._C.CUDA_BUILD


@pytest.mark.skipif(not CPP_EXECUTOR, reason="needs the GPU build (the C++ CUDA executor)")
@pytest.mark.parametrize("backend", ["cublas", "triton", "triton-tma", "triton-decode"])
@pytest.mark.parametrize("rank_kind", ["int", "device", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_cpp_executor_equals_the_python_path(backend, rank_kind, frozen_prefix, dropout_p):
    """The C++ executor runs the same kernels as the Python path for a named backend: bit-identical y, u, dx, dA, dB
    (the cuBLAS composition's lean prep on both; Triton binaries from C++ vs triton's launcher), with and without
    adapter dropout (the seed on the device)."""
    M = 16 if backend == "triton-decode" else 300
    t = make_inputs((M, 256), 200, 16, True, "contiguous", torch.bfloat16, "cuda")
    rank = {"int": torch.tensor(5), "device": torch.tensor(5, device="cuda"),
            "per-row": per_row_ranks(M, 16).cuda()}[rank_kind]
    drop = (dropout_p, torch.tensor(1234, device="cuda") if dropout_p else None)
    args = (t["x"], t["weight"], t["bias"], None, t["lora_A"], t["lora_B"], rank, ALPHA, True)
    try:
        py_y, py_u = backends.forward(*args, backend, *drop)
    except ValueError as error:  # e.g. triton-tma below sm_90
        pytest.skip(str(error))
    y, u = torch.ops.dylora.forward(*args, backend, *drop)
    assert torch.equal(y, py_y) and torch.equal(u, py_u)
    if backend == "triton-decode":
        return  # forward only
    grad = torch.randn_like(y)
    bwd = (grad, t["x"], t["weight"], t["lora_A"], t["lora_B"], u, rank, ALPHA, frozen_prefix, True, True, backend)
    for ours, theirs in zip(torch.ops.dylora.backward(*bwd, *drop), backends.backward(*bwd, *drop)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("seed_kind", ["drawn", "given"])
def test_dropout_under_graph_capture(fresh_dispatcher, seed_kind):
    """Adapter dropout in a captured training step (warmed up eagerly): with the seed drawn by the op (a device-side
    draw inside the graph) every replay uses a new mask; with a seed tensor the caller rewrites between replays, each
    replay equals the float64 reference with that seed."""
    from test_dropout import reference_run as dropout_reference
    M, K, N, r_max = 96, 64, 48, 8
    inputs = make_inputs((M, K), N, r_max, True, "contiguous", torch.float32, "cuda")
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).cuda()
    rank = torch.tensor(5, device="cuda")
    seed = torch.tensor(7, device="cuda") if seed_kind == "given" else None
    leaves = {k: v.clone().requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in inputs.items()}

    def step():
        for k in ("x", "lora_A", "lora_B"):
            leaves[k].grad = None
        y = dylora_kernels.dylora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                                         leaves["lora_B"], rank, ALPHA, frozen_prefix=True, dropout_p=0.3,
                                         dropout_seed=seed)
        y.backward(g)
        return y

    graph, y = capture(step)
    outputs = []
    for value in (11, 12):
        if seed is not None:
            seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        outputs.append(y.detach().clone())
        if seed is not None:
            ours = (y.detach(), leaves["x"].grad, leaves["lora_A"].grad, leaves["lora_B"].grad)
            ref = dropout_reference(inputs, 5, ALPHA, True, g, 0.3, value)
            for name, out, expected in zip(("y", "dx", "dA", "dB"), ours, ref):
                assert rel_err(out.cpu(), expected) <= 2e-3, name
    assert not torch.equal(outputs[0], outputs[1])  # a new mask per replay
