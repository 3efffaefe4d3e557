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
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llm import TINY_RUN as TINY
from tiny_llm import save_tiny_model

from reclora.pipeline import main as run_main
from reclora.serving import Recommender, RunFolderError, ServingError, _Store, read_table


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


def test_a_table_scored_in_chunks_gives_the_same_scores(tiny_run, monkeypatch) -> None:
    """score_table builds histories, prompts and h_u SCORE_CHUNK requests at a time (all at
    once, a 1e6-row table needed tens of GB before its first forward): chunks of 5 give the
    scores and columns of one chunk, with seen rows and a new user among them. In fp32: under
    the run's bf16 autocast a request's score moves with the batch it shares (1.4e-5 here)."""
    import reclora.serving as serving

    rec = Recommender.load(tiny_run, amp="off")

    _, rows = _predictions(tiny_run)
    requests = [{k: r[k] for k in ("user_id", "item_id", "timestamp")} for r in rows]
    requests.append({"user_id": "999999", "item_id": rows[0]["item_id"],
                     "timestamp": rows[0]["timestamp"]})
    seen = rec.ds.hist_item[rec.ds.hist_ptr[rec.ds.user[rec.test[0]]]]  # rated before
    requests.append(dict(requests[0], item_id=str(rec.ds.item_raw_id[seen])))
    whole = rec.score_table(requests)
    monkeypatch.setattr(serving, "SCORE_CHUNK", 5)
    import reclora.pipeline as pl

    built, real = [], pl.prompt_tokens
    monkeypatch.setattr(pl, "prompt_tokens", lambda *a: built.append(len(a[3])) or real(*a))
    chunked = rec.score_table(requests)
    assert built == [5, 5, 5, 5, 5, 1]  # 26 requests, at most 5 prompts at a time
    for column, values in whole.items():
        assert np.array_equal(chunked[column], values) if column != "score" else np.allclose(
            chunked[column], values, rtol=0, atol=1e-6), column
    assert chunked["seen"][-1] == 1 and chunked["cold_start"][-2] == 1
    assert rec.timings["n"] == len(requests) and rec.timings["llm_s"] > 0


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
    # MovieLens ids are whole numbers: new users too (the dataset's users are 1..943).
    table = rec.score_table([{"user_id": "900001", "item_id": item, "timestamp": t},
                             {"user_id": "900002", "item_id": item, "timestamp": t}])
    assert list(table["cold_start"]) == [1, 1] and list(table["history_len"]) == [0, 0]
    assert np.all((table["score"] > 0) & (table["score"] < 1))
    # Known users the CRM trained on are not flagged; unseen ones of the dataset are.
    trained = np.flatnonzero(rec.crm_known)[:1]
    unseen = np.flatnonzero(~rec.crm_known)[:1]
    assert not rec.is_cold(str(rec.ds.user_raw_id[trained[0]]))
    assert rec.is_cold(str(rec.ds.user_raw_id[unseen[0]]))
    # A new user's observed interactions become their history; still cold for the CRM.
    rec.observe([{"user_id": "900001", "item_id": str(rec.ds.item_raw_id[j]),
                  "timestamp": t - 100 + j, "rating": 4} for j in range(1, 4)])
    again = rec.score_table({"user_id": ["900001"], "item_id": [item], "timestamp": [t]})
    assert again["history_len"][0] == 3 and again["cold_start"][0] == 1
    assert again["score"][0] != table["score"][0]


def test_an_observe_during_a_score_never_lends_its_user_to_the_request(rec) -> None:
    """A score gave a never-seen user a temporary index, then read the registered users
    again: an observe in between registered a user at that index, and the request was
    scored with that user's history (a thread-safety audit; forced here at that point)."""
    item, t = str(rec.ds.item_raw_id[0]), int(rec.ds.time.max()) + 100
    ask = {"user_id": ["990000"], "item_id": [item], "timestamp": [t]}
    alone = rec.fork().score_table(ask)
    users = rec._users

    def then_observe(*args, register):
        out = users(*args, register=register)
        if not register:  # the score's lookup: an observe lands right after it
            rec.observe([{"user_id": "990001", "item_id": str(rec.ds.item_raw_id[j]),
                          "timestamp": t - 10 + j, "rating": 5} for j in range(1, 6)])
        return out

    rec._users = then_observe
    raced = rec.score_table(ask)
    assert raced["history_len"][0] == 0 and raced["score"][0] == alone["score"][0]
    assert rec._ids.new_users == ["990001"]  # the observe itself took effect


def test_a_callers_autocast_does_not_change_serving(tiny_run, rec) -> None:
    """Load and score inside a serving loop's bf16 autocast: the retrieval table had come out
    bf16 (other history items in the prompts) and h_u moved; they run as the run did now,
    and only the LLM forward takes the run's amp."""
    req = rec.test_requests()
    plain = rec.score(req)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rec.score(req)
        loaded = Recommender.load(tiny_run)
    assert loaded.retriever.table.dtype == torch.float32
    assert np.array_equal(inside, plain) and np.array_equal(loaded.score(req), plain)


def test_rank_orders_candidates_by_score(rec) -> None:
    user = str(rec.test_requests()["user_id"][0])
    cands = [str(x) for x in rec.ds.item_raw_id[:5]]
    ranked = rec.rank(user, cands, top=3)
    assert len(ranked) == 3 and {i for i, _ in ranked} <= set(cands)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    full = dict(rec.rank(user, cands))
    assert all(full[i] == s for i, s in ranked)


# ------------------------------------------------------ items the user already rated
def _last_rated(rec: Recommender, user: str) -> tuple[int, str, int]:
    """(store row, item id, time) of the user's latest rating in the dataset."""
    st = rec._ids.store
    mine = np.flatnonzero(st.user == rec.ds.user_raw_id.tolist().index(user))
    row = int(mine[np.argmax(st.time[mine])])
    return row, str(rec.ds.item_raw_id[st.item[row]]), int(st.time[row])


def _without_row(rec: Recommender, row: int) -> Recommender:
    """A fork whose store never held interaction `row`."""
    import dataclasses

    st, keep = rec._ids.store, np.arange(rec._ids.store.user.size) != row
    fork = rec.fork()
    fork._ids = dataclasses.replace(fork._ids, store=_Store(
        st.user[keep], st.item[keep], st.rating[keep], st.time[keep], st.label[keep],
        st.n_users))
    return fork


@pytest.mark.parametrize("pairs_sorted", [False, True])
def test_a_store_extended_equals_one_built_over_all_rows(pairs_sorted) -> None:
    """observe merges new interactions into the store's sorted orders instead of sorting
    everything again: the result equals a store built over all the rows, including time
    ties with held rows (arrival order), several new rows of one user, new users, and the
    pair index whether or not it had been built."""
    rng = np.random.default_rng(0)

    def rows(n: int, users: int):
        r = rng.integers(1, 6, n).astype(np.float32)
        return (rng.integers(0, users, n), rng.integers(0, 30, n), r,
                rng.integers(0, 5, n), (r > 3).astype(np.int64))

    fields = ("user", "item", "rating", "time", "label", "hist_index", "hist_ptr", "keys")
    for _ in range(100):
        users = int(rng.integers(1, 8))
        st = _Store(*rows(int(rng.integers(0, 40)), users), users)
        for _ in range(3):
            if pairs_sorted:
                st.rated(np.zeros(1, np.int64), np.zeros(1, np.int64))
            had_pairs = "_pairs" in st.__dict__
            new_users = users + int(rng.integers(0, 3))
            add = rows(int(rng.integers(1, 8)), new_users)
            got = st.extended(*add, new_users)
            want = _Store(*(np.concatenate([getattr(st, f), a]) for f, a in
                            zip(fields, add)), new_users)
            for f in fields:
                assert np.array_equal(getattr(got, f), getattr(want, f)), f
                assert getattr(got, f).dtype == getattr(want, f).dtype, f
            assert got.n_users == want.n_users
            assert ("_pairs" in got.__dict__) == had_pairs
            assert all(np.array_equal(x, y) for x, y in zip(got._pairs, want._pairs))
            st, users = got, new_users


def test_a_view_holds_only_what_its_requests_read(rec) -> None:
    """Each request's history in the view is its user's store rows strictly before its time
    in (time, arrival) order, less the row of its own item where the user rated it before
    (a shadow user); the view holds those rows and the requests, not the whole store (a copy
    of every interaction per request took seconds on ML-25M)."""
    st, rng = rec._ids.store, np.random.default_rng(0)
    picked = rng.choice(st.user.size, 16, replace=False)
    users, times = st.user[picked], st.time[picked] + rng.integers(-50_000, 50_000, 16)
    items = np.where(np.arange(16) % 2 == 0, st.item[picked], rng.integers(0, rec.ds.n_items, 16))
    users[8:12], times[8:12] = users[0], times[0] + np.array([3, -2, 1, -1]) * 99_999
    users = np.concatenate([users, [rec.ds.n_users]])  # a temporary user: no history
    items, times = np.concatenate([items, [3]]), np.concatenate([times, [times[0]]])
    own = st.rated_before(users, items, times)
    assert (own >= 0).sum() >= 4
    view, samples, hl, _ = rec._view(users, items, times, ["new-user"], rec._ids, own)
    for j, s in enumerate(samples):
        mine = np.flatnonzero((st.user == users[j]) & (st.time < times[j]) & (
            np.arange(st.user.size) != own[j]))
        mine = mine[np.lexsort((mine, st.time[mine]))]
        a = view.hist_ptr[view.user[s]]
        assert view.hist_len[s] == hl[j] == mine.size, j
        for got, want in ((view.hist_item, st.item), (view.hist_rating, st.rating),
                          (view.hist_time, st.time)):
            assert np.array_equal(got[a:a + hl[j]], want[mine]), j
        assert view.item[s] == items[j] and view.time[s] == times[j]
    assert view.n_interactions <= hl.sum() + 2 * samples.size < st.user.size // 10
    assert view.rating[samples].tolist() == [0.0] * samples.size  # unknown: not in histories


def test_observe_refuses_a_pair_already_rated(rec) -> None:
    """The dataset refuses a (user, item) pair rated twice (a label leak); observe took a
    second rating silently, and both copies then filled the prompt's history."""
    user, item, t = _known_user_and_item(rec)  # the user rated `item` at t (a test sample)
    stored = rec._ids.store.rating[rec._ids.store.rated(
        *[np.array([rec.ds.user_raw_id.tolist().index(user)]),
          np.array([rec.ds.item_raw_id.tolist().index(item)])])[0]]
    new = _unrated_item(rec, user)
    ok = {"user_id": "900001", "item_id": new, "timestamp": t, "rating": 5}
    with pytest.raises(ServingError, match=(
            rf"interactions row 1: user_id '0{user}' already rated item_id '{item}' \(the "
            rf"dataset's interaction: rating {stored:g} at timestamp {t}\); one rating per "
            r"\(user, item\) pair, as in the dataset")):
        rec.observe([ok, {"user_id": "0" + user, "item_id": item, "timestamp": t + 9,
                          "rating": 1}])
    with pytest.raises(ServingError, match=r"interactions row 1: user_id '900001' rates "
                                           rf"item_id '0{new}' again \(interactions row 0 "
                                           r"rates it too\)"):
        rec.observe([ok, dict(ok, item_id="0" + new, timestamp=t + 1)])
    assert rec.n_observed == 0 and rec._ids.new_users == []  # nothing taken in
    assert rec.observe([ok]) == 1
    with pytest.raises(ServingError, match=rf"interactions row 0: user_id '900001' already "
                                           rf"rated item_id '{new}' \(an earlier observe's "
                                           rf"interaction: rating 5 at timestamp {t}\)"):
        rec.observe([dict(ok, timestamp=t + 5, rating=1)])
    assert rec.n_observed == 1


def test_repeated_seen_requests_share_one_shadow_user(rec) -> None:
    """Each seen request copied its user's whole history into a shadow user of its own
    (1,000 repeats of one held 1,000 copies); requests that leave out the same row now share
    one, holding the longest prefix any of them reads, and score as one request does."""
    user, _, _ = _known_user_and_item(rec)
    _, item, t_item = _last_rated(rec, user)
    later = int(rec._ids.store.time.max()) + 1
    one = {"user_id": [user], "item_id": [item], "timestamp": [later]}
    alone = rec.score_table(one)
    times = [later, later, later, later + 5]
    many = {"user_id": [user] * 4, "item_id": [item] * 4, "timestamp": times}
    table = rec.score_table(many)
    assert table["seen"].tolist() == [1] * 4
    assert np.allclose(table["score"][:3], alone["score"][0], rtol=0, atol=1e-5)
    assert table["history_len"].tolist() == [alone["history_len"][0]] * 4
    ids = rec._ids
    users, temp, _ = rec._users(np.asarray(many["user_id"], dtype=object), ["x"] * 4, ids,
                                register=False)
    items = rec._items(np.asarray(many["item_id"], dtype=object), ["x"] * 4)
    stamps = np.asarray(times)
    own = ids.store.rated_before(users, items, stamps)
    view, samples, _, real = rec._view(users, items, stamps, temp, ids, own)
    assert view.n_users == ids.store.hist_ptr.size - 1 + 1  # the users, then one shadow
    assert samples[0] == alone["history_len"][0]  # the shadow's history held once
    for s in samples:
        assert view.item[s] not in view.history(int(s))[0]


def test_a_seen_target_is_scored_without_itself_in_its_history(rec, monkeypatch) -> None:
    """A request for an item its user rated before the request's time put that item, with
    its rating, into its own prompt and the CRM's history. It is scored as if the rating
    had never been stored (same tokens, same h_u), flagged `seen`; the other rows of the
    table are scored exactly as without it."""
    user, _, _ = _known_user_and_item(rec)
    assert not rec.is_cold(user)  # the CRM reads its trained id embedding
    row, item, t_item = _last_rated(rec, user)
    later = int(rec._ids.store.time.max()) + 1
    test = {k: v[:4] for k, v in rec.test_requests().items()}
    mixed = {k: np.concatenate([test[k], np.asarray(v, dtype=test[k].dtype)]) for k, v in
             {"user_id": [user, user], "item_id": [item, item],
              "timestamp": [later, t_item]}.items()}
    table = rec.score_table(mixed)
    tokens, reps = rec.last_inputs["tokens"], rec.last_inputs["user_reps"]
    assert table["seen"].tolist() == [0, 0, 0, 0, 1, 0]  # rated at t_item: not before it
    # No row's history holds its own target.
    ids = rec._ids
    users, temp, _ = rec._users(mixed["user_id"], ["x"] * 6, ids, register=False)
    items = rec._items(mixed["item_id"], ["x"] * 6)
    own = ids.store.rated_before(users, items, mixed["timestamp"])
    view, samples, hl, _ = rec._view(users, items, mixed["timestamp"], temp, ids, own)
    for s in samples:
        assert view.item[s] not in view.history(int(s))[0]
    assert np.array_equal(hl, table["history_len"])
    # The seen row reads what a store without that rating gives (tokens, h_u, score).
    alone = rec.score_table({k: v[4:5] for k, v in mixed.items()})
    alone_reps = rec.last_inputs["user_reps"]
    never = _without_row(rec, row)
    ref = never.score_table({k: v[4:5] for k, v in mixed.items()})
    assert ref["seen"][0] == 0 and alone["seen"][0] == 1
    assert tokens[4] == never.last_inputs["tokens"][0]
    assert torch.equal(alone_reps, never.last_inputs["user_reps"])
    assert alone["score"][0] == ref["score"][0]
    assert table["history_len"][4] == ref["history_len"][0]
    # The other rows get the inputs they got before seen rows were told apart (the CRM's
    # batch the same shape; the LLM's scores may move by its batch rounding, see load).
    with monkeypatch.context() as m:
        m.setattr(_Store, "rated_before", lambda self, u, i, t: np.full(u.size, -1))
        leaky = rec.score_table(mixed)
        assert leaky["history_len"][4] == table["history_len"][4] + 1
    unseen = [0, 1, 2, 3, 5]
    assert [tokens[j] for j in unseen] == [rec.last_inputs["tokens"][j] for j in unseen]
    assert torch.equal(reps[unseen], rec.last_inputs["user_reps"][unseen])
    # A new user's observed item is theirs too.
    rec.observe([{"user_id": "900001", "item_id": item, "timestamp": 5, "rating": 4},
                 {"user_id": "900001", "item_id": "50", "timestamp": 6, "rating": 2}])
    new = rec.score_table({"user_id": ["900001"], "item_id": [item], "timestamp": [7]})
    assert new["seen"][0] == 1 and new["history_len"][0] == 1 and new["cold_start"][0] == 1


def test_rank_leaves_out_the_candidates_the_user_rated(rec) -> None:
    """rank's default time is after every interaction: each candidate the user had rated
    was ranked with its own rating in its prompt."""
    user, _, _ = _known_user_and_item(rec)
    _, item, t_item = _last_rated(rec, user)
    fresh = [_unrated_item(rec, user)] + [str(v) for v in rec.ds.item_raw_id[-2:]]
    assert item not in fresh
    ranked = rec.rank(user, [fresh[0], item, fresh[1]])
    assert {i for i, _ in ranked} == {fresh[0], fresh[1]}
    assert ranked == rec.rank(user, fresh[:2])  # scored as if never asked
    assert rec.rank(user, [item]) == []
    both = rec.rank(user, [fresh[0], item, fresh[1]], seen=True)
    assert {i for i, _ in both} == {fresh[0], item, fresh[1]}
    # Before the rating it is not seen.
    assert [i for i, _ in rec.rank(user, [item], timestamp=t_item)] == [item]


def test_rank_reads_one_snapshot_while_another_thread_observes(rec, monkeypatch) -> None:
    """An observe landing between rank's seen check and its scoring (another thread): the
    whole rank reads the store as it was when rank began, as if it ran first."""
    user, _, _ = _known_user_and_item(rec)
    u = rec.ds.user_raw_id.tolist().index(user)
    rated = set(rec.ds.item[rec.ds.user == u].tolist())
    first = next(i for i in range(rec.ds.n_items) if i not in rated)
    free = [str(v) for i, v in enumerate(rec.ds.item_raw_id) if i not in rated][:3]
    t = int(rec.ds.time.max()) + 100
    alone = rec.fork().rank(user, free, timestamp=t)
    store_type = type(rec._ids.store)
    real = store_type.rated_before

    def then_observe(store, *args, **kwargs):  # right after rank's seen check
        out = real(store, *args, **kwargs)
        if rec._ids.store.rated(np.asarray([u]), np.asarray([first]))[0] < 0:
            rec.observe([{"user_id": user, "item_id": free[0], "timestamp": t - 50,
                          "rating": 5}])
        return out

    monkeypatch.setattr(store_type, "rated_before", then_observe)
    assert rec.rank(user, free, timestamp=t) == alone


# ---------------------------------------------------------------------------- ids
def _known_user_and_item(rec: Recommender) -> tuple[str, str, int]:
    """A test request's (user, item, time) whose user the CRM trained on (not cold)."""
    req = rec.test_requests()
    j = next(j for j, u in enumerate(req["user_id"]) if not rec.is_cold(u))
    return str(req["user_id"][j]), str(req["item_id"][j]), int(req["timestamp"][j])


def _unrated_item(rec: Recommender, user: str) -> str:
    """An item the dataset's user never rated."""
    u = rec.ds.user_raw_id.tolist().index(user)
    rated = set(rec.ds.item[rec.ds.user == u].tolist())
    return str(next(v for i, v in enumerate(rec.ds.item_raw_id) if i not in rated))


def test_a_padded_movielens_id_is_the_datasets_user_and_item(rec) -> None:
    """The reader reads "0279" as user 279 (reclora.data.movielens.normalise_id); serving
    looked ids up as typed: "0279" was served as a new user (cold, no history) and a padded
    item was refused."""
    user, item, t = _known_user_and_item(rec)
    ids = [(user, item), ("0" + user, item), (" 00" + user, "0" + item), ("+" + user, item)]
    table = rec.score_table({"user_id": [u for u, _ in ids], "item_id": [i for _, i in ids],
                             "timestamp": [t] * len(ids)})
    assert list(table["cold_start"]) == [0] * 4
    assert len(set(table["history_len"].tolist())) == 1 and table["history_len"][0] > 0
    assert np.allclose(table["score"], table["score"][0], rtol=0, atol=1e-6)
    assert not rec.is_cold("0" + user)
    # Ids come back as given (as score_table echoes its requests').
    other = _unrated_item(rec, user)  # rank leaves out `item`: the user rated it
    assert rec.rank("0" + user, ["0" + other]) == [("0" + other,
                                                   rec.rank(user, [other])[0][1])]
    # observe: a padded id is the known user (no new user registered), its item the item.
    assert rec.observe([{"user_id": "0" + user, "item_id": "00" + other, "timestamp": t - 1,
                         "rating": 5}]) == 1
    assert rec._ids.new_users == []
    again = rec.score_table({"user_id": [user], "item_id": [item], "timestamp": [t]})
    assert again["history_len"][0] == table["history_len"][0] + 1


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_an_id_movielens_cannot_hold_is_refused_naming_the_row(rec, column) -> None:
    user, item, t = _known_user_and_item(rec)
    row = {"user_id": user, "item_id": item, "timestamp": t, "rating": 4}
    for bad in ("u" + user, "7.5", "1e3"):
        with pytest.raises(ServingError, match=rf"requests row 1: {column} '{re.escape(bad)}' "
                                               r"is not a whole number \(MovieLens ids are\)"):
            rec.score([row, dict(row, **{column: bad})])
        with pytest.raises(ServingError, match=rf"interactions row 0: {column} "):
            rec.observe([dict(row, **{column: bad})])
    assert rec.n_observed == 0 and rec._ids.new_users == []
    with pytest.raises(ServingError, match=r"rank: user_id 'u1' is not a whole number"):
        rec.rank("u1", [item])


def test_a_dataset_of_string_ids_takes_them_verbatim(rec) -> None:
    """GoodReads' reader keeps ids as they are: serving does too, so a non-numeric id is a
    (new) user and "0279" is not "279". The served run is ML-100K; only the id rule is
    GoodReads' here (no prompt is built)."""
    import dataclasses

    user, item, t = _known_user_and_item(rec)
    rec.ds = dataclasses.replace(rec.ds, source="goodreads")
    assert not rec.is_cold(user)
    assert rec.is_cold("0" + user) and rec.is_cold("reader-7f3a")
    assert rec.observe([{"user_id": "reader-7f3a", "item_id": item, "timestamp": t,
                         "rating": 4}]) == 1
    assert rec._ids.new_users == ["reader-7f3a"]
    with pytest.raises(ServingError, match=rf"item_id '0{item}' is not an item"):
        rec.observe([{"user_id": user, "item_id": "0" + item, "timestamp": t, "rating": 4}])


def test_rank_refuses_a_repeated_candidate(rec) -> None:
    """--candidates 1,1,2 ranked item 1 twice (two places of the top N)."""
    user, item, _ = _known_user_and_item(rec)
    other = next(str(v) for v in rec.ds.item_raw_id if str(v) != item)
    with pytest.raises(ServingError, match=rf"rank: candidates\[2\]: item_id '{item}' repeats "
                                           rf"candidates\[0\] '{item}' \(item {item}\); list "
                                           "each item once"):
        rec.rank(user, [item, other, item])
    with pytest.raises(ServingError, match=rf"candidates\[1\]: item_id '0{item}' repeats"):
        rec.rank(user, [item, "0" + item])  # the same MovieLens item
    assert len(rec.rank(user, [item, other], seen=True)) == 2  # the user rated `item`


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
    item = _unrated_item(rec, "1")  # a second rating of a pair is refused on its own
    rows = [{"user_id": "900001", "item_id": item, "timestamp": 5, "rating": 5},
            {"user_id": "1", "item_id": item, "timestamp": 5, "rating": rating}]
    shown = re.escape(f"{rating:g}")
    with pytest.raises(ServingError, match=rf"interactions row 1: rating {shown} is not on "
                                           r"the dataset's scale, 1 to 5 in steps of 1"):
        rec.observe(rows)
    assert rec.n_observed == 0 and rec._ids.new_users == []  # nothing taken in
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
    assert rec._ids.new_users == [] and rec.n_observed == 0
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


def test_a_folder_made_before_the_added_options_serves(tiny_run, tmp_path) -> None:
    """run_config.json and stage2_config.json without the options added since folders were
    first made (loss, id_history, item_encoder, mix, gate_top_k, gate_sqrt; such folders
    all ran with their defaults): served as before, not refused as another version."""
    # Written out, not read from serving's own table: a key missing there must fail here.
    stage2 = {"loss": "pair", "gate_top_k": None, "gate_sqrt": False}
    run = {**stage2, "id_history": "recent", "item_encoder": "minilm", "mix": "factor"}
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    for rel, added in (("run_config.json", run), ("reclora/stage2_config.json", stage2)):
        cfg = json.loads((out / rel).read_text())
        assert {k: cfg.pop(k) for k in added} == added
        (out / rel).write_text(json.dumps(cfg))
    served = Recommender.load(out).cfg
    assert {k: getattr(served, k) for k in run} == run


def test_adapters_replaced_while_they_load_are_refused(tiny_run, tmp_path,
                                                       monkeypatch) -> None:
    """Other adapters loaded, the recorded ones put back before the digest is taken: a
    digest taken after the load alone would accept the model it did not load."""
    import reclora.checkpoint as checkpoint

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    path = out / "reclora" / "best.safetensors"
    recorded = path.read_bytes()
    path.write_bytes(_other_adapters(path))
    real_load = checkpoint.load_adapters

    def load_then_restore(model, file, **kwargs):
        layers = real_load(model, file, **kwargs)
        path.write_bytes(recorded)
        return layers

    monkeypatch.setattr(checkpoint, "load_adapters", load_then_restore)
    with pytest.raises(RunFolderError, match="not the adapters"):
        Recommender.load(out)


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
                            "history_len", "seen"]
    assert {g["seen"] for g in got} == {"0"}
    assert np.abs(np.asarray([float(g["score"]) for g in got])
                  - np.asarray([float(r["reclora"]) for r in rows])).max() <= 1e-5

    ranked = tmp_path / "ranked.csv"
    assert main(["rank", "--run", str(tiny_run), "--user", rows[0]["user_id"],
                 "--candidates", "1,2,3", "--top", "2", "--output", str(ranked),
                 "--no-progress"]) == 0
    lines = ranked.read_text().splitlines()
    assert lines[0] == "rank,user_id,item_id,score,cold_start" and len(lines) == 3
    # A candidate the user rated is left out, and said so; --seen ranks it.
    rec = Recommender.load(tiny_run)
    user = rows[0]["user_id"]
    _, item, _ = _last_rated(rec, user)
    for flag, n in (([], 1), (["--seen"], 2)):
        capsys.readouterr()
        assert main(["rank", "--run", str(tiny_run), "--user", user, "--candidates",
                     f"{item},{_unrated_item(rec, user)}", "--top", "2", "--output",
                     str(ranked), "--no-progress", *flag]) == 0
        assert len(ranked.read_text().splitlines()) == 1 + n
        err = capsys.readouterr().err
        assert (f"ranked 1 candidates for user {user}" in err and "left out 1 the user "
                "already rated (--seen ranks them)" in err) if n == 1 else "left out" not in err


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
    # --threads 1000000000 aborted inside libgomp ("Out of memory"), naming no option; the
    # bound is the CPU count (one over it here, so that an unbounded option would just run).
    with pytest.raises(SystemExit):
        main(["score", "--run", str(tiny_run), "--input", str(req), "--output", str(out),
              "--threads", str((os.cpu_count() or 1) + 1)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0], err


def test_cli_rank_candidates_file_errors_are_one_line(tiny_run, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """An empty or header-only --candidates file ranked nothing with exit 0; a mistyped
    path was taken as an item id ("requests row 0: item_id '/x/typo.txt' ..."); a repeated
    id was ranked twice."""
    from reclora.cli import main

    _, rows = _predictions(tiny_run)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "header.csv").write_text("item_id\n\n")
    cases = [(str(tmp_path / "empty.txt"), "empty.txt: no item ids in the file"),
             (str(tmp_path / "header.csv"), "header.csv: no item ids in the file"),
             (str(tmp_path / "typo.txt"), "typo.txt: no such file"),
             (str(tmp_path), f"--candidates {tmp_path}: a folder, not a file"),
             ("1,50,1", "candidates[2]: item_id '1' repeats candidates[0] '1'")]
    for cands, message in cases:
        assert main(["rank", "--run", str(tiny_run), "--user", rows[0]["user_id"],
                     "--candidates", cands, "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (cands, err)
    # A file in this folder: the rule is the text's, ./NAME reads it.
    (tmp_path / "cands").write_text("1\n50\n")
    monkeypatch.chdir(tmp_path)
    assert main(["rank", "--run", str(tiny_run), "--user", rows[0]["user_id"],
                 "--candidates", "./cands", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and {line.split(",")[2] for line in out[1:]} == {"1", "50"}


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


def test_a_model_the_run_lacks_names_the_ones_it_has(tiny_run) -> None:
    """An unknown name, or an ablation this run did not train, is refused with the run's
    own finished LLM models (not every name some run may have)."""
    finished = sorted(p.stem for p in (tiny_run / "stages").glob("*.json")
                      if p.stem in ("zero-shot", "tallrec", "rella", "reclora")
                      or p.stem.startswith("reclora-"))
    assert "reclora" in finished and "reclora-uniform" not in finished
    with pytest.raises(ServingError, match=r"model 'din' cannot be served; this run's LLM "
                                           r"models: .*reclora"):
        Recommender.load(tiny_run, model="din")
    with pytest.raises(RunFolderError, match=r"has not finished model 'reclora-uniform'; its "
                                             r"LLM models: .*reclora") as err:
        Recommender.load(tiny_run, model="reclora-uniform")
    assert all(m in str(err.value) for m in finished)
