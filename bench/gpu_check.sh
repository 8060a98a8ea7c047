#!/usr/bin/env bash
# The one prepared script for a lent H100/H200: CUDA tests, then benchmarks, then plots.
#
#   bash bench/gpu_check.sh            # from any directory; PYTHON=... picks the interpreter
#   DEVICE=cpu BENCH_ARGS=--quick bash bench/gpu_check.sh   # dry run of the script itself on a CPU
#
# Budget: under 6 minutes in all (every step has its own timeout, summing to < 360 s), so
# that a 10-minute device call leaves time for a rerun. The split: env 15 s, CUDA tests
# 100 s, fusion loss on logits 115 s, fused lm_head + loss 55 s (S in {2, 4} only and a
# 200 ms timing window per provider; chunk sizes auto/1024/2048 swept), training step
# fusion vs CLM-only 50 s (8-layer Llama, 4 timed steps per mode), plots 20 s = 355 s.
# A failing or timed-out step does not stop the later ones (the benchmark's numbers are
# worth having even when a test fails), but the script exits non-zero at the end. The
# benchmarks append their records as they go, so a step cut short by its timeout still
# leaves the shapes it finished. Results go to bench/results/<gpu>/ (commit them from there)
# and, when $OUT is set, the log and one archive of the results are put there (the device
# tool brings back at most 8 files).
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
    step env 15 bash -c 'date -u; git rev-parse --short HEAD 2>/dev/null; { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true; }; "$0" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"' "$PY"
    step tests 100 "$PY" -m pytest -q -m cuda --durations=10 tests
    step bench_fusion_loss 115 "$PY" -m bench.bench_fusion_loss --device "$DEVICE" --out "$RES" "${BENCH_ARGS[@]}"
    step bench_fused_linear 55 "$PY" -m bench.bench_fused_linear --device "$DEVICE" --out "$RES" \
        --candidates 2 4 --chunk-rows 0 1024 2048 --rep-ms 200 "${BENCH_ARGS[@]}"
    step bench_train_step 50 "$PY" -m bench.bench_train_step --device "$DEVICE" --out "$RES" \
        $([ -z "${BENCH_ARGS[*]}" ] && echo --steps 4) "${BENCH_ARGS[@]}"
    # every results file in one process (torch and matplotlib imported once); a missing or
    # broken file fails the step but does not stop the others from being plotted
    step plot 20 "$PY" -c '
import sys, traceback
from bench.plot import main
rc = 0
for path in sys.argv[1:]:
    try:
        rc |= main([path])
    except Exception:
        traceback.print_exc()
        rc = 1
sys.exit(rc)' "$RES/fusion_loss.jsonl" "$RES/fused_linear_loss.jsonl" "$RES/train_step.jsonl"
    echo "=== gpu_check: status=$status after ${SECONDS}s; results in $RES"
    return $status
}

main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
    # The device tool returns at most 8 files: the log, plus every result of this run in one
    # archive (unpack it into bench/results/<gpu>/ and commit it).
    mkdir -p "$OUT"
    cp "$LOG" "$OUT"/
    (cd "$RES" && tar czf "$OUT/results.tar.gz" --ignore-failed-read ./*.jsonl ./*.png 2>/dev/null)
fi
exit "$status"
