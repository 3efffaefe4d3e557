"""The run's report (pipeline.report and markdown) on hand-made stage results (an audit of
the statistics): p-values printed without overstating them, a figure that cannot lose the
report, and no NaN token in results.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from reclora import metrics, pipeline
from reclora.pipeline import Run, RunConfig, format_p_value, markdown, report

FILES = {"predictions.csv", "results.json", "results.md", "results.png"}


def _run(out, labels, users) -> Run:
    """A Run over a stand-in dataset whose test subset is every sample."""
    n = len(labels)
    run = Run(RunConfig(output=str(out), device="cpu", progress=False))
    run.ds = SimpleNamespace(
        label=np.asarray(labels), user=np.asarray(users), item=np.arange(n),
        time=np.arange(n) + 1_000_000, item_raw_id=np.array([f"i{i}" for i in range(n)]),
        user_raw_id=np.array([f"u{u}" for u in range(int(np.max(users)) + 1)]),
        stats=lambda: {"name": "stand-in"})
    run.test = np.arange(n)
    out.mkdir(parents=True, exist_ok=True)
    return run


def _stage(labels, probs) -> dict:
    return {**metrics.evaluate(labels, probs), "n_train": 10, "n_test": len(labels),
            "train_s": 1.0, "probs": [float(p) for p in probs]}


def _point_outside_its_interval():
    """20 users of 2 positives and 2 negatives; reclora orders the users at random and is
    perfect inside each: a resample weighs the within-user pairs (all won) a little more
    than the data does, so every resampled AUC lies above the point AUC."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(20), 4)
    labels = np.tile([1, 1, 0, 0], 20)
    offset = rng.permutation(20)[users] * 10.0
    probs = 1 / (1 + np.exp(-(offset - 95 + labels * 1.0) / 40))
    return users, labels, {"din": _stage(labels, rng.random(labels.size)),
                           "reclora": _stage(labels, probs)}


def test_a_point_outside_its_interval_is_drawn(tmp_path) -> None:
    """errorbar's xerr = [auc - lo, hi - auc] went negative: matplotlib refused it and the
    run ended without predictions.csv (--resume failed the same way every time)."""
    users, labels, results = _point_outside_its_interval()
    out = report(_run(tmp_path, labels, users), results)
    m = out["models"]["reclora"]
    assert m["auc"] < m["auc_ci95"][0]  # the case: the point is left of its interval
    assert FILES <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_figure_that_fails_is_a_warning(tmp_path, monkeypatch, capsys) -> None:
    """The figure was drawn before predictions.csv: any plotting error lost it. Now the
    data files are written first and a failed figure is one warning line; a results.png
    of an earlier report is removed rather than left beside other numbers."""
    users, labels, results = _point_outside_its_interval()
    (tmp_path / "results.png").write_bytes(b"an earlier figure")

    def broken_plot(models, path):
        raise RuntimeError("no display backend")

    monkeypatch.setattr(pipeline, "plot", broken_plot)
    report(_run(tmp_path, labels, users), results)
    assert {p.name for p in tmp_path.iterdir()} == FILES - {"results.png"}
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == labels.size + 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reclora run: warning: results.png not drawn (RuntimeError: no display "
                   "backend); results.json, results.md and predictions.csv are written"]


def test_a_constant_model_has_no_spearman(tmp_path) -> None:
    """Spearman of constant scores is undefined: it reached results.json as a bare NaN
    (not JSON: strict readers refused the whole file) and results.md as "nan"."""
    rng = np.random.default_rng(0)
    n = 200
    users, y = rng.integers(0, 30, n), rng.integers(0, 2, n)
    results = {"din": _stage(y, rng.random(n)), "zero-shot": _stage(y, np.full(n, 0.5)),
               "reclora": _stage(y, rng.random(n))}
    report(_run(tmp_path, y, users), results)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    spearman = res["rank_corr_with_gate_crm"]["spearman"]
    assert spearman["zero-shot"] is None and np.isfinite(spearman["reclora"])
    md = (tmp_path / "results.md").read_text()
    assert "zero-shot n/a, reclora " in md and "nan" not in md.lower()


@pytest.mark.parametrize(("p", "n_resamples", "text"), [
    (2 / 1001, 1000, "< 0.002"),   # no resample crossed 0: the floor of 1,000 resamples
    (2 / 101, 100, "< 0.020"),
    (4 / 1001, 1000, "0.004"),     # one crossing
    (2 / 10001, 10000, "< 0.001"),
    (4 / 10001, 10000, "< 0.001"),  # would print 0.000
    (0.0312, 1000, "0.031"),
    (1.0, 1000, "1.000"),
    (0.0, 1000, "< 0.001"),         # a p of 0 from a results.json made before add-one
])
def test_p_values_are_printed_without_overstating(p, n_resamples, text) -> None:
    assert format_p_value(p, n_resamples) == text


def test_results_md_never_prints_a_p_of_zero() -> None:
    """results.md printed p = 0 as "0.000" (3 rows of the published table)."""
    d = {"diff": 0.2668, "low": 0.2061, "high": 0.3261, "level": 0.95,
         "p_value": 2 / 1001, "n_resamples": 1000, "significant": True}
    res = {"config": {"n_test": 800, "seed": 0, "n_train": 16, "k_text": 5, "k_id": 60,
                      "k": 16, "r": 8},
           "dataset": {"name": "stand-in"}, "device": "cpu", "world_size": 1, "wall_s": 60.0,
           "models": {}, "comparisons": {"reclora vs zero-shot": d}}
    md = markdown(res)
    assert "| reclora vs zero-shot | +0.2668 | [+0.2061, +0.3261] | < 0.002 | yes |" in md
    assert "0.000" not in md
    assert "Beyond noise: the 95% interval excludes 0 (the same as p <= 0.05)" in md


def test_a_report_never_writes_bare_nan(tmp_path) -> None:
    """results.json is strict JSON: a NaN that slipped through is an error, and no
    half-written file is left (stage files may keep a diverged step's NaN loss)."""
    from reclora.few2many import atomic_write_json

    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json(path, {"spearman": float("nan")}, allow_nan=False)
    assert not path.exists()
    atomic_write_json(path, {"loss": float("nan")})
    assert "NaN" in path.read_text()
