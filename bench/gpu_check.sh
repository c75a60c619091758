#!/usr/bin/env bash
# The GPU check: build the package, run the test suite on the GPU, then the GPU benchmark. Run from the
# repository root on a CUDA machine:   bash bench/gpu_check.sh
# Logs and results go to $OUT (default bench/out): install.log, tests.log, bench.log, bench_gpu.json,
# bench_gpu.md, bench_e2e.log, bench_e2e.json, bench_e2e.md. The benchmark's table is the last thing printed. If the C++ extension fails to build,
# the script says so and goes on without it (PYTHONPATH=.: the ops are then defined in Python and the
# Triton kernels serve CUDA; the cuBLAS composition is not timed). Exit status: non-zero if the build,
# the tests or a benchmark failed. Budget: well under 9 minutes on one H100/H200 (the end-to-end step at most 3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DYLORA_FUZZ_CASES=${DYLORA_FUZZ_CASES:-20}
# The GPU-relevant suites (the model/distributed/Trainer/demo tests are CPU-only and run in CI).
TESTS=${GPU_CHECK_TESTS:-"tests/test_cuda.py tests/test_triton.py tests/test_ops.py tests/test_wrappers.py tests/test_reliability.py tests/test_dispatch.py tests/test_e2e.py::test_captured_training_step_replays_every_rank"}
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-170}
E2E_TIMEOUT=${GPU_CHECK_E2E_TIMEOUT:-180}
export DYLORA_DISPATCH_CACHE="$OUT/dispatch_cache"  # a fresh dispatcher cache: the run measures
PY=${PYTHON:-python3}
t0=$SECONDS
stamp() { echo "[gpu_check +$((SECONDS - t0)) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"

stamp "building the C++ extension (pip install -e .)"
build_rc=0
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
    build_rc=1
    tail -n 30 "$OUT/install.log"
    stamp "build FAILED: going on without the C++ extension (Triton only; see $OUT/install.log)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DYLORA_ALLOW_NO_EXTENSION=1
fi
"$PY" -c "import dylora_kernels.ops as o; print('C++ extension:', 'built' if o._C is not None else 'MISSING')"

# pytest-xdist, when installed, spreads the Triton compilations over processes.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stamp "tests, at most $TESTS_TIMEOUT s (log: $OUT/tests.log, one line per test)"
# -v: a line per finished test, so a run cut by the timeout still shows what passed and failed.
timeout "$TESTS_TIMEOUT" "$PY" -m pytest -v -p no:cacheprovider -rfE ${XDIST[@]+"${XDIST[@]}"} $TESTS >"$OUT/tests.log" 2>&1
tests_rc=$?
[ "$tests_rc" -eq 124 ] && echo "tests TIMED OUT after $TESTS_TIMEOUT s; per-test results so far:"
echo "passed $(grep -c ' PASSED' "$OUT/tests.log"), failed $(grep -c ' FAILED' "$OUT/tests.log"), errors $(grep -c ' ERROR' "$OUT/tests.log"), skipped $(grep -c ' SKIPPED' "$OUT/tests.log")"
grep -E " (FAILED|ERROR)" "$OUT/tests.log" | grep "::" | head -n 25
grep -E "^E  " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 12
stamp "tests exit status $tests_rc"

stamp "benchmark (log: $OUT/bench.log)"
timeout "$BENCH_TIMEOUT" "$PY" bench/bench_gpu.py --quick --out "$OUT" >"$OUT/bench.log" 2>&1
bench_rc=$?
stamp "benchmark exit status $bench_rc; tests exit status $tests_rc; build exit status $build_rc"
[ "$bench_rc" -ne 0 ] && tail -n 40 "$OUT/bench.log"

# End to end: one training step of RoBERTa-base, GPT-2 medium and a LLaMA-style stack (eager, compiled,
# captured once in a CUDA graph for every rank). It rewrites its table after each model, so a run cut
# by the timeout still leaves the models it finished.
stamp "end-to-end benchmark, at most $E2E_TIMEOUT s (log: $OUT/bench_e2e.log)"
timeout "$E2E_TIMEOUT" "$PY" bench/bench_e2e.py --gpu-quick --out "$OUT" >"$OUT/bench_e2e.log" 2>&1
e2e_rc=$?
stamp "end-to-end exit status $e2e_rc"
[ "$e2e_rc" -ne 0 ] && tail -n 20 "$OUT/bench_e2e.log"
[ "$bench_rc" -eq 0 ] && { echo; cat "$OUT/bench_gpu.md"; }
[ -f "$OUT/bench_e2e.md" ] && { echo; cat "$OUT/bench_e2e.md"; }
for rc in "$bench_rc" "$tests_rc" "$e2e_rc"; do [ "$rc" -ne 0 ] && exit "$rc"; done
exit "$build_rc"
