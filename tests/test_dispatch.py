"""The per-shape dispatcher (dispatch.py) and the CUDA router (backends.py), on CPU: an injected fake
timer stands in for CUDA events, so which candidate wins, the caches, the DYLORA_DISPATCH override
and CUDA-graph capture are all checked without a GPU. Also: the op schemas agree with the Python
fallback's, and that fallback (no C++ extension) still serves the Triton kernels."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dylora_kernels import backends, dispatch, ops
from conftest import CUDA, HAS_TRITON, make_inputs, reference_run, rel_err

_C = ops._C
INTERPRETER = pytest.mark.skipif(CUDA or not HAS_TRITON or _C is None, reason="runs the Triton kernels on CPU tensors in the "
                                                                "interpreter (CI without a GPU)")


class FakeTimer:
    """Times from a table instead of the clock (each candidate here returns its own name when run);
    records what it was asked to time."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, run):
        name = run()
        self.calls.append(name)
        return self.times[name]


def candidates(*names):
    return {name: (lambda name=name: name) for name in names}


def test_steady_state_timer_times_bursts_sized_from_one_call():
    """One warm-up call, one timed call, then `reps` bursts of about burst_ms: the result is per call, the bursts
    never exceed max_calls, and a slow candidate is timed one call at a time."""
    def run(per_call_ms, fixed_ms=0.05, **kwargs):
        calls, bursts = [], []

        def burst(fn, n):
            bursts.append(n)
            for _ in range(n):
                fn()
            return n * per_call_ms + fixed_ms  # a fixed cost per burst (the first launch from an idle GPU)

        ms = dispatch.steady_state_timer(lambda: calls.append(1), burst=burst, **kwargs)
        return ms, len(calls), bursts

    ms, n_calls, bursts = run(0.1, reps=3, burst_ms=2.0)
    assert bursts == [1, 13, 13, 13] and n_calls == 1 + 1 + 39  # 2.0 / (0.1 + 0.05) = 13 calls per burst
    assert ms == pytest.approx(0.1 + 0.05 / 13)  # the fixed cost is amortised over the burst
    assert run(0.0001, fixed_ms=0.0, reps=2)[2] == [1, 100, 100]  # capped at max_calls
    assert run(5.0, reps=2)[2] == [1, 1, 1]  # a call longer than the burst: one call per burst


def test_fastest_candidate_wins_and_is_remembered(tmp_path):
    timer = FakeTimer({"cublas": 2.0, "triton": 1.5, "triton-tma": 1.7})
    d = dispatch.Dispatcher(timer=timer, capturing=lambda: False, cache_dir=tmp_path)
    key = ("forward", "bf16", 8192)
    assert d.choose("H100", key, candidates("cublas", "triton", "triton-tma")) == "triton"
    assert sorted(timer.calls) == ["cublas", "triton", "triton-tma"]
    assert d.choose("H100", key, candidates("cublas", "triton", "triton-tma")) == "triton"
    assert len(timer.calls) == 3  # remembered: nothing timed again
    assert d.choose("H200", key, candidates("cublas", "triton")) == "triton"  # another GPU: measured again
    assert len(timer.calls) == 5
    # A new process (a new Dispatcher) on the same GPU model reads the choice from disk: no timing.
    fresh = FakeTimer({})
    again = dispatch.Dispatcher(timer=fresh, capturing=lambda: False, cache_dir=tmp_path)
    assert again.choose("H100", key, candidates("cublas", "triton", "triton-tma")) == "triton"
    assert fresh.calls == []
    assert json.loads((tmp_path / "H100.json").read_text()) == {repr(key): "triton"}


def test_a_single_candidate_is_never_timed():
    timer = FakeTimer({})
    d = dispatch.Dispatcher(timer=timer, capturing=lambda: False, cache_dir=None)
    assert d.choose("H100", ("k",), candidates("cublas")) == "cublas" and timer.calls == []


def test_capture_never_times(tmp_path):
    """Inside a CUDA-graph capture: the remembered choice, else the first candidate, never a timing,
    and the default is not remembered (the next eager call measures)."""
    timer = FakeTimer({"cublas": 3.0, "triton": 1.0})
    capturing = [True]
    d = dispatch.Dispatcher(timer=timer, capturing=lambda: capturing[0], cache_dir=tmp_path)
    assert d.choose("H100", ("a",), candidates("cublas", "triton")) == "cublas" and timer.calls == []
    capturing[0] = False
    assert d.choose("H100", ("a",), candidates("cublas", "triton")) == "triton" and len(timer.calls) == 2
    capturing[0] = True
    assert d.choose("H100", ("a",), candidates("cublas", "triton")) == "triton" and len(timer.calls) == 2


def test_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "H100.json").write_text("{not json")
    timer = FakeTimer({"cublas": 1.0, "triton": 2.0})
    d = dispatch.Dispatcher(timer=timer, capturing=lambda: False, cache_dir=tmp_path)
    assert d.choose("H100", ("b",), candidates("cublas", "triton")) == "cublas" and len(timer.calls) == 2


def test_dispatch_env_restricts_the_families(monkeypatch):
    monkeypatch.setenv("DYLORA_DISPATCH", "triton")
    assert dispatch.forced_family() == "triton"
    assert dispatch.in_family("triton-tma", "triton") and not dispatch.in_family("cublas", "triton")
    assert not dispatch.in_family("cublas/triton", "triton") and dispatch.in_family("cublas/triton", "auto")
    monkeypatch.setenv("DYLORA_DISPATCH", "fastest")
    with pytest.raises(ValueError, match=r"DYLORA_DISPATCH must be one of \('auto', 'triton', 'cublas'\), got 'fastest'"):
        dispatch.forced_family()


def test_router_times_on_first_call_only(monkeypatch):
    """backends._first_call on a (pretend) CUDA device: the dispatcher measures the candidates once per key,
    the chosen kernel is cached, and the call returns its result."""
    timer = FakeTimer({"cublas": 2.0, "triton": 1.0})
    monkeypatch.setattr(backends, "DISPATCHER", dispatch.Dispatcher(timer=timer, capturing=lambda: False,
                                                                     cache_dir=None))
    monkeypatch.setattr(backends, "_device_name", lambda device: "FakeGPU")
    monkeypatch.setattr(backends, "_capturing", lambda device: False)
    monkeypatch.setattr(backends, "_CHOSEN", {})
    kernels = {name: (lambda *args, name=name: name) for name in ("cublas", "triton")}
    key = ("forward", "auto", torch.device("cuda", 0), 64)
    x = torch.empty(2, 3, device="meta")
    x_on_gpu = type("X", (), {"device": torch.device("cuda", 0), "dtype": x.dtype, "shape": x.shape})()
    assert backends._first_call(key, kernels, (), x_on_gpu, torch.ones(2), 4, False) == "triton"
    assert backends._CHOSEN[key] is kernels["triton"] and len(timer.calls) == 2
    assert backends.DISPATCHER.memory == {("FakeGPU", "forward", "auto", 64): "triton"}  # the device index is not kept


@INTERPRETER
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_backward_pairs_mix_families(frozen_prefix):
    """A "<dx>/<lora>" candidate takes dx from one implementation and dA, dB from another: here the C++
    composition and the Triton kernels (interpreter) on CPU, against float64."""
    kernels = {"cublas": _C.backward, "triton": lambda *args: backends._triton_backward(*args, variant="pointer")}
    pairs = backends._pairs(kernels)
    assert set(pairs) == {"cublas", "triton", "cublas/triton", "triton/cublas"}
    inputs = make_inputs((23, 32), 20, 6, True, "contiguous", torch.float32, "cpu")
    x, W, A, B = (inputs[k] for k in ("x", "weight", "lora_A", "lora_B"))
    rank = torch.tensor(4)
    _, u = _C.forward(x, W, None, None, A, B, rank, 2.0, True)
    g = torch.randn(23, 20, generator=torch.Generator().manual_seed(1))
    ref = reference_run(inputs, rank, 2.0, frozen_prefix, g)
    for name, kernel in pairs.items():
        dx, dA, dB = kernel(g, x, W, A, B, u, rank, 2.0, frozen_prefix, True, True, 0.0, None)
        for what, out, expected in zip(("dx", "dA", "dB"), (dx, dA, dB), ref[1:]):
            assert rel_err(out, expected) <= 1e-5, (name, what)


def test_schemas_agree_with_the_fallback():
    """The Python fallback defines the same schemas as csrc/dylora.cpp (checked here, not by hand)."""
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(torch.ops.dylora, name).default._schema) == "dylora::" + schema


@INTERPRETER
def test_without_the_extension_triton_still_works():
    """With dylora_kernels._C unimportable (a failed build), the ops are defined in Python and the
    Triton kernels serve them (here in the interpreter): the shared op tests pass, cpp is refused clearly."""
    code = (
        "import sys; sys.modules['dylora_kernels._C'] = None\n"
        "import pytest, torch, dylora_kernels\n"
        "assert dylora_kernels.ops._C is None\n"
        "try:\n"
        "    dylora_kernels.dylora_linear(torch.ones(1, 2), torch.ones(3, 2), None, torch.ones(1, 2), torch.ones(3, 1), 1, 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the C++ extension' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('cpp should be refused')\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_ops.py', '-k',"
        " 'triton and not opcheck and (r7 or r1) and not frozen']))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DYLORA_ALLOW_NO_EXTENSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
