"""Compile every Triton kernel for an H100 (sm_90a) without a GPU, with the ptxas that triton bundles.

    python tests/sm90_compile.py [--quick | --index-width | --precision | --arch [--quick]] [--only=KERNEL,...]
    (TRITON_INTERPRET must be unset: it replaces the compiler)

The interpreter runs the kernels' arithmetic but not the compiler, so it misses what only compilation finds:
type errors in the jitted code, shared memory beyond the chip, register spills, main loops the software pipeliner
leaves unpipelined, a TMA kernel that fell back to plain loads. This compiles each kernel in the layouts its
launchers use, with every autotune config (the configs the autotuner may pick), for bf16 and fp32 inputs and for
the lightest and the heaviest constexpr flags (bias, base, per-row ranks, fp32 adapters beside bf16 inputs),
specialised the way the JIT specialises a launch on 16-aligned tensors with sizes divisible by 16 (M and the
autotune keys excepted: never specialised). Checks, per compilation:

- shared memory ≤ 227 KiB for 16-bit inputs (an fp32 config over it is reported: the autotuner times it as
  infinite and skips it, and every config group keeps one that fits);
- zero register spills, read from ptxas itself: the PTX is assembled again with the bundled ptxas and the flags
  triton uses (`-lineinfo -v --gpu-name=sm_90a`), and its "bytes spill stores/loads" line is parsed (triton 3.6
  keeps that log only when TRITON_DUMP_PTXAS_LOG is set, and its `n_spills` needs a GPU to load the binary);
- the main loop (the innermost loop holding the dot) is pipelined: its operands arrive by asynchronous copies
  (cp.async) or, for the TMA kernel, by TMA copies completing on mbarriers, with asynchronous wgmma that leaves
  one group in flight (`warp_group_dot_wait {pendings ≥ 1}`), and the PTX holds `cp.async.bulk.tensor` (TMA) and
  `wgmma.mma_async`; for the TMA kernel's FLATTEN configs that loop is the single flattened loop over tiles and
  K blocks, the epilogue's TMA store inside it; for the GEMV, its loads are asynchronous copies; for the finish
  kernel, each loop iteration loads one tile of kernels.FINISH_LOAD elements (several splits at once);
- the TMA kernel's exposed waits, printed per compilation: wgmma waits {pendings = 0} before the first TMA load
  of a tile (the seed's) and TMA store waits {pendings = 0} between one tile's epilogue stores (two half-tile
  stores sharing one buffer), for the configs that are not FLATTEN; a LOWRANK_LAST config must have none of the
  first, an EPILOGUE_SUBTILE=False one none of the second; a CTAS_PER_SM = 2 config must fit two programs per SM
  with 16-bit adapters (shared memory ≤ 113 KiB, registers × threads × 2 ≤ 64 K; fp32 adapters: reported).

- index products that can reach 2^31 (WIDE_INDEX: a column-major base, W, x or g; the split partials) are 64-bit
  in the PTX: the stride is widened before it is multiplied, never an operand of 32-bit integer arithmetic;
- fp32 dots follow PRECISION: no tf32 tensor-core instruction under "ieee", tf32 under "tf32".

Prints one line per compilation; exit status 1 if a check fails, 77 if this triton cannot compile offline.
--quick: only each kernel's first large config in bf16 with the heaviest flags. --only=tma,finish: only those
kernels (after the index-width and precision checks). --index-width / --precision: only
that check. --arch [--quick]: the pointer kernels for sm_80, sm_86 and sm_89 (every config, dtype, layout; fp32
dots in both precisions), their shared memory against 99 / 163 / 227 KiB and the pruning rule
(kernels.shared_memory) checked against it; --quick: sm_86, fp32 and fp32 adapters, "ieee", one layout.
tests/test_triton.py runs the full sm_90a check in a subprocess, tests/test_gpu_reliability.py the others.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

SKIP = 77  # exit status: nothing checked
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

try:  # triton internals: a triton without them (or without its CUDA backend) skips the check
    import triton
    from triton import compile as triton_compile
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
except ImportError as e:
    print(f"sm90_compile.py: this triton cannot compile offline ({e})")
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from dylora_kernels.triton import hopper, kernels  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # bytes of shared memory one H100 block may use
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
DTYPES = {"bf16": ("bf16", "bf16"), "fp32": ("fp32", "fp32"), "bf16+fp32 adapters": ("bf16", "fp32")}

# Pointer parameter types: "x" = the input dtype D, "a" = the adapter dtype Da, else a fixed type.
# kernel -> (autotuner, its configs, pointer types, launch layouts: name -> constexprs and unit strides of that
#            launch (None = an absent operand), flag sets: (lightest, heaviest), what its main loop must show:
#            "tma": TMA loads on mbarriers feeding wgmma left in flight; "async": both dot operands by cp.async;
#            "async+prefetch": the streamed operand by cp.async, every other load issued one iteration ahead
#            (the shrink's Y, whose slot mask lies along its contiguous dimension for v); "prefetch": every load one
#            iteration ahead (the GEMV: no dot, so the compiler does not pipeline it); "tiles": every load in a loop
#            is one tile of kernels.FINISH_LOAD elements (the finish kernel); None: no loop to check)
P = dict
KERNELS = {
    "fused": (kernels._fused_linear_kernel, kernels._configs("fused"),
              P(x_ptr="x", y_ptr="x", u_ptr="*fp32", z_ptr="a", bias_ptr="x", base_ptr="x", rank_ptr="*i64",
                out_ptr="x", seed_ptr="*i64"),
              {"y": P(stride_xk=1, stride_yk=1, stride_ur=1, stride_zr=1, stride_bias=1, stride_basen=1, stride_on=1,
                      DROPOUT=False, DROPOUT_VEC4=False, seed_ptr=None),
               "dx": P(stride_xk=1, stride_yn=1, stride_ur=1, stride_zn=1, stride_on=1, HAS_BIAS=False,
                       HAS_BASE=False, bias_ptr=None, base_ptr=None)},
              (P(HAS_W=True, HAS_BIAS=False, HAS_BASE=False, PER_ROW=False, DROPOUT=False, DROPOUT_VEC4=False,
                 seed_ptr=None),
               P(HAS_W=True, HAS_BIAS=True, HAS_BASE=True, PER_ROW=True, DROPOUT=True, DROPOUT_VEC4=True)),
              "async"),
    "tma": (hopper._fused_linear_tma_kernel, kernels._configs("tma"),
            P(u_ptr="*fp32", z_ptr="a", bias_ptr="x", base_ptr="x", rank_ptr="*i64"),
            {"y": P(Y_KN=False, stride_ur=1, stride_zr=1, stride_bias=1, stride_basen=1),
             "dx": P(Y_KN=True, stride_ur=1, stride_zn=1, HAS_BIAS=False, HAS_BASE=False, bias_ptr=None,
                     base_ptr=None)},
            (P(HAS_BIAS=False, HAS_BASE=False, PER_ROW=False), P(HAS_BIAS=True, HAS_BASE=True, PER_ROW=True)),
            "tma"),
    "shrink": (kernels._shrink_kernel, kernels._configs("shrink"),
               P(x_ptr="x", y_ptr="a", rank_ptr="*i64", out_ptr="*fp32", u_ptr="*fp32", fold_ptr="*fp32",
                 seed_ptr="*i64"),
               {"u": P(stride_xk=1, stride_yk=1, stride_or=1, FOLD=False, u_ptr=None, fold_ptr=None),
                "v": P(stride_xk=1, stride_yr=1, stride_or=1, stride_ur=1, stride_fk=1, DROPOUT=False,
                       DROPOUT_VEC4=False, seed_ptr=None)},
               (P(PER_ROW=True, FOLD=False, DROPOUT=False, DROPOUT_VEC4=False, u_ptr=None, fold_ptr=None,
                  seed_ptr=None),
                P(PER_ROW=False, FOLD=True, DROPOUT=True, DROPOUT_VEC4=True)),
               "async+prefetch"),
    "decode": (kernels._decode_kernel, kernels._configs("decode"),
               P(x_ptr="x", w_ptr="x", a_ptr="a", z_ptr="a", bias_ptr="x", base_ptr="x", rank_ptr="*i64",
                 out_ptr="x", u_ptr="*fp32", seed_ptr="*i64"),
               {"y": P(stride_xk=1, stride_wk=1, stride_ak=1, stride_zr=1, stride_bias=1, stride_basen=1,
                       stride_on=1, stride_ur=1, BLOCK_M=16)},
               (P(HAS_W=True, HAS_BIAS=False, HAS_BASE=False, PER_ROW=False, NEED_U=False, DROPOUT=False,
                  DROPOUT_VEC4=False, u_ptr=None, seed_ptr=None),
                P(HAS_W=True, HAS_BIAS=True, HAS_BASE=True, PER_ROW=True, NEED_U=True, DROPOUT=True,
                  DROPOUT_VEC4=True)),
               "async"),
    "grad": (kernels._lora_grad_kernel, kernels._configs("grad"),
             P(p_ptr="*fp32", q_ptr="x", rank_ptr="*i64", part_ptr="*fp32", seed_ptr="*i64"),
             {"dA/dB": P(stride_pr=1, stride_qk=1, stride_wk=1)},
             # the launchers' two extremes (dB: no dropout; dA with dropout)
             (P(ONE_HOT=True, PER_ROW=True, DROPOUT=False, DROPOUT_VEC4=False, seed_ptr=None),
              P(ONE_HOT=False, PER_ROW=False, DROPOUT=True, DROPOUT_VEC4=True)),
             "async"),
    "gemv": (kernels._frozen_gemv_kernel, kernels._configs("gemv"),
             P(p_ptr="*fp32", q_ptr="x", rank_ptr="*i64", part_ptr="*fp32", seed_ptr="*i64"),
             {"dA": P(stride_pr=1, stride_qk=1, stride_wk=1)},
             (P(DROPOUT=False, DROPOUT_VEC4=False, seed_ptr=None), P(DROPOUT=True, DROPOUT_VEC4=True)),
             "prefetch"),
    "finish": (kernels._finish_kernel,  # the launcher's blocks at r_max 64 and 16 (BLOCK_S: compile_one)
               [triton.Config(dict(zip(("BLOCK_R", "BLOCK_K"), kernels.finish_blocks(R, False)[:2])))
                for R in (64, 16)],
               P(part_ptr="*fp32", rank_ptr="*i64", out_ptr="a"),
               {"dA": P(stride_wk=1, stride_ok=1), "dB": P(stride_wk=1, stride_or=1)},
               (P(ONE_SLOT=True), P(ONE_SLOT=False)),
               "tiles"),
}


def compile_one(tuner, pointers, fixed, config, dtype, target=H100, options=None):
    """The compiled kernel for one config, specialised like a launch on aligned, 16-divisible operands."""
    fn = tuner.fn if isinstance(tuner, Autotuner) else tuner
    D, Da = DTYPES[dtype]
    kw = config.kwargs
    descriptors = {}
    if "x_desc" in fn.arg_names:  # the TMA kernel: descriptor block shapes as its pre_hook sets them
        BM, BN, BK = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        descriptors = {"x_desc": (BM, BK), "y_desc": (BK, BN) if fixed["Y_KN"] else (BN, BK),
                       "out_desc": (BM, BN // 2 if kw["EPILOGUE_SUBTILE"] else BN)}
    # r_max = 64: the slot blocks and capacities the launchers derive from it
    capacity = dict(BLOCK_R=kernels.seed_block_r(64) if "z_ptr" in fn.arg_names else kernels.block_r(64),
                    R_CAP=64, NUM_SMS=132, R_BLOCKS=kernels.cdiv(64, kernels.seed_block_r(64)), PRECISION="tf32")
    fixed = {**{k: v for k, v in capacity.items() if k in fn.arg_names}, **fixed, **kw}
    if "BLOCK_S" in fn.arg_names:  # the finish kernel: splits per load as its launcher derives them
        fixed.setdefault("BLOCK_S", kernels.finish_blocks(fixed["BLOCK_R"], fixed["ONE_SLOT"])[2])
    not_specialised = {fn.arg_names[i] for i, p in enumerate(fn.params) if p.do_not_specialize}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in fixed:
            signature[name], constants[(i,)] = "constexpr", fixed[name]
        elif name in descriptors:
            signature[name] = f"tensordesc<{D}[{descriptors[name][0]},{descriptors[name][1]}]>"
        else:
            kind = pointers.get(name, "fp32" if name == "alpha" else "i32")
            signature[name] = {"x": f"*{D}", "a": f"*{Da}"}.get(kind, kind)
            if name not in not_specialised and signature[name] != "fp32":
                attrs[(i,)] = BaseBackend.parse_attr("D")  # 16-byte aligned pointer / int divisible by 16
    return triton_compile(ASTSource(fn, signature, constants, attrs), target=target,
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages, **(options or {})))


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of the PTX assembled by the bundled ptxas with triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def innermost_loops(ttgir: str) -> list[str]:
    """The text of each scf.for body that holds no further loop."""
    bodies, lines = [], ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].startswith(" " * indent + "}") and not lines[j].startswith(" " * (indent + 1)))
            body = "\n".join(lines[i + 1:end])
            if "scf.for" not in body:
                bodies.append(body)
    return bodies


def prefetched(body: str) -> bool:
    """Whether every plain load in a loop body is a prefetch: its result is only carried to the next iteration."""
    yields = [line for line in body.splitlines() if "scf.yield" in line][-1]
    loads = re.findall(r"(%[\w.]+) = tt\.load", body)
    return bool(loads) and all(re.search(re.escape(name) + r"\b", yields) for name in loads)


def pipeline_problems(loop: str, ttgir: str, ptx: str, flattened: bool = False) -> list[str]:
    """What the main loop lacks (see KERNELS), as messages. ``flattened``: the TMA kernel's FLATTEN configs, whose
    main loop must be the one flattened loop over (tile, K block) that also holds the epilogue's TMA store."""
    loops = innermost_loops(ttgir)
    if loop == "tma":
        main = [b for b in loops if "async_tma_copy_global_to_local" in b and "warp_group_dot" in b]
        if not main:
            return ["no loop with TMA loads feeding wgmma"]
        body, problems = main[0], []
        if flattened and "async_tma_copy_local_to_global" not in body:
            problems.append("the persistent loop nest was not flattened (the epilogue's store is outside the loop)")
        if body.count("async_tma_copy_global_to_local") < 2 or "wait_barrier" not in body:
            problems.append("main loop's TMA loads are not pipelined on mbarriers")
        if not re.search(r"warp_group_dot_wait .*pendings = [1-9]", body):
            problems.append("main loop's wgmma is not left in flight (pendings = 0)")
        if "cp.async.bulk.tensor" not in ptx or "wgmma.mma_async" not in ptx:
            problems.append("PTX lacks cp.async.bulk.tensor or wgmma.mma_async")
        return problems
    if loop == "async":
        main = [b for b in loops if "dot" in b]
        if not main or max(b.count("async_copy_global_to_local") for b in main) < 2:
            return ["the main loop's dot operands are not pipelined (no async copies)"]
    if loop == "async+prefetch":
        main = [b for b in loops if "dot" in b]
        if not main or "async_copy_global_to_local" not in main[0] or not prefetched(main[0]):
            return ["the main loop's operands are neither async copies nor prefetched"]
    if loop == "prefetch" and not any(prefetched(b) for b in loops):
        return ["the loop's loads are not issued one iteration ahead"]
    if loop == "tiles":
        shapes = [m for b in loops for m in re.findall(r"tt\.load .*: tensor<([\dx]+)x!tt\.ptr", b)]
        sizes = [eval(shape.replace("x", "*")) for shape in shapes]
        if not sizes or any(size != kernels.FINISH_LOAD for size in sizes):
            return [f"the loop loads {shapes}, not tiles of {kernels.FINISH_LOAD} elements"]
    return []


def tma_waits(ttgir: str) -> tuple[int, int]:
    """(wgmma waits {pendings = 0} before the first TMA load, TMA store waits {pendings = 0} between the first and
    the last epilogue store) in the TTGIR of the TMA kernel: the exposed waits of one tile, as compiled."""
    lines = ttgir.splitlines()
    first_load = next(i for i, line in enumerate(lines) if "async_tma_copy_global_to_local" in line)
    stores = [i for i, line in enumerate(lines) if "async_tma_copy_local_to_global" in line]
    dot_waits = sum(bool(re.search(r"warp_group_dot_wait .*pendings = 0\b", line)) for line in lines[:first_load])
    store_waits = sum(bool(re.search(r"async_tma_store_wait .*pendings = 0\b", line))
                      for line in lines[stores[0]:stores[-1]])
    return dot_waits, store_waits


MAX_SHARED_2_PER_SM = 113 * 1024  # two blocks per SM: (228 KiB - 2 × 1 KiB reserved) / 2


def jobs(quick: bool):
    """(kernel name, layout, dtype, constexprs, config) of every compilation to check."""
    for name, (tuner, configs, pointers, layouts, flag_sets, loop) in KERNELS.items():
        for dtype in DTYPES:
            if (loop == "tma" and dtype == "fp32") or (quick and dtype != "bf16"):
                continue  # the TMA variant is offered for 16-bit inputs only
            # bf16: the lightest and the heaviest flags; fp32 and fp32 adapters: the heaviest
            flags = flag_sets if dtype == "bf16" and not quick and flag_sets[0] != flag_sets[1] else flag_sets[1:]
            if flag_sets[1].get("DROPOUT_VEC4") and not quick:  # also one Philox call per element (K % 4 != 0)
                flags = [*flags, {**flag_sets[1], "DROPOUT_VEC4": False}]
            for layout, layout_fixed in layouts.items():
                for flag in flags:
                    fixed = {**flag, **layout_fixed}
                    # pruned under DROPOUT (kernels._prune_for, per DROPOUT_VEC4): never runs
                    runs = [c for c in configs if not fixed.get("DROPOUT")
                            or kernels.dropout_config_ok(name, c, fixed.get("DROPOUT_VEC4", False))]
                    for config in runs[1:2] if quick else runs:
                        yield name, layout, dtype, fixed, config


# A False flag means no operand: the pointer arguments the launchers pass as None then.
NONE_WHEN_FALSE = {"HAS_W": ("y_ptr", "w_ptr"), "HAS_BIAS": ("bias_ptr",), "HAS_BASE": ("base_ptr",),
                   "NEED_U": ("u_ptr",), "FOLD": ("u_ptr", "fold_ptr"), "DROPOUT": ("seed_ptr",)}


def every_flag_combination():
    """(kernel name, layout, constexprs) for every combination of the boolean flags a launcher may pass, with
    the first config and bf16: each must at least compile (a flag combination never compiled before is how a
    compile-time error, such as a loop-carried variable changing type, reaches a GPU)."""
    for name, (tuner, configs, pointers, layouts, flag_sets, _) in KERNELS.items():
        fn = tuner.fn if isinstance(tuner, Autotuner) else tuner
        names = sorted({k for flags in flag_sets for k, v in flags.items() if isinstance(v, bool)})
        for layout, layout_fixed in layouts.items():
            for values in itertools.product((False, True), repeat=len(names)):
                flags = dict(zip(names, values))
                flags.update({k: v for k, v in layout_fixed.items() if isinstance(v, bool)})  # the layout decides
                nones = {arg: None for flag, v in flags.items() if not v
                         for arg in NONE_WHEN_FALSE.get(flag, ()) if arg in fn.arg_names}
                yield name, layout, {**layout_fixed, **flags, **nones}


# Index products that can reach 2^31 (M·N, M·K, N·K, partial buffers): the stride parameters whose products must be
# computed in 64 bits, per kernel and layout (that layout's unit strides, minus these: a runtime i32 stride, as the
# JIT passes one below 2^31; the heaviest flags). E.g. a column-major base (stride_basen = M) at n ≥ 2^31 / M.
WIDE_INDEX = {
    "fused": ("y", ("stride_basen",)),                 # base (M, N) column-major: n·M
    "tma": ("y", ("stride_basen",)),                   # the same epilogue
    "decode": ("y", ("stride_wk", "stride_basen")),    # W (N, K) column-major: k·N
    "shrink": ("v", ("stride_fp",)),                   # fold partials (M/16, N): row block·N
    "grad": ("dA/dB", ("stride_qk", "stride_ws")),     # Q (M, K) column-major: k·M; partials: split·R·K
    "gemv": ("dA", ("stride_qk", "stride_ws")),
    "finish": ("dA", ("stride_ws",)),
}
NARROW = re.compile(r"^\s*(?:mul|mad|mul24|mad24|add|sub|shl)\.(?:lo\.|hi\.)?[sub]32\b")  # 32-bit index arithmetic


def narrow_index_problems(ttir: str, ptx: str, params) -> list[str]:
    """Which of the kernel parameters ``params`` take part in 32-bit integer arithmetic in the PTX (a multiply, or
    the add of a strength-reduced one) instead of being widened first. The PTX parameter of a TTIR argument has its
    index (descriptors included); the register it is loaded into must be 64-bit (``ld.param.s32 %rd``) or be
    sign-extended (``cvt.s64.s32``) and never be an operand of 32-bit arithmetic."""
    head = next(line for line in ttir.splitlines() if "tt.func public" in line)
    names = re.findall(r"%([A-Za-z_]\w*): ", head)
    entry = re.search(r"\.entry (\w+)\(", ptx).group(1)
    problems = []
    for param in params:
        load = re.search(rf"ld\.param\.\w+\s+(%\w+), \[{entry}_param_{names.index(param)}\];", ptx)
        if load is None:
            problems.append(f"{param}: not loaded (specialised away?)")
            continue
        reg = load.group(1)
        uses = [line.strip() for line in ptx.splitlines()
                if re.search(re.escape(reg) + r"\b", line) and "ld.param" not in line]
        narrow = [line for line in uses if NARROW.search(line)]
        widened = reg.startswith("%rd") or any(re.match(r"cvt\.[su]64\.[su]32|(?:mul|mad)\.wide\.[su]32", line)
                                               for line in uses)
        if narrow:
            problems.append(f"{param}: 32-bit index arithmetic: {narrow[0]}")
        elif not widened:
            problems.append(f"{param}: never widened to 64 bits")
    return problems


def index_width_jobs():
    """(kernel name, constexprs, parameters) of each compilation the 64-bit index check needs."""
    for name, (layout, params) in WIDE_INDEX.items():
        _, _, _, layouts, flag_sets, _ = KERNELS[name]
        fixed = {k: v for k, v in {**flag_sets[1], **layouts[layout]}.items() if k not in params}
        variants = [{**fixed, "ONE_SLOT": v} for v in (False, True)] if "ONE_SLOT" in fixed else [fixed]
        for flags in variants:
            yield name, flags, params


def check_index_width() -> int:
    """Compile each kernel of WIDE_INDEX (first large config, bf16) and check its index products are 64-bit."""
    failures = 0
    for name, fixed, params in index_width_jobs():
        tuner, configs, pointers, _, _, _ = KERNELS[name]
        compiled = compile_one(tuner, pointers, fixed, configs[1], "bf16")
        problems = narrow_index_problems(compiled.asm["ttir"], compiled.asm["ptx"], params)
        failures += bool(problems)
        flags = ",".join(k for k, v in fixed.items() if v is True) or "-"
        print(f"{name:6} [{flags}] 64-bit index products of {', '.join(params)}"
              + ("".join(f"  FAIL: {p}" for p in problems) or ": ok"), flush=True)
    return failures


# Shared memory per block (opt-in maximum) of the Ampere/Ada GPUs users train on, and of the H100.
ARCH_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
R_MAX = 64  # the rank capacity compile_one compiles for (the slot blocks derive from it)


def check_shared_memory(archs, quick: bool) -> int:
    """Compile every pointer kernel with every config (the TMA kernel is sm_90a only) for ``archs`` and report its
    shared memory against 99 / 163 / 227 KiB; fail where kernels.shared_memory (the rule that prunes configs before
    they are tried) and the compiled size disagree about fitting any of the three. fp32 dots compile with both
    precisions (PRECISION "tf32" and "ieee"). --quick: sm_86, the kernels with configs near a limit (fused, decode,
    gradient partials), fp32 inputs and fp32 adapters beside bf16 with "ieee" (torch's default), the first
    layout."""
    SIZES = {"bf16": (2, 2), "fp32": (4, 4), "bf16+fp32 adapters": (2, 4)}
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, (tuner, configs, pointers, layouts, flag_sets, _) in KERNELS.items():
            if name in ("tma", "finish") or (quick and name in ("shrink", "gemv")):
                continue  # TMA: sm_90a only; finish: not autotuned (a few KiB); --quick: the kernels near a limit
            for dtype, precision in [(d, p) for d in (("fp32", "bf16+fp32 adapters") if quick else DTYPES)
                                     for p in (("ieee",) if quick else ("tf32", "ieee") if d != "bf16" else ("tf32",))]:
                # The rule is for launches without dropout; with DROPOUT (not --quick) the configs that run under it
                # must agree with the rule about fitting too (the mask's tile adds a little scratch).
                flag_variants = [{**flag_sets[1], "DROPOUT": False, "DROPOUT_VEC4": False, "seed_ptr": None}
                                 if "DROPOUT" in flag_sets[1] else flag_sets[1]]
                if flag_sets[1].get("DROPOUT") and not quick:
                    flag_variants.append(flag_sets[1])
                for layout, layout_fixed in list(layouts.items())[:1 if quick else None]:
                    for flags, config in [(f, c) for f in flag_variants for c in configs if not f.get("DROPOUT")
                                          or kernels.dropout_config_ok(name, c, f.get("DROPOUT_VEC4", False))]:
                        fixed = {**flags, **layout_fixed, "PRECISION": precision}
                        smem = compile_one(tuner, pointers, fixed, config, dtype, target).metadata.shared
                        rule = kernels.shared_memory(name, config, *SIZES[dtype], R_MAX, precision)
                        fits = " ".join(f"{limit // 1024}K:{'y' if smem <= limit else 'n'}"
                                        for limit in sorted(set(ARCH_LIMITS.values())))
                        wrong = [limit // 1024 for limit in set(ARCH_LIMITS.values())
                                 if (smem <= limit) != (rule <= limit)]
                        failures += bool(wrong)
                        print(f"sm_{arch} {name:6} {layout:5} {dtype} {precision}"
                              f"{' DROPOUT' if flags.get('DROPOUT') else ''} {config.kwargs} "
                              f"stages={config.num_stages}: "
                              f"smem {smem // 1024} KiB (rule {rule // 1024} KiB) fits {fits}"
                              + (f"  FAIL: the rule disagrees at {wrong} KiB" if wrong else ""), flush=True)
    return failures


def check_precision() -> int:
    """The fp32 fused kernel compiled with PRECISION "ieee" (torch's "highest") has no tf32 tensor core instruction;
    with "tf32" it has (sm_90a: wgmma ... tf32); bf16 inputs with fp32 adapters under "ieee" keep bf16 wgmma for the
    GEMM and no tf32."""
    tuner, configs, pointers, layouts, flag_sets, _ = KERNELS["fused"]
    failures = 0
    for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16+fp32 adapters", "ieee")):
        ptx = compile_one(tuner, pointers, {**flag_sets[1], **layouts["y"], "PRECISION": precision}, configs[1],
                          dtype).asm["ptx"]
        tf32 = bool(re.search(r"(?:wgmma|mma)\S*\.tf32", ptx))
        bf16 = bool(re.search(r"(?:wgmma|mma)\S*\.bf16", ptx))
        ok = tf32 == (precision == "tf32") and bf16 == (dtype != "fp32")  # the bf16 GEMM keeps its tensor cores
        failures += not ok
        print(f"fused {dtype} {precision}: {'tf32 mma' if tf32 else 'no tf32'}{', bf16 mma' if bf16 else ''}"
              + ("" if ok else "  FAIL"), flush=True)
    return failures


def main() -> int:
    if "--arch" in sys.argv:  # the pointer kernels on Ampere / Ada: shared memory and the pruning rule
        quick = "--quick" in sys.argv
        return 1 if check_shared_memory((86,) if quick else (80, 86, 89), quick) else 0
    if "--precision" in sys.argv:
        return 1 if check_precision() else 0
    failures = check_index_width()
    if "--index-width" in sys.argv:
        return 1 if failures else 0
    failures += check_precision()
    seen = set()
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
    for name, layout, fixed in every_flag_combination():
        if only and name not in only:
            continue
        tuner, configs, pointers, _, _, _ = KERNELS[name]
        key = (name, layout, tuple(sorted(fixed.items(), key=lambda kv: kv[0])))
        if key in seen:
            continue
        seen.add(key)
        flags = ",".join(k for k, v in fixed.items() if v is True) or "-"
        try:
            compile_one(tuner, pointers, fixed, configs[0], "bf16")
        except Exception as e:  # noqa: BLE001 - report every combination that does not compile
            failures += 1
            print(f"{name:6} {layout:5} [{flags}]: FAIL: does not compile: {str(e)[-600:]}", flush=True)
    print(f"{len(seen)} flag combinations compiled", flush=True)
    for name, layout, dtype, fixed, config in jobs("--quick" in sys.argv):
        if only and name not in only:
            continue
        tuner, _, pointers, _, _, loop = KERNELS[name]
        compiled = compile_one(tuner, pointers, fixed, config, dtype)
        flags = ",".join(k for k, v in fixed.items() if v is True and k != "EPILOGUE_SUBTILE") or "-"
        head = (f"{name:6} {layout:5} {dtype} [{flags}] {config.kwargs} stages={config.num_stages} "
                f"warps={config.num_warps}: smem {compiled.metadata.shared // 1024} KiB")
        problems = []
        if compiled.metadata.shared > MAX_SHARED:
            if dtype == "fp32":  # the autotuner times it as infinite and skips it (OutOfResources)
                print(f"{head} > 227: never runs", flush=True)
                continue
            problems.append(f"shared memory {compiled.metadata.shared} B > {MAX_SHARED} B")
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        if spills:
            problems.append(f"{spills} bytes of register spills")
        problems += pipeline_problems(loop, compiled.asm["ttgir"], compiled.asm["ptx"],
                                      flattened=config.kwargs.get("FLATTEN", False))
        waits = ""
        if loop == "tma":
            kw = config.kwargs
            if not kw["FLATTEN"]:  # (a flattened loop's prologue and epilogue copies make these counts meaningless)
                dot_waits, store_waits = tma_waits(compiled.asm["ttgir"])
                waits = (f"; {dot_waits} wgmma wait{{pendings = 0}} before the first TMA load, {store_waits} TMA "
                         f"store wait{{pendings = 0}} within the epilogue")
                if kw["LOWRANK_LAST"] and dot_waits:
                    problems.append("LOWRANK_LAST: a wgmma wait precedes the K loop's first TMA loads")
                if not kw["EPILOGUE_SUBTILE"] and store_waits:
                    problems.append("one epilogue store per tile, yet a store wait within the epilogue")
            if kw["CTAS_PER_SM"] > 1:
                fits = (compiled.metadata.shared <= MAX_SHARED_2_PER_SM
                        and regs * config.num_warps * 32 * kw["CTAS_PER_SM"] <= 65536)
                waits += f", {kw['CTAS_PER_SM']} per SM: {'fit' if fits else 'do not fit'}"
                if not fits and dtype == "bf16":  # fp32 adapters: it runs one per SM (the tuner times it as it runs)
                    problems.append(f"{kw['CTAS_PER_SM']} programs per SM do not fit (shared memory or registers)")
        failures += bool(problems)
        print(f"{head}, {regs} regs, spills {spills} B{waits}" + "".join(f"  FAIL: {p}" for p in problems),
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
