"""GPU benchmark (issue 3): the Triton path against F.linear, naive slicing and the cuBLAS+addmm peer.

    python bench/bench_gpu.py [--out DIR] [--dry-run]

bf16, no bias, r_max = 64, b in {8, 32, 64}; (M, K, N) from LLM layers and decode sizes. Forward
(no grad), forward+backward full and frozen-prefix (x, A, B require grad; W frozen). Every time is a
triton.testing.do_bench median after a warm-up call, and every ratio is over F.linear measured in the
same run (its forward, or its forward+backward with x requiring grad for the f+b rows). Peak memory
of one forward+backward (torch.cuda.max_memory_allocated above what the inputs hold) for naive and
dylora. Writes DIR/bench_gpu.json and DIR/bench_gpu.md (DIR: --out, else $OUT, else bench/out) and
prints the table last.

--dry-run checks the plumbing on CPU tensors with the Triton interpreter (tiny shapes, fp32, a
wall-clock timer instead of do_bench): the numbers mean nothing.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import IMPLS  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
R_MAX, RANKS, ALPHA, DTYPE, DEVICE = 64, (8, 32, 64), 16.0, torch.bfloat16, "cuda"
if DRY_RUN:
    SHAPES, R_MAX, RANKS, DTYPE, DEVICE = [(33, 40, 24), (1, 40, 24)], 16, (4, 16), torch.float32, "cpu"
MODES = {"forward": "forward", "full": "fwd+bwd full", "frozen": "fwd+bwd frozen-prefix"}


def median_ms(fn):
    fn()  # warm-up: compilation and autotuning happen here, outside the timing
    if DRY_RUN:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def make_step(impl, shape, b, mode):
    """One call of impl: a no-grad forward, or forward + backward w.r.t. x (and A, B except F.linear)."""
    M, K, N = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE)
    x, W = rnd(M, K), rnd(N, K) / K**0.5
    A, B = rnd(R_MAX, K) / K**0.5, rnd(N, R_MAX)
    rank = torch.tensor(b, device=DEVICE) if impl == "dylora" else b
    fn = functools.partial(IMPLS[impl], backend="triton") if impl == "dylora" else IMPLS[impl]
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(x, W, None, A, B, rank, ALPHA, False)
        return step
    wrt = [x.requires_grad_(True)] + ([] if impl == "F.linear" else [A.requires_grad_(True), B.requires_grad_(True)])
    grad_out = rnd(M, N)

    def step():
        return torch.autograd.grad(fn(x, W, None, A, B, rank, ALPHA, mode == "frozen"), wrt, grad_out)
    return step


def peak_mib(step):
    """Peak memory of one call above what was allocated before it, in MiB (None off CUDA)."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run():
    rows = []
    for shape in SHAPES:
        for mode in MODES:
            floor = median_ms(make_step("F.linear", shape, RANKS[0], mode))
            for b in RANKS:
                row = {"shape": list(shape), "b": b, "mode": mode, "F.linear_ms": floor}
                for impl in ("naive", "addmm", "dylora"):
                    step = make_step(impl, shape, b, mode)
                    row[f"{impl}_ms"] = median_ms(step)
                    row[impl] = row[f"{impl}_ms"] / floor
                    if mode != "forward" and impl in ("naive", "dylora"):
                        row[f"{impl}_peak_mib"] = peak_mib(step)
                    del step
                rows.append(row)
                print(f"{shape} b={b} {mode}: " + ", ".join(f"{k} {row[k]:.3f}" for k in ("naive", "addmm", "dylora")),
                      flush=True)
    return rows


def table(rows, device_name):
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    lines = [f"{device_name}, torch {torch.__version__}, {str(DTYPE).removeprefix('torch.')}, no bias, "
             f"r_max = {R_MAX}; median time ratio over F.linear in the same run (lower is better); "
             "peak MiB = one forward+backward above its inputs", "",
             "| M×K×N | b | pass | F.linear ms | naive | addmm peer | dylora | peak MiB naive | peak MiB dylora |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['b']} | {MODES[r['mode']]} | {r['F.linear_ms']:.3f} | "
                     f"{r['naive']:.3f} | {r['addmm']:.3f} | {r['dylora']:.3f} | "
                     f"{fmt(r.get('naive_peak_mib'))} | {fmt(r.get('dylora_peak_mib'))} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check under the Triton interpreter")
    args = parser.parse_args()
    if not DRY_RUN and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --dry-run)")
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run, Triton interpreter)"
    rows = run()
    text = table(rows, device_name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "dtype": str(DTYPE), "r_max": R_MAX,
                   "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
