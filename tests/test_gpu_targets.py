"""benchmarks/gpu_targets.py's plumbing that only a GPU run would reach otherwise: the
triton-fused candidate really runs the fused GEMM (and "triton" then the unfused path), and
the target table sets each backend's cell beside both roofline designs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from op_cases import count_calls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

import reclora_kernels as rk  # noqa: E402
from benchmarks import gpu_targets as gt  # noqa: E402
from benchmarks import roofline  # noqa: E402
from reclora_kernels.triton import configs, launch  # noqa: E402
from reclora_kernels.triton.card_plan import force_fused  # noqa: E402

CASE = roofline.Case("tiny", tokens=12, rows=3, d_in=40, d_out=24, adapters=4, rank=2)


@pytest.fixture(autouse=True)
def tables_as_their_files():
    yield
    force_fused(None, configs.table_key(torch.device("cpu")))
    gt._FUSED_NOW[0] = None


@pytest.mark.skipif("triton" not in rk.available_backends() or torch.cuda.is_available(),
                    reason="runs the Triton interpreter on CPU tensors")
def test_the_fused_candidate_runs_the_fused_gemm(monkeypatch):
    fused = count_calls(monkeypatch, launch, "_run_fused")
    expand = count_calls(monkeypatch, launch, "_run_expand")
    (inputs,) = gt.make_pool(CASE, torch.float32, torch.device("cpu"), sets=1)
    y_fused = gt.candidate(gt.FUSED, CASE)(inputs)
    assert len(fused) == 1 and not expand
    y_triton = gt.candidate("triton", CASE)(inputs)  # back to the table's own choice: unfused
    assert len(fused) == 1 and len(expand) == 1
    torch.testing.assert_close(y_fused, y_triton, rtol=2e-5, atol=2e-5)


def test_target_table_with_the_fused_column():
    run = gt.Run(smoke=True)
    run.backends = ["triton", gt.FUSED]
    run.rows = [gt.Row("dense factor fwd", roofline.TARGETS[0].case, 1.10)]
    results = {"dense factor fwd": {"triton": 1.3, gt.FUSED: 1.05, gt.MATERIALISE: 1.6}}
    header, rule, row, above = gt.target_table(run, results)
    assert "roofline new" in header and "roofline fused" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    width = len(header.strip("|").split("|"))
    assert len(cells) == width == len(rule.strip("|").split("|"))
    assert cells[2:5] == ["1.30x short", "1.05x met", "1.60x short"]
    new, fused = (roofline.ratio(run.rows[0].case, d, run.card) for d in ("new", "fused"))
    assert cells[5:] == [f"{new:.2f}x", f"{fused:.2f}x"]
    assert len(above.strip("|").split("|")) == width
    assert "0.50 short" in above and "0.08 met" in above  # (1.3 - 1) / 0.6, (1.05 - 1) / 0.6
