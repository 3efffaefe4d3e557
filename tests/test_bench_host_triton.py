"""benchmarks/bench_host_triton.py end to end (a few calls): its launch counts are what the
launch plan says one call makes, and its table is written, with the columns that run the
calls through Triton's launch path, through the op's fast launch and through it with the fused
GEMM on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")

# (Triton launches, torch kernels) per call, read from reclora_kernels/triton/launch.py:
# factor mode mixes A and B (one Triton launch for both, dense or gathered: mix.ONE_LAUNCH),
# then the shrink, the expand and cuBLAS's addmm_; output mode has no mixing; the backward
# with only lora_a's gradient is the shrink of g (d = 16 is one K chunk: no split, no zeroed
# buffer), one segment sum that stores dA_p (each row owns its block: no zeroing) and the
# GEMM w^T dA_p: no dB_p, dB or dw, which nobody asked for, and no zero-filled gradients for
# the custom op's saved outputs.
EXPECTED = {
    "op[triton] dense factor": (3, 1),
    "op[triton] dense output": (2, 1),
    "op[triton] gathered k=4, idx checked once": (3, 1),
    "op[triton] forward+backward": (5, 2),
    "nn.Linear module, no_grad": (0, 1),
}


def test_bench_host_triton_counts_launches(tmp_path):
    out = tmp_path / "host.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("RECLORA_POISON", None)  # the suite's NaN fills would count as launches
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_triton.py"),
                          "--calls", "3", "--rounds", "1", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in EXPECTED:
            rows[cells[0]] = (int(cells[3]), int(cells[4]))
            # stubbed, JITFunction.run, fast launch, fast launch with the fused GEMM
            assert all(float(cells[i]) > 0 for i in (1, 5, 6, 7))
    assert rows == EXPECTED
