"""What the C++ path's packing of non-packed 16-bit GEMM operands costs on the CPU (issue #22): dylora_linear in
bf16 with x contiguous vs x a row-strided view (every other row of a buffer twice as tall; the gradient of y in the
same layout), forward and forward + backward, beside F.linear on the same x and the copy x.contiguous() alone.

    python bench/bench_bf16_layout.py            # median ms of 20 calls after 3 warm-up calls, per shape
"""
import statistics
import time

import torch
import torch.nn.functional as F

import dylora_kernels

SHAPES = [(256, 1024, 1024), (2048, 1024, 1024), (2048, 4096, 4096)]  # (M, K, N)
R_MAX, RANK, ALPHA = 16, 8, 16.0


def median_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).bfloat16()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, r_max {R_MAX}, rank {RANK}")
    print(f"{'M x K x N':>18} {'x layout':>12} {'F.linear':>9} {'forward':>9} {'fwd+bwd':>9} {'x copy':>8}   (ms)")
    for M, K, N in SHAPES:
        W, bias, A, B = rnd(N, K) / K**0.5, rnd(N), (rnd(R_MAX, K) / K**0.5).requires_grad_(), rnd(N, R_MAX).requires_grad_()
        for layout in ("contiguous", "row-strided"):
            x, grad = rnd(M, K), rnd(M, N)
            if layout == "row-strided":
                x, grad = rnd(2 * M, K)[::2], rnd(2 * M, N)[::2]
            x.requires_grad_()
            forward = lambda: dylora_kernels.dylora_linear(x, W, bias, A, B, RANK, ALPHA, frozen_prefix=True)
            with torch.no_grad():
                t_linear, t_fwd = median_ms(lambda: F.linear(x, W, bias)), median_ms(forward)
            t_step = median_ms(lambda: forward().backward(grad))
            t_copy = median_ms(lambda: x.detach().contiguous())
            print(f"{f'{M}x{K}x{N}':>18} {layout:>12} {t_linear:9.2f} {t_fwd:9.2f} {t_step:9.2f} {t_copy:8.3f}")


if __name__ == "__main__":
    main()
