"""Predicted GPU times of the Triton kernels (a roofline model, not a measurement): the tables of bench/NOTES.md.

    python bench/roofline.py      (no GPU needed; prints the markdown tables)

For each shape of bench_gpu.py (bf16, no bias, r_max = 64, b ∈ {8, 32}) and each kernel launch of the variant the
shape takes (M ≤ 16: "decode" forward, pointer backward; M ≥ 2048: "tma"), the bytes every operand moves to or
from DRAM (each once: L2 re-reads are not counted, except that the decode kernel's re-reads of A[:b] are listed),
the FLOPs the kernel executes (tensor-core tiles as launched: the shrink and the gradients compute a 64-slot block
whatever b is), and max(bytes / bandwidth, FLOPs / peak) on an H200 (4.8 TB/s) and an H100 (3.35 TB/s), both
~790 dense bf16 TFLOP/s. Launch latency, pipeline ramp-up, tail effects and L2 misses are not modelled. The
F.linear row is the same model for cuBLAS's GEMM (and its dx GEMM for forward + backward).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dylora_kernels.triton.kernels import split_rows  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
RANKS = (8, 32)
R, BF16, FP32, SECTOR = 64, 2, 4, 32  # r_max, bytes per element, bytes per DRAM sector (one strided fp32 read)
GPUS = {"H200": (4.8e12, 790e12), "H100": (3.35e12, 790e12)}
SMS = 132
DECODE_BLOCK_N = 32  # the decode config this model assumes (N / 32 programs)


def cdiv(a, b):
    return -(-a // b)


def gemm(M, K, N):
    """x (M, K) · W (N, K)ᵀ → (M, N): bytes, FLOPs."""
    return (M * K + N * K + M * N) * BF16, 2 * M * N * K


def forward(M, K, N, b):
    """(kernel, bytes, FLOPs, note) of the forward's launches."""
    if M <= 16:
        programs = cdiv(N, DECODE_BLOCK_N)
        return [("decode", (M * K + N * K + b * K + N * b + M * N) * BF16 + M * R * FP32,
                 2 * 16 * N * K + 2 * 16 * K * R * programs + 2 * 16 * N * R,
                 f"+ {programs * b * K * BF16 / 1e6:.1f} MB of A[:b] re-read from L2 ({programs} programs)")]
    seed = 32 * cdiv(b, 32)  # the seed's slot blocks of 32
    return [("shrink u", (M * K + b * K) * BF16 + M * R * FP32, 2 * M * K * R, ""),
            ("tma GEMM y", gemm(M, K, N)[0] + M * b * FP32 + N * b * BF16, 2 * M * N * K + 2 * M * N * seed, "")]


def backward(M, K, N, b, frozen):
    """(kernel, bytes, FLOPs, note) of the backward's launches (x requires grad; one shared rank)."""
    seed = 32 * cdiv(b, 32)
    dx_name = "tma GEMM dx" if M > 16 else "pointer GEMM dx"
    parts_v = cdiv(M, 64)  # the fold's row blocks (BLOCK_M = 64 assumed)
    kernels = [("shrink v" + (" + dB fold" if frozen else ""),
                M * N * BF16 + N * b * BF16 + M * R * FP32 + (M * SECTOR + parts_v * N * FP32 if frozen else 0),
                2 * M * N * R + (2 * M * N if frozen else 0), ""),
               (dx_name, (M * N + N * K + M * K) * BF16 + M * b * FP32 + K * b * BF16,
                2 * M * N * K + 2 * M * K * seed, "")]
    if frozen:
        s, _ = split_rows(M, cdiv(K, 128), SMS)
        kernels += [("GEMV dA row", M * K * BF16 + M * SECTOR + s * K * FP32, 2 * M * K, f"{s} splits"),
                    ("finish dA", s * K * FP32 + R * K * BF16, s * K, ""),
                    ("finish dB", parts_v * N * FP32 + N * R * BF16, parts_v * N, f"{parts_v} row blocks")]
    else:
        for name, cols in (("dA", K), ("dB", N)):
            s, _ = split_rows(M, cdiv(cols, 128), SMS)
            kernels += [(f"split-M grad {name}", M * R * FP32 + M * cols * BF16 + s * R * cols * FP32,
                         2 * M * cols * R, f"{s} splits"),
                        (f"finish {name}", s * R * cols * FP32 + R * cols * BF16, s * R * cols, "")]
    return kernels


def seconds(nbytes, flops, gpu):
    bandwidth, peak = GPUS[gpu]
    return max(nbytes / bandwidth, flops / peak)


def totals(rows, floor):
    """{gpu: (our predicted seconds, F.linear's predicted seconds)}."""
    return {gpu: (sum(seconds(nb, fl, gpu) for _, nb, fl, _ in rows), sum(seconds(nb, fl, gpu) for nb, fl in floor))
            for gpu in GPUS}


def table(title, rows, floor):
    """A markdown table of kernel rows (name, bytes, FLOPs, note), their total, and the F.linear floor."""
    out = [f"#### {title}", "",
           "| kernel | MB moved | GFLOP | H200 µs | H100 µs | note | measured H200 µs | measured H100 µs |",
           "|---|---|---|---|---|---|---|---|"]
    for name, nbytes, flops, note in rows:
        t = {gpu: seconds(nbytes, flops, gpu) * 1e6 for gpu in GPUS}
        out.append(f"| {name} | {nbytes / 1e6:.1f} | {flops / 1e9:.2f} | {t['H200']:.1f} | {t['H100']:.1f} | {note} | | |")
    tot = totals(rows, floor)
    out.append(f"| **total** | | | **{tot['H200'][0] * 1e6:.1f}** | **{tot['H100'][0] * 1e6:.1f}** | | | |")
    out.append(f"| F.linear (same model) | | | {tot['H200'][1] * 1e6:.1f} | {tot['H100'][1] * 1e6:.1f} | | | |")
    return out


def target(mode, M):
    """The issue's target for a pass (ratio over F.linear unless stated), '' where it sets none."""
    if mode == "forward":
        return "≤ 1.05" if M >= 2048 else "≤ 1.3 over eager"
    return {("full", 8192): "≤ 1.15", ("frozen", 8192): "≤ 1.10", ("frozen", 2048): "≤ 1.30"}.get((mode, M), "")


def passes():
    """(shape, b, pass name, kernel rows, F.linear floor) of every benchmarked pass."""
    for M, K, N in SHAPES:
        for b in RANKS:
            fwd = forward(M, K, N, b)
            yield (M, K, N), b, "forward", fwd, [gemm(M, K, N)]
            for mode, frozen in (("full", False), ("frozen", True)):
                yield (M, K, N), b, mode, fwd + backward(M, K, N, b, frozen), [gemm(M, K, N), gemm(M, N, K)]


def main():
    names = {"forward": "forward", "full": "fwd+bwd full", "frozen": "fwd+bwd frozen-prefix"}
    lines = ["| M×K×N | b | pass | predicted µs H200 | ratio over F.linear (model) H200 | predicted µs H100 | "
             "ratio (model) H100 | target | measured ratio H200 | measured ratio H100 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, b, mode, rows, floor in passes():
        tot = totals(rows, floor)
        lines.append(f"| {'×'.join(map(str, shape))} | {b} | {names[mode]} | {tot['H200'][0] * 1e6:.1f} | "
                     f"{tot['H200'][0] / tot['H200'][1]:.3f} | {tot['H100'][0] * 1e6:.1f} | "
                     f"{tot['H100'][0] / tot['H100'][1]:.3f} | {target(mode, shape[0])} | | |")
    lines.append("")
    for shape, b, mode, rows, floor in passes():
        lines += table(f"{'×'.join(map(str, shape))}, b = {b}: {names[mode]}", rows, floor) + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
