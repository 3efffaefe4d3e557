#!/usr/bin/env bash
# GPU check for the device machine (../shared/ENVIRONMENT.md, "The GPU machine"; issue 12 item 7):
# build the native kernels for sm_90, run the GPU test subset, then benchmarks/gpu_targets.py
# (the target table with the roofline's prediction beside every measured ratio, per-kernel
# times, host us per call, launches per call, CUDA-graph replay at T = 64). No model weights.
# Every step has its own limit (build 120 s, tests 50 + 40 + 130 s, targets 140 s), cut further so
# the whole stays within BUDGET_S (default 400 s); a step cut by its limit gets SIGINT first,
# so pytest still prints its summary.
#
# A session's 15 device minutes, start-ups included (a machine goes back 30 s after a call, so
# a rerun starts a fresh one: 1-2 min, and none starts with under 4 min left):
#   1. run: `bash benchmarks/gpu_check.sh` with the tool's timeout_s 460 (~9-10 min in all);
#   2. fix here, then one rerun of the build and the failed tests only, e.g.
#      `BUDGET_S=150 bash benchmarks/gpu_check.sh --only "tests/test_x.py::test_y"`;
#   3. tune (`python benchmarks/tune_triton.py --budget-s <s> --out "$OUT/<card>.json"`) only
#      in a session whose check came back clean with over 5 minutes left.
#
#   bash benchmarks/gpu_check.sh            # logs to $OUT (if set) or benchmarks/results/gpu
#   bash benchmarks/gpu_check.sh --only IDS # build, then pytest on IDS (space-separated)
#   bash benchmarks/gpu_check.sh --smoke    # on a CPU: no build, no GPU tests, targets --smoke
#
# That machine has python3 3.12, torch 2.11+cu130, triton 3.6, pytest, no registry (before a
# session, `bash scripts/compile_against_torch.sh` compiles csrc/ against 2.11's headers here,
# and `python scripts/triton_aot_check.py` every Triton kernel the op launches for sm_90). Wheels the
# tests need and it lacks (hypothesis and its dependencies) travel in .whl/ (carry it):
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hypothesis
# sortedcontainers attrs`.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
ONLY=""
[ "${1:-}" = "--smoke" ] && SMOKE=1
[ "${1:-}" = "--only" ] && ONLY="${2:?--only needs the test ids}"
LOG_DIR="${OUT:-benchmarks/results/gpu}"
[ "$SMOKE" = 1 ] && LOG_DIR="${OUT:-${TMPDIR:-/tmp}/gpu_check_smoke}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(echo "${CARD:-cpu}" | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z' | sed 's/^_*//; s/_*$//')
START=$SECONDS
BUDGET_S="${BUDGET_S:-400}"  # the whole script, seconds (see the plan above)
declare -a STEPS=()
FAILED=0  # the exit status: 1 if a step failed or was skipped

left() { echo $((BUDGET_S - (SECONDS - START))); }

step() {  # step NAME LIMIT_S COMMAND...: run, tee its log, record status and seconds
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS rc
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 10 ]; then
    STEPS+=("$(printf '%-11s %-10s %5ds' "$name" "skipped" 0)"); echo "=== $name: no time left"
    FAILED=1
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$LOG_DIR/${SLUG}_$name.log"
  rc=${PIPESTATUS[0]}
  STEPS+=("$(printf '%-11s %-10s %5ds' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" \
    $((SECONDS - start)))")
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

{
  echo "host: $(hostname)  card: ${CARD:-none}  $(nvidia-smi --query-gpu=driver_version \
    --format=csv,noheader 2>/dev/null | head -1)"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$LOG_DIR/${SLUG}_env.log"

if [ "$SMOKE" = 1 ]; then
  echo "--smoke: no build and no GPU tests (they need the GPU machine)"
  step targets 140 "$PY" benchmarks/gpu_targets.py --smoke --out "$LOG_DIR"
else
  if ! "$PY" -c "import hypothesis" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 60 "$PY" -m pip install --no-index --no-deps .whl/*.whl
  fi
  export TORCH_CUDA_ARCH_LIST=9.0
  export MAX_JOBS="${MAX_JOBS:-8}"
  step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
  "$PY" - <<'PY' 2>&1 | tee -a "$LOG_DIR/${SLUG}_build.log"
import reclora_kernels as rk
from reclora_kernels import ops
print("native loaded:", ops.NATIVE_LOADED, "cpu:", ops.NATIVE_CPU, "cuda:", ops.NATIVE_CUDA)
print("available backends:", rk.available_backends())
PY
fi
if [ -n "$ONLY" ]; then  # a rerun: the failed tests only
  # shellcheck disable=SC2086  # IDS: space-separated pytest node ids
  step tests "$(left)" "$PY" -m pytest -q -p no:cacheprovider $ONLY
elif [ "$SMOKE" = 0 ]; then
  # Without hypothesis (a wheel in .whl/, which the device tool copies only when carried)
  # test_op.py and the files importing it fail to collect: say so loudly, and let pytest run
  # what does collect (--continue-on-collection-errors) instead of nothing.
  "$PY" -c "import hypothesis" 2>/dev/null || echo "=== WARNING: hypothesis is missing" \
    "(carry .whl/): test_op.py and the files that import it will not collect"
  COLLECT=(-q -p no:cacheprovider --continue-on-collection-errors)
  # The files with tests marked cuda (found here: collecting all of tests/ costs seconds and
  # one module that fails to import would stop the step).
  mapfile -t CUDA_FILES < <(grep -l "mark.cuda" tests/*.py)
  # 50 s: one of them (test_row_plan.py) starts a child process whose device assert must
  # not take this process's CUDA context down (~5-10 s).
  step tests_cuda 50 "$PY" -m pytest "${COLLECT[@]}" --maxfail=10 -m cuda "${CUDA_FILES[@]}"
  # The fused GEMM (off by default; gpu_targets times it as triton-fused, with the card
  # table's schedule: TMA and a persistent grid by default) against the oracle on the GPU,
  # pointer and TMA variants: before the op suite, which its limit cuts.
  step tests_fused 40 "$PY" -m pytest "${COLLECT[@]}" --maxfail=5 \
    tests/test_fused_gemm.py tests/test_fused_tma.py \
    -k "runs or main_loop or nan or ragged or strided or descriptors or probe or unaligned"
  # GPU cases only: float64 runs on the CPU backends alone (the CUDA kernels take fp32/fp16/
  # bf16), and the CPU-device cases (ids ending "-cpu]": ~200 of 500) are what CI runs. The
  # short files first, so a cut by the limit falls on the big op suite's tail (316 cases; the
  # last GPU run did 118 in 113 s). --maxfail, not -x: one failure must not hide the others.
  step tests 130 "$PY" -m pytest "${COLLECT[@]}" --maxfail=10 \
    "tests/test_custom_ops.py::test_cuda_graph_replay" \
    "tests/test_custom_ops.py::test_training_after_inference_mode" tests/test_mix_pair.py \
    tests/test_native.py tests/test_op.py \
    -k "not (float64 and cuda) and not -cpu] and not thread_counts and not gradcheck_cpu \
and not gradcheck_float64"
  # gpu_targets stops measuring 20 s before its limit, so its table is always printed.
  TLIMIT=140; [ "$(left)" -lt "$TLIMIT" ] && TLIMIT=$(left)
  step targets "$TLIMIT" "$PY" benchmarks/gpu_targets.py --out "$LOG_DIR" \
    --budget-s $((TLIMIT - 20))
fi

echo
echo "---------------- gpu_check summary ($((SECONDS - START)) s) ----------------"
printf '%-11s %-10s %6s\n' step status time
for s in "${STEPS[@]}"; do echo "$s"; done
for t in tests tests_cuda tests_fused; do
  [ -f "$LOG_DIR/${SLUG}_$t.log" ] && echo "$t: $(grep -hE '(passed|failed|error)' \
    "$LOG_DIR/${SLUG}_$t.log" | tail -1)"
done
echo "logs: $LOG_DIR/${SLUG}_*.log"
echo
# The target table last (gpu_targets.py also wrote it to $LOG_DIR/targets_<card>.md).
sed -n '/^== targets/,$p' "$LOG_DIR/${SLUG}_targets.log" 2>/dev/null | grep -v '^wrote '
exit "$FAILED"
