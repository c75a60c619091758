"""Per-call host overhead (pytest-benchmark): tiny tensors, so what is timed is Python, validation,
dispatch and autograd, not arithmetic. Run all of it and print the table with
``python bench/bench_overhead.py``; this file alone runs with ``python -m pytest bench/test_bench_overhead.py``.

M = 1, K = N = 64, r_max = 8, b = 4, fp32, one thread. Each round times ITERATIONS calls of every
implementation back to back (the baselines in pytest-benchmark's setup, the package's function as
the benchmark), so all share the machine's state of that moment.
"""
import os
import statistics
import sys
import time

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import IMPLS  # noqa: E402

import dylora_kernels  # noqa: E402

M, K, N, R_MAX, B_RANK, ALPHA = 1, 64, 64, 8, 4, 2.0
PASSES = ("forward", "frozen", "full")
RANK_KINDS = ("int", "0-d", "per-row")
ROUNDS, ITERATIONS = 15, 200


def make_steps(mode, rank_kind):
    """One call of each implementation: F.linear, nn.Linear, naive slicing, dylora_linear, DyLoRALinear."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    linear = nn.Linear(K, N).requires_grad_(False)
    W, bias = linear.weight, linear.bias
    A, B = torch.randn(R_MAX, K, generator=g), torch.randn(N, R_MAX, generator=g)
    rank = {"int": B_RANK, "0-d": torch.tensor(B_RANK), "per-row": torch.full((M,), B_RANK)}[rank_kind]
    layer = dylora_kernels.DyLoRALinear.from_linear(nn.Linear(K, N), R_MAX, ALPHA, frozen_prefix=mode == "frozen")
    layer.set_rank(rank)
    frozen = mode == "frozen"
    calls = {
        "F.linear": lambda x, A, B: IMPLS["F.linear"](x, W, bias, A, B, B_RANK, ALPHA, frozen),
        "nn.Linear": lambda x, A, B: linear(x),
        "naive": lambda x, A, B: IMPLS["naive"](x, W, bias, A, B, rank, ALPHA, frozen),
        "dylora_linear": lambda x, A, B: dylora_kernels.dylora_linear(x, W, bias, A, B, rank, ALPHA,
                                                                      frozen_prefix=frozen),
        "DyLoRALinear": lambda x, A, B: layer(x),
    }
    if mode == "forward":
        def forward_only(call):
            def step():
                with torch.no_grad():
                    return call(x, A, B)
            return step
        return {name: forward_only(call) for name, call in calls.items()}
    x, A, B = x.requires_grad_(True), A.requires_grad_(True), B.requires_grad_(True)
    grad_out = torch.randn(M, N, generator=g)
    wrt = {"F.linear": [x], "nn.Linear": [x], "naive": [x, A, B], "dylora_linear": [x, A, B],
           "DyLoRALinear": [x, layer.lora_A, layer.lora_B]}
    return {name: (lambda call=call, wrt=wrt[name]: torch.autograd.grad(call(x, A, B), wrt, grad_out))
            for name, call in calls.items()}


@pytest.mark.parametrize("rank_kind", RANK_KINDS)
@pytest.mark.parametrize("mode", PASSES)
def test_overhead(benchmark, mode, rank_kind):
    torch.set_num_threads(1)
    steps = make_steps(mode, rank_kind)
    measured = "dylora_linear"
    baselines = {name: [] for name in steps if name != measured}

    def repeated(step):  # pytest-benchmark allows no iterations > 1 with a setup: loop here instead
        def run():
            for _ in range(ITERATIONS):
                step()
        return run

    def time_baselines():
        for name, times in baselines.items():
            start = time.perf_counter()
            repeated(steps[name])()
            times.append((time.perf_counter() - start) / ITERATIONS)

    benchmark.group = f"{mode} {rank_kind}"
    benchmark.pedantic(repeated(steps[measured]), setup=time_baselines, rounds=ROUNDS, warmup_rounds=2)
    benchmark.extra_info.update(mode=mode, rank_kind=rank_kind, iterations=ITERATIONS,
                                baseline_medians={n: statistics.median(t[-ROUNDS:]) for n, t in baselines.items()})
