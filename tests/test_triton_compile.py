"""Every Triton kernel specialization the op launches compiles for a GPU (sm_90), on this
machine without one: scripts/triton_aot_check.py records the launches under the interpreter
in one process and compiles them with triton.compile and the wheel's ptxas in another. The
interpreter runs the kernels' Python only, so a kernel can pass every CPU test and still not
compile (it found one: the implicit-rows helper's two return types)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def aot_check(*args: str, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    """Run scripts/triton_aot_check.py (compiling needs the real JIT, not the interpreter);
    (the finished process, its stdout and stderr's tail for an assertion message)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"),
                           *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    return done, done.stdout + done.stderr[-3000:]


# The H100's tuned table and default.json's cuda table (what an H200 gets).
@pytest.mark.parametrize("card", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
# An empty Triton cache compiles all of them: 9.3 min for the H100's table on this 2-core
# machine with other work beside it (2026-12-08), so the limit leaves room for a cold CI run.
@pytest.mark.timeout(1200)
def test_every_launched_kernel_compiles_for_sm90(card):
    done, report = aot_check("--card", card, timeout=1180)
    assert done.returncode == 0, report
    first = done.stdout.splitlines()[0]
    assert " 0 failed to compile" in first, report
    launched = int(first.split("tables: ")[1].split(" distinct")[0])
    assert launched >= 100, report  # kernels x dtypes x layouts x row lengths (108, 2026-12-01)

