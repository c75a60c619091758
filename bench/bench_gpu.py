"""GPU benchmark: every path the dispatcher chooses between, the dispatched one, and the peers.

    python bench/bench_gpu.py [--out DIR] [--dry-run] [--quick] [--int-rank]

bf16, no bias, r_max = 64, b in {8, 32}; (M, K, N) from LLM layers down to decode sizes. Forward
(no grad), forward+backward full and frozen-prefix (x, A, B require grad; W frozen). Columns: the
peers F.linear (the floor), naive slicing, the cuBLAS+addmm composition written in PyTorch; then this
package with each backend forced ("cublas": the C++ ATen composition; "triton" and its variants) and
"auto" (what the dispatcher picks; its choice is printed). Every time is a triton.testing.do_bench
median after a warm-up call; every ratio is over F.linear in the same run. Also: peak memory of one
forward+backward (naive vs auto), the host time to enqueue one M = 1 forward (no sync), and M ≤ 16
forwards replayed from a CUDA graph. Writes DIR/bench_gpu.json and DIR/bench_gpu.md (DIR: --out,
else $OUT, else bench/out) and prints the table last.

--dry-run checks the plumbing on CPU tensors with the Triton interpreter (tiny shapes, fp32, a
wall-clock timer): the numbers mean nothing. --quick: b = 32 only and fewer shapes. --int-rank: the package
gets the rank as a Python int (a host value: the cuBLAS composition slices with it) instead of a 0-d tensor on
the GPU (what a training loop holds; the default).
"""
import functools
import json
import os
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
INT_RANK = "--int-rank" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as timing  # noqa: E402
from baselines import IMPLS  # noqa: E402

import dylora_kernels  # noqa: E402,F401  (registers the ops before baselines use them)
from dylora_kernels import backends  # noqa: E402

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
R_MAX, RANKS, ALPHA, DTYPE, DEVICE = 64, (8, 32), 16.0, torch.bfloat16, "cuda"
if "--quick" in sys.argv:
    SHAPES, RANKS = [(8192, 4096, 4096), (2048, 4096, 4096), (16, 4096, 4096)], (32,)
if DRY_RUN:
    SHAPES, R_MAX, RANKS, DTYPE, DEVICE = [(33, 40, 24), (1, 40, 24)], 16, (4,), torch.float32, "cpu"
MODES = {"forward": "forward", "full": "fwd+bwd full", "frozen": "fwd+bwd frozen-prefix"}
PEERS = ("F.linear", "naive", "addmm")


def median_ms(fn):
    return timing.median_ms(fn, wall_clock=DRY_RUN, warmup=10, rep=40)


def package_paths(shape):
    """The backends to time for this shape: the C++ composition, each Triton variant that applies, auto."""
    M, K, N = shape
    x = torch.empty(M, K, device=DEVICE, dtype=DTYPE)
    W = torch.empty(N, K, device=DEVICE, dtype=DTYPE)
    A, B = torch.empty(R_MAX, K, device=DEVICE, dtype=DTYPE), torch.empty(N, R_MAX, device=DEVICE, dtype=DTYPE)
    paths = ["cublas"] if DEVICE == "cuda" and backends._C is not None else []
    if backends.triton_available(x.device):
        variants = backends._triton().variants("forward", x, W, A, B)
        paths += ["triton" if v == "pointer" else f"triton-{v}" for v in variants]
    return paths + (["auto"] if DEVICE == "cuda" else [])


def make_step(impl, shape, b, mode):
    """One call: a no-grad forward, or forward + backward w.r.t. x (and A, B except F.linear)."""
    M, K, N = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE)
    x, W = rnd(M, K), rnd(N, K) / K**0.5
    A, B = rnd(R_MAX, K) / K**0.5, rnd(N, R_MAX)
    if impl in PEERS:
        fn, rank = IMPLS[impl], b
    else:  # the package: a 0-d rank tensor on the device (what a training loop holds), or an int (--int-rank)
        fn, rank = functools.partial(IMPLS["dylora"], backend=impl), b if INT_RANK else torch.tensor(b, device=DEVICE)
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


def dispatched_choice():
    """What the router chose most recently (its cache maps keys to kernels; report the names)."""
    chosen = backends.DISPATCHER.memory
    return dict(chosen)


def first_call_s(step):
    """Wall-clock seconds of one call, synchronised (for a new dispatch key: its measurement)."""
    start = time.perf_counter()
    step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def host_us_per_forward(impl, calls=200):
    """Host time to enqueue one M = 1 forward (K = N = 4096), no sync inside the loop."""
    step = make_step(impl, (1, 4096, 4096) if DEVICE == "cuda" else SHAPES[-1], 32 if DEVICE == "cuda" else RANKS[0],
                     "forward")
    for _ in range(3):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_ms(impl, shape, b):
    """Median ms of a forward replayed from a CUDA graph (after an eager warm-up outside the capture)."""
    step = make_step(impl, shape, b, "forward")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay)


def run():
    rows = []
    for shape in SHAPES:
        paths = package_paths(shape)
        for mode in MODES:
            floor = median_ms(make_step("F.linear", shape, RANKS[0], mode))
            for b in RANKS:
                row = {"shape": list(shape), "b": b, "mode": mode, "F.linear_ms": floor, "paths": paths}
                for impl in ("naive", "addmm", *paths):
                    try:
                        step = make_step(impl, shape, b, mode)
                        if impl == "auto":  # its first call: the dispatcher's timing (the forced columns already
                            row["auto_first_s"] = first_call_s(step)  # compiled and tuned every kernel)
                        row[f"{impl}_ms"] = median_ms(step)
                        row[impl] = row[f"{impl}_ms"] / floor
                        if mode != "forward" and impl in ("naive", "auto"):
                            row[f"{impl}_peak_mib"] = peak_mib(step)
                    except Exception as e:  # a failing path is reported on its row, the others still run
                        row[impl], row[f"{impl}_error"] = None, f"{type(e).__name__}: {e}"[:300]
                        print(f"  {impl} failed: {row[f'{impl}_error']}", flush=True)
                if DEVICE == "cuda" and mode == "forward" and shape[0] <= 16:
                    row["graph_F.linear_ms"] = graph_ms("F.linear", shape, b)
                    row["graph_auto_ms"] = graph_ms("auto", shape, b)
                rows.append(row)
                print(f"{shape} b={b} {mode}: " + ", ".join(
                    f"{k} {row[k]:.3f}" if row.get(k) is not None else f"{k} failed" for k in ("naive", "addmm", *paths)),
                    flush=True)
    return rows


def table(rows, device_name, host):
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    paths = list(dict.fromkeys(p for r in rows for p in r["paths"]))
    rank_form = "a Python int" if INT_RANK else "a 0-d tensor on the device"
    lines = [f"{device_name}, torch {torch.__version__}, {str(DTYPE).removeprefix('torch.')}, no bias, r_max = {R_MAX}, "
             f"the package's rank {rank_form}; median time ratio over F.linear in the same run (lower is better); "
             "peak MiB = one forward+backward above its inputs", "",
             "| M×K×N | b | pass | F.linear ms | naive | addmm peer | " + " | ".join(paths)
             + " | peak MiB naive | peak MiB auto |",
             "|---|---|---|---|---|---|" + "---|" * len(paths) + "---|---|"]
    for r in rows:
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['b']} | {MODES[r['mode']]} | {r['F.linear_ms']:.3f} | "
                     f"{fmt(r.get('naive'))} | {fmt(r.get('addmm'))} | "
                     + " | ".join(fmt(r.get(p)) for p in paths)
                     + f" | {fmt(r.get('naive_peak_mib'), '.0f')} | {fmt(r.get('auto_peak_mib'), '.0f')} |")
    graphs = [r for r in rows if "graph_auto_ms" in r]
    if graphs:
        lines += ["", "M ≤ 16 forward replayed from a CUDA graph (ratio over F.linear replayed the same way):", "",
                  "| M×K×N | b | F.linear graph ms | auto graph ratio |", "|---|---|---|---|"]
        lines += [f"| {'×'.join(map(str, r['shape']))} | {r['b']} | {r['graph_F.linear_ms']:.4f} | "
                  f"{r['graph_auto_ms'] / r['graph_F.linear_ms']:.3f} |" for r in graphs]
    firsts = [r for r in rows if r.get("auto_first_s") is not None]
    if firsts:
        lines += ["", "Seconds of auto's first call per row (the dispatcher measuring its candidates; the forced columns "
                  "before it compiled and tuned the kernels): " + ", ".join(
                      f"{'×'.join(map(str, r['shape']))} b={r['b']} {MODES[r['mode']]} {r['auto_first_s']:.2f}"
                      for r in firsts)]
    lines += ["", "Host µs to enqueue one forward (M = 1, K = N = 4096, no sync): "
              + ", ".join(f"{k} {v:.1f}" for k, v in host.items())]
    return "\n".join(lines)


def main():
    args, device_name = timing.gpu_bench_setup(__doc__, "bench_gpu.py", DRY_RUN, "b = 32 only, three shapes",
                                               ("--int-rank", "the package's rank as a Python int"))
    print(f"{device_name}; C++ extension: {'built' if backends._C is not None else 'MISSING (cublas path not timed)'}",
          flush=True)
    rows = run()
    host = {impl: host_us_per_forward(impl) for impl in ("F.linear", "addmm", *package_paths(SHAPES[-1]))}
    text = table(rows, device_name, host)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "dtype": str(DTYPE), "r_max": R_MAX,
                   "rows": rows, "host_us": host,
                   "dispatch": {repr(k): v for k, v in dispatched_choice().items()},
                   "timings": {repr(k): v for k, v in backends.DISPATCHER.timings.items()}}, f, indent=1)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
