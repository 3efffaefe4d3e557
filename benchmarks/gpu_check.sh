#!/usr/bin/env bash
# GPU check for the device machine (../shared/ENVIRONMENT.md, "The GPU machine"): build the
# native kernels for sm_90, run the op suites on the GPU, run the quick benchmark, and print a
# short table last. Whole script: under 6 minutes (each step has its own timeout).
#
#   bash benchmarks/gpu_check.sh            # logs go to $OUT (if set) or benchmarks/results/gpu
#
# That machine has python3 3.12, torch 2.11+cu130, triton 3.6, pytest, no registry. Wheels
# that the tests need and it lacks (hypothesis and its dependencies) travel in .whl/ (carry
# it): `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hypothesis
# sortedcontainers attrs`.
set -u
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
declare -a STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, tee its log, record status and seconds
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS rc
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  STEPS+=("$(printf '%-10s %-8s %5ds' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" $((SECONDS - start)))")
  return "$rc"
}

{
  echo "host: $(hostname)  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG_DIR/env.log"

if ! "$PY" -c "import hypothesis" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 60 "$PY" -m pip install --no-index --no-deps .whl/*.whl
fi

export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS="${MAX_JOBS:-8}"
if step build 200 "$PY" -m pip install --no-build-isolation --no-deps -e . ; then
  "$PY" - <<'PY' 2>&1 | tee -a "$LOG_DIR/build.log"
import reclora_kernels as rk
from reclora_kernels import ops
print("native loaded:", ops.NATIVE_LOADED, "cpu:", ops.NATIVE_CPU, "cuda:", ops.NATIVE_CUDA)
print("available backends:", rk.available_backends())
PY
  # float64 runs on the CPU backends only (the CUDA kernels take fp32/fp16/bf16), so the
  # float64 cases on the GPU are deselected here rather than failed.
  # test_native first: -x stops at the first failure, and the native checks should report.
  step tests 180 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_native.py tests/test_op.py \
    -k "not (float64 and cuda)"
  step bench 120 "$PY" benchmarks/bench_lora.py --quick --no-csv
fi

echo
echo "---------------- gpu_check summary ----------------"
printf '%-10s %-8s %6s\n' step status time
for s in "${STEPS[@]}"; do echo "$s"; done
grep -hE "^[0-9]+ (passed|failed)|passed|failed" "$LOG_DIR/tests.log" 2>/dev/null | tail -1
echo "logs: $LOG_DIR"
