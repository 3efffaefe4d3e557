"""The environment variables reclora_kernels reads at import: a value it does not know is
refused there, naming the variable (a typo was ignored, or failed every op call blaming its
`backend` argument); unset or empty means auto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_with(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECLORA_")}
    return subprocess.run(
        [sys.executable, "-c", "import reclora_kernels.ops as o; print(o.ENV_BACKEND)"],
        env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, value", [
    ("RECLORA_BACKEND", "foo"), ("RECLORA_CPU_THIN", "BLAS"), ("RECLORA_CPU_BF16", "loops"),
    ("RECLORA_CPU_HALF_BASE", "MKL"),
])
def test_an_unknown_value_is_refused_at_import(name, value):
    done = _import_with(**{name: value})
    assert done.returncode != 0
    assert f"${name} must be one of" in done.stderr and repr(value) in done.stderr


def test_empty_means_auto_and_known_values_load():
    done = _import_with(RECLORA_BACKEND="", RECLORA_CPU_THIN="blas", RECLORA_CPU_BF16="mkl",
                        RECLORA_CPU_HALF_BASE="aten")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "auto"
