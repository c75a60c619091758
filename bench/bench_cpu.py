"""Run the CPU microbenchmarks and print one table of ratios over F.linear alone (same run, medians).

    python bench/bench_cpu.py [extra pytest args]

Forward rows are over F.linear's forward; forward+backward rows over F.linear's forward+backward
(x requiring grad). The baselines run interleaved with the timed C++ rounds (see test_bench_cpu.py).
Also writes the raw pytest-benchmark JSON to bench/cpu_results.json.
"""
import json
import os
import platform
import sys
from collections import defaultdict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "cpu_results.json")
TARGETS = {"forward": 1.10, "frozen": 1.15, "full": 1.20}  # issue 2, ratios over F.linear


def main(argv):
    code = pytest.main([os.path.join(HERE, "test_bench_cpu.py"), "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={RESULTS}", "--benchmark-disable-gc",
                        "--benchmark-columns=median", *argv])
    if code != 0:
        return code
    medians = {}
    for bench in json.load(open(RESULTS))["benchmarks"]:
        info = bench["extra_info"]
        medians[(tuple(info["shape"]), info["b"], info["mode"])] = {"dylora": bench["stats"]["median"],
                                                                   **info["baseline_medians"]}
    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fp32, r_max = 64; median time ratio over F.linear in the same run\n")
    print("| M×K×N | b | pass | F.linear ms | naive | dylora | target |")
    print("|---|---|---|---|---|---|---|")
    worst = defaultdict(float)
    for (shape, b, mode), t in medians.items():
        naive, ours = t["naive"] / t["F.linear"], t["dylora"] / t["F.linear"]
        worst[mode] = max(worst[mode], ours)
        name = {"forward": "forward", "full": "fwd+bwd full", "frozen": "fwd+bwd frozen-prefix"}[mode]
        ok = "ok" if ours <= TARGETS[mode] and (mode != "forward" or ours <= naive) else "MISSED"
        print(f"| {'×'.join(map(str, shape))} | {b} | {name} | {t['F.linear'] * 1e3:.2f} | {naive:.3f} | "
              f"{ours:.3f} | ≤ {TARGETS[mode]:.2f} {ok} |")
    print("\nworst dylora ratio: " + ", ".join(f"{m} {worst[m]:.3f}" for m in TARGETS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
