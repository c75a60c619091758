"""Compile the Triton kernels for an H100 (sm_90) without a GPU, with the ptxas that triton bundles.

    python tests/sm90_compile.py          (TRITON_INTERPRET must be unset: it replaces the compiler)

The interpreter runs the kernels' arithmetic but not the compiler, so it misses what only compilation
finds: type errors in the jitted code, shared memory beyond the chip, main loops the software pipeliner
leaves unpipelined. This compiles each kernel in the layouts the launchers use (forward and backward),
with its small config and its first large config for bf16 (the small one for fp32), specialised the way the JIT
specialises a launch on 16-aligned tensors with sizes divisible by 16 (M excepted: never specialised),
and checks that every loop's loads became asynchronous copies (cp.async) and that the bf16 large
configs fit in shared memory. Prints one line per compilation; exit status 1 if a check fails, 77 if
this triton cannot compile offline.
tests/test_triton.py runs it in a subprocess.
"""
import os
import sys

SKIP = 77  # exit status: nothing checked
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_compile.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

try:  # triton internals: a triton without them (or without its CUDA backend) skips the check
    from triton import compile as triton_compile
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"sm90_compile.py: this triton cannot compile offline ({e})")
    sys.exit(SKIP)

from dylora_kernels.triton import kernels  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # bytes of shared memory one H100 block may use
DTYPES = {"bf16": "*bf16", "fp32": "*fp32"}

# kernel -> (autotuner, pointer types by parameter ("x" = the input dtype), constexprs, launch layouts:
#            name -> the stride parameters that are 1 for that launch's contiguous operands)
KERNELS = {
    "fused": (kernels._fused_linear_kernel,
              dict(x_ptr="x", y_ptr="x", bias_ptr="x", u_ptr="*fp32", z_ptr="x", rank_ptr="*i64", out_ptr="x"),
              dict(HAS_BIAS=True, PER_ROW=False, BLOCK_R=64),
              {"y": ("stride_xk", "stride_yk", "stride_bias", "stride_ur", "stride_zr", "stride_on"),
               "dx": ("stride_xk", "stride_yn", "stride_bias", "stride_ur", "stride_zn", "stride_on")}),
    "shrink": (kernels._shrink_kernel,
               dict(x_ptr="x", y_ptr="x", rank_ptr="*i64", out_ptr="*fp32"),
               dict(PER_ROW=True, BLOCK_R=64),
               {"u": ("stride_xk", "stride_yk", "stride_or"), "v": ("stride_xk", "stride_yr", "stride_or")}),
    "grad": (kernels._lora_grad_kernel,
             dict(p_ptr="*fp32", q_ptr="x", rank_ptr="*i64", out_ptr="x"),
             dict(ONE_HOT=True, PER_ROW=False, BLOCK_R=64),
             {"dA": ("stride_pr", "stride_qk", "stride_ok"), "dB": ("stride_pr", "stride_qk", "stride_or")}),
}


def compile_one(tuner, pointers, constexprs, unit_strides, config, dtype):
    """The compiled kernel for one config, specialised like a launch on aligned, 16-divisible operands."""
    fn = tuner.fn
    not_specialised = {fn.arg_names[i] for i, p in enumerate(fn.params) if p.do_not_specialize}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        fixed = {**constexprs, **config.kwargs, **{s: 1 for s in unit_strides}}
        if name in fixed:
            signature[name], constants[(i,)] = "constexpr", fixed[name]
            continue
        kind = pointers.get(name, "fp32" if name == "alpha" else "i32")
        signature[name] = DTYPES[dtype] if kind == "x" else kind
        if name not in not_specialised and signature[name] != "fp32":
            attrs[(i,)] = BaseBackend.parse_attr("D")  # 16-byte aligned pointer / int divisible by 16
    return triton_compile(ASTSource(fn, signature, constants, attrs), target=H100,
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def loop_bodies(ttgir: str) -> list[str]:
    """The text of each scf.for body in the TTGIR (the kernels have no nested loops)."""
    bodies, lines = [], ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].startswith(" " * indent + "}") and not lines[j].startswith(" " * (indent + 1)))
            bodies.append("\n".join(lines[i + 1:end]))
    return bodies


def main() -> int:
    failures = 0
    for name, (tuner, pointers, constexprs, layouts) in KERNELS.items():
        configs = kernels._configs(name)
        for dtype in DTYPES:
            for layout, unit_strides in layouts.items():
                for config in (configs[0], configs[1]) if dtype == "bf16" else configs[:1]:
                    compiled = compile_one(tuner, pointers, constexprs, unit_strides, config, dtype)
                    copies = [body.count("async_copy_global_to_local") for body in loop_bodies(compiled.asm["ttgir"])]
                    shared = compiled.metadata.shared
                    problems = []
                    if not copies or min(copies) < 2:  # a pipelined loop prefetches both dot operands
                        problems.append("a loop's loads are not pipelined (no async copies)")
                    if dtype == "bf16" and shared > MAX_SHARED:
                        problems.append(f"shared memory {shared} B > {MAX_SHARED} B")
                    failures += bool(problems)
                    print(f"{name:6} {layout:2} {dtype} {config.kwargs} stages={config.num_stages}: "
                          f"smem {shared // 1024} KiB, async copies per loop {copies}"
                          + "".join(f"  FAIL: {p}" for p in problems), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
