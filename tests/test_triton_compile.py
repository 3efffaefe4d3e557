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


# The H100's tuned table and default.json's cuda table (what an H200 gets).
@pytest.mark.parametrize("card", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
# An empty Triton cache compiles all of them: 9.3 min for the H100's table on this 2-core
# machine with other work beside it (2026-12-08), so the limit leaves room for a cold CI run.
@pytest.mark.timeout(1200)
def test_every_launched_kernel_compiles_for_sm90(card):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"),
                           "--card", card],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1180)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    first = done.stdout.splitlines()[0]
    assert " 0 failed to compile" in first, report
    launched = int(first.split("tables: ")[1].split(" distinct")[0])
    assert launched >= 100, report  # kernels x dtypes x layouts x row lengths (108, 2026-12-01)


# The launches a model's bf16 forward makes on an H100 by default (the expand's 64 x 128 tile)
# or once a measurement turns the fused GEMM on (its 128 x 256 TMA tiles).
HOT = (r"expand_kernel \[\*bf16.*BLOCK_T=64 BLOCK_N=128"
       r"|fused_linear_kernel \[\*bf16.*BLOCK_T=128 BLOCK_N=256.*TMA=True")


@pytest.mark.timeout(900)
def test_hot_kernels_do_not_spill_as_the_jit_compiles_them():
    """Registers as a GPU's JIT compiles the kernels (arguments equal to 1 as constants,
    divisible-by-16 hints; scripts/triton_aot_check.py --as-jit): the expand's tile spills
    nothing, and the fused GEMM spills nothing inside its main loop. Its epilogue used to sum
    a tile's rows in a second [T, N] accumulator; the compiler then kept acc in local memory
    across the main loop (128 of its ~210 instructions were spill loads and stores)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"),
                           "--as-jit", "--only", HOT, "--no-loop-spills"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=880)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    lines = done.stdout.splitlines()[1:]
    expand = [line for line in lines if line.startswith("ok    expand_kernel")]
    fused = [line for line in lines if "fused_linear_kernel" in line]
    assert len(expand) >= 8 and len(fused) >= 8, report
    assert all(" registers, 0 B spilled" in line for line in expand), report
    assert all(", 0 spill instructions in the MMA loop" in line for line in fused), report
