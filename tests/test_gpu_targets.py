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


# --- a failed base, an interrupt, the deadline: what the table may then say -----------------


@pytest.fixture
def smoke_run(monkeypatch):
    monkeypatch.setattr(gt, "INTERRUPTED", [])
    run = gt.Run(smoke=True)
    run.backends = ["cpu"]
    return run


def fake_times(monkeypatch, run, outcomes: list) -> list[int]:
    """run.time_ms gives outcomes[i] on its i-th call (an exception is raised); returns the
    calls made, by index."""
    made = []

    def time_ms(calls):
        made.append(len(made))
        got = outcomes[len(made) - 1]
        if isinstance(got, BaseException):
            raise got
        return got

    monkeypatch.setattr(run, "time_ms", time_ms)
    return made


def test_a_failed_base_gives_no_ratio(smoke_run, monkeypatch):
    """The candidates' milliseconds were once returned as their ratios: '0.42x met'."""
    row = smoke_run.rows[0]
    fake_times(monkeypatch, smoke_run, [RuntimeError("CUDA out of memory"), 0.42, 0.42])
    got = gt.measure_ratio(smoke_run, row)
    assert got["cpu"] == got[gt.MATERIALISE] == "no base: RuntimeError: CUDA out of memory"
    line = gt.target_table(smoke_run, {row.key: got})[2]
    assert "met" not in line and "short" not in line


def test_an_interrupt_stops_the_row_at_the_next_candidate(smoke_run, monkeypatch):
    """gpu_check.sh's SIGINT on a candidate: the rest of the row is not measured (its SIGKILL
    follows 15 s later, and the table comes last)."""
    row = smoke_run.rows[0]
    made = fake_times(monkeypatch, smoke_run, [0.2, KeyboardInterrupt(), 0.4])
    got = gt.measure_ratio(smoke_run, row)
    assert made == [0, 1]  # materialise+bmm never timed
    assert got["cpu"] == got[gt.MATERIALISE] == "skipped: interrupted (time limit)"


def test_the_deadline_is_checked_before_every_candidate(smoke_run, monkeypatch):
    row = smoke_run.rows[0]
    made = []

    def time_ms(calls):  # the base's measurement runs past the deadline
        made.append(1)
        smoke_run.deadline = 0.0
        return 0.2

    monkeypatch.setattr(smoke_run, "time_ms", time_ms)
    got = gt.measure_ratio(smoke_run, row)
    assert made == [1] and got["cpu"] == "skipped: out of the time budget (--budget-s)"


def test_graph_and_host_rows_stop_after_an_interrupt(smoke_run, monkeypatch):
    graph_row, host_row = (r for r in smoke_run.rows if r.kind != "ratio")
    smoke_run.backends = ["cpu", "other"]
    smoke_run.cuda = True  # graph_replay_ms is made up below; nothing is captured
    monkeypatch.setattr(smoke_run, "pool", lambda case: [None])
    made = []

    def measured(value):
        def fake(call, **kw):
            made.append(call)
            if len(made) == 2:
                raise KeyboardInterrupt
            return value
        return fake

    one_ms = gt.timing._summary([1.0], "ms")
    monkeypatch.setattr(gt.timing, "graph_replay_ms", measured(one_ms))
    got = gt.measure_graph(smoke_run, graph_row)  # base, then cpu interrupted
    assert len(made) == 2
    assert got["other"] == got[gt.MATERIALISE] == "skipped: interrupted (time limit)"
    made.clear()
    gt.INTERRUPTED.clear()
    host = gt.timing.HostTime(gt.timing._summary([5.0], "us"), 0.0, False)
    monkeypatch.setattr(gt.timing, "host_us_per_call", measured(host))
    got = gt.measure_host(smoke_run, host_row)
    assert len(made) == 2 and got[gt.BASE] == 5.0
    assert got["other"] == got[gt.MATERIALISE] == "skipped: interrupted (time limit)"


def test_a_failed_base_graph_gives_no_ratio(smoke_run, monkeypatch):
    graph_row = next(r for r in smoke_run.rows if r.kind == "graph")
    smoke_run.cuda = True
    monkeypatch.setattr(smoke_run, "pool", lambda case: [None])
    calls = []

    def graph_replay_ms(call):
        calls.append(call)
        if len(calls) == 1:
            raise RuntimeError("capture failed")
        return gt.timing._summary([1.0], "ms")

    monkeypatch.setattr(gt.timing, "graph_replay_ms", graph_replay_ms)
    got = gt.measure_graph(smoke_run, graph_row)
    assert got["cpu"] == "no base: RuntimeError: capture failed"


def test_an_interrupt_while_making_a_pool_is_a_cell_not_the_end(smoke_run, monkeypatch):
    smoke_run.cuda = True

    def pool(case):
        raise KeyboardInterrupt

    monkeypatch.setattr(smoke_run, "pool", pool)
    case = roofline.TARGETS[0].case
    try:  # an escaped interrupt would end pytest's session, not fail this test
        (line,) = gt.kernel_report(smoke_run, case, "triton")
        assert line.endswith(": skipped: interrupted (time limit)")
        gt.INTERRUPTED.clear()
        assert gt.launches_line(smoke_run, case, "triton").endswith(
            "measured skipped: interrupted (time limit)")
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped: main would end before the table")


def test_main_measures_the_decode_rows_first(monkeypatch, tmp_path, capsys):
    """The cheapest rows, which a cold Triton cache pushed past the budget when they came
    last; the table keeps the spec's order. A failed row prints no stray traceback."""
    monkeypatch.setattr(gt, "INTERRUPTED", [])
    order = []

    def fake(value):
        def measure(run, row):
            order.append(row.kind)
            if row.kind == "host":
                raise RuntimeError("host timing broke")
            return {b: value for b in run.backends}
        return measure

    for kind in ("ratio", "graph", "host"):
        monkeypatch.setattr(gt, f"measure_{kind}", fake(1.05))
    threads = torch.get_num_threads()
    try:
        assert gt.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert order == ["graph", "host", "ratio", "ratio", "ratio", "ratio"]
    out, err = capsys.readouterr()
    table = out[out.index("| case |"):].splitlines()[2:]
    assert [line.split(" | ")[0][2:] for line in table[:6]] == [r.key for r in gt.smoke_rows()]
    assert "RuntimeError: host timing broke" in out
    assert "Traceback" not in err and "NoneType: None" not in err


def test_profiler_events_that_are_not_launches_are_left_out():
    """A record_function range comes back as a CUDA-side user annotation (flagged on torch
    2.5+; the op's own label by name in any case): the launch counts must not take it."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks import timing

    cuda = DeviceType.CUDA

    def evt(name, device=cuda, **flags):
        return SimpleNamespace(name=name, device_type=device, **flags)

    assert timing.is_device_launch(evt("shrink_kernel"), cuda)
    assert not timing.is_device_launch(evt("shrink_kernel", DeviceType.CPU), cuda)
    assert not timing.is_device_launch(evt("anything", is_user_annotation=True), cuda)
    assert not timing.is_device_launch(evt("reclora::triton_lora_mix_forward"), cuda)
    assert timing.launch_kind("Memset (Device)") == "memsets"
    fill = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
            "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, ...)")
    assert timing.launch_kind(fill) == "memsets"  # torch 2.11's torch.zeros
    assert timing.launch_kind("Memcpy HtoD (Pageable -> Device)") == "memcpys"
    assert timing.launch_kind("fused_linear_kernel") == "kernels"
