"""Data audit findings 2-6: a repeated (user, item) pair in any format, item files that lose
interactions (truncated, zero-padded or repeated ids), time splits emptied by tied timestamps,
embedding caches keyed by the folder as typed, and a cluster bootstrap over one cluster."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datagen import (
    make_synthetic,
    write_goodreads,
    write_ml1m,
    write_ml25m,
    write_ml100k_grouplens,
    write_ml100k_recbole,
)

from reclora import metrics
from reclora.data import DataError, load_dataset
from reclora.data.splits import RawData, build_dataset, repeated_pairs, split_by_time

ITEM_FILES = {  # format -> (writer, item file, its header lines)
    "ml-100k": (write_ml100k_recbole, "ml-100k.item", 1),
    "ml-100k-grouplens": (write_ml100k_grouplens, "u.item", 0),
    "ml-1m": (write_ml1m, "movies.dat", 0),
    "ml-25m": (write_ml25m, "movies.csv", 1),
}
USER_FILES = {  # format -> (writer, user file, its header lines)
    "ml-100k": (write_ml100k_recbole, "ml-100k.user", 1),
    "ml-100k-grouplens": (write_ml100k_grouplens, "u.user", 0),
    "ml-1m": (write_ml1m, "users.dat", 0),
}
SEP = {"ml-100k": "\t", "ml-100k-grouplens": "|", "ml-1m": "::", "ml-25m": ","}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="latin-1").splitlines(keepends=True)


def _load(d: Path):
    return load_dataset(d, min_history=1, core=1)


# ------------------------------------------------------------- 2: a pair rated twice
def test_repeated_pairs_match_a_brute_force_oracle() -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 50, 300):
        user, item = rng.integers(0, 6, n), rng.integers(0, 9, n)
        seen: dict[tuple[int, int], int] = {}
        want_later, want_first = [], []
        for i, pair in enumerate(zip(user.tolist(), item.tolist())):
            if pair in seen:
                want_later.append(i)
                want_first.append(seen[pair])
            else:
                seen[pair] = i
        later, first = repeated_pairs(user, item)
        assert later.tolist() == want_later and first.tolist() == want_first


def _raw(user, item, time=None, source="ml-1m", **kw) -> RawData:
    n = len(user)
    return RawData("t", source, "movie", np.array(user), np.array(item),
                   np.full(n, 4.0, np.float32),
                   np.arange(n, dtype=np.int64) if time is None else np.array(time),
                   {str(i): {"title": f"M{i}", "genres": ["Drama"]} for i in set(item)}, **kw)


def test_a_repeated_pair_is_refused_for_any_raw_data() -> None:
    """The check is in build_dataset, for every format (GoodReads had none)."""
    raw = _raw([1, 1, 2, 2, 1], [7, 8, 7, 8, 8], files={"interactions": "x/ratings.dat"})
    with pytest.raises(DataError, match=r"x/ratings\.dat: data rows 2 and 5 both rate item 8 "
                       "by user 1"):
        build_dataset(raw, min_history=0, core=1)
    raw = _raw(["u1", "u1", "u2"], ["b", "b", "b"], source="goodreads")
    with pytest.raises(DataError, match=r"^t: data rows 1 and 2 both rate item b by user u1 "):
        build_dataset(raw, min_history=0, core=1)


def _goodreads_second_file(d: Path, records: list[dict], name: str = "young_adult") -> None:
    """A second genre's interactions file (read after "poetry": files go in name order)."""
    with gzip.open(d / f"goodreads_interactions_{name}.json.gz", "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _goodreads_records(d: Path) -> list[dict]:
    with gzip.open(d / "goodreads_interactions_poetry.json.gz", "rt") as f:
        return [json.loads(ln) for ln in f]


def test_goodreads_pair_rated_twice_is_refused(tmp_path) -> None:
    d = write_goodreads(tmp_path / "gr", make_synthetic())
    recs = _goodreads_records(d)
    j = next(i for i, r in enumerate(recs) if r["rating"] > 0)
    again = dict(recs[j], rating=recs[j]["rating"] % 5 + 1)  # another rating of the pair
    _goodreads_second_file(d, [again])
    with pytest.raises(DataError, match=rf"poetry\.json\.gz line {j + 1} and \S+young_adult"
                       rf"\.json\.gz line 1 both rate book {recs[j]['book_id']} by user "
                       rf"{recs[j]['user_id']} "):
        _load(d)


def test_goodreads_same_record_in_overlapping_genre_files_is_read_once(tmp_path) -> None:
    d = write_goodreads(tmp_path / "gr", make_synthetic())
    alone = _load(d)
    recs = _goodreads_records(d)
    _goodreads_second_file(d, recs[::2])  # the same records, listed under a second genre
    both = _load(d)
    for attr in ("user", "item", "rating", "time", "label"):
        assert np.array_equal(getattr(both, attr), getattr(alone, attr))
    # The same record twice in one file is not the genre overlap: refused.
    _goodreads_second_file(d, [recs[0], recs[0]])
    with pytest.raises(DataError, match=r"young_adult\.json\.gz line 1 and \S+young_adult\.json"
                       r"\.gz line 2 both rate book"):
        _load(d)


# ------------------------------------------------------------- 3: item and user files
@pytest.mark.parametrize("fmt", sorted(ITEM_FILES))
def test_truncated_item_file_is_refused(tmp_path, fmt) -> None:
    """Cutting the item file in half dropped half the interactions without a word."""
    writer, name, header = ITEM_FILES[fmt]
    d = writer(tmp_path / "d", make_synthetic(n_users=30, n_items=20))  # all items rated
    lines = _lines(d / name)
    (d / name).write_text("".join(lines[: header + 10]), encoding="latin-1")  # items 1..10
    with pytest.raises(DataError, match=rf"interactions rate 10 items that have no row in the "
                       rf"item file \S+{name} \(raw ids 11, 12, 13, 14, 15, \.\.\.\)"):
        _load(d)


def test_goodreads_books_missing_are_announced(tmp_path, capsys) -> None:
    syn = make_synthetic(n_items=20)
    d = write_goodreads(tmp_path / "gr", syn)
    with gzip.open(d / "goodreads_books_poetry.json.gz", "rt") as f:
        books = f.readlines()
    with gzip.open(d / "goodreads_books_poetry.json.gz", "wt") as f:
        f.writelines(books[1:])  # book 1001 has no row
    ds = _load(d)
    n_dropped = int((syn.item == 1).sum())
    assert "1001" not in set(ds.item_raw_id.tolist())
    assert (f"{n_dropped} of {syn.user.size} interactions rate 1 items that have no row in the "
            f"item file {d / 'goodreads_books_poetry.json.gz'} (raw ids 1001); those "
            "interactions are dropped") in capsys.readouterr().err


@pytest.mark.parametrize("fmt", sorted(ITEM_FILES))
def test_zero_padded_item_ids_match_the_interactions(tmp_path, fmt) -> None:
    """"007" in the item file is item 7 of the interactions (the movies dropped out)."""
    writer, name, header = ITEM_FILES[fmt]
    syn = make_synthetic()
    full = _load(writer(tmp_path / "full", syn))
    d = writer(tmp_path / "d", syn)
    lines = _lines(d / name)
    (d / name).write_text("".join(lines[:header] + ["00" + ln for ln in lines[header:]]),
                          encoding="latin-1")
    ds = _load(d)
    assert ds.n_interactions == full.n_interactions
    assert list(ds.item_raw_id) == list(full.item_raw_id)
    assert ds.item_title == full.item_title


@pytest.mark.parametrize("fmt", sorted(ITEM_FILES) + [f"{f}-users" for f in USER_FILES])
def test_repeated_id_in_a_user_or_item_file_is_refused(tmp_path, fmt) -> None:
    """The last row of a repeated id silently won."""
    users = fmt.endswith("-users")
    fmt = fmt.removesuffix("-users")
    writer, name, header = (USER_FILES if users else ITEM_FILES)[fmt]
    d = writer(tmp_path / "d", make_synthetic())
    lines = _lines(d / name)
    row = lines[header + 4]  # id 5, on line header + 5
    (d / name).write_text("".join(lines) + "05" + row[1:], encoding="latin-1")
    with pytest.raises(DataError, match=rf"{name}: line {len(lines) + 1} repeats id 5 of line "
                       rf"{header + 5} \(one row per id\)"):
        _load(d)


def test_non_integer_item_id_is_refused(tmp_path) -> None:
    d = write_ml1m(tmp_path / "d", make_synthetic())
    lines = _lines(d / "movies.dat")
    (d / "movies.dat").write_text("".join(lines[:2] + ["x" + lines[2]] + lines[3:]),
                                  encoding="latin-1")
    with pytest.raises(DataError, match=r"movies\.dat: line 3: id 'x3' is not a whole number"):
        _load(d)


def test_missing_users_are_named_plainly(tmp_path) -> None:
    d = write_ml1m(tmp_path / "d", make_synthetic(n_users=14))
    (d / "users.dat").write_text("".join(_lines(d / "users.dat")[:10]), encoding="latin-1")
    with pytest.raises(DataError, match=r"4 of 14 users have no row in the user file \S+"
                       r"users\.dat \(raw ids 11, 12, 13, \.\.\.\)"):
        _load(d)


# ------------------------------------------------------------- 4: the time split
def _ties(n_users: int = 20) -> RawData:
    """Day-granular times: each user rates 2 items a day on days 0..3, one on days 4 and 5
    and 6 on day 6. With min_history=5 a user has 10 samples: 2 on day 3, 1 on days 4 and 5,
    6 on day 6, which holds 60 % of all samples and both cuts of 8:1:1."""
    rng = np.random.default_rng(0)
    days = np.r_[np.arange(4).repeat(2), [4, 5], [6] * 6]
    user = np.arange(n_users).repeat(days.size)
    item = np.concatenate([rng.choice(30, days.size, replace=False) for _ in range(n_users)])
    return _raw(user, item, np.tile(1_600_000_000 + days * 86400, n_users))


def test_split_emptied_by_a_tied_timestamp_is_refused() -> None:
    """The valid split came out empty (57:0:43) and training failed in the AUC."""
    t = 1_600_000_000 + 6 * 86400
    with pytest.raises(DataError, match=rf"the valid split is empty: 120 of 200 samples share "
                       rf"the timestamp {t} \(positions 40\.0% to 100\.0% "):
        build_dataset(_ties(), min_history=5, core=1)
    ds = build_dataset(_ties(), min_history=5, core=1, split=(0.3, 0.2, 0.5))
    assert (ds.train.size, ds.valid.size, ds.test.size) == (60, 20, 120)
    time = np.r_[[5] * 8, 6, 7]  # the train cut (position 5) falls in the first block
    with pytest.raises(DataError, match=r"the train split is empty: 8 of 10 samples share the "
                       r"timestamp 5 \(positions 0\.0% to 80\.0% "):
        split_by_time(np.arange(10), time, (0.5, 0.3, 0.2))


def test_split_fractions_must_be_finite_and_zero_means_empty() -> None:
    samples = np.arange(10)
    time = np.arange(10) * 7
    for bad in ((float("nan"), 0.5, 0.5), (float("inf"), 0.0, 0.0), (0.5, 0.5), ("a", 0, 1)):
        with pytest.raises(ValueError, match="split must be three finite fractions"):
            split_by_time(samples, time, bad)
    tr, va, te, cuts = split_by_time(samples, time, (0.8, 0.2, 0.0))
    assert (tr.size, va.size, te.size) == (8, 2, 0) and cuts == (56, 64)
    tr, va, te, _ = split_by_time(samples, time, (1.0, 0.0, 0.0))
    assert (tr.size, va.size, te.size) == (10, 0, 0)
    for frac, name in (((0.9, 0.09, 0.01), "test"), ((0.01, 0.49, 0.5), "train")):
        with pytest.raises(DataError, match=f"the {name} split is empty: a fraction of 0.01 of "
                           "10 samples rounds to none"):
            split_by_time(samples, time, frac)


# ------------------------------------------------------------- 5: embedding caches
def _encoder(folder: Path, ds, seed: int) -> None:
    """A tiny random Llama saved as a sentence-encoder folder (AutoModel reads it)."""
    from tiny_llm import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(ds.item_description)
    tiny_llama(len(tok), seed=seed, hidden=16, layers=1).model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture
def small_ds(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load(write_ml1m(tmp_path / "d", make_synthetic()))
    torch.set_num_threads(n)


def test_same_folder_name_in_two_projects_gets_two_caches(tmp_path, small_ds, monkeypatch
                                                          ) -> None:
    """"enc" in projB returned projA's embeddings (cache and model keyed on the text "enc")."""
    from reclora.data.embeddings import embedding_cache_path, item_embeddings

    kw = {"cache_dir": tmp_path / "cache", "precision": "fp32", "progress": False}
    got, paths = {}, {}
    for proj, seed in (("projA", 0), ("projB", 1)):
        _encoder(tmp_path / proj / "enc", small_ds, seed)
        monkeypatch.chdir(tmp_path / proj)
        got[proj] = item_embeddings(small_ds, "enc", **kw)
        paths[proj] = embedding_cache_path(small_ds, "enc", cache_dir=kw["cache_dir"])
        assert paths[proj] == embedding_cache_path(small_ds, str(tmp_path / proj / "enc"),
                                                   cache_dir=kw["cache_dir"])
    assert paths["projA"] != paths["projB"]
    assert not torch.allclose(got["projA"], got["projB"])
    assert torch.equal(got["projB"], item_embeddings(small_ds, "enc", **kw, refresh=True))


def test_encoder_retrained_in_place_gets_a_new_cache(tmp_path, small_ds) -> None:
    from reclora.data import embeddings as E

    folder = tmp_path / "enc"
    kw = {"cache_dir": tmp_path / "cache", "precision": "fp32", "progress": False}
    _encoder(folder, small_ds, seed=0)
    first = E.item_embeddings(small_ds, str(folder), **kw)
    path = E.embedding_cache_path(small_ds, str(folder), cache_dir=kw["cache_dir"])
    _encoder(folder, small_ds, seed=1)  # the same files, new weights
    again = E.item_embeddings(small_ds, str(folder), **kw)
    assert E.embedding_cache_path(small_ds, str(folder), cache_dir=kw["cache_dir"]) != path
    assert not torch.allclose(first, again)
    # A weights file is hashed once per process while its size and mtime hold.
    E.encoder_digest(folder)
    misses = E._sha256_of.cache_info().misses
    E.encoder_digest(folder)
    assert E._sha256_of.cache_info().misses == misses


def test_llm_spec_is_keyed_on_its_weights(tmp_path, small_ds) -> None:
    """"llm:<folder>" and an "llm" model loaded from a folder: same rule as an encoder."""
    from reclora.data.embeddings import embedding_cache_path

    for proj, seed in (("a", 0), ("b", 1)):
        _encoder(tmp_path / proj / "m", small_ds, seed)
    spec = [embedding_cache_path(small_ds, f"llm:{tmp_path / p / 'm'}") for p in "ab"]
    assert spec[0] != spec[1]
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path / "a" / "m")))
    assert embedding_cache_path(small_ds, "llm", model=model) == spec[0]
    shutil.copy(tmp_path / "b" / "m" / "model.safetensors", tmp_path / "a" / "m")
    assert embedding_cache_path(small_ds, "llm", model=model) != spec[0]


# ------------------------------------------------------------- 6: one-cluster bootstrap
def test_cluster_bootstrap_needs_two_groups() -> None:
    """One group gave a zero-width interval and a 'significant' difference with p = 0."""
    rng = np.random.default_rng(0)
    y, a, b = rng.integers(0, 2, 200), rng.random(200), rng.random(200)
    one = np.zeros(200, int)
    with pytest.raises(ValueError, match=r"groups: need at least 2 groups \(got 1\)"):
        metrics.bootstrap_auc(y, a, groups=one)
    with pytest.raises(ValueError, match=r"groups: need at least 2 groups \(got 1\)"):
        metrics.paired_bootstrap_auc(y, a, b, groups=one)
    two = metrics.paired_bootstrap_auc(y, a, b, groups=np.arange(200) % 2, n_resamples=50)
    assert two.n_resamples > 0
