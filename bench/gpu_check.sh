#!/usr/bin/env bash
# The GPU check: build the package, run the test suite on the GPU, then the GPU benchmark. Run from the
# repository root on a CUDA machine:   bash bench/gpu_check.sh
# Logs and results go to $OUT (default bench/out): install.log, tests.log, bench.log, bench_gpu.json,
# bench_gpu.md. The benchmark's table is the last thing printed. If the C++ extension fails to build,
# the script says so and goes on without it (PYTHONPATH=.: the ops are then defined in Python and the
# Triton kernels serve CUDA; the cuBLAS composition is not timed). Exit status: non-zero if the build,
# the tests or the benchmark failed. Budget: well under 6 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DYLORA_FUZZ_CASES=${DYLORA_FUZZ_CASES:-40}
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
stamp "tests (log: $OUT/tests.log)"
timeout 210 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
tail -n 1 "$OUT/tests.log"
stamp "tests exit status $tests_rc"

stamp "benchmark (log: $OUT/bench.log)"
timeout 170 "$PY" bench/bench_gpu.py --quick --out "$OUT" >"$OUT/bench.log" 2>&1
bench_rc=$?
stamp "benchmark exit status $bench_rc; tests exit status $tests_rc; build exit status $build_rc"
if [ "$bench_rc" -ne 0 ]; then
    tail -n 30 "$OUT/bench.log"
    exit "$bench_rc"
fi
echo
cat "$OUT/bench_gpu.md"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$build_rc"
