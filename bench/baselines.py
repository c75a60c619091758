"""What every benchmark compares, and how the GPU ones time it, defined once (bench_gpu.py,
bench_kernels.py and the CPU benchmarks import it).

Each entry is ``fn(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix) -> y``:

    F.linear   the frozen GEMM alone: the floor
    naive      naive slicing, ``dylora_kernels.reference.dylora_linear`` (DESIGN §4 (b))
    addmm      the best plain-PyTorch peer (DESIGN §4 (c)):
               y = F.linear(x, W, bias); y.addmm_(x @ A[:b].T, B[:, :b].T, alpha=alpha / b)
    dylora     this package, ``dylora_kernels.dylora_linear`` (``backend`` keyword, default "auto":
               C++ on CPU, Triton on CUDA)

``rank`` is an int for F.linear, naive and addmm (they slice on the host); dylora also takes a 0-d
integer tensor on x's device, the form training loops use (no host-to-device copy per call).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dylora_kernels
from dylora_kernels import reference


def median_ms(fn, wall_clock: bool = False, **do_bench):
    """Median milliseconds of ``fn`` after a warm-up call (compilation, autotuning and the dispatcher's
    measurement happen there): triton.testing.do_bench on a GPU, or three wall-clock calls (``wall_clock``:
    the CPU dry runs, where the numbers only check the plumbing)."""
    fn()
    if wall_clock:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median", **do_bench)


def medians(methods: dict, leaves, grad, rounds: int) -> dict:
    """Timing of several methods on the same data, each a no-grad forward and a forward + backward of ``grad`` (the
    ``leaves``' gradients cleared first): {(name, "forward" | "fwd+bwd"): median seconds}. CUDA (``grad`` there):
    triton.testing.do_bench per method and mode. CPU: every method once per round, interleaved so that the machine's
    drift spreads over all of them, after a warm-up round."""
    if grad.is_cuda:
        import triton.testing

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        def fwd_bwd(fn):
            def run():
                for t in leaves:
                    t.grad = None
                fn().backward(grad)
            return run

        return {(name, mode): triton.testing.do_bench(wrap(fn), return_mode="median") / 1e3
                for name, fn in methods.items() for mode, wrap in (("forward", no_grad), ("fwd+bwd", fwd_bwd))}
    times = {(name, mode): [] for name in methods for mode in ("forward", "fwd+bwd")}
    for r in range(rounds + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            fwd = time.perf_counter() - start
            for t in leaves:
                t.grad = None
            start = time.perf_counter()
            fn().backward(grad)
            both = time.perf_counter() - start
            if r:  # round 0 warms up
                times[(name, "forward")].append(fwd)
                times[(name, "fwd+bwd")].append(both)
    return {k: statistics.median(v) for k, v in times.items()}


def gpu_bench_setup(doc: str, script: str, dry_run: bool, quick_help: str, *flags: tuple[str, str]):
    """(parsed arguments, device name) for a GPU benchmark: --out DIR (default $OUT, else bench/out), --quick,
    --dry-run and the extra store_true ``flags`` ((name, help) pairs); exits without a GPU unless it is a dry run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check under the Triton interpreter")
    for name, help_text in flags:
        parser.add_argument(name, action="store_true", help=help_text)
    args = parser.parse_args()
    if dry_run:
        return args, "CPU (dry run, Triton interpreter)"
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device (or --dry-run)")
    return args, torch.cuda.get_device_name()


def f_linear(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix):
    return F.linear(x, weight, bias)


def naive(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix):
    return reference.dylora_linear(x, weight, bias, lora_A, lora_B, int(rank), alpha, frozen_prefix)


def addmm(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix):
    """cuBLAS (or MKL) GEMM, then the low-rank term accumulated into y by one addmm_. In frozen-prefix
    mode the rows/columns below b-1 are detached, so autograd trains only row/column b-1."""
    b = int(rank)
    A_b, B_b = lora_A[:b], lora_B[:, :b]
    if frozen_prefix:
        A_b = torch.cat([A_b[:-1].detach(), A_b[-1:]])
        B_b = torch.cat([B_b[:, :-1].detach(), B_b[:, -1:]], dim=1)
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias)
    y.addmm_(x2 @ A_b.t(), B_b.t(), alpha=alpha / b)
    return y.view(*x.shape[:-1], weight.shape[0])


def dylora(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, backend="auto"):
    return dylora_kernels.dylora_linear(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix=frozen_prefix,
                                        backend=backend)


IMPLS = {"F.linear": f_linear, "naive": naive, "addmm": addmm, "dylora": dylora}
