"""reclora_kernels/triton/fast_launch.py: the cached launch runs the kernel Triton's own path
would and gives its launcher the same arguments. Each check runs in its own process without
the interpreter (tests/fast_launch_check.py), with a stand-in sm_90 driver, so it runs here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
# fast_launch_check.CHECKS (not imported here: it turns the interpreter off for its process)
CHECKS = ["check_keys", "check_launcher_args", "check_hooks_take_tritons_path",
          "check_op_launches"]


@pytest.mark.parametrize("check", CHECKS)
def test_fast_launch(check):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RECLORA_POISON")}
    run = subprocess.run([sys.executable, str(HERE / "fast_launch_check.py"), check],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith(f"ok {check}")
