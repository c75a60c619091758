"""CPU microbenchmarks (pytest-benchmark): the C++ path against naive slicing and F.linear alone.

Run all of them and print the ratio table with ``python bench/bench_cpu.py``; this file alone runs with
``python -m pytest bench/test_bench_cpu.py``. fp32, r_max = 64, b in {8, 64}, forward and
forward+backward in full and frozen-prefix mode (x requires grad; the base layer is frozen).
"""
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import IMPLS as ALL_IMPLS  # noqa: E402  (the baselines are defined once, for CPU and GPU)

SHAPES = [(512, 1024, 1024), (2048, 1024, 4096), (8, 4096, 4096)]  # (M, K, N)
R_MAX, RANKS, ALPHA = 64, (8, 64), 16.0
MODES = ("forward", "full", "frozen")
ROUNDS, WARMUP = 11, 2
IMPLS = {name: ALL_IMPLS[name] for name in ("F.linear", "naive", "dylora")}  # addmm is the GPU peer


def make_step(impl, shape, b, mode):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    W, bias = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A, B = torch.randn(R_MAX, K, generator=g) / K**0.5, torch.randn(N, R_MAX, generator=g)
    fn = lambda x, W, bias, A, B, b, frozen: IMPLS[impl](x, W, bias, A, B, b, ALPHA, frozen)
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(x, W, bias, A, B, b, False)
        return step
    wrt = [x.requires_grad_(True)] if impl == "F.linear" else [x.requires_grad_(True), A.requires_grad_(True),
                                                               B.requires_grad_(True)]
    grad_out = torch.randn(M, N, generator=g)

    def step():
        return torch.autograd.grad(fn(x, W, bias, A, B, b, mode == "frozen"), wrt, grad_out)
    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_cpu(benchmark, shape, b, mode):
    """pytest-benchmark times the C++ path; before each of its rounds the two baselines run once each,
    so all three see the same machine state (a shared 2-core VM drifts by 20 % over seconds, which
    ratios between separately timed benchmarks would inherit)."""
    steps = {impl: make_step(impl, shape, b, mode) for impl in IMPLS}
    baselines = {impl: [] for impl in IMPLS if impl != "dylora"}

    def time_baselines():
        for impl, times in baselines.items():
            start = time.perf_counter()
            steps[impl]()
            times.append(time.perf_counter() - start)

    benchmark.group = f"{'x'.join(map(str, shape))} b={b} {mode}"
    benchmark.pedantic(steps["dylora"], setup=time_baselines, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    medians = {impl: statistics.median(times[-ROUNDS:]) for impl, times in baselines.items()}
    benchmark.extra_info.update(shape=list(shape), b=b, mode=mode, baseline_medians=medians)
