#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine (from the repository root):   bash bench/gpu_check.sh
# Steps, in order, each under its own time limit (seconds; GPU_CHECK_<STEP>_TIMEOUT overrides) so that a slow
# step cannot starve the rest:
#   build      the GPU build (pip install -e .), then `python -m dylora_kernels info`            BUILD   120
#   tests      the GPU-relevant suites, with pytest-xdist when installed (one line per test)      TESTS   110
#   sanitize   compute-sanitizer memcheck over a small forward/backward of every plan kind        SANITIZE 45
#   kernels    bench/bench_kernels.py --quick (each kernel's device time, TMA configs)            KERNELS  45
#   bench      bench/bench_gpu.py --quick, then --int-rank                                        BENCH    90
#   layers     bench/bench_dropout.py and bench/bench_conv.py on CUDA, bf16 (fused adapter dropout  LAYERS   45
#              vs dropout + op; the conv op, NCHW and channels-last, vs F.conv2d and LyCORIS)
#   e2e        bench/bench_e2e.py --gpu-quick (training steps on the paper's models)              E2E      85
# The limits add up to 9 minutes (a step that ends early passes nothing on): one call of at most 10 minutes;
# with the machine's start, what is left of the 15 minutes of device time allows a shorter second call.
# Logs and results go to $OUT (default bench/out); a digest of every step is printed last. If the extension
# fails to build, the script goes on without it (PYTHONPATH=.: the ops are defined in Python, Triton serves CUDA).
# Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DYLORA_FUZZ_CASES=${DYLORA_FUZZ_CASES:-20}
export DYLORA_DISPATCH_CACHE="$OUT/dispatch_cache"  # a fresh dispatcher cache: the run measures
TESTS=${GPU_CHECK_TESTS:-"tests/test_cuda.py tests/test_executor.py tests/test_lean.py tests/test_info.py tests/test_triton.py tests/test_ops.py tests/test_wrappers.py tests/test_reliability.py tests/test_dispatch.py tests/test_gpu_reliability.py tests/test_dropout.py tests/test_e2e.py::test_captured_training_step_replays_every_rank"}
PY=${PYTHON:-python3}
t0=$SECONDS
DIGEST=()
status=0
stamp() { echo "[gpu_check +$((SECONDS - t0)) s] $*"; }
limit() { local name="GPU_CHECK_${1}_TIMEOUT"; echo "${!name:-$2}"; }
# run STEP LIMIT LOG command...: the command under `timeout`, its output in $OUT/LOG; one digest line.
run() {
    local step=$1 seconds=$2 log=$3
    shift 3
    stamp "$step (at most $seconds s; log: $OUT/$log)"
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    local note="exit $rc"
    [ "$rc" -eq 124 ] && note="TIMED OUT after $seconds s"
    [ "$rc" -ne 0 ] && status=1 && tail -n 25 "$OUT/$log"
    DIGEST+=("$step: $note in $((SECONDS - start)) s")
    return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"

if ! run build "$(limit BUILD 120)" install.log "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    stamp "build FAILED: going on without the C++ extension (Triton only)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DYLORA_ALLOW_NO_EXTENSION=1
fi
"$PY" -m dylora_kernels info | tee "$OUT/info.log"

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# -v: a line per finished test, so a run cut by the timeout still shows what passed and failed.
run tests "$(limit TESTS 110)" tests.log "$PY" -m pytest -v -p no:cacheprovider -rfE ${XDIST[@]+"${XDIST[@]}"} $TESTS
DIGEST+=("  tests: passed $(grep -c ' PASSED' "$OUT/tests.log"), failed $(grep -c ' FAILED' "$OUT/tests.log"), errors $(grep -c ' ERROR' "$OUT/tests.log"), skipped $(grep -c ' SKIPPED' "$OUT/tests.log")")
grep -E " (FAILED|ERROR)" "$OUT/tests.log" | grep "::" | head -n 25
grep -E "^E  " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 12

if command -v compute-sanitizer >/dev/null; then
    run sanitize "$(limit SANITIZE 45)" sanitize.log compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PY" bench/sanitize.py
    grep -E "ERROR SUMMARY|FAILED" "$OUT/sanitize.log" | head -n 5
else
    DIGEST+=("sanitize: no compute-sanitizer on PATH")
fi
run kernels "$(limit KERNELS 45)" kernels.log "$PY" bench/bench_kernels.py --quick
run bench "$(limit BENCH 90)" bench.log bash -c "'$PY' bench/bench_gpu.py --quick --out '$OUT' && '$PY' bench/bench_gpu.py --quick --int-rank --out '$OUT/int_rank'"
run layers "$(limit LAYERS 45)" layers.log bash -c "'$PY' bench/bench_dropout.py --device cuda --dtype bfloat16 \
    --shapes 8192x4096x4096,1024x768x768 --r-max 64 --rank 32 && for layout in '' --channels-last; do \
    '$PY' bench/bench_conv.py --device cuda --dtype bfloat16 \$layout || exit 1; done"
if [ -f bench/bench_e2e.py ]; then
    run e2e "$(limit E2E 85)" e2e.log "$PY" bench/bench_e2e.py --gpu-quick --out "$OUT"
fi

echo
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
[ -f "$OUT/bench_e2e.md" ] && { echo; cat "$OUT/bench_e2e.md"; }
grep -E "^\||^(NVIDIA|CPU)" "$OUT/layers.log" 2>/dev/null
echo
stamp "digest"
printf '  %s\n' "${DIGEST[@]}"
exit "$status"
