"""benchmarks/gpu_targets.py's plumbing that only a GPU run would reach otherwise: the
triton-fused candidate really runs the fused GEMM (and "triton" then the unfused path), and
the target table sets each backend's cell beside both roofline designs, and the kernel
report's kinds split the predicted launches without double counting."""

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


def test_fused_kernel_report_sets_the_overlap_beside_its_absence(monkeypatch):
    """The fused GEMM's row gives the prediction with the persistent schedule's overlapped
    stores and, below it, without: a GPU run tells which the kernel does."""
    run = gt.Run(smoke=True)
    run.cuda = True  # the profile below is made up; nothing runs
    monkeypatch.setattr(run, "pool", lambda case: [None])
    monkeypatch.setattr(gt, "calls_for", lambda *a: [lambda: None])
    stats = [gt.timing.KernelStat("fused_linear_kernel", 1.0, 400.0),
             gt.timing.KernelStat("mix_pair_kernel", 1.0, 9.0)]
    monkeypatch.setattr(gt.timing, "kernel_profile", lambda call, calls: stats)
    case = roofline.TARGETS[0].case
    lines = gt.kernel_report(run, case, gt.FUSED)
    (row,) = [x for x in lines if x.strip().startswith("Triton fused GEMM")]
    (alt,) = [x for x in lines if "stores not overlapped" in x]
    assert lines.index(alt) == lines.index(row) + 1
    (gemm,) = [x for x in roofline.predict(case, "fused", run.card) if x.name.startswith("fused")]
    pred, without = gemm.time_us(run.card), roofline.exposed(gemm).time_us(run.card)
    assert without > pred + 20  # 7/8 of y's 67 MB store back after the main loops
    assert row.split()[-4:-2] == [f"{pred:.1f}", "400.0"]
    assert alt.split()[-3:] == [f"{without:.1f}", "400.0", f"{400.0 / without:.2f}"]
    # The unfused backend has no overlapped launch: no such line.
    assert not [x for x in gt.kernel_report(run, case, "triton") if "not overlapped" in x]


@pytest.mark.parametrize("design", ["new", "fused"])
def test_every_predicted_launch_falls_in_one_kernel_kind(design):
    """The per-kind rows of kernel_report add up to the prediction: each launch of each
    target (forward and forward+backward) in exactly one kind."""
    for target in roofline.TARGETS:
        for planned in roofline.predict(target.case, design, roofline.H100):
            if not planned.per_call:
                continue
            kinds = [label for label, _, is_launch in gt.KINDS if is_launch(planned)]
            assert len(kinds) == 1, (target.case.label, planned.name, kinds)
