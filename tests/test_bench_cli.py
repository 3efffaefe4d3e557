"""The benchmarks' command lines (benchmarks/bench_lora.py, bench_serving.py, gpu_targets.py,
tune_triton.py): a bad option is refused in one line before anything is measured or written,
bench_serving never makes its run inside a folder it did not make, and a bench_lora run that
measured nothing writes nothing. No real benchmark runs here beyond one tiny bench_lora case."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import bench_lora as bl  # noqa: E402
from benchmarks import bench_serving as bs  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import gpu_targets as gt  # noqa: E402
from benchmarks import tune_triton as tt  # noqa: E402

TINY = bl.Case("spec", 16, 12, 8, 2, 4, 4, 2, False)


@pytest.fixture(autouse=True)
def _threads_restored():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def refused(capsys, main, argv: list[str]) -> str:
    """main(argv) exits 2 at parse time; its one-line message."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- bench_lora -------------------------------------------------------------------------------


@pytest.fixture
def lora_results(tmp_path, monkeypatch):
    """bench_lora's default outputs (results/<device>.md, the plot, bench_lora.csv) in a
    temporary folder, and the measuring made to fail the test if it is reached."""
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(common, "RESULTS", results)

    def measuring(*a, **kw):
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(bl, "run_case", measuring)
    return results


@pytest.mark.parametrize("argv, named", [
    (["--suites", "spce"], "--suites: unknown 'spce'"),  # replaced cpu.md with an empty table
    (["--modes", "fwdd"], "--modes: unknown 'fwdd'"),  # was timed as the backward
    (["--mixes", "factr"], "--mixes: unknown 'factr'"),
    (["--suites", ","], "--suites"),
    (["--rounds", "0"], "--rounds"),  # silently the default (`args.rounds or 5`)
    (["--rounds", "-2"], "--rounds"),  # a StatisticsError traceback
    (["--rep-ms", "0"], "--rep-ms"),
    (["--threads", "0"], "--threads"),
    (["--dtype", "nosuch"], "--dtype"),
    (["--dtypes", "float32,nosuch"], "--dtypes: unknown 'nosuch'"),
    (["--device", "tpu"], "--device"),
    (["--budget", "nan"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--seed", "-1"], "--seed"),
    (["--quick", "--impls", "cpux"], "--impls: 'cpux' matches no implementation"),
])
def test_bench_lora_refuses_a_bad_option_before_measuring(capsys, lora_results, argv, named):
    line = refused(capsys, bl.main, ["--no-csv", *argv])
    assert "error: argument " + named in line
    assert not list(lora_results.iterdir())  # cpu.md, the plot and the CSV untouched


def test_bench_lora_lists_the_choices(capsys, lora_results):
    line = refused(capsys, bl.main, ["--suites", "spec,spce"])
    assert "choose from spec, smollm, k1, sweep-T, sweep-M" in line


def test_bench_lora_refuses_an_output_path_it_cannot_write(capsys, lora_results, tmp_path):
    for option in ("--markdown", "--plot", "--csv"):
        line = refused(capsys, bl.main, ["--quick", option, str(tmp_path)])
        assert f"argument {option}: cannot write {tmp_path}: {tmp_path} is a folder" in line
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = refused(capsys, bl.main, ["--quick", "--markdown", str(a_file / "cpu.md")])
    assert f"{a_file} is not a folder" in line


def test_make_call_refuses_an_unknown_mode():
    inp = bl.make_inputs(TINY, torch.float32, torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="unknown mode 'fwdd'"):
        bl.make_call(lambda *a: a[0], "impl", inp, "fwdd", TINY, "factor")
    assert callable(bl.make_call(lambda *a: a[0].sum(), "impl", inp, "bwd", TINY, "factor"))


def fake_rows(case: bl.Case, mix: str, modes: list[str], failed: bool) -> list[bl.Row]:
    err = "RuntimeError: boom" if failed else ""
    nan_or = (lambda v: math.nan) if failed else (lambda v: v)
    return [bl.Row(case.suite, case.label, case.d_in, case.d_out, case.tokens, case.rows,
                   case.adapters, case.slots, case.rank, case.gathered, "float32", mix, mode,
                   impl, nan_or(1.0), nan_or(1.0), nan_or(1.0), nan_or(0.0), nan_or(1.0), err)
            for mode in modes for impl in (bl.BASE, "lora_mix_linear[cpu]")]


@pytest.mark.parametrize("measured", [(), (1,)])
def test_a_case_with_nothing_measured_is_not_written(monkeypatch, tmp_path, capsys, measured):
    """Every candidate of a case failed: its rows are not appended to the CSV; no row of the
    run measured: no markdown, plot or CSV at all (a typo once replaced cpu.md with an empty
    table, exit 0), and exit 1."""
    other = bl.Case("spec", 32, 24, 16, 4, 4, 4, 2, False)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bl, "cases_for", lambda device, suites, quick: [TINY, other])
    monkeypatch.setattr(bl, "run_case", lambda case, mix, modes, device, dt, args: fake_rows(
        case, mix, modes, failed=[TINY, other].index(case) not in measured))
    out = {"csv": tmp_path / "b.csv", "md": tmp_path / "cpu.md", "png": tmp_path / "b.png"}
    rc = bl.main(["--device", "cpu", "--threads", "1", "--dtype", "float32", "--mixes",
                  "factor", "--modes", "fwd", "--csv", str(out["csv"]), "--markdown",
                  str(out["md"]), "--plot", str(out["png"])])
    if not measured:
        assert rc == 1
        assert "no row was measured (4 failed); nothing written" in capsys.readouterr().err
        assert not [p for p in out.values() if p.exists()]
    else:
        assert rc == 0 and out["md"].exists()
        with out["csv"].open() as f:
            rows = list(csv.DictReader(f))
        assert [r["d_in"] for r in rows] == ["32", "32"]  # the measured case only
    assert not (tmp_path / "results").exists()


def test_a_tiny_bench_lora_run_end_to_end(monkeypatch, tmp_path):
    """The options as given reach the timing (--rounds 2, not `or`-ed away); --quick's
    default suites and modes; the outputs written."""
    suites_seen, rounds_seen = [], []
    monkeypatch.setattr(bl, "cases_for", lambda device, suites, quick: (
        suites_seen.append(list(suites)) or [TINY]))
    timing = common.time_cpu_interleaved

    def time_cpu(fns, **kw):
        rounds_seen.append(kw["min_rounds"])
        return timing(fns, **kw)

    monkeypatch.setattr(common, "time_cpu_interleaved", time_cpu)
    md, out_csv = tmp_path / "md" / "cpu.md", tmp_path / "b.csv"
    rc = bl.main(["--quick", "--device", "cpu", "--threads", "1", "--dtype", "float32",
                  "--mixes", "factor", "--impls", "reference", "--rounds", "2",
                  "--csv", str(out_csv), "--markdown", str(md)])
    assert rc == 0 and md.exists()
    assert suites_seen == [["spec"]] and rounds_seen == [2, 2]  # fwd and fwd+bwd
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["impl"]) for r in rows} == {
        (m, i) for m in ("fwd", "fwd+bwd") for i in (bl.BASE, "lora_mix_linear[reference]")}
    assert not [r for r in rows if r["error"]]


# --- bench_serving ----------------------------------------------------------------------------


@pytest.fixture
def fake_pipeline(monkeypatch):
    """reclora.pipeline.main recorded, not run: the argv of each `reclora run`."""
    calls: list[list[str]] = []
    module = types.ModuleType("reclora.pipeline")
    module.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "reclora.pipeline", module)
    return calls


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def user_run(tmp_path: Path) -> Path:
    """A run of the user's cut off before its RecLoRA stage."""
    run = tmp_path / "my-run"
    (run / "stages").mkdir(parents=True)
    (run / "run_config.json").write_text('{"model": "mine", "n_test": 24}')
    (run / "stages" / "crm_din.json").write_text("{}")
    return run


def test_bench_serving_refuses_a_users_unfinished_run(tmp_path, capsys, fake_pipeline):
    """It once resumed `reclora run --quick ...` into it, rewriting its run_config.json and
    its stages with the benchmark's options."""
    run = user_run(tmp_path)
    before = snapshot(run)
    line = refused(capsys, bs.main, ["--run", str(run), "--out", str(tmp_path / "s.md")])
    assert f"--run {run} has no finished RecLoRA stage" in line
    assert f"`reclora run --resume --output {run}`" in line
    assert not fake_pipeline and snapshot(run) == before
    with pytest.raises(bs.RunRefused):  # ensure_run alone refuses it too
        bs.ensure_run(run)
    assert not fake_pipeline and snapshot(run) == before


def test_bench_serving_refuses_any_other_folder_and_a_file(tmp_path, capsys, fake_pipeline):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert "nor a folder this benchmark made" in refused(capsys, bs.main, ["--run", str(other)])
    assert "is not a folder" in refused(capsys, bs.main, ["--run", str(other / "todo.txt")])
    assert not fake_pipeline and snapshot(other) == {"todo.txt": b"x"}


def test_bench_serving_makes_its_run_only_in_its_own_folders(tmp_path, monkeypatch,
                                                             fake_pipeline):
    new = tmp_path / "new"
    bs.ensure_run(new)  # does not exist: made, and marked
    assert fake_pipeline[-1][-3:] == ["--output", str(new), "--resume"]
    assert (new / bs.MARKER).is_file()
    ours = user_run(tmp_path)  # cut short, but marked as the benchmark's: resumed
    (ours / bs.MARKER).write_text("")
    bs.ensure_run(ours)
    assert fake_pipeline[-1][-3] == "--output" and fake_pipeline[-1][-2] == str(ours)
    empty = tmp_path / "empty"
    empty.mkdir()
    bs.ensure_run(empty)
    default = tmp_path / "runs" / "bench-serving"  # the default, made before the marker
    (default / "stages").mkdir(parents=True)
    (default / "run_config.json").write_text("{}")
    monkeypatch.setattr(bs, "DEFAULT_RUN", default)
    bs.ensure_run(default)
    assert [c[c.index("--output") + 1] for c in fake_pipeline] == [
        str(new), str(ours), str(empty), str(default)]
    done = user_run(tmp_path / "finished")  # a finished run is served as it is
    (done / "stages" / "reclora.json").write_text("{}")
    bs.ensure_run(done)
    assert len(fake_pipeline) == 4 and not (done / bs.MARKER).exists()


@pytest.mark.parametrize("argv, named", [
    (["--requests", "0"], "--requests"),  # 0 and -5 took every user of the dataset
    (["--requests", "-5"], "--requests"),
    (["--per-request", "0"], "--per-request"),  # silently 1
    (["--batch-size", "0"], "--batch-size"),
    (["--skip", "swtich"], "--skip: unknown 'swtich'"),
    (["--device", "tpu"], "--device"),
])
def test_bench_serving_refuses_bad_counts(capsys, fake_pipeline, argv, named):
    assert "error: argument " + named in refused(capsys, bs.main, argv)
    assert not fake_pipeline


def test_bench_serving_refuses_an_out_it_cannot_write(capsys, tmp_path, fake_pipeline):
    run = tmp_path / "new-run"
    line = refused(capsys, bs.main, ["--run", str(run), "--out", str(tmp_path)])
    assert f"argument --out: cannot write {tmp_path}: {tmp_path} is a folder" in line
    assert not fake_pipeline and not run.exists()


def fake_recommender(users: int):
    """A Recommender's dataset: 2 test interactions per user."""
    user = np.repeat(np.arange(users), 2)
    ds = types.SimpleNamespace(
        test=np.arange(user.size), valid=np.arange(0), train=np.arange(0), user=user,
        item=np.arange(user.size) % 7, time=np.arange(user.size) * 10,
        user_raw_id=[f"u{u}" for u in range(users)], item_raw_id=[f"i{i}" for i in range(7)])
    return types.SimpleNamespace(ds=ds)


def test_distinct_user_requests_counts(capsys):
    rec = fake_recommender(5)
    req = bs.distinct_user_requests(rec, 3)
    assert list(req["user_id"]) == ["u0", "u1", "u2"]
    assert not capsys.readouterr().out
    req = bs.distinct_user_requests(rec, 100000)  # once silently all of them
    assert len(set(req["user_id"])) == req["user_id"].size == 5
    assert "100000 requests asked for, but the run's dataset has 5 users" in \
        capsys.readouterr().out
    for n in (0, -5):
        with pytest.raises(ValueError, match="requests must be >= 1"):
            bs.distinct_user_requests(rec, n)


def test_the_observed_item_is_one_the_user_never_rated():
    """bench_serving's observe step: serving refuses a second rating of a pair."""
    rec = fake_recommender(5)  # user u0 rated items 0 and 1
    assert bs.unrated_item(rec, "u0") == "i2"
    assert bs.unrated_item(rec, "u3") == "i1"  # rated items 6 and 0 (rows 6, 7 mod 7)
    assert bs.unrated_item(rec, "new") == "i0"


# --- gpu_targets, tune_triton -----------------------------------------------------------------


@pytest.fixture
def no_measuring(monkeypatch):
    def run(*a, **kw):
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(gt, "Run", run)


def test_gpu_targets_refuses_an_out_it_cannot_make_before_measuring(tmp_path, capsys,
                                                                    monkeypatch, no_measuring):
    """It once measured everything, then ended in a FileExistsError traceback at the write,
    the table lost."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = refused(capsys, gt.main, ["--smoke", "--out", str(a_file)])
    assert f"--out {a_file}: {a_file} is not a folder" in line
    line = refused(capsys, gt.main, ["--smoke", "--out", str(a_file / "sub")])
    assert f"--out {a_file / 'sub'}: cannot make the folder" in line
    monkeypatch.setenv("OUT", str(a_file))  # the device machine's $OUT
    assert f"$OUT {a_file}: {a_file} is not a folder" in refused(capsys, gt.main, ["--smoke"])


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "x"])
def test_gpu_targets_refuses_a_budget_that_is_no_number(tmp_path, capsys, no_measuring, value):
    """--budget-s nan never ran out (perf_counter() > nan is False)."""
    line = refused(capsys, gt.main, ["--smoke", "--out", str(tmp_path), "--budget-s", value])
    assert "argument --budget-s" in line


def test_gpu_targets_prints_its_table_when_the_write_fails(tmp_path, capsys, monkeypatch):
    """--budget-s -1: nothing measured (the table of skips), instantly."""
    def full_disk(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert gt.main(["--smoke", "--out", str(tmp_path), "--budget-s", "-1"]) == 1
    captured = capsys.readouterr()
    assert "cannot write" in captured.err and "No space left on device" in captured.err
    assert captured.out.rstrip().splitlines()[-1].startswith("| T=16 in 4 rows fwd, host us")
    assert "== targets" in captured.out


@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_tune_triton_refuses_a_budget_that_is_not_finite(capsys, value):
    """NaN passed the reserve's check (nan <= 60 is False) and the sweep ran unbounded."""
    assert "argument --budget-s: must be a finite number" in refused(
        capsys, tt.main, ["--budget-s", value])


def test_tune_triton_refuses_an_out_it_cannot_write(capsys, tmp_path):
    line = refused(capsys, tt.main, ["--out", str(tmp_path)])
    assert f"argument --out: cannot write {tmp_path}: {tmp_path} is a folder" in line


def test_a_tiny_bench_serving_scale_run(tmp_path, capsys):
    """bench_serving_scale end to end on 20,000 interactions: its table holds both rows, and
    the view it times is the one serving builds (its history rows, not the whole store)."""
    from benchmarks import bench_serving_scale as bss

    out = tmp_path / "scale.md"
    assert bss.main(["--interactions", "20000", "--reps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| observe 1 interaction + 1 lookup |" in text and "| view of 16 requests |" in text
    held = int(text.split("ms (")[1].split(" interactions")[0].replace(",", ""))
    assert 0 < held < 20000
