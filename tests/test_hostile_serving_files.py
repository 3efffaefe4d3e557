"""Files a served run reads, made hostile (audit of the files the tools write, findings 3, 6,
7 and 8):

- a gate CRM whose h_u is not finite for some users: their requests raise, naming the rows
  and users, instead of scoring NaN beside normal scores (3);
- the item-embedding cache is keyed on max_length, and a cache file holding NaN, another
  width or dtype is recomputed, not returned (6);
- crm/din.pt replaced between its hash and its load is refused (7);
- run_config.json values of the wrong type name the file, the field and the type (8);
- the 2026-12-08 audit: rank given a string of candidates, huge integer timestamps, a
  damaged stage fingerprint, amp checked at load, CSV lines after a multi-line field, and
  --output checked before anything loads.

One tiny run (random Llama, DIN) per module for 3 and 7; the rest build their own files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_llm import TINY_RUN as TINY
from tiny_llm import save_tiny_model

from reclora import pipeline as pl
from reclora.serving import Recommender, RunFolderError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(model_dir)
    out = tmp_path_factory.mktemp("serve") / "run"
    assert pl.main([*TINY, "--model", str(model_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return Recommender.load(tiny_run)


# ------------------------------------------------------- 3: a non-finite h_u per request
def test_a_user_whose_h_u_is_nan_is_refused_naming_the_row(loaded) -> None:
    """A NaN in one user's CRM id row: that user's request raises (others alone still
    score), where it scored NaN beside normal scores."""
    rec = loaded.fork()
    req = rec.test_requests()
    users = rec._users(req["user_id"], ["t"] * req["user_id"].size, rec._ids,
                       register=False)[0]
    known = [j for j, u in enumerate(users) if rec.crm_known[u]]
    j = known[0]
    others = {k: v[users != users[j]] for k, v in req.items()}
    emb = next(m for m in rec.crm.crm.modules() if hasattr(m, "user_row"))
    row = int(emb.user_row[users[j]])
    kept = emb.user_id.weight[row].clone()
    try:
        with torch.no_grad():
            emb.user_id.weight[row, 0] = float("nan")
        with pytest.raises(RunFolderError) as err:
            rec.score(req)
        msg = str(err.value)
        assert f"user_id {req['user_id'][j]!r}" in msg and "h_u is not finite" in msg
        assert f"{(users == users[j]).sum()} of {users.size} requests" in msg
        assert "crm/din.pt" in msg
        assert np.isfinite(rec.score(others)).all()
    finally:
        with torch.no_grad():
            emb.user_id.weight[row] = kept
    assert np.isfinite(rec.score(req)).all()


def test_non_finite_reference_statistics_are_refused_at_load(tiny_run, monkeypatch) -> None:
    """The stage-2 pool's h_u standardises every request: one NaN there is the CRM file's
    fault, said at load, not a NaN error on every request."""
    real = pl.crm_user_reps

    def nan_on_the_pool(ds, crm, samples, k, *how):
        reps = real(ds, crm, samples, k, *how)
        reps[0, 0] = float("nan")
        return reps

    monkeypatch.setattr(pl, "crm_user_reps", nan_on_the_pool)
    with pytest.raises(RunFolderError, match=r"crm/din\.pt: its h_u is not finite for 1 of "
                                             r"the 8 stage-2 training samples"):
        Recommender.load(tiny_run)


# ------------------------------------------------------ 7: the CRM hashed, then replaced
def test_a_crm_replaced_after_its_hash_is_never_served(tiny_run, tmp_path, monkeypatch) -> None:
    """Serving hashed crm/din.pt, then read it again to load it: a writer in between (a
    `reclora run --resume` retraining the CRM) had its unchecked bytes served. The bytes are
    now read once, hashed, and loaded: the file replaced before the load changes nothing."""
    import reclora.crm as crm_package
    from reclora.crm import load_crm, save_crm

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "crm" / "din.pt"
    crm, meta = load_crm(ckpt)
    hashed = {k: v.clone() for k, v in crm.named_parameters()}
    with torch.no_grad():
        for p in crm.parameters():
            p.add_(0.3)
    other = tmp_path / "retrained.pt"
    save_crm(crm, other, meta)
    real = crm_package.load_crm

    def a_writer_lands_first(path, *args, **kwargs):
        if Path(path) == ckpt and other.exists():
            other.replace(ckpt)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(crm_package, "load_crm", a_writer_lands_first)
    served = dict(Recommender.load(run).crm.crm.named_parameters())
    assert not other.exists()  # the writer did land
    assert all(torch.equal(served[k], v) for k, v in hashed.items())


# ------------------------------------------------------- 8: run_config.json value types
def _config_folder(tmp_path, **over) -> Path:
    raw = json.loads(json.dumps(dataclasses.asdict(pl.RunConfig())))  # tuples as lists
    raw.update(over)
    (tmp_path / "run_config.json").write_text(json.dumps(raw))
    return tmp_path


def test_a_default_run_config_passes_the_type_check(tmp_path) -> None:
    """Every RunConfig field's default has a type the check knows (the load goes on to the
    stage file, which this folder lacks); ints are floats' values too."""
    with pytest.raises(RunFolderError, match=r"stages/reclora\.json"):
        Recommender.load(_config_folder(tmp_path, n_train=0.5, alpha=16, gate_lr=None,
                                        data_dir="data", crm_max_train=100))


@pytest.mark.parametrize("key, value, expected", [
    ("seed", 1.5, "int"), ("seed", True, "int"), ("n_valid", "8", "int"),
    ("n_valid", 8.0, "int"), ("data_dir", 5, "str or null"), ("model", 7, "str or null"),
    ("n_train", "8", "a finite number"), ("alpha", float("nan"), "a finite number"),
    ("lr", False, "a finite number"), ("standardize_reps", 1, "bool"),
    ("crms", "din", "a list of str"), ("target_modules", ["q_proj", 3], "a list of str"),
    ("crm_max_train", 1.5, "int or null"),
])
def test_a_run_config_value_of_another_type_names_file_field_and_type(tmp_path, key, value,
                                                                      expected) -> None:
    folder = _config_folder(tmp_path, **{key: value})
    with pytest.raises(RunFolderError) as err:
        Recommender.load(folder)
    assert str(err.value) == f"{folder / 'run_config.json'}: {key} {value!r}: expected {expected}"


# ------------------------------------------------------------ 6: the embedding cache
def _encoder(folder: Path, ds) -> None:
    """A tiny random Llama saved as a sentence-encoder folder (AutoModel reads it)."""
    from tiny_llm import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(ds.item_description)
    tiny_llama(len(tok), seed=0, hidden=16, layers=1).model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture
def encoded(tmp_path):
    """(dataset, encoder folder, item_embeddings keywords) over a small synthetic dataset."""
    from datagen import make_synthetic, write_ml1m

    from reclora.data import load_dataset

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = load_dataset(write_ml1m(tmp_path / "d", make_synthetic()), min_history=1, core=1)
    _encoder(tmp_path / "enc", ds)
    yield ds, str(tmp_path / "enc"), {"cache_dir": tmp_path / "cache", "precision": "fp32",
                                      "progress": False}
    torch.set_num_threads(n)


def test_max_length_keys_the_cache_and_the_default_keeps_its_name(encoded) -> None:
    from reclora.data.embeddings import embedding_cache_path, item_embeddings

    ds, enc, kw = encoded
    full = item_embeddings(ds, enc, **kw)
    short = item_embeddings(ds, enc, max_length=4, **kw)
    assert not torch.allclose(full, short)  # the cut changes them: not the cached file
    assert torch.equal(short, item_embeddings(ds, enc, max_length=4, refresh=True, **kw))
    default = embedding_cache_path(ds, enc, cache_dir=kw["cache_dir"])
    assert default == embedding_cache_path(ds, enc, cache_dir=kw["cache_dir"], max_length=128)
    assert "-len" not in default.name and default.is_file()  # caches made before keep
    cut = embedding_cache_path(ds, enc, cache_dir=kw["cache_dir"], max_length=4)
    assert cut.name.endswith(f"-len4-{default.name.rsplit('-', 1)[1]}") and cut.is_file()


def _nan(emb):
    emb = emb.clone()
    emb[3, 0] = float("nan")
    return emb


@pytest.mark.parametrize("edit, with_meta", [
    (_nan, True),  # NaN, its metadata right
    (lambda e: e[:, :5].contiguous(), False),  # another width, no "dim" metadata
    (lambda e: e[:, :5].contiguous(), True),  # another width than its "dim" says
    (lambda e: e.double(), True),  # float64
    (lambda e: e.unsqueeze(-1), True),  # three dimensions
])
def test_a_cache_file_that_loads_but_is_wrong_is_recomputed(encoded, edit, with_meta) -> None:
    from reclora.data.embeddings import embedding_cache_path, item_embeddings

    ds, enc, kw = encoded
    good = item_embeddings(ds, enc, **kw)
    path = embedding_cache_path(ds, enc, cache_dir=kw["cache_dir"])
    meta = {"dim": str(good.shape[1])} if with_meta else None
    save_file({"embeddings": edit(good)}, str(path), metadata=meta)
    for got in (item_embeddings(ds, enc, **kw), load_file(str(path))["embeddings"]):
        assert got.dtype == torch.float32 and torch.equal(got, good)  # and rewritten


# ------------------------------------------------------- 2026-12-08 serving audit
def test_rank_refuses_a_string_of_candidates_and_a_bool_top(loaded) -> None:
    """rank("784", "52") ranked items "5" and "2", one a character."""
    from reclora.serving import ServingError

    user = str(loaded.ds.user_raw_id[1])
    with pytest.raises(ServingError, match=r"candidates must be a list of item ids, got the "
                                           r"str '52' \(for one item: \['52'\]\)"):
        loaded.rank(user, "52")
    item = str(loaded.ds.item_raw_id[1])
    with pytest.raises(ServingError, match="top must be an int >= 1, got True"):
        loaded.rank(user, [item], top=True)


def test_a_huge_integer_timestamp_is_named(loaded) -> None:
    from reclora.serving import ServingError

    request = {"user_id": str(loaded.ds.user_raw_id[1]),
               "item_id": str(loaded.ds.item_raw_id[1]), "timestamp": 10**400}
    with pytest.raises(ServingError, match="timestamp .* is not an integer"):
        loaded.score([request])


@pytest.mark.parametrize("fingerprint", [[1], {"world_size": "x"}, {"world_size": 0}])
def test_a_damaged_stage_fingerprint_names_its_file(tiny_run, tmp_path, fingerprint) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    stage_file = run / "stages" / "reclora.json"
    stage = json.loads(stage_file.read_text())
    stage["fingerprint"] = (fingerprint if not isinstance(fingerprint, dict)
                            else dict(stage["fingerprint"], **fingerprint))
    stage_file.write_text(json.dumps(stage))
    with pytest.raises(RunFolderError, match=r"reclora.json: its fingerprint is not a map "
                                             "with a world_size >= 1"):
        Recommender.load(run)


def test_amp_is_checked_at_load(tiny_run) -> None:
    from reclora.serving import ServingError

    with pytest.raises(ServingError, match="amp must be None, 'auto', 'bf16' or 'off'"):
        Recommender.load(tiny_run, amp="fp16")


def test_request_csv_errors_name_the_physical_line(tmp_path) -> None:
    """Records were counted, so a quoted field over three lines shifted every later line
    number; a blank first line was read as a header of no columns."""
    from reclora.serving import ServingError, read_table

    path = tmp_path / "r.csv"
    path.write_text('user_id,item_id,timestamp,note\n784,678,891387895,"a\nb\nc"\n'
                    "356,300,xx,z\n")
    with pytest.raises(ServingError, match=r"r.csv line 5: timestamp 'xx'"):
        read_table(path)
    path.write_text("\nuser_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(ServingError, match=r"r.csv line 1: blank, expected a header line"):
        read_table(path)


def test_score_checks_its_output_before_loading(tiny_run, tmp_path, capsys) -> None:
    """--output naming a folder failed after the model had loaded and scored every request."""
    from reclora.serving import score_main

    requests = tmp_path / "r.csv"
    requests.write_text("user_id,item_id,timestamp\n1,2,3\n")
    code = score_main(["--run", str(tiny_run), "--input", str(requests), "--output",
                       str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert f"--output {tmp_path}: is a folder" in err
