"""launch.py's compiled-kernel path on CPU: the CUDA path's Python with the GPU launches stubbed
(bench/host_harness.py), in a subprocess without TRITON_INTERPRET (the interpreter bypasses that path).

What a GPU run would otherwise be the first to check: after the first launch per key no launch goes through
triton again; a new key (an unaligned operand, another shape bucket, another mode) goes through triton once;
a new rank value or M in the same bucket does not; and every launch hands the compiled kernel its runtime
arguments followed by the constexprs of the config it was compiled with.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "bench")
from host_harness import stubbed_gpu_launches
from dylora_kernels import dylora_linear
from dylora_kernels.triton import hopper, kernels

launchers = {l.fn.__name__: l for l in [*kernels._launch.values(), hopper._LAUNCH]}
g = torch.Generator().manual_seed(0)
K, N, R = 64, 48, 8
w = torch.randn(N, K, generator=g).bfloat16()
A, B = torch.randn(R, K, generator=g).bfloat16(), torch.randn(N, R, generator=g).bfloat16()
report = {}

def call(backend, x, rank, frozen=None):
    if frozen is None:
        dylora_linear(x, w, None, A, B, rank, 1.0, backend=backend)
    else:
        xg, Ag, Bg = x.detach().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
        y = dylora_linear(xg, w, None, Ag, Bg, rank, 1.0, frozen_prefix=frozen, backend=backend)
        y.backward(torch.ones_like(y))

with stubbed_gpu_launches(record=True) as log:
    for backend, frozen in [("triton", None), ("triton-tma", None), ("triton-decode", None),
                            ("triton", True), ("triton", False), ("triton-tma", True), ("triton-tma", False)]:
        name = f"{backend} {frozen}"
        for launcher in launchers.values():  # each case starts with nothing compiled
            launcher.cache.clear()
        x = torch.randn(4, K, generator=g).bfloat16()
        log.clear(); call(backend, x, 3, frozen); first = list(log.first)
        log.clear(); call(backend, x, 3, frozen); again = (list(log.first), [r[0] for r in log.runs])
        arity = all(len(args) == len(launchers[k].fn.params) for k, _, args in log.runs)
        def config_ok(k, args):  # the harness compiles each autotuned kernel with its first config
            l = launchers[k]
            if not hasattr(l.tuner, "configs"):
                return True
            named = dict(zip(l.constexpr_names, args[l.n_runtime:]))
            return all(named[n] == v for n, v in l.tuner.configs[0].kwargs.items())
        tails = all(config_ok(k, args) for k, _, args in log.runs)
        log.clear(); call(backend, x, 5, frozen); new_rank = list(log.first)
        log.clear(); call(backend, torch.randn(3, K, generator=g).bfloat16(), 5, frozen); same_bucket = list(log.first)
        log.clear(); call(backend, torch.randn(9, K, generator=g).bfloat16(), 5, frozen); new_bucket = list(log.first)
        unaligned = None
        if backend != "triton-tma":  # (TMA refuses unaligned operands)
            storage = torch.randn(4 * K + 1, generator=g).bfloat16()
            log.clear(); call(backend, storage[1:].view(4, K), 5, frozen); unaligned = list(log.first)
        report[name] = dict(first=first, again=again, arity=arity, tails=tails, new_rank=new_rank,
                            same_bucket=same_bucket, new_bucket=new_bucket, unaligned=unaligned)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


CASES = ["triton None", "triton-tma None", "triton-decode None", "triton True", "triton False", "triton-tma True",
         "triton-tma False"]


@pytest.mark.parametrize("case", CASES)
def test_second_call_launches_cached_binaries_only(report, case):
    r = report[case]
    assert r["first"], "the first call should have gone through triton"
    first_again, launched = r["again"]
    assert first_again == [], f"triton's launch path ran again: {first_again}"
    assert set(r["first"]) <= set(launched), "the second call should launch what the first compiled"
    if case.startswith("triton-tma"):
        assert "_fused_linear_tma_kernel" in launched
    if case == "triton-decode None":
        assert launched == ["_decode_kernel"]


@pytest.mark.parametrize("case", CASES)
def test_compiled_kernels_get_runtime_arguments_then_the_configs_constexprs(report, case):
    assert report[case]["arity"] and report[case]["tails"]


@pytest.mark.parametrize("case", CASES)
def test_new_key_goes_through_triton_once_rank_and_m_do_not(report, case):
    r = report[case]
    assert r["new_rank"] == [], "a new rank value must not recompile or re-tune (rank is data)"
    assert r["same_bucket"] == [], "M in the same bucket must reuse the binaries"
    assert r["new_bucket"], "another M bucket is another autotune key"
    assert r["unaligned"] is None or r["unaligned"], "an operand that is not 16-byte aligned must not reuse a binary specialised on alignment"
