"""`reclora run --id-history semantic`: the gate CRM reads, for h_u, the K_id history items the
LSMR retrieves for the target (RECLORA.md section 2; the reference's --ret) instead of the K_id
most recent. The CRMs train as before; only the gated LLM stages change, and serving reads
the same items as the run did."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_cli_errors import assert_one_line, call
from tiny_llm import TINY_RUN, save_tiny_model

import reclora.pipeline as pl
from reclora.crm import CRMBatch, CRMSchema, build_crm
from reclora.data.splits import RawData, build_dataset
from reclora.retriever import LongShortRetriever
from reclora.serving import Recommender, RunFolderError

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("items", "ratings", "times", "mask")
K_ID = 9


@pytest.fixture(scope="module")
def ds():
    """One user with 120 ratings among 40 with 12 each (histories longer than K_id)."""
    rng = np.random.default_rng(0)
    n_items = 200
    users, items = [], []
    for u in range(41):
        k = 120 if u == 0 else 12
        users += [u] * k
        items += rng.choice(n_items, k, replace=False).tolist()
    n = len(users)
    raw = RawData("long", "ml-25m", "movie", np.array(users), np.array(items),
                  rng.integers(1, 6, n).astype(np.float32), rng.permutation(n).astype(np.int64),
                  {str(i): {"title": f"Film {i % 9}", "genres": ["Drama"]}
                   for i in range(n_items)})
    return build_dataset(raw, min_history=1, core=1)


@pytest.fixture(scope="module")
def retriever(ds):
    emb = torch.randn(ds.n_items, 8, generator=torch.Generator().manual_seed(0))
    return LongShortRetriever(ds, emb, k_text=3, k_id=K_ID, similarity="dot")


@pytest.fixture(scope="module")
def crm(ds):
    torch.manual_seed(0)
    return build_crm("din", CRMSchema.from_dataset(ds), dim=16).eval()


def test_semantic_h_u_is_the_crm_over_the_retrieved_items(ds, retriever, crm,
                                                          monkeypatch) -> None:
    """h_u of each sample is the CRM over exactly its K_id retrieved items (in chunks sorted
    by history length, rows back in input order), and differs from the recent items' h_u
    where the history is longer than K_id."""
    s = np.random.default_rng(1).permutation(ds.samples)[:300]
    monkeypatch.setattr(pl, "RETRIEVAL_CHUNK", 64)  # several retrieval chunks
    with torch.no_grad():
        got = pl.crm_user_reps(ds, crm, s, K_ID, "semantic", retriever)
        want = crm.user_representation(CRMBatch.from_history(ds.targets(s),
                                                             retriever.batches(s)[1]))
        recent = pl.crm_user_reps(ds, crm, s, K_ID)
        want_recent = crm.user_representation(CRMBatch.from_dataset(ds, s, k=K_ID))
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(recent, want_recent.float(), rtol=0, atol=1e-6)
    long = torch.from_numpy(ds.hist_len[s] > K_ID)
    assert long.sum() > 20
    differ = (got - recent).abs().amax(1) > 1e-4
    assert bool(differ[long].float().mean() > 0.5)
    assert not bool(differ[~long].any())  # the same items, in the same time order


def test_id_history_in_chunks_equals_one_retrieval(ds, retriever, monkeypatch) -> None:
    s = np.random.default_rng(2).permutation(ds.samples)[:200]
    want = retriever.batches(s)[1]
    monkeypatch.setattr(pl, "RETRIEVAL_CHUNK", 32)
    got = pl.history(ds, retriever, s, "semantic", K_ID, "id")
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    empty = pl.history(ds, retriever, s[:0], "semantic", K_ID, "id")
    assert empty.items.shape == (0, K_ID)


def test_a_k_the_retriever_was_not_built_for_is_refused(ds, retriever) -> None:
    with pytest.raises(ValueError, match=f"retriever gives {K_ID} id history items, not 5"):
        pl.history(ds, retriever, ds.samples[:4], "semantic", 5, "id")
    with pytest.raises(ValueError, match="retriever gives 3 text history items, not 4"):
        pl.text_history(ds, retriever, ds.samples[:4], "semantic", 4)
    with pytest.raises(ValueError, match="mode must be"):
        pl.history(ds, retriever, ds.samples[:4], "retrieved", K_ID, "id")


def test_only_the_gated_models_read_the_option() -> None:
    cfg = replace(pl.RunConfig(), id_history="semantic")
    modes = {n: pl.llm_spec(n, cfg).id_mode for n in pl.LLM_MODELS + pl.ABLATIONS}
    assert modes == {"zero-shot": "recent", "tallrec": "recent", "rella": "recent",
                     "reclora": "semantic", "reclora-uniform": "recent",
                     "reclora-recent-text": "semantic", "reclora-short-id": "recent",
                     "reclora-no-f2m": "semantic"}
    assert {pl.llm_spec(n, pl.RunConfig()).id_mode for n in modes} == {"recent"}
    with pytest.raises(ValueError, match="id_history must be one of"):
        pl.RunConfig(id_history="retrieved")


def test_the_option_is_in_the_gated_stages_fingerprints_only(tmp_path) -> None:
    """Semantic h_u redoes the stages it changes and nothing else; the default leaves every
    fingerprint as it was before the option (so older folders resume)."""
    def fingerprints(id_history: str) -> dict:
        cfg = replace(pl.RunConfig(), output=str(tmp_path), device="cpu",
                      id_history=id_history)
        run = pl.Run(cfg)
        run.data_digest = "d" * 16
        run.train_pool, run.valid, run.test = np.arange(8), np.arange(8, 12), np.arange(12, 16)
        run.crm_sha = {"din": "c" * 64}
        return {n: run.fingerprint(n) for n in (*pl.LLM_MODELS, *pl.ABLATIONS, "crm_din")}

    recent, semantic = fingerprints("recent"), fingerprints("semantic")
    assert not any("id_history" in fp for fp in recent.values())
    changed = sorted(n for n in recent if recent[n] != semantic[n])
    assert changed == ["reclora", "reclora-no-f2m", "reclora-recent-text"]
    assert all(semantic[n]["id_history"] == "semantic" for n in changed)


def test_a_bad_value_is_one_line(capsys) -> None:
    code, err = call(pl.main, ["--id-history", "retrieved"], capsys)
    assert_one_line(code, err, "--id-history", "semantic")


# ------------------------------------------------------------------ run and serve
@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(model_dir)
    out = tmp_path_factory.mktemp("idsem") / "run"
    assert pl.main([*TINY_RUN, "--model", str(model_dir), "--output", str(out),
                    "--id-history", "semantic"]) == 0
    return out


def _reclora_predictions(run) -> np.ndarray:
    import csv

    with open(run / "predictions.csv", newline="") as fh:
        return np.asarray([float(r["reclora"]) for r in csv.DictReader(fh)])


def test_serving_reads_the_items_the_run_read(semantic_run) -> None:
    """Served over the run's test subset, the scores are the run's; with the K_id most
    recent items instead (what serving did before it read the option) they are not."""
    want = _reclora_predictions(semantic_run)
    rec = Recommender.load(semantic_run)
    assert rec.spec.id_mode == "semantic"
    assert np.abs(rec.score(rec.test_requests()) - want).max() <= 1e-5
    as_recent = rec.fork()
    as_recent.spec = dataclasses.replace(rec.spec, id_mode="recent")
    as_recent.rep_ref = pl.crm_user_reps(rec.ds, rec.crm.crm, rec.train_pool, rec.spec.k_hist)
    assert np.abs(as_recent.score(rec.test_requests()) - want).max() > 1e-4


def test_a_folder_without_the_option_serves_as_recent(semantic_run, tmp_path) -> None:
    """run_config.json of a folder made before the option has no id_history: it reads as
    "recent" (as it ran), so a semantic stage no longer matches it and is refused."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(semantic_run, old)
    path = old / "run_config.json"
    raw = json.loads(path.read_text())
    del raw["id_history"]
    path.write_text(json.dumps(raw))
    with pytest.raises(RunFolderError, match=r"reclora\.json: made with other inputs.*"
                                              "id_history"):
        Recommender.load(old)
    Recommender.load(old, model="rella")  # not gated: unchanged by the option
