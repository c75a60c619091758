"""The C++ Triton launcher (csrc/triton_launch.cpp) without a GPU.

- Host logic: for every variant and flag combination of the forward and the backward (weight, bias, base
  present or not, shared or per-row ranks, frozen or full, compute_dx / compute_lora, need_u), odd shapes and a
  TMA config with two programs per SM,
  the C++ launcher's launches (kernel, grid, every argument, constexprs, packed parameters) and allocations
  equal the Python path's, both with the GPU launches stubbed (bench/cplan_harness.py, in a subprocess
  without TRITON_INTERPRET, like tests/test_host_path.py).
- Plans: "not handled" when Python has not run a launch yet, refusals (num_ctas, PDL, scratch), and malformed
  descriptions rejected with a clear error.
- ABI (tests/sm90_compile.py's compilations for sm_90a): the parameters the C++ launcher packs for a compiled
  kernel equal, in type, size and order, what triton's own launcher passes (its generated C source) and the
  PTX ``.entry`` parameter list.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _run(script: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode == 77:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


HOST_SCRIPT = r"""
import itertools, json, sys, torch
sys.path.insert(0, "bench")
from host_harness import stubbed_gpu_launches
from cplan_harness import compare

g = torch.Generator().manual_seed(0)
rnd = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=g).to(dtype)
results = {}

def rank_of(per_row, M, R):
    return torch.randint(1, R + 1, (M,), generator=g) if per_row else torch.tensor(R // 2 + 1)

with stubbed_gpu_launches(record=True) as log:
    for variant, has_w, has_bias, has_base, per_row, need_u in itertools.product(
            ("pointer", "decode", "tma"), *[(False, True)] * 5):
        M = 5 if variant == "decode" else 37
        K, N, R = (40, 24, 6) if variant != "pointer" else (45, 29, 6)
        adapters = torch.float32 if (has_bias and variant == "pointer") else torch.bfloat16
        x = rnd(M, K) if variant != "pointer" or has_base else rnd(M, 2 * K)[:, ::2]  # strided x too
        inputs = dict(x=x, weight=rnd(N, K) if has_w else None, bias=rnd(N) if has_bias else None,
                      base=rnd(M, N) if has_base else None, lora_A=rnd(R, K, dtype=adapters),
                      lora_B=rnd(N, R, dtype=adapters), rank=rank_of(per_row, M, R), alpha=1.5, need_u=need_u)
        case = f"forward {variant} w={has_w} bias={has_bias} base={has_base} per_row={per_row} need_u={need_u}"
        results[case] = compare(log, "forward", variant, inputs)
    for variant, has_w, frozen, per_row, (cdx, clora) in itertools.product(
            ("pointer", "tma"), (False, True), (False, True), (False, True), ((True, True), (True, False), (False, True))):
        M, K, N, R = 37, 40, 24, 6
        x, grad = rnd(M, K), rnd(M, N)
        if variant == "pointer" and per_row:
            grad = rnd(N, M).t()  # a column-major g
        inputs = dict(grad=grad, x=x, weight=rnd(N, K) if has_w else None, lora_A=rnd(R, K), lora_B=rnd(N, R),
                      u=rnd(M, R, dtype=torch.float32), rank=rank_of(per_row, M, R), alpha=0.75,
                      frozen_prefix=frozen, compute_dx=cdx, compute_lora=clora)
        case = f"backward {variant} w={has_w} frozen={frozen} per_row={per_row} dx={cdx} lora={clora}"
        results[case] = compare(log, "backward", variant, inputs)
    # A long M: several split-M partials in the gradients
    M, K, N, R = 300, 40, 24, 9
    inputs = dict(grad=rnd(M, N), x=rnd(M, K), weight=rnd(N, K), lora_A=rnd(R, K), lora_B=rnd(N, R),
                  u=rnd(M, R, dtype=torch.float32), rank=torch.tensor(4), alpha=2.0, frozen_prefix=False,
                  compute_dx=True, compute_lora=True)
    results["backward pointer M=300 R=9"] = compare(log, "backward", "pointer", inputs)
    # Adapter dropout: the seed pointer, the threshold (its int32 bits: p = 0.75 is above 2^31) and DROPOUT
    seed = torch.tensor(2**40 + 9)
    for variant, per_row, p in itertools.product(("pointer", "decode", "tma"), (False, True), (0.1, 0.75)):
        M, (K, N, R) = (5 if variant == "decode" else 37), ((40, 24, 6) if variant != "pointer" else (45, 29, 6))
        inputs = dict(x=rnd(M, K), weight=rnd(N, K), bias=rnd(N), base=None, lora_A=rnd(R, K), lora_B=rnd(N, R),
                      rank=rank_of(per_row, M, R), alpha=1.5, need_u=True, dropout_p=p, dropout_seed=seed)
        results[f"dropout forward {variant} per_row={per_row} p={p}"] = compare(log, "forward", variant, inputs)
    for variant, frozen, per_row, (cdx, clora) in itertools.product(
            ("pointer", "tma"), (False, True), (False, True), ((True, True), (True, False), (False, True))):
        M, K, N, R = 37, 40, 24, 6
        inputs = dict(grad=rnd(M, N), x=rnd(M, K), weight=rnd(N, K), lora_A=rnd(R, K), lora_B=rnd(N, R),
                      u=rnd(M, R, dtype=torch.float32), rank=rank_of(per_row, M, R), alpha=0.75, frozen_prefix=frozen,
                      compute_dx=cdx, compute_lora=clora, dropout_p=0.3, dropout_seed=seed)
        case = f"dropout backward {variant} frozen={frozen} per_row={per_row} dx={cdx} lora={clora}"
        results[case] = compare(log, "backward", variant, inputs)
    M, K, N, R = 300, 40, 24, 9
    for frozen in (False, True):
        inputs = dict(grad=rnd(M, N), x=rnd(M, K), weight=rnd(N, K), lora_A=rnd(R, K), lora_B=rnd(N, R),
                      u=rnd(M, R, dtype=torch.float32), rank=torch.tensor(4), alpha=2.0, frozen_prefix=frozen,
                      compute_dx=True, compute_lora=True, dropout_p=0.75, dropout_seed=seed)
        results[f"dropout backward pointer M=300 R=9 frozen={frozen}"] = compare(log, "backward", "pointer", inputs)
    # A TMA config with two programs per SM: 6 tiles of 16 x 16, grid min(2 x SMs, tiles), in C++ as in Python
    import triton
    from dylora_kernels.triton import hopper
    small = hopper.CONFIGS[0]
    hopper.CONFIGS = [triton.Config({**small.kwargs, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "CTAS_PER_SM": 2},
                                    num_warps=small.num_warps, num_stages=small.num_stages)]
    hopper._CHOSEN.clear()
    M, K, N, R = 37, 40, 24, 6
    inputs = dict(x=rnd(M, K), weight=rnd(N, K), bias=None, base=None, lora_A=rnd(R, K), lora_B=rnd(N, R),
                  rank=torch.tensor(3), alpha=1.5, need_u=True)
    results["forward tma 2 per SM"] = compare(log, "forward", "tma", inputs)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def host_results():
    return _run(HOST_SCRIPT)


def test_cpp_forward_launches_equal_python(host_results):
    cases = {k: v for k, v in host_results.items() if k.startswith("forward")}
    assert len(cases) == 97
    bad = {k: v for k, v in cases.items() if v}
    assert not bad, json.dumps(bad, indent=1)[:6000]


def test_cpp_backward_launches_equal_python(host_results):
    cases = {k: v for k, v in host_results.items() if k.startswith("backward")}
    assert len(cases) == 49
    bad = {k: v for k, v in cases.items() if v}
    assert not bad, json.dumps(bad, indent=1)[:6000]


def test_cpp_dropout_launches_equal_python(host_results):
    """Adapter dropout through both launchers: every variant, shared and per-row ranks, p below and above 1/2 in the
    forward; frozen/full, dx/lora subsets and a split-M reduction in the backward (tma: dx by the pointer kernel)."""
    cases = {k: v for k, v in host_results.items() if k.startswith("dropout")}
    assert len(cases) == 12 + 24 + 2
    bad = {k: v for k, v in cases.items() if v}
    assert not bad, json.dumps(bad, indent=1)[:6000]


PLAN_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "bench")
from host_harness import stubbed_gpu_launches
from dylora_kernels import _C
from dylora_kernels import triton as T
from dylora_kernels.triton import cplan

g = torch.Generator().manual_seed(1)
x, w = torch.randn(8, 32, generator=g).bfloat16(), torch.randn(16, 32, generator=g).bfloat16()
A, B = torch.randn(4, 32, generator=g).bfloat16(), torch.randn(16, 4, generator=g).bfloat16()
rank = torch.tensor(3)
out = {}
with stubbed_gpu_launches() as log:
    args = (x, w, None, None, A, B, rank, 1.0, True)
    description = cplan.describe("forward", "pointer", *args)
    plan = _C.triton_plan(description)
    _C.triton_record(1)
    out["before_python"] = _C.triton_forward(plan, *args) is None  # Python has not run this key yet
    out["launches_before"] = _C.triton_launches()
    T.forward(*args)  # the Python path runs it (compiling, here: the stub)
    out["after_python"] = _C.triton_forward(plan, *args) is not None
    out["launches_after"] = _C.triton_launches()
    out["binaries"] = plan.binaries
    big = torch.randn(600, 32, generator=g).bfloat16()  # another M bucket: a new autotune key
    out["new_bucket"] = _C.triton_forward(plan, big, w, None, None, A, B, rank, 1.0, True) is None
    for field, value in [("num_ctas", 2), ("launch_pdl", True), ("launch_cooperative_grid", True),
                         ("global_scratch_size", 64), ("profile_scratch_size", 64)]:
        def refusing(step, a, c, field=field, value=value):
            b = cplan.binary_for(step, a, c)
            return None if b is None else {**b, field: value}
        plan2 = _C.triton_plan({**description, "binary_for": refusing})
        out[f"refuses {field}"] = _C.triton_forward(plan2, *args) is None
    _C.triton_record(0)
    errors = {}
    kernels = dict(description["kernels"])
    kernels["fused"] = {**kernels["fused"], "params": kernels["fused"]["params"][:-1]}
    for name, bad in [("not a dict", 3), ("version", {**description, "version": 2}),
                      ("variant", {**description, "variant": "tiles"}),
                      ("decode backward", {**description, "op": "backward", "variant": "decode"}),
                      ("param count", {**description, "kernels": kernels})]:
        try:
            _C.triton_plan(bad)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    try:
        _C.triton_backward(plan, x, x, w, A, B, x.float(), rank, 1.0, False, True, True)
        out["wrong_op"] = None
    except ValueError as e:
        out["wrong_op"] = str(e)
print(json.dumps(out))
"""


def test_plan_not_handled_refused_and_errors():
    r = _run(PLAN_SCRIPT)
    assert r["before_python"] and r["launches_before"] == 0, "launched before Python ran the key"
    assert r["after_python"] and r["launches_after"] == 2 and r["binaries"] == 2
    assert r["new_bucket"], "a new autotune key must fall back to Python"
    for field in ("num_ctas", "launch_pdl", "launch_cooperative_grid", "global_scratch_size",
                  "profile_scratch_size"):
        assert r[f"refuses {field}"], field
    errors = r["errors"]
    assert "must be a dict" in errors["not a dict"]
    assert "version" in errors["version"]
    assert "tiles" in errors["variant"] and "decode" in errors["decode backward"]
    assert "runtime parameters" in errors["param count"]
    assert "forward plan" in r["wrong_op"]


ABI_SCRIPT = r"""
import json, os, re, sys
sys.path.insert(0, "tests")
import sm90_compile as S  # exits 77 when this triton cannot compile offline
from triton.backends.nvidia.driver import make_launcher
from triton.runtime.autotuner import Autotuner
from dylora_kernels import _C

C_TYPES = {"CUdeviceptr": ("ptr", 8), "int32_t": ("i32", 4), "int64_t": ("i64", 8), "uint64_t": ("u64", 8),
           "uint32_t": ("fp32", 4), "CUtensorMap": ("tensordesc", 128)}  # (fp32 travels as its uint32_t bits)

def triton_layout(kernel):
    # What triton's generated launcher passes: its _launch() parameters after the fixed ones, then the scratch.
    src = make_launcher({}, dict(kernel.src.signature), kernel.metadata.tensordesc_meta)
    decls = [d.strip() for d in re.search(r"static void _launch\(([^)]*)\)", src).group(1).split(",")]
    decls = decls[decls.index("CUdeviceptr profile_scratch") + 1:]
    params = re.search(r"void \*params\[\] = \{([^}]*)\}", src).group(1).split(",")
    assert params[-2:] == [" &global_scratch", " &profile_scratch "], params[-2:]
    return [list(C_TYPES[d.rsplit(" ", 1)[0]]) for d in decls] + [["ptr", 8], ["ptr", 8]]

PARAM = re.compile(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+(\.ptr\s+)?[^,\[]*?(\w+)(?:\[(\d+)\])?\s*$")

def ptx_layout(ptx, name):
    body = re.search(r"\.entry\s+" + name + r"\s*\((.*?)\)", ptx, re.S).group(1)
    out = []
    for line in body.split(","):
        m = PARAM.search(line.strip())
        ty, ptr, _, count = m.groups()
        if count:
            out.append(["tensordesc", int(count)] if ty == "b8" else [ty, -1])
        elif ptr:
            out.append(["ptr", 8])
        else:
            out.append({"u32": ["i32", 4], "s32": ["i32", 4], "u64": ["i64", 8], "s64": ["i64", 8],
                        "f32": ["fp32", 4]}.get(ty, [ty, -1]))
    return out

full = os.environ.get("DYLORA_ABI_FULL") == "1"
jobs = list(S.jobs(quick=not full))
if full:
    jobs += [(n, l, "bf16", f, S.KERNELS[n][1][0]) for n, l, f in S.every_flag_combination()]
results = {}
for name, layout, dtype, fixed, config in jobs:
    tuner, _, pointers, *_ = S.KERNELS[name]
    kernel = S.compile_one(tuner, pointers, fixed, config, dtype)
    fn = tuner.fn if isinstance(tuner, Autotuner) else tuner
    types = [kernel.src.signature[p] for p in fn.arg_names]
    cpp = [list(t) for t in _C.triton_param_layout(types)]
    case = f"{name} {layout} {dtype} {sorted(fixed.items())} {config.kwargs}"
    results[case] = {"cpp": cpp, "triton": triton_layout(kernel), "ptx": ptx_layout(kernel.asm["ptx"], kernel.name)}
print(json.dumps(results))
"""


def test_packed_parameters_match_triton_and_ptx():
    results = _run(ABI_SCRIPT, timeout=1200)
    assert len(results) >= 11
    kinds = set()
    for case, r in results.items():
        assert r["cpp"] == r["triton"], f"{case}: C++ packs {r['cpp']}, triton's launcher {r['triton']}"
        assert r["cpp"] == r["ptx"], f"{case}: C++ packs {r['cpp']}, the PTX .entry takes {r['ptx']}"
        kinds.update(t for t, _ in r["cpp"])
    assert {"ptr", "i32", "fp32", "tensordesc", "i64"} <= kinds  # every kind the kernels pass was checked


def test_bench_host_has_cpp_rows(tmp_path):
    """bench/bench_host.py's C++ launcher rows run (one round) and report a time for every row."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, "bench/bench_host.py", "--rounds", "1", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    median = json.loads(out.read_text())["median_us"]
    cpp = {k: v for k, v in median.items() if k.startswith("C++ launcher")}
    assert len(cpp) == 7 and all(v > 0 for v in cpp.values()), median
