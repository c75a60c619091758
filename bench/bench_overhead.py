"""Per-call host overhead: print the table of median microseconds per call (issue 8's targets).

    python bench/bench_overhead.py [extra pytest args]

Tiny shapes (M = 1, K = N = 64, r_max = 8, b = 4, fp32, one thread): F.linear, nn.Linear, naive
slicing, ``dylora_linear`` and ``DyLoRALinear``, forward (no grad) and forward + backward (x, A, B
need grad) in frozen-prefix and full mode, with the rank as an int, a 0-d tensor and a per-row
tensor. Targets: dylora_linear ≤ F.linear + 20 µs (forward) / + 60 µs (forward + backward),
DyLoRALinear ≤ nn.Linear + 25 µs (forward; forward + backward: the functional budget, + 60 µs),
and never above naive slicing. Raw JSON: bench/overhead_results.json.
"""
import json
import os
import platform
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "overhead_results.json")
BUDGET_US = {"forward": 20.0, "frozen": 60.0, "full": 60.0}
MODULE_BUDGET_US = {"forward": 25.0, "frozen": 60.0, "full": 60.0}
PASS_NAMES = {"forward": "forward", "frozen": "fwd+bwd frozen-prefix", "full": "fwd+bwd full"}


def main(argv):
    code = pytest.main([os.path.join(HERE, "test_bench_overhead.py"), "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={RESULTS}", "--benchmark-disable-gc", "--benchmark-columns=median", *argv])
    if code != 0:
        return code
    print(f"\nCPU: {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; "
          "M = 1, K = N = 64, r_max = 8, b = 4, fp32; median µs per call, same rounds\n")
    print("| pass | rank | F.linear | nn.Linear | naive | dylora_linear | DyLoRALinear | "
          "dylora_linear − F.linear | DyLoRALinear − nn.Linear | ≤ naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    missed = 0
    for bench in json.load(open(RESULTS))["benchmarks"]:
        info = bench["extra_info"]
        t = {name: s * 1e6 for name, s in info["baseline_medians"].items()}
        t["dylora_linear"] = bench["stats"]["median"] / info["iterations"] * 1e6
        mode = info["mode"]
        extra, module_extra = t["dylora_linear"] - t["F.linear"], t["DyLoRALinear"] - t["nn.Linear"]
        ok_extra, ok_module = extra <= BUDGET_US[mode], module_extra <= MODULE_BUDGET_US[mode]
        ok_naive = max(t["dylora_linear"], t["DyLoRALinear"]) <= t["naive"]
        missed += not (ok_extra and ok_module and ok_naive)
        mark = lambda ok: "ok" if ok else "MISSED"
        print(f"| {PASS_NAMES[mode]} | {info['rank_kind']} | {t['F.linear']:.1f} | {t['nn.Linear']:.1f} | "
              f"{t['naive']:.1f} | {t['dylora_linear']:.1f} | {t['DyLoRALinear']:.1f} | "
              f"+{extra:.1f} (≤ +{BUDGET_US[mode]:.0f} {mark(ok_extra)}) | "
              f"+{module_extra:.1f} (≤ +{MODULE_BUDGET_US[mode]:.0f} {mark(ok_module)}) | {mark(ok_naive)} |")
    print(f"\n{missed} row(s) missed a target")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
