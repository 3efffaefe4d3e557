"""Two options of `reclora run` toward RECLORA.md section 2, each off by default (the published
results) and in the fingerprints of the stages it changes only when set:

- `--id-history semantic`: the gate CRM reads, for h_u, the K_id history items the LSMR
  retrieves for the target (the reference's --ret) instead of the K_id most recent. The CRMs
  train as before; only the gated LLM stages change.
- `--item-encoder llm`: the retriever ranks items by the run's own LLM's embeddings
  (mean-pooled last hidden state, PCA to 512) instead of MiniLM's.

Serving reads the same items and embeddings as the run did."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from datagen import one_heavy_user
from test_cli_errors import assert_one_line, call
from test_reliability_pipeline import stage_fingerprints
from tiny_llm import TINY_RUN, save_tiny_model

import reclora.pipeline as pl
from reclora.crm import CRMBatch, CRMSchema, build_crm
from reclora.retriever import LongShortRetriever
from reclora.serving import Recommender, RunFolderError

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("items", "ratings", "times", "mask")
STAGES = (*pl.LLM_MODELS, *pl.ABLATIONS, "crm_din")
K_ID = 9


@pytest.fixture(scope="module")
def ds():
    """One user with 120 ratings among 40 with 12 each (histories longer than K_id)."""
    return one_heavy_user("long", 40, 120, 12, 200, "Film", 9)


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
        return stage_fingerprints(replace(pl.RunConfig(), id_history=id_history), tmp_path,
                                  STAGES)

    recent, semantic = fingerprints("recent"), fingerprints("semantic")
    assert not any("id_history" in fp for fp in recent.values())
    changed = sorted(n for n in recent if recent[n] != semantic[n])
    assert changed == ["reclora", "reclora-no-f2m", "reclora-recent-text"]
    assert all(semantic[n]["id_history"] == "semantic" for n in changed)


def test_the_item_encoder_is_in_the_retrieving_stages_fingerprints_only(tmp_path) -> None:
    def fingerprints(**over) -> dict:
        return stage_fingerprints(replace(pl.RunConfig(), **over), tmp_path, STAGES)

    minilm, llm = fingerprints(), fingerprints(item_encoder="llm")
    assert not any("item_encoder" in fp for fp in minilm.values())
    unchanged = sorted(n for n in minilm if minilm[n] == llm[n])
    # Recent items in the prompt and no retrieved h_u: nothing retrieved.
    assert unchanged == ["crm_din", "reclora-recent-text", "tallrec"]
    # With retrieved h_u, the recent-text ablation retrieves too.
    both = fingerprints(item_encoder="llm", id_history="semantic")
    assert both["reclora-recent-text"]["item_encoder"] == "llm"
    assert "item_encoder" not in both["tallrec"]
    with pytest.raises(ValueError, match="item_encoder must be one of"):
        pl.RunConfig(item_encoder="bert")


def test_llm_item_embeddings_are_the_run_models(ds, tmp_path) -> None:
    """--item-encoder llm embeds with a copy of --model loaded from its files (cached under
    --data-dir); a hub name whose files are not here is one ValueError naming the model."""
    from reclora.data.embeddings import item_embeddings

    model_dir = tmp_path / "m"
    save_tiny_model(model_dir)
    cfg = replace(pl.RunConfig(), model=str(model_dir), data_dir=str(tmp_path / "data"),
                  item_encoder="llm", item_precision="fp32")
    got = pl.run_item_embeddings(ds, cfg, progress=False)
    want = item_embeddings(ds, f"llm:{model_dir}", precision="fp32", progress=False,
                           cache_dir=tmp_path / "other")
    assert got.shape[0] == ds.n_items and torch.equal(got, want)
    assert list((tmp_path / "data" / "embeddings").rglob("llm-*.safetensors"))
    minilm = pl.run_item_embeddings(ds, replace(cfg, item_encoder="minilm"), progress=False)
    assert minilm.shape == (ds.n_items, 384)
    with pytest.raises(ValueError, match="item_encoder 'llm': the files of model "
                                         "'nobody/no-such-model' are not in the local cache"):
        pl.run_item_embeddings(ds, replace(cfg, model="nobody/no-such-model"), progress=False)


def test_the_llm_encoder_embeds_in_float32_whatever_the_checkpoint(tmp_path) -> None:
    """transformers loads a checkpoint in its own dtype by default: a bf16 model embedded the
    items in bf16 on the CPU whatever --item-precision said."""
    from tiny_llm import tiny_llama, tiny_tokenizer

    from reclora.data.embeddings import load_llm

    tok = tiny_tokenizer(["Film Drama"])
    tiny_llama(len(tok)).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_llm(str(tmp_path / "m"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("model", [None, "smollm2-135m"])
def test_a_gguf_model_embeds_from_its_file(ds, monkeypatch, model) -> None:
    """The shipped models are single .gguf files: the encoder is that file, not its folder
    (which holds no config.json)."""
    import reclora.data.embeddings as embeddings
    from reclora.llm import shipped_smollm2

    seen = []
    monkeypatch.setattr(embeddings, "item_embeddings",
                        lambda ds, encoder, **kw: seen.append(encoder))
    pl.run_item_embeddings(ds, replace(pl.RunConfig(), model=model, item_encoder="llm"),
                           progress=False)
    assert seen == [f"llm:{shipped_smollm2()}"] and seen[0].endswith(".gguf")


@pytest.mark.parametrize("option", ["--id-history", "--item-encoder"])
def test_a_bad_value_is_one_line(capsys, option) -> None:
    code, err = call(pl.main, [option, "retrieved"], capsys)
    assert_one_line(code, err, option, "invalid choice")


# ------------------------------------------------------------------ run and serve
@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    """A tiny run with both options set."""
    model_dir = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(model_dir)
    out = tmp_path_factory.mktemp("idsem") / "run"
    assert pl.main([*TINY_RUN, "--model", str(model_dir), "--output", str(out),
                    "--id-history", "semantic", "--item-encoder", "llm", "--ablations"]) == 0
    return out


def _predictions(run, model: str) -> np.ndarray:
    import csv

    with open(run / "predictions.csv", newline="") as fh:
        return np.asarray([float(r[model]) for r in csv.DictReader(fh)])


@pytest.mark.parametrize("model", ["rella", "zero-shot", "reclora-recent-text",
                                   "reclora-no-f2m", "reclora-short-id"])
def test_serving_retrieves_with_the_runs_embeddings(semantic_run, model) -> None:
    rec = Recommender.load(semantic_run, model=model)
    got = rec.score(rec.test_requests())
    assert np.abs(got - _predictions(semantic_run, model)).max() <= 1e-5


def test_serving_reads_the_items_the_run_read(semantic_run) -> None:
    """Served over the run's test subset, the scores are the run's; with the K_id most
    recent items instead (what serving did before it read the option) they are not."""
    want = _predictions(semantic_run, "reclora")
    rec = Recommender.load(semantic_run)
    assert rec.spec.id_mode == "semantic"
    assert np.abs(rec.score(rec.test_requests()) - want).max() <= 1e-5
    as_recent = rec.fork()
    as_recent.spec = dataclasses.replace(rec.spec, id_mode="recent")
    as_recent.rep_ref = pl.crm_user_reps(rec.ds, rec.crm.crm, rec.train_pool, rec.spec.k_hist)
    assert np.abs(as_recent.score(rec.test_requests()) - want).max() > 1e-4


def test_a_served_folder_whose_llm_files_are_gone_is_one_error(semantic_run,
                                                               monkeypatch) -> None:
    import reclora.llm as llm

    def gone(model):
        raise FileNotFoundError(model)

    monkeypatch.setattr(llm, "model_files", gone)
    with pytest.raises(RunFolderError, match=r"run_config\.json: item_encoder 'llm': the "
                                              "files of model .* are not in the local cache"):
        Recommender.load(semantic_run)


@pytest.mark.parametrize("option, changed, unchanged", [
    ("id_history", "reclora", "rella"), ("item_encoder", "rella", "tallrec")])
def test_a_folder_without_the_option_serves_as_before_it(semantic_run, tmp_path, option,
                                                        changed, unchanged) -> None:
    """run_config.json of a folder made before an option lacks it: it reads as the default
    (as such a folder ran), so a stage the option changed no longer matches and is refused,
    and one it did not change still serves."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(semantic_run, old)
    path = old / "run_config.json"
    raw = json.loads(path.read_text())
    del raw[option]
    path.write_text(json.dumps(raw))
    with pytest.raises(RunFolderError, match=rf"{changed}\.json: made with other inputs.*"
                                              f"{option}"):
        Recommender.load(old, model=changed)
    Recommender.load(old, model=unchanged)
