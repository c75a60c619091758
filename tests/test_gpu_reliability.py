"""What a real GPU (and a user's GPU) hits that the interpreter cannot show (issue 19), each checked offline, with a
fake, in the interpreter, or on a GPU when one is at hand:

1. index products that reach 2^31 are computed in 64 bits (the compiled PTX; on a GPU, M·N > 2^31);
2. fp32 dots follow torch's matmul precision, which is part of the dispatch key;
3. a candidate that fails to compile or launch is dropped with one warning, the next one is used; configs are pruned
   by the device's shared memory before they are tried;
4. a key first seen inside CUDA-graph capture raises a clear error; host ranks are prepared outside capture;
5. deterministic mode: a fixed implementation and config per key, nothing timed;
6. what runs on which GPU architecture (``backends.available_backends``).
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import dylora_kernels
from dylora_kernels import backends, dispatch, reference
from conftest import CUDA, HAS_TRITON, make_inputs, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_COMPILE = os.path.join(ROOT, "tests", "sm90_compile.py")
INTERPRETER = pytest.mark.skipif(CUDA or not HAS_TRITON, reason="runs the Triton kernels in the interpreter (no GPU)")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def offline_compile(*flags, timeout=900):
    """tests/sm90_compile.py with ``flags``, without the interpreter (which would replace the compiler)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, SM90_COMPILE, *flags], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode == 77:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture
def fresh_router(monkeypatch):
    """Empty router caches (the choices made here are not kept)."""
    monkeypatch.setattr(backends, "_CHOSEN", {})
    monkeypatch.setattr(backends, "_DEVICE_RANKS", {})
    monkeypatch.setattr(backends, "_RANK_TABLES", {})


class FakeX:
    """Stands in for x on a pretend CUDA device (only what _first_call reads)."""
    device, dtype, shape = torch.device("cuda", 0), torch.float32, (2, 3)


def pretend_gpu(monkeypatch, timer, capturing=False):
    monkeypatch.setattr(backends, "DISPATCHER", dispatch.Dispatcher(timer=timer, capturing=lambda: capturing,
                                                                     cache_dir=None, skip=dispatch.DISPATCHER.skip))
    monkeypatch.setattr(backends, "_device_name", lambda device: "FakeGPU")
    monkeypatch.setattr(backends, "_capturing", lambda device: capturing)


def timed(times, calls):
    """A fake dispatcher timer: runs the candidate once (as the real one's warm-up does), then reads its time."""
    def timer(run):
        calls.append(run())
        return times[calls[-1]]
    return timer


# --------------------------------------------------------------------------------------------
# 1. 64-bit index products
# --------------------------------------------------------------------------------------------
def test_index_products_are_64_bit_in_the_ptx():
    """Compiled for sm_90a (no GPU needed): every stride whose product can reach 2^31 (a column-major base, W or
    x/g; the split partials) is widened to 64 bits before it is multiplied, in every kernel that has one."""
    out = offline_compile("--index-width")
    assert out.count(": ok") >= 8, out


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA else 0


needs_10gb = pytest.mark.skipif(_free_gpu_bytes() < 10 * 2**30, reason="needs a CUDA device with 10 GB free")


@gpu
@needs_10gb
def test_column_major_base_past_2_31_elements():
    """y = base + delta with base (M, N) column-major and M·N > 2^31 (bf16, 4.3 GB): the epilogue's n·M index
    product overflows in 32 bits. Checked on the last rows and columns against float64."""
    M, N, K, R = 16400, 131072, 64, 8
    assert M * N > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5
    B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16, generator=g)
    base = torch.randn(N, M, device="cuda", dtype=torch.bfloat16, generator=g).t()  # (M, N), column-major
    y = dylora_kernels.dylora_delta(x, A, B, 5, 2.0, base=base, backend="triton")
    rows, cols = torch.arange(M - 40, M, device="cuda"), torch.arange(N - 300, N, device="cuda")
    ref = (base[rows][:, cols].double()
           + (2.0 / 5) * (x[rows].double() @ A[:5].double().t()) @ B[cols, :5].double().t())
    assert rel_err(y[rows][:, cols], ref) < 1e-2


@gpu
@needs_10gb
def test_column_major_gradient_past_2_31_elements():
    """dB = (alpha/b)·gᵀ·u with g (M, N) column-major and M·N > 2^31: the gradient kernel's k·M index product
    overflows in 32 bits. The last columns of dB against float64."""
    from dylora_kernels import triton as T

    M, N, K, R = 16400, 131072, 64, 8
    g_gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g_gen)
    A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16, generator=g_gen) / K**0.5
    B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16, generator=g_gen)
    grad = torch.randn(N, M, device="cuda", dtype=torch.bfloat16, generator=g_gen).t()  # column-major
    rank = torch.tensor(5, device="cuda")
    u = (x.float() @ A.float().t()) * (torch.arange(R, device="cuda") < 5)
    _, _, dB = T.backward(grad, x, None, A, B, u, rank, 2.0, False, False, True)
    cols = torch.arange(N - 300, N, device="cuda")
    ref = (2.0 / 5) * grad[:, cols].double().t() @ u.double()
    assert rel_err(dB[cols], ref) < 1e-2


# --------------------------------------------------------------------------------------------
# 2. fp32 precision follows torch
# --------------------------------------------------------------------------------------------
@pytest.fixture
def matmul_precision():
    """Set torch's fp32 matmul precision for one test, restored after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_precision_key_follows_torch(matmul_precision):
    for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
        matmul_precision(setting)
        assert backends.matmul_precision_key() == expected, setting


@INTERPRETER
def test_fp32_launches_get_torchs_precision_and_keys_differ(matmul_precision, fresh_router, monkeypatch):
    """Each Triton launch of an fp32 call gets the PRECISION torch allows ("ieee" under "highest", "tf32" under
    "high"), the two settings are two dispatch keys, and a 16-bit call gets triton's default (its dots ignore it)."""
    from dylora_kernels.triton import launch

    seen = []
    real = launch.Launcher.__call__

    def spy(self, grid, args, constexprs):
        seen.append(constexprs["PRECISION"])
        return real(self, grid, args, constexprs)

    monkeypatch.setattr(launch.Launcher, "__call__", spy)
    t = make_inputs((5, 16), 12, 4, False, "contiguous", torch.float32, "cpu")
    call = lambda t: dylora_kernels.dylora_linear(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 3, 1.0,
                                                  backend="triton")
    for setting, expected in (("highest", "ieee"), ("high", "tf32")):
        matmul_precision(setting)
        seen.clear()
        call(t)
        assert seen and set(seen) == {expected}, (setting, seen)
    keys = [k for k in backends._CHOSEN if k[0] == "forward"]
    assert len(keys) == 2 and {k[-2] for k in keys} == {"ieee", "tf32"}
    seen.clear()
    call({k: v.half() for k, v in t.items() if v is not None} | {"bias": None})
    assert seen and set(seen) == {"tf32"}


def test_fp32_dots_compile_to_ieee_or_tf32():
    """Offline (sm_90a): the fp32 fused kernel compiled with "ieee" has no tf32 tensor-core instruction, with
    "tf32" it does."""
    out = offline_compile("--precision")
    assert "fp32 ieee: no tf32" in out and "fp32 tf32: tf32 mma" in out, out


# --------------------------------------------------------------------------------------------
# 3. Fall back instead of failing
# --------------------------------------------------------------------------------------------
def _failing(error):
    def run(*args):
        raise error
    return run


def _triton_error(name, *args):
    errors = pytest.importorskip("triton.runtime.errors")
    return getattr(errors, name)(*args)


@pytest.mark.parametrize("error", ["OutOfResources", "PTXASError", "launch"])
def test_failing_first_candidate_is_dropped_on_the_first_call(error, fresh_router):
    """On the first call for a key, a candidate that raises is dropped with one warning, the next is used and
    remembered (CPU: no timing, the first candidate is tried first)."""
    exc = (RuntimeError("Triton Error [CUDA]: invalid argument") if error == "launch"
           else _triton_error(error, *((100_000, 101_376, "shared memory") if error == "OutOfResources" else ("x",))))
    kernels = {"triton": _failing(exc), "cublas": lambda *args: "cublas ran"}
    key = ("forward", "auto", torch.device("cpu"), "fallback", error)
    x = torch.empty(2, 3)
    with pytest.warns(RuntimeWarning, match="'triton' kernel failed") as caught:
        assert backends._first_call(key, kernels, (), x, torch.ones(2), 4, False) == "cublas ran"
    assert len(caught) == 1
    assert backends._CHOSEN[key] is kernels["cublas"]


def test_failing_candidate_is_dropped_in_measurement(monkeypatch, fresh_router):
    """On a (pretend) GPU the dispatcher times every candidate: one that raises while timed is ruled out with one
    warning, even when it would be the fastest, and the best of the others is used."""
    calls = []
    pretend_gpu(monkeypatch, timed({"triton": 1.0, "cublas": 3.0, "triton-tma": 2.0}, calls))
    kernels = {"cublas": lambda *a: "cublas", "triton": _failing(_triton_error("OutOfResources", 1, 0, "shared")),
               "triton-tma": lambda *a: "triton-tma"}
    with pytest.warns(RuntimeWarning, match="'triton' kernel failed") as caught:
        out = backends._first_call(("forward", "measured"), kernels, (), FakeX(), torch.ones(2), 4, False)
    assert out == "triton-tma" and len(caught) == 1 and sorted(calls) == ["cublas", "triton-tma"]


def test_every_candidate_failing_says_so(fresh_router):
    kernels = {"a": _failing(RuntimeError("no")), "b": _failing(RuntimeError("nope"))}
    with pytest.warns(RuntimeWarning), pytest.raises(dispatch.CandidateFailed, match="no forward kernel could run"):
        backends._first_call(("forward", "x"), kernels, (), torch.empty(2, 3), torch.ones(2), 4, False)


def test_out_of_memory_is_not_a_fallback(fresh_router):
    """Running out of device memory is the caller's problem, not the candidate's: it propagates at once."""
    kernels = {"a": _failing(torch.OutOfMemoryError("CUDA out of memory")), "b": lambda *a: "b"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError):
            backends._first_call(("forward", "oom"), kernels, (), torch.empty(2, 3), torch.ones(2), 4, False)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_configs_are_pruned_by_the_devices_shared_memory(monkeypatch):
    """Before a config is tried: only those whose shared memory (kernels.shared_memory) fits the device's limit
    (99 KiB: sm_86/89); the small config when none fits; one config when fixed (deterministic)."""
    from dylora_kernels.triton import kernels

    monkeypatch.setattr(kernels, "_INTERPRET", False)
    configs = kernels._configs("fused")
    assert len(configs) > 1
    x = torch.empty(1, dtype=torch.float32)
    args = dict(x_ptr=x, z_ptr=x, R=64, M_BUCKET=4096, N_BUCKET=4096, K_BUCKET=4096)
    unlimited = kernels._prune_for("fused", False, configs, args)
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: 99 * 1024)
    kept = kernels._prune_for("fused", False, configs, args)
    too_big = [c for c in unlimited if kernels.shared_memory("fused", c, 4, 4, 64) > 99 * 1024]
    assert too_big and kept == [c for c in unlimited if c not in too_big] and kept
    assert kernels._prune_for("fused", True, configs, args) == kept[:1]
    monkeypatch.setattr(kernels, "shared_memory_limit", lambda device: 1024)
    assert kernels._prune_for("fused", False, configs, args) == configs[:1]


def test_pruning_rule_matches_compiled_kernels_on_sm86():
    """Offline: fp32 and fp32-adapter configs (IEEE dots) of the kernels with configs near a limit (fused, decode,
    gradient partials) compiled for sm_86; the pruning rule agrees with the compiled shared memory about fitting
    99 / 163 / 227 KiB. (The full report for sm_80/86/89:
    ``python tests/sm90_compile.py --arch``.)"""
    out = offline_compile("--arch", "--quick")
    assert "sm_86" in out and "FAIL" not in out


# --------------------------------------------------------------------------------------------
# 4. CUDA-graph capture of a key never seen eagerly
# --------------------------------------------------------------------------------------------
@INTERPRETER
def test_capture_of_an_unseen_key_raises_a_clear_error(monkeypatch, fresh_router):
    """With a (fake) capture in progress, the first call for a key raises, saying to warm up eagerly; after one
    eager call the same key runs inside the capture (nothing left to choose) and gives the same result."""
    t = make_inputs((6, 16), 12, 4, True, "contiguous", torch.float32, "cpu")
    call = lambda: dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 3, 1.0,
                                                backend="triton")
    monkeypatch.setattr(backends, "_capturing", lambda device: True)
    with pytest.raises(backends.CaptureError, match="once eagerly"):
        call()
    assert backends._CHOSEN == {}
    monkeypatch.setattr(backends, "_capturing", lambda device: False)
    eager = call()
    monkeypatch.setattr(backends, "_capturing", lambda device: True)
    assert torch.equal(call(), eager)


def test_host_ranks_are_prepared_outside_capture(monkeypatch, fresh_router):
    """A host rank's device copy: every rank 0..r_max is made at the first eager call (one table, 16-byte aligned
    entries), so a capture at another host rank finds its tensor; an unprepared one raises instead of copying."""
    meta = torch.device("meta")
    backends.prepare_device_ranks(meta, 8)
    monkeypatch.setattr(backends, "_capturing", lambda device: True)
    for b in (1, 5, 8):
        on_device = backends._rank_on(torch.tensor(b), meta)
        assert on_device.device == meta and on_device.dim() == 0
        assert on_device.storage_offset() * on_device.element_size() % 16 == 0
    with pytest.raises(backends.CaptureError, match="once eagerly"):
        backends._rank_on(torch.tensor(9), meta)


@gpu
def test_real_capture_of_an_unseen_shape(monkeypatch, fresh_router):
    """A CUDA graph captured at a shape never run eagerly raises CaptureError (not an obscure CUDA error); after an
    eager warm-up at one host rank, graphs captured at other host ranks replay correctly."""
    monkeypatch.setattr(backends, "DISPATCHER", dispatch.Dispatcher(cache_dir=None, skip=(dispatch.CandidateFailed,)))
    M, K, N, R = 70, 48, 40, 12
    t = make_inputs((M, K), N, R, True, "contiguous", torch.float32, "cuda")
    call = lambda b: dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], b, 2.0)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call(3)
    except Exception as e:  # noqa: BLE001 - ending the aborted capture may raise on top of it
        assert any(isinstance(c, backends.CaptureError) and "once eagerly" in str(c)
                   for c in (e, e.__context__, e.__cause__)), repr(e)
    else:
        pytest.fail("capturing an unseen shape did not raise CaptureError")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(3)  # the warm-up
    torch.cuda.current_stream().wait_stream(side)
    for b in (1, 7, R):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = call(b)
        graph.replay()
        torch.cuda.synchronize()
        t64 = {k: v.cpu().double() for k, v in t.items()}
        ref = reference.dylora_linear(t64["x"], t64["weight"], t64["bias"], t64["lora_A"], t64["lora_B"],
                                      torch.tensor(b), 2.0, False)
        assert rel_err(y, ref) < 2e-3, b


# --------------------------------------------------------------------------------------------
# 5. Determinism on request
# --------------------------------------------------------------------------------------------
def test_deterministic_follows_torch_and_the_environment(monkeypatch):
    monkeypatch.setattr(backends, "_ENV_DETERMINISTIC", False)
    assert not backends.deterministic()
    env = {**os.environ, backends.DETERMINISTIC_ENV: "1"}
    code = "from dylora_kernels import backends; print(backends.deterministic())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_choice_is_fixed_not_timed(monkeypatch, fresh_router):
    """A fake timer that would pick "triton": deterministic mode takes the cuBLAS composition without timing
    anything (and "triton" when cuBLAS is not offered)."""
    calls = []
    pretend_gpu(monkeypatch, timed({"cublas": 3.0, "triton": 1.0}, calls))
    kernels = {"triton": lambda *a: "triton", "cublas": lambda *a: "cublas"}
    assert backends._first_call(("forward", "timed"), kernels, (), FakeX(), torch.ones(2), 4, False) == "triton"
    calls.clear()
    assert backends._first_call(("forward", "fixed"), kernels, (), FakeX(), torch.ones(2), 4, True) == "cublas"
    only_triton = {"triton-tma": lambda *a: "triton-tma", "triton": lambda *a: "triton"}
    assert backends._first_call(("forward", "fixed2"), only_triton, (), FakeX(), torch.ones(2), 4, True) == "triton"
    assert calls == []


@INTERPRETER
def test_deterministic_mode_is_a_key_and_uses_fixed_configs(monkeypatch, fresh_router):
    """The setting is part of the key, and the Triton kernels then launch through their fixed-config tuners."""
    from dylora_kernels.triton import kernels

    used = []
    real = kernels._launcher
    monkeypatch.setattr(kernels, "_launcher", lambda name, tuned: used.append(tuned) or real(name, tuned))
    t = make_inputs((5, 16), 12, 4, False, "contiguous", torch.float32, "cpu")
    for fixed in (False, True):
        monkeypatch.setattr(backends, "_ENV_DETERMINISTIC", fixed)
        used.clear()
        dylora_kernels.dylora_linear(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 3, 1.0, backend="triton")
        assert used and set(used) == {not fixed}
    assert {k[-1] for k in backends._CHOSEN if k[0] == "forward"} == {False, True}


_DETERMINISTIC_RUN = """
from conftest import make_inputs  # first: sets TRITON_INTERPRET=1 without a GPU
import hashlib, torch, dylora_kernels
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
t = make_inputs((300, 96), 80, 16, True, "contiguous", dtype, device)
leaves = {k: v.clone().requires_grad_(k in ("x", "lora_A", "lora_B")) for k, v in t.items()}
y = dylora_kernels.dylora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                                 7, 2.0, backend=BACKEND)
y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y))
digest = hashlib.sha256()
for out in (y, leaves["x"].grad, leaves["lora_A"].grad, leaves["lora_B"].grad):
    digest.update(out.detach().float().cpu().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.skipif(not (CUDA or HAS_TRITON), reason="needs a GPU or the Triton interpreter")
def test_two_processes_give_identical_bits(tmp_path):
    """DYLORA_DETERMINISTIC=1: two fresh processes (no shared dispatch or autotune cache) compute bit-identical y,
    dx, dA, dB (on a GPU with backend="auto": no timing decides; in the interpreter, the Triton kernels)."""
    backend = "auto" if CUDA else "triton"
    env = {**os.environ, backends.DETERMINISTIC_ENV: "1", "PYTHONPATH": os.path.join(ROOT, "tests")}
    digests = []
    for i in range(2):
        env["DYLORA_DISPATCH_CACHE"] = env["TRITON_CACHE_DIR"] = str(tmp_path / str(i))
        done = subprocess.run([sys.executable, "-c", _DETERMINISTIC_RUN.replace("BACKEND", repr(backend))], env=env,
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        digests.append(done.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------------------------
# 6. Every GPU architecture
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability,runs", [((7, 5), set()), ((8, 0), {"triton", "triton-decode"}),
                                             ((8, 6), {"triton", "triton-decode"}),
                                             ((8, 9), {"triton", "triton-decode"}),
                                             ((9, 0), {"triton", "triton-decode", "triton-tma"})])
def test_available_backends_per_architecture(monkeypatch, capability, runs):
    """What ``python -m dylora_kernels info`` lists for a (pretend) GPU of each architecture: the pointer Triton
    kernels on sm_80+, the TMA kernel on sm_90+ only, cuBLAS everywhere; each backend that does not run says why."""
    monkeypatch.setattr(backends, "_capability", lambda device: capability)
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    found = backends.available_backends(torch.device("cuda", 0))
    names = {name for name, ok, _ in found if ok and name.startswith("triton")}
    assert names == runs
    table = {name: (ok, note) for name, ok, note in found}
    assert table["cublas"][0] == (backends._C is not None)
    for name, (ok, note) in table.items():
        assert note, name
        if not ok and name.startswith("triton"):
            assert f"sm_{capability[0]}{capability[1]}" in note


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tma_variant_only_on_sm90_and_later(monkeypatch):
    from dylora_kernels.triton import hopper

    for capability, expected in (((8, 0), False), ((8, 6), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        hopper._device_has_tma.cache_clear()
        assert hopper._device_has_tma(torch.device("cuda", 0)) is expected, capability
    hopper._device_has_tma.cache_clear()


def test_available_backends_here():
    """On this machine: the C++ CPU kernels when built; Triton in the interpreter when TRITON_INTERPRET=1."""
    table = {name: ok for name, ok, _ in backends.available_backends("cpu")}
    assert table["cpp"] == (backends._C is not None)
    assert table["triton"] == (HAS_TRITON and not CUDA)
