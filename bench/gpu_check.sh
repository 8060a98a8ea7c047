#!/usr/bin/env bash
# The one prepared script for a lent H100/H200: CUDA tests, then benchmarks, then plots.
#
#   bash bench/gpu_check.sh            # from any directory; PYTHON=... picks the interpreter
#   DEVICE=cpu BENCH_ARGS=--quick bash bench/gpu_check.sh   # dry run of the script itself on a CPU
#
# Budget: under 6 minutes in all (every step has its own timeout, summing to < 360 s), so
# that a 10-minute device call leaves time for a rerun. A failing or timed-out step does not
# stop the later ones (the benchmark's numbers are worth having even when a test fails),
# but the script exits non-zero at the end. Results go to bench/results/<gpu>/ (commit
# them from there) and, when $OUT is set, the .jsonl, .png and the log are copied flat into
# $OUT (the device tool brings back at most 8 files).
set -uo pipefail  # deliberately no -e: see above

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project runs from the tree, not pip-installed
export PYTHONUNBUFFERED=1  # progress reaches the log before a timeout kills a step
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
DEVICE=${DEVICE:-cuda}
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"

RES=$("$PY" -c 'from bench.common import card_name, results_dir; print(results_dir(card_name("'"$DEVICE"'")))') || {
    echo "gpu_check: no $DEVICE device visible to torch; nothing to do" >&2
    exit 2
}
LOG="$RES/gpu_check.log"

step() {  # step NAME LIMIT_S CMD...: run with a timeout, report rc and time, remember failures
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s"
    case $rc in
        0) ;;
        5) [ "$name" = tests ] && echo "=== $name: no CUDA tests collected" || status=1 ;;  # pytest's 'nothing collected'
        124|137) echo "=== $name: TIMED OUT"; status=1 ;;
        *) status=1 ;;
    esac
}

main() {
    status=0
    step env 20 bash -c 'date -u; git rev-parse --short HEAD 2>/dev/null; { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true; }; "$0" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"' "$PY"
    step tests 140 "$PY" -m pytest -q -m cuda --durations=10 tests
    step bench_fusion_loss 170 "$PY" -m bench.bench_fusion_loss --device "$DEVICE" --out "$RES" "${BENCH_ARGS[@]}"
    step plot 25 "$PY" -m bench.plot "$RES/fusion_loss.jsonl"
    echo "=== gpu_check: status=$status after ${SECONDS}s; results in $RES"
    return $status
}

main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$RES"/*.jsonl "$RES"/*.png "$LOG" "$OUT"/ 2>/dev/null
fi
exit "$status"
