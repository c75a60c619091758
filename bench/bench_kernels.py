"""GPU timing of the Triton kernel backend itself, per variant and per kernel: fills the "measured" columns of
bench/NOTES.md (whose predictions come from bench/roofline.py).

    python bench/bench_kernels.py [--quick] [--out DIR] [--dry-run]

The shapes of bench_gpu.py (bf16, no bias, r_max = 64, b ∈ {8, 32}), through dylora_kernels.triton.forward /
backward directly (no ops layer, no autograd): the forward of every variant that applies, and forward + backward
in full and frozen-prefix mode for each backward variant, as triton.testing.do_bench medians after a warm-up
(compilation and autotuning), each over F.linear (forward) or F.linear + its dx GEMM (forward + backward) measured
in the same run. Then one call of each pass under torch.profiler, listing every kernel's device time. Writes
DIR/bench_kernels.md (DIR: --out, else $OUT, else bench/out) and prints it.

--quick: 8192×4096×4096, 2048×4096×4096 and 16×4096×4096 at b = 32 only (about a minute with warm compile caches:
what a short GPU session can afford after bench/gpu_check.sh).

--dry-run checks the plumbing on CPU tensors with the Triton interpreter (tiny shapes, fp32, a wall-clock
timer, no profiler): the numbers mean nothing.
"""
import os
import sys

DRY_RUN = "--dry-run" in sys.argv
QUICK = "--quick" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dylora_kernels.triton as T  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import gpu_bench_setup, median_ms  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
R_MAX, RANKS, ALPHA, DTYPE, DEVICE = 64, (8, 32), 16.0, torch.bfloat16, "cuda"
if QUICK:
    SHAPES, RANKS = [(8192, 4096, 4096), (2048, 4096, 4096), (16, 4096, 4096)], (32,)
if DRY_RUN:
    SHAPES, RANKS, DTYPE, DEVICE = [(40, 32, 24), (3, 32, 24)], (8,), torch.float16, "cpu"


def median_us(fn):
    return median_ms(fn, wall_clock=DRY_RUN) * 1e3


def kernel_times(fn):
    """{kernel name: device µs} of one call (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total for e in prof.key_averages() if e.device_time_total > 0}


def main():
    args, device_name = gpu_bench_setup(__doc__, "bench_kernels.py", DRY_RUN, "three shapes at b = 32 only")
    lines = [f"{device_name}, torch {torch.__version__}, {str(DTYPE).removeprefix('torch.')}, no bias, r_max = {R_MAX}",
             "", "| M×K×N | b | pass | variant | µs | ratio over F.linear | F.linear µs |", "|---|---|---|---|---|---|---|"]
    profiles = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for M, K, N in SHAPES:
        rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE)
        x, W, grad = rnd(M, K), rnd(N, K) / K**0.5, rnd(M, N)
        A, B = rnd(R_MAX, K) / K**0.5, rnd(N, R_MAX)
        floor_fwd = median_us(lambda: F.linear(x, W))
        floor_bwd = median_us(lambda: (F.linear(x, W), grad @ W))
        for b in RANKS:
            rank = torch.tensor(b, device=DEVICE)
            for variant in T.variants("forward", x, W, A, B):
                fwd = lambda: T.forward(x, W, None, None, A, B, rank, ALPHA, False, variant)
                t = median_us(fwd)
                lines.append(f"| {M}×{K}×{N} | {b} | forward | {variant} | {t:.1f} | {t / floor_fwd:.3f} | {floor_fwd:.1f} |")
                profiles.append((f"{M}×{K}×{N} b={b} forward {variant}", fwd))
            offered = T.variants("forward", x, W, A, B)
            fwd_variant = "decode" if "decode" in offered else offered[-1]  # decode (M ≤ 16), else tma if offered
            for bwd_variant in T.variants("backward", x, W, A, B):
                for mode, frozen in (("full", False), ("frozen", True)):
                    def step():
                        y, u = T.forward(x, W, None, None, A, B, rank, ALPHA, True, fwd_variant)
                        return T.backward(grad, x, W, A, B, u, rank, ALPHA, frozen, True, True, bwd_variant)
                    t = median_us(step)
                    name = f"fwd+bwd {mode}"
                    lines.append(f"| {M}×{K}×{N} | {b} | {name} | {fwd_variant} + {bwd_variant} | {t:.1f} | "
                                 f"{t / floor_bwd:.3f} | {floor_bwd:.1f} |")
                    profiles.append((f"{M}×{K}×{N} b={b} {name} {fwd_variant} + {bwd_variant}", step))
            print("\n".join(lines[-6:]), flush=True)
    chosen = T.hopper._CHOSEN
    if chosen:
        lines += ["", "TMA configs chosen (key: M, N, K buckets, dtypes, flags → config):", ""]
        lines += [f"- {key} → {T.hopper._config_name(config)}" for key, config in chosen.items()]
    if not DRY_RUN:
        lines += ["", "Device time per kernel, one call (torch.profiler):", ""]
        for title, fn in profiles:
            lines.append(f"- {title}: " + ", ".join(f"{k} {v:.1f} µs" for k, v in kernel_times(fn).items()))
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
