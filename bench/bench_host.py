"""Host time of the CUDA path, measured on this CPU: the Python of every Triton variant, launches stubbed.

    python bench/bench_host.py [--rounds N] [--json PATH]

The op, the router, the Triton wrappers and launch.py's compiled-kernel path run as on a GPU; the C
launcher call, the driver queries and the first launch per key (autotuning, compiling) are stubbed
(bench/host_harness.py). Tiny tensors (M = 1, K = N = 64, r_max = 8, b = 4, bf16), one thread: what is
timed is host work. Each round times every row back to back; the table shows medians over rounds, in µs,
beside F.linear (forward) and F.linear forward + backward on the same tensors. On a GPU each launch adds
its C launcher call (a few µs) on top.

The "C++ launcher" rows time csrc/triton_launch.cpp (the kernel contract run from C++ once a plan exists:
allocations, arguments, specialisation key, binary lookup, parameter packing) in a C++ loop, its launches
going to its recording stub instead of cuLaunchKernelEx; the op's validation and dispatch are not in them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this times the compiled-kernel path, not the interpreter")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_harness import stubbed_gpu_launches  # noqa: E402

from dylora_kernels import _C, backends, dylora_linear  # noqa: E402

M, K, N, R_MAX, RANK = 1, 64, 64, 8, 4
CALLS = 300  # per row per round


def rows():
    """name -> (pass, one call). Every call allocates its outputs, as a real one does."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    A, B = torch.randn(R_MAX, K, generator=g).bfloat16(), torch.randn(N, R_MAX, generator=g).bfloat16()
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    grad = torch.randn(M, N, generator=g).bfloat16()
    per_row = torch.full((M,), RANK)

    def fwd_bwd(backend, frozen):
        def call():
            dylora_linear(xg, w, None, Ag, Bg, RANK, 1.0, frozen_prefix=frozen, backend=backend).backward(grad)
        return call

    def linear_fwd_bwd():
        F.linear(xg, w).backward(grad)

    out = {"F.linear": ("forward", lambda: F.linear(x, w)),
           "F.linear fwd+bwd (x needs grad)": ("fwd+bwd", linear_fwd_bwd)}
    for backend in ("triton", "triton-tma", "triton-decode"):
        out[f"{backend}: forward"] = ("forward", lambda b=backend: dylora_linear(x, w, None, A, B, RANK, 1.0, backend=b))
    out["triton: forward, per-row ranks"] = (
        "forward", lambda: dylora_linear(x, w, None, A, B, per_row, 1.0, backend="triton"))
    for backend in ("triton", "triton-tma"):
        out[f"{backend}: fwd+bwd frozen-prefix"] = ("fwd+bwd", fwd_bwd(backend, True))
        out[f"{backend}: fwd+bwd full"] = ("fwd+bwd", fwd_bwd(backend, False))
    # The C++ CUDA executor (csrc/plan.cpp) with a cuBLAS-composition plan, on these CPU tensors: the same ATen
    # composition called directly vs through the executor (key, plan lookup, dispatch): the difference is the
    # executor's own host work. The rank tensor is 0-d on the host, as a Python int becomes.
    C, rank = _C, torch.tensor(RANK)
    u = C.forward(x, w, None, None, A, B, rank, 1.0, True)[1]
    out["cuBLAS composition, direct: forward"] = ("forward", lambda: C.forward(x, w, None, None, A, B, rank, 1.0, False))
    out["cuBLAS composition, executor: forward"] = (
        "forward", lambda: C.executor_forward(x, w, None, None, A, B, rank, 1.0, False, "cublas"))
    out["cuBLAS composition, direct: backward frozen"] = (
        "backward", lambda: C.backward(grad, x, w, A, B, u, rank, 1.0, True, True, True))
    out["cuBLAS composition, executor: backward frozen"] = (
        "backward", lambda: C.executor_backward(grad, x, w, A, B, u, rank, 1.0, True, True, True, "cublas"))
    return out


def cublas_planner(op, backend, args):
    """The executor's planner for the cuBLAS rows: the composition (CPU tensors have no measured choice)."""
    return [("cublas", None, None)], True


def cpp_rows():
    """name -> (pass, time(calls) -> s per call): the C++ launcher (csrc/triton_launch.cpp) on the same tensors,
    timed in a C++ loop (what the C++ op pays per call once its plan exists; no Python per call), its launches
    going to the recording stub (counting only). Plans come from cplan.describe after the Python path ran
    each key once, as on a GPU."""
    from dylora_kernels import _C
    from dylora_kernels import triton as T
    from dylora_kernels.triton import cplan

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    A, B = torch.randn(R_MAX, K, generator=g).bfloat16(), torch.randn(N, R_MAX, generator=g).bfloat16()
    grad, rank = torch.randn(M, N, generator=g).bfloat16(), torch.tensor(RANK)
    out = {}

    def plan(op, variant, *args):
        (T.forward if op == "forward" else T.backward)(*args, variant=variant)  # the Python path, once
        return _C.triton_plan(cplan.describe(op, variant, *args))

    forward_args = (x, w, None, None, A, B, rank, 1.0)
    for variant in ("pointer", "tma", "decode"):
        p = plan("forward", variant, *forward_args, False)
        out[f"C++ launcher {variant}: forward"] = (
            "forward", lambda calls, p=p: _C.triton_time_forward(p, *forward_args, False, calls))
    for variant in ("pointer", "tma"):
        fwd = plan("forward", variant, *forward_args, True)
        u = T.forward(*forward_args, True, variant=variant)[1]
        for frozen in (True, False):
            backward_args = (grad, x, w, A, B, u, rank, 1.0, frozen, True, True)
            bwd = plan("backward", variant, *backward_args)

            def both(calls, fwd=fwd, bwd=bwd, backward_args=backward_args):
                return (_C.triton_time_forward(fwd, *forward_args, True, calls)
                        + _C.triton_time_backward(bwd, *backward_args, calls))
            out[f"C++ launcher {variant}: fwd+bwd {'frozen-prefix' if frozen else 'full'} (dx, dA, dB)"] = (
                "fwd+bwd", both)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the medians (µs) here")
    parser.add_argument("--no-cpp", dest="cpp", action="store_false",
                        help="leave out the C++ launcher's rows (csrc/triton_launch.cpp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    samples: dict[str, list[float]] = {}
    _C.set_python_side(cublas_planner, backends.forward, backends.backward)
    with stubbed_gpu_launches():
        table = rows()
        for _, call in table.values():  # first calls: routing, the launchers' first launch per key
            for _ in range(20):
                call()
        cpp = cpp_rows() if args.cpp else {}
        _C.triton_record(1)  # the C++ launcher's launches: counted, not sent to a driver
        for _ in range(args.rounds):
            for name, (_, call) in table.items():
                start = time.perf_counter()
                for _ in range(CALLS):
                    call()
                samples.setdefault(name, []).append((time.perf_counter() - start) / CALLS * 1e6)
            for name, (_, timed) in cpp.items():
                samples.setdefault(name, []).append(timed(CALLS) * 1e6)
        _C.triton_record(0)
        table.update(cpp)
    _C.set_python_side(backends.plan, backends.forward, backends.backward)
    median = {name: statistics.median(times) for name, times in samples.items()}
    fastest = {name: min(times) for name, times in samples.items()}  # the round least disturbed by other load
    floor = {"forward": median["F.linear"], "fwd+bwd": median["F.linear fwd+bwd (x needs grad)"]}
    print(f"\nCPU: {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; "
          f"M = {M}, K = N = {K}, r_max = {R_MAX}, b = {RANK}, bf16; median µs per call over {args.rounds} rounds\n")
    print("| call | µs | over F.linear (same pass) | fastest round µs |")
    print("|---|---|---|---|")
    for name, (kind, _) in table.items():
        extra = "" if name.startswith("F.linear") or kind not in floor else f"{median[name] - floor[kind]:+.1f}"
        if "executor" in name:
            extra += f" (executor: +{median[name] - median[name.replace('executor', 'direct')]:.1f} over direct)"
        print(f"| {name} | {median[name]:.1f} | {extra} | {fastest[name]:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "median_us": median, "fastest_round_us": fastest}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
