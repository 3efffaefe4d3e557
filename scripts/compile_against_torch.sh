#!/usr/bin/env bash
# Compile csrc/ against another torch's headers, without installing that torch.
#
#   bash scripts/compile_against_torch.sh            # torch 2.11.0, the GPU machine's
#   bash scripts/compile_against_torch.sh 2.12.1
#
# Why: the GPU machine runs torch 2.11 (../shared/ENVIRONMENT.md) while this checkout and CI
# build against 2.14, and a GPU session has 15 minutes in all: a C++ API that 2.11 lacks must
# fail here, not in that session's build step. Downloads the torch wheel (no dependencies,
# ~530 MB, kept in $CACHE), unpacks only its headers, then checks every C++ source with
# `g++ -fsyntax-only` and compiles every CUDA source with nvcc for sm_90 (when nvcc is found),
# in the C++ standard that torch's cpp_extension passes. Exit status 0 only when every file
# compiled.
set -u
cd "$(dirname "$0")/.."
VERSION="${1:-2.11.0}"
PY="${PYTHON:-.venv/bin/python}"
CACHE="${CACHE:-${TMPDIR:-/tmp}/reclora_torch_headers}"
DIR="$CACHE/$VERSION"
mkdir -p "$DIR"
if [ ! -d "$DIR/torch/include" ]; then
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$DIR" "torch==$VERSION" || { echo "could not download torch==$VERSION"; exit 2; }
  "$PY" - "$DIR" <<'PY' || { echo "could not unpack the wheel"; exit 2; }
import pathlib, sys, zipfile
folder = pathlib.Path(sys.argv[1])
wheel = next(folder.glob("torch-*.whl"))
with zipfile.ZipFile(wheel) as z:  # the headers only: the libraries are ~2 GB unpacked
    z.extractall(folder, [n for n in z.namelist() if n.startswith("torch/include/")
                          or n == "torch/utils/cpp_extension.py"])
wheel.unlink()
PY
fi
# The standard that torch's own cpp_extension passes (C++17 in 2.11, C++20 in 2.14).
STD=c++17
grep -q -- "common_cflags += \['-std=c++20'" "$DIR/torch/utils/cpp_extension.py" 2>/dev/null &&
  STD=c++20
T="$DIR/torch/include"
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NVCC=$(command -v "${CUDA_HOME:+$CUDA_HOME/bin/}nvcc")  # it adds its own CUDA headers
INC=(-I"$T" -I"$T/torch/csrc/api/include" -I"$PYINC")
DEFS=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
LOGS="$DIR/logs"
mkdir -p "$LOGS"
failed=0
check() {  # check NAME COMMAND...: run it, keep its log, report one line
  local name="$1"; shift
  if "$@" >"$LOGS/$name.log" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name (log: $LOGS/$name.log)"; grep -m 5 "error" "$LOGS/$name.log"
    failed=1
  fi
}
echo "torch $VERSION headers ($STD) in $T"
for f in csrc/*.cpp csrc/cpu/*.cpp; do
  check "$(basename "$f")" g++ -fsyntax-only -std="$STD" -fopenmp -fPIC "${DEFS[@]}" \
    "${INC[@]}" "$f"
done
if [ -n "$NVCC" ]; then
  for f in csrc/cuda/*.cu; do
    check "$(basename "$f")" "$NVCC" -c -o /dev/null -std="$STD" \
      --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      --compiler-options -fPIC -gencode=arch=compute_90,code=sm_90 "${DEFS[@]}" "${INC[@]}" "$f"
  done
else
  echo "skip  csrc/cuda (no nvcc found)"
fi
exit "$failed"
