#!/usr/bin/env bash
# The one prepared script for a lent H100/H200: the compile sweep, CUDA tests, then
# benchmarks, then plots.
#
#   bash bench/gpu_check.sh            # from any directory; PYTHON=... picks the interpreter
#   DEVICE=cpu BENCH_ARGS=--quick bash bench/gpu_check.sh   # dry run of the script itself on a CPU
#
# Budget: at most 6 minutes in all (every step has its own timeout; LIMIT below holds them
# and the script refuses to start if they sum to more than 360 s), so that a 10-minute device
# call leaves time for a rerun. The split:
#   env 10 s; compile 60 s (every kernel variant compiled ahead of time with ptxas for sm_80
#   and sm_90 in 16 processes: CPU work, the machine has 16 cores; ~1200 binaries, ~350 CPU-s
#   of ptxas on the 2-core dev machine, so ~25-45 s expected; exits 1 on any spill; the report
#   is only written at the end); CUDA tests 60 s (every Triton op forward + backward with no
#   host sync); flash-attn varlen 15 s (skipped and passing when flash-attn does not import);
#   fusion loss on logits 70 s; programs-per-SM sweep 25 s (fused only, N 8192, V 128256, S 3,
#   bf16, P in 1 2 3 4 (at 16 warps an SM holds at most 4), 100 ms timing window); fused
#   lm_head + loss 30 s (S in {2, 4} only, a 200 ms timing window per provider, chunk sizes
#   auto/1024/2048); training step fusion vs CLM-only 35 s (8-layer Llama, 4 timed steps per
#   mode); online vs offline fusion 45 s (~0.9B target, 5 timed steps per provider; skipped
#   and passing without datasets and rapidfuzz); plots 10 s = 360 s.
# No GPU run has measured these steps yet: after the first one, rebalance from the
# "=== name: rc=.. after ..s" lines of its log.
# A failing or timed-out step does not stop the later ones (the benchmark's numbers are
# worth having even when a test fails), but the script exits non-zero at the end. The
# benchmarks append their records as they go, so a step cut short by its timeout still
# leaves the shapes it finished. Results go to bench/results/<gpu>/ (commit them from there)
# and, when $OUT is set, the log and one archive of the results (with compile_report.json)
# are put there (the device tool brings back at most 8 files).
set -uo pipefail  # deliberately no -e: see above

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project runs from the tree, not pip-installed
export PYTHONUNBUFFERED=1  # progress reaches the log before a timeout kills a step
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
DEVICE=${DEVICE:-cuda}
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"

# Each step's time limit in seconds; the sum is the script's worst case.
declare -A LIMIT=([env]=10 [compile]=30 [tests]=60 [flash_varlen]=15 [bench_fusion_loss]=70 [bench_tail]=30
                  [bench_pps_sweep]=25 [bench_fused_linear]=30 [bench_train_step]=35 [bench_online]=45 [plot]=10)
BUDGET_S=360
total=0
for s in "${LIMIT[@]}"; do total=$((total + s)); done
if [ "$total" -gt "$BUDGET_S" ]; then
    echo "gpu_check: the step limits sum to ${total}s, over the ${BUDGET_S}s budget" >&2
    exit 2
fi

# Wheels the GPU machines lack (datasets, rapidfuzz, ...), fetched here by bench/gpu_wheels.sh and
# carried with the call (carry=[".whl"]): installed outside the image's site-packages
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fusellm-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/fusellm-site" \
        || echo "gpu_check: the carried wheels in .whl/ did not install; the steps that need them will say so" >&2
fi

RES=$("$PY" -c 'from bench.common import card_name, results_dir; print(results_dir(card_name("'"$DEVICE"'")))') || {
    echo "gpu_check: no $DEVICE device visible to torch; nothing to do" >&2
    exit 2
}
LOG="$RES/gpu_check.log"

step() {  # step NAME CMD...: run with the timeout LIMIT[NAME], report rc and time, remember failures
    local name=$1 limit=${LIMIT[$1]} start=$SECONDS rc
    shift
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
    echo "=== gpu_check: step limits sum to ${total}s (budget ${BUDGET_S}s)"
    step env bash -c 'date -u; git rev-parse --short HEAD 2>/dev/null; { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true; }; "$0" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"' "$PY"
    # ptxas on the CI set of kernel variants (sm_80 and sm_90) with this machine's triton; needs
    # the interpreter off, whatever the caller's environment says. The exhaustive reports (1942
    # binaries, too many for this budget) are made on the CPU machine with the same triton and
    # ptxas versions (bench/results/compile/). The report is written at the end: a stale one
    # must not be archived as this run's when the step times out.
    rm -f "$RES/compile_report.json"
    step compile env -u TRITON_INTERPRET "$PY" -m fusellm_kernels.ops.aot_compile --quiet --jobs 16 \
        --json "$RES/compile_report.json"
    step tests "$PY" -m pytest -q -m cuda --durations=10 --ignore=tests/test_flash_varlen.py tests
    # transformers' packed varlen path (--attn-implementation flash_attention_2), only where flash-attn imports
    step flash_varlen bash -c 'if ! err=$("$0" -c "import flash_attn" 2>&1); then
            echo "flash-attn not installed: varlen path skipped"
            echo "  (import flash_attn: $(printf "%s" "$err" | tail -n 1))"
            exit 0
        fi
        exec "$0" -m pytest -q -m cuda tests/test_flash_varlen.py' "$PY"
    step bench_fusion_loss "$PY" -m bench.bench_fusion_loss --device "$DEVICE" --out "$RES" \
        --providers fused,dense_teacher,gather_eager,gather_compile,liger_ce "${BENCH_ARGS[@]}"
    # the bucketed top-k tail (teacher_tail="bucket") beside the default, on the same inputs
    step bench_tail "$PY" -m bench.bench_fusion_loss --device "$DEVICE" --out "$RES" \
        --providers fused,fused_bucket,dense_bucket --vocab 32000 128256 --candidates 3 --rep-ms 100 "${BENCH_ARGS[@]}"
    # persistent programs per SM of the fusion-loss kernel: does pass 2's walk still fit in L2?
    step bench_pps_sweep "$PY" -m bench.bench_fusion_loss --device "$DEVICE" --out "$RES" --providers fused \
        --vocab 128256 --candidates 3 --programs-per-sm 1 2 3 4 --rep-ms 100 "${BENCH_ARGS[@]}"
    step bench_fused_linear "$PY" -m bench.bench_fused_linear --device "$DEVICE" --out "$RES" \
        --candidates 2 4 --chunk-rows 0 1024 2048 --rep-ms 200 "${BENCH_ARGS[@]}"
    step bench_train_step "$PY" -m bench.bench_train_step --device "$DEVICE" --out "$RES" \
        $([ -z "${BENCH_ARGS[*]}" ] && echo --steps 4) "${BENCH_ARGS[@]}"
    # online fusion: a ~0.9B Llama target, two ~0.5B sources of other tokenizer families, sequence 2048,
    # alignment in 2 worker processes; the prepared corpus needs `datasets` and the vocabulary map
    # `rapidfuzz`, which the GPU machines lack: carried as wheels (bench/gpu_wheels.sh, installed
    # above); without them the step says so and passes
    step bench_online bash -c 'if ! err=$("$0" -c "import datasets, rapidfuzz" 2>&1); then
            echo "online bench skipped: $(printf "%s" "$err" | tail -n 1) (run bench/gpu_wheels.sh here and carry .whl)"
            exit 0
        fi
        exec "$0" -m bench.bench_online --device "$1" --out "$2" ${3:+--quick}' "$PY" "$DEVICE" "$RES" "${BENCH_ARGS[*]:+quick}"
    # every results file in one process (torch and matplotlib imported once); a missing or
    # broken file fails the step but does not stop the others from being plotted
    step plot "$PY" -c '
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
    (cd "$RES" && tar czf "$OUT/results.tar.gz" --ignore-failed-read ./*.jsonl ./*.png ./compile_report.json 2>/dev/null)
fi
exit "$status"
