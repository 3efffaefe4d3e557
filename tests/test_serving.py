"""Serving a finished run (issue 15) and its predictions.csv (issue 14 item 5): one tiny run
(random Llama, DIN on K_id = 5) per module, loaded once; each test works on a fork.

- predictions.csv: every model's per-sample test scores, named as in results.json.
- consistency: `score` over the run's test subset reproduces the run's predictions.
- no leakage: interactions at or after a request's time never change its score.
- observe: a new interaction changes the next score; every weight stays bit-identical.
- cold start: users new to the dataset (or unseen by the CRM) are flagged.
- bad input: unknown items, malformed rows, a run folder of another version or with a
  missing or corrupt file: one clear error naming the row or the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llm import TINY_RUN as TINY
from tiny_llm import save_tiny_model

from reclora.pipeline import main as run_main
from reclora.serving import Recommender, RunFolderError, ServingError, read_table


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(model_dir)
    out = tmp_path_factory.mktemp("serve") / "run"
    assert run_main([*TINY, "--model", str(model_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return Recommender.load(tiny_run)


@pytest.fixture
def rec(loaded):
    return loaded.fork()


def _predictions(run) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _weights(rec: Recommender) -> str:
    """A digest of every parameter and buffer of the LLM (banks, gates) and the CRM."""
    h = hashlib.sha256()
    for module in (rec.ctr.model, rec.crm.crm):
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).clone().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------- predictions.csv
def test_predictions_csv_holds_every_models_test_scores(tiny_run) -> None:
    from reclora.data import load_dataset

    cols, rows = _predictions(tiny_run)
    res = json.loads((tiny_run / "results.json").read_text())
    assert cols == ["user_id", "item_id", "timestamp", "label", *res["models"]]
    ds = load_dataset("ml-100k")
    test = np.asarray(json.loads((tiny_run / "subsets.json").read_text())["test"])
    assert len(rows) == test.size == 24
    for r, i in zip(rows, test):
        assert r["user_id"] == str(ds.user_raw_id[ds.user[i]])
        assert r["item_id"] == str(ds.item_raw_id[ds.item[i]])
        assert int(r["timestamp"]) == ds.time[i] and int(r["label"]) == ds.label[i]
    for name in res["models"]:
        stage = "crm_din" if name == "din" else name
        probs = json.loads((tiny_run / "stages" / f"{stage}.json").read_text())["probs"]
        assert np.allclose([float(r[name]) for r in rows], probs, rtol=0, atol=1e-9), name
    assert not [p for p in tiny_run.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------- consistency
def test_score_reproduces_the_runs_test_predictions(rec, tiny_run) -> None:
    _, rows = _predictions(tiny_run)
    table = rec.score_table(tiny_run / "predictions.csv")  # extra columns are ignored
    want = np.asarray([float(r["reclora"]) for r in rows])
    assert np.abs(table["score"] - want).max() <= 1e-5
    assert list(table["user_id"]) == [r["user_id"] for r in rows]
    # A list of dicts and a dict of arrays give the same scores.
    as_dicts = [{k: r[k] for k in ("user_id", "item_id", "timestamp")} for r in rows]
    assert np.array_equal(rec.score(as_dicts), table["score"])
    assert np.array_equal(rec.score(rec.test_requests()), table["score"])
    # Histories as of each request's time: the dataset's own history lengths.
    assert np.array_equal(table["history_len"], rec.ds.hist_len[rec.test])


@pytest.mark.parametrize("model", ["rella", "tallrec", "zero-shot"])
def test_other_llm_models_reproduce_their_predictions(tiny_run, model) -> None:
    _, rows = _predictions(tiny_run)
    other = Recommender.load(tiny_run, model=model)
    got = other.score(tiny_run / "predictions.csv")
    assert np.abs(got - np.asarray([float(r[model]) for r in rows])).max() <= 1e-5


def test_requests_of_many_users_share_a_batch_each_with_its_own_mixture(rec) -> None:
    """Scored together in one batch or one by one, each row keeps its own user's mixture
    (float32, no autocast, so padding cannot move the result beyond rounding)."""
    rec.amp = "off"
    req = {k: v[:8] for k, v in rec.test_requests().items()}
    assert len(set(req["user_id"])) > 1
    together = rec.score(req, batch_size=8)
    alone = np.asarray([rec.score({k: v[j:j + 1] for k, v in req.items()}, batch_size=1)[0]
                        for j in range(8)])
    assert np.allclose(together, alone, rtol=0, atol=1e-5)
    # The same prompt under another user's h_u scores differently: the mixture is per row.
    first = {k: v[:1] for k, v in req.items()}
    swapped = dict(first, user_id=req["user_id"][1:2])
    assert rec.score(first)[0] != rec.score(swapped)[0]


# ----------------------------------------------------------------- no leakage / observe
def _known_request(rec: Recommender) -> dict[str, list]:
    req = rec.test_requests()
    j = int(np.argmax(rec.ds.hist_len[rec.test] > 3))
    return {k: [v[j]] for k, v in req.items()}


def test_later_interactions_never_leak_into_a_score(rec) -> None:
    req = _known_request(rec)
    before = rec.score_table(req)
    t = int(req["timestamp"][0])
    items = [str(x) for x in rec.ds.item_raw_id[:3]]
    rec.observe([{"user_id": req["user_id"][0], "item_id": items[0], "timestamp": t,
                  "rating": 5},  # the same second: not history (as in the dataset)
                 {"user_id": req["user_id"][0], "item_id": items[1], "timestamp": t + 3600,
                  "rating": 1}])
    after = rec.score_table(req)
    assert after["score"][0] == before["score"][0]
    assert after["history_len"][0] == before["history_len"][0]
    # The run's own later interactions of this user are already in the store: scoring at
    # an earlier time sees fewer of them.
    earlier = rec.score_table(dict(req, timestamp=[t - 1]))
    assert earlier["history_len"][0] <= before["history_len"][0]


def test_observe_changes_the_next_score_and_no_weight(rec) -> None:
    req = _known_request(rec)
    weights = _weights(rec)
    before = rec.score_table(req)
    t = int(req["timestamp"][0])
    new = [{"user_id": req["user_id"][0], "item_id": str(rec.ds.item_raw_id[j]),
            "timestamp": t - 10 + j, "rating": 5 if j % 2 else 1} for j in range(4)]
    assert rec.observe(new) == 4
    after = rec.score_table(req)
    assert after["history_len"][0] == before["history_len"][0] + 4
    assert after["score"][0] != before["score"][0]
    assert _weights(rec) == weights
    # The fork it came from is untouched.
    assert rec.fork().n_observed == 4


def test_observe_then_score_is_fast_on_top_of_the_forward(rec) -> None:
    import time

    req = _known_request(rec)
    rec.score(req)
    t = time.perf_counter()
    rec.observe([{"user_id": req["user_id"][0], "item_id": "50",
                  "timestamp": int(req["timestamp"][0]) - 1, "rating": 4}])
    rec.score(req)
    total = time.perf_counter() - t
    assert total - rec.timings["llm_s"] < 0.5


# ----------------------------------------------------------------------- cold start
def test_unknown_users_are_served_cold_and_flagged(rec) -> None:
    item = str(rec.ds.item_raw_id[0])
    t = int(rec.ds.time.max())
    table = rec.score_table([{"user_id": "new-user-1", "item_id": item, "timestamp": t},
                             {"user_id": "new-user-2", "item_id": item, "timestamp": t}])
    assert list(table["cold_start"]) == [1, 1] and list(table["history_len"]) == [0, 0]
    assert np.all((table["score"] > 0) & (table["score"] < 1))
    # Known users the CRM trained on are not flagged; unseen ones of the dataset are.
    trained = np.flatnonzero(rec.crm_known)[:1]
    unseen = np.flatnonzero(~rec.crm_known)[:1]
    assert not rec.is_cold(str(rec.ds.user_raw_id[trained[0]]))
    assert rec.is_cold(str(rec.ds.user_raw_id[unseen[0]]))
    # A new user's observed interactions become their history; still cold for the CRM.
    rec.observe([{"user_id": "new-user-1", "item_id": str(rec.ds.item_raw_id[j]),
                  "timestamp": t - 100 + j, "rating": 4} for j in range(1, 4)])
    again = rec.score_table({"user_id": ["new-user-1"], "item_id": [item], "timestamp": [t]})
    assert again["history_len"][0] == 3 and again["cold_start"][0] == 1
    assert again["score"][0] != table["score"][0]


def test_rank_orders_candidates_by_score(rec) -> None:
    user = str(rec.test_requests()["user_id"][0])
    cands = [str(x) for x in rec.ds.item_raw_id[:5]]
    ranked = rec.rank(user, cands, top=3)
    assert len(ranked) == 3 and {i for i, _ in ranked} <= set(cands)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    full = dict(rec.rank(user, cands))
    assert all(full[i] == s for i, s in ranked)


# ------------------------------------------------------------------------ bad input
def test_bad_requests_name_the_row(rec, tmp_path) -> None:
    t = int(rec.ds.time.max())
    with pytest.raises(ServingError, match=r"requests row 1: item_id 'no-such-item'"):
        rec.score([{"user_id": "1", "item_id": "1", "timestamp": t},
                   {"user_id": "1", "item_id": "no-such-item", "timestamp": t}])
    bad = tmp_path / "req.csv"
    bad.write_text("user_id,item_id,timestamp\n1,1,100\n1,1,abc\n")
    with pytest.raises(ServingError, match=r"req.csv line 3: timestamp 'abc' is not an int"):
        read_table(bad)
    bad.write_text("user_id,item_id,timestamp\n1,1,100\n1,1\n")
    with pytest.raises(ServingError, match=r"req.csv line 3: 2 fields"):
        read_table(bad)
    bad.write_text("user,item_id,timestamp\n1,1,100\n")
    with pytest.raises(ServingError, match=r"no column user_id"):
        read_table(bad)
    with pytest.raises(ServingError, match=r"row 0: timestamp -5 is outside"):
        rec.score([{"user_id": "1", "item_id": "1", "timestamp": -5}])
    with pytest.raises(ServingError, match=r"interactions row 0: rating 'nan'"):
        rec.observe([{"user_id": "1", "item_id": "1", "timestamp": 5, "rating": "nan"}])


@pytest.mark.parametrize("rating", [50, -7, 1e30, 0, 4.5])
def test_observe_refuses_a_rating_off_the_datasets_scale(rec, rating) -> None:
    """ML-100K's ratings are 1..5 whole stars: 1e30 became the CRM's lowest rating level and
    a positive label, 50 the prompt's "50 stars"."""
    assert rec.rating_scale == (1.0, 5.0, 1.0)
    item = str(rec.ds.item_raw_id[0])
    rows = [{"user_id": "new-user", "item_id": item, "timestamp": 5, "rating": 5},
            {"user_id": "1", "item_id": item, "timestamp": 5, "rating": rating}]
    shown = re.escape(f"{rating:g}")
    with pytest.raises(ServingError, match=rf"interactions row 1: rating {shown} is not on "
                                           r"the dataset's scale, 1 to 5 in steps of 1"):
        rec.observe(rows)
    assert rec.n_observed == 0 and rec._new_users == []  # nothing taken in
    assert rec.observe(rows[:1] + [dict(rows[1], rating=1)]) == 2


def test_a_missing_user_id_names_the_row(rec) -> None:
    """NaN (pandas' missing value) was read as the user "nan": cold, and two rows with
    missing ids shared one history."""
    item = str(rec.ds.item_raw_id[0])
    with pytest.raises(ServingError, match=r"requests row 0: user_id is missing \(nan\)"):
        rec.score_table({"user_id": [float("nan")], "item_id": [item], "timestamp": [5]})
    with pytest.raises(ServingError, match=r"interactions row 1: user_id is missing"):
        rec.observe([{"user_id": "1", "item_id": item, "timestamp": 5, "rating": 5},
                     {"user_id": np.nan, "item_id": item, "timestamp": 6, "rating": 1}])
    assert rec._new_users == [] and rec.n_observed == 0
    with pytest.raises(ServingError, match=r"rank: user_id is missing"):
        rec.rank(np.nan, [item])


def test_the_summary_prints_the_load_time(rec) -> None:
    from reclora.serving import _summary

    table = rec.score_table(rec.test_requests())
    assert rec.load_s > 0.05  # the tiny run loads in ~0.5 s
    assert f"load {rec.load_s:.1f} s" in _summary(rec, table, 1.0)


def _broken_copy(tiny_run, tmp_path, rel, data):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    path = out / rel
    if callable(data):
        data = data(path)
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    return out


def _config_of_another_version(path):
    cfg = json.loads(path.read_text())
    cfg["option_of_a_later_version"] = 1
    return json.dumps(cfg).encode()


def _other_data(path):
    stage = json.loads(path.read_text())
    stage["fingerprint"]["data"] = "0123456789abcdef"
    return json.dumps(stage).encode()


def _other_adapters(path):
    """Adapters that fit the model but are not the stage's (one value changed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    other = path.with_name("other.safetensors")
    save_file(tensors, other, metadata=metadata)
    return other.read_bytes()


@pytest.mark.parametrize("rel,data,match", [
    ("run_config.json", _config_of_another_version, "another version"),
    ("run_config.json", b"{not json", "unreadable"),
    ("stages/reclora.json", _other_data, "data changed"),
    ("stages/reclora.json", None, "missing"),
    ("reclora/best.safetensors", None, "missing"),
    ("reclora/best.safetensors", b"\x00" * 64, "cannot be loaded"),
    ("reclora/best.safetensors", _other_adapters, "not the adapters"),
    ("crm/din.pt", lambda p: p.read_bytes()[:100], "sha256 differs"),
    ("subsets.json", b'{"train": [1], "valid": [], "test": []}', "subset"),
    # JSON of the wrong type: an AttributeError or int() error that named no file.
    ("subsets.json", b"[]", "holds list, not a JSON object"),
    ("subsets.json", b'{"train": "abc"}', "train subset is not a list of sample indices"),
    ("stages/reclora.json", b"[]", "holds list"),
    ("stages/crm_din.json", b"[]", "holds list"),
    ("reclora/stage2_config.json", b"7", "holds int"),
])
def test_a_bad_run_folder_names_the_file(tiny_run, tmp_path, rel, data, match) -> None:
    out = _broken_copy(tiny_run, tmp_path, rel, data)
    with pytest.raises(RunFolderError, match=match) as err:
        Recommender.load(out)
    assert rel.split("/")[-1] in str(err.value)


# ------------------------------------------------------------------------------ CLI
def test_cli_score_and_rank(tiny_run, tmp_path, capsys) -> None:
    from reclora.cli import main

    out = tmp_path / "scores.csv"
    assert main(["score", "--run", str(tiny_run), "--input",
                 str(tiny_run / "predictions.csv"), "--output", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "scored 24 requests" in err and "cold start" in err
    cols, rows = _predictions(tiny_run)
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == ["user_id", "item_id", "timestamp", "score", "cold_start",
                            "history_len"]
    assert np.abs(np.asarray([float(g["score"]) for g in got])
                  - np.asarray([float(r["reclora"]) for r in rows])).max() <= 1e-5

    ranked = tmp_path / "ranked.csv"
    assert main(["rank", "--run", str(tiny_run), "--user", rows[0]["user_id"],
                 "--candidates", "1,2,3", "--top", "2", "--output", str(ranked),
                 "--no-progress"]) == 0
    lines = ranked.read_text().splitlines()
    assert lines[0] == "rank,user_id,item_id,score,cold_start" and len(lines) == 3


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys) -> None:
    from reclora.cli import main

    req = tmp_path / "req.csv"
    req.write_text("user_id,item_id,timestamp\n1,1,100\n1,99999,100\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--run", str(tiny_run), "--input", str(req), "--output",
                 str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "req.csv line 3" in err[0] and "99999" in err[0], err
    assert not out.exists()
    assert main(["score", "--run", str(tmp_path / "nowhere"), "--input", str(req),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0], err


def test_a_model_whose_weights_changed_is_refused(tiny_run, tmp_path) -> None:
    """The adapters were trained on the base's weights: other weights behind the same
    --model (a folder rewritten, a package updated) are refused, not served (their scores
    moved by up to 0.15 in P(click))."""
    from safetensors.torch import load_file, save_file

    model_dir = json.loads((tiny_run / "run_config.json").read_text())["model"]
    weights = next(p for p in sorted(Path(model_dir).iterdir())
                   if p.suffix == ".safetensors")
    backup = tmp_path / "weights.bak"
    shutil.copy2(weights, backup)
    try:
        tensors = load_file(weights)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key] + 0.01
        save_file(tensors, weights, metadata={"format": "pt"})
        with pytest.raises(RunFolderError, match="not the ones the run used"):
            Recommender.load(tiny_run)
    finally:
        shutil.copy2(backup, weights)
    Recommender.load(tiny_run, model="zero-shot")  # the same files again: served


def test_a_stage_trained_under_torchrun_is_served(tiny_run, tmp_path) -> None:
    """A stage trained by 2 processes stores its world size in its fingerprint; serving (one
    process) compares with the stage's world size, not its own, and loads it."""
    def trained_by_two(path):
        stage = json.loads(path.read_text())
        stage["fingerprint"]["world_size"] = 2
        return json.dumps(stage).encode()

    out = _broken_copy(tiny_run, tmp_path, "stages/reclora.json", trained_by_two)
    rec = Recommender.load(out)
    assert np.array_equal(rec.stage_probs, Recommender.load(tiny_run).stage_probs)
