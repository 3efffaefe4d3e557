"""Data audit of 2026-12-08: fields a hostile or broken file gets wrong silently (an
unquoted comma in an ML-25M title, ratings off the scale, GoodReads dates that do not
exist, ids past 2^53 merged), GoodReads records that failed without naming their file and
line, a genre list that blew up memory, and the installed ML-100K copied file by file
(`--k` / `--r` / `--k-text` without a ceiling: tests/test_cli_errors.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datagen import make_synthetic, write_goodreads, write_ml1m, write_ml25m

from reclora.data import DataError, load_dataset
from reclora.data.goodreads import parse_goodreads_time


def _load(d: Path):
    return load_dataset(d, min_history=1, core=1)


def _edit_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1] = new
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_an_unquoted_comma_in_an_ml25m_title_is_refused(tmp_path) -> None:
    d = write_ml25m(tmp_path / "m25", make_synthetic(seed=1))
    _edit_line(d / "movies.csv", 4, "3,Toy, Story (1993),Sci-Fi")
    with pytest.raises(DataError, match=r"movies.csv: line 4 has 4 fields"):
        _load(d)


@pytest.mark.parametrize("rating", ["40", "-1", "0", "5.5", "3.25"])
def test_ratings_off_movielens_scale_are_refused(tmp_path, rating) -> None:
    """A 40 was a positive label and the prompts said "(-1-40 stars)"."""
    d = write_ml1m(tmp_path / "m1", make_synthetic(seed=2))
    u, i, _, t = (d / "ratings.dat").read_text().splitlines()[2].split("::")
    _edit_line(d / "ratings.dat", 3, f"{u}::{i}::{rating}::{t}")
    with pytest.raises(DataError, match=rf"data row 3: rating {float(rating)!r} is not on "
                                        "MovieLens' scale"):
        _load(d)


def test_ids_at_2_53_are_refused(tmp_path) -> None:
    """2^53 + 1 parses to 2^53: two users there became one."""
    d = write_ml25m(tmp_path / "m25", make_synthetic(seed=3))
    _, i, r, t = (d / "ratings.csv").read_text().splitlines()[1].split(",")
    _edit_line(d / "ratings.csv", 2, f"9007199254740993,{i},{r},{t}")
    with pytest.raises(DataError, match=r"data row 1: user id .* out of range"):
        _load(d)


@pytest.mark.parametrize("date, why", [
    ("Mon Aug 45 13:41:57 -0700 2016", "out of range"),
    ("Mon Feb 30 13:41:57 -0700 2016", "out of range"),
    ("Mon Aug 01 99:41:57 -0700 2016", "out of range"),
    ("Mon Aug 01 13:41:57 0700 2016", "bad GoodReads date"),
    ("Mon Foo 01 13:41:57 -0700 2016", "bad GoodReads date"),
])
def test_goodreads_dates_that_do_not_exist_are_refused(date, why) -> None:
    with pytest.raises(ValueError, match=why):
        parse_goodreads_time(date)
    assert parse_goodreads_time("Mon Aug 01 13:41:57 -0700 2016") == 1470084117


def _rewrite_first_record(d: Path, name: str, change) -> None:
    path = d / name
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    lines[0] = change(json.loads(lines[0]))
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


INTERACTIONS = "goodreads_interactions_poetry.json.gz"
BOOKS = "goodreads_books_poetry.json.gz"


@pytest.mark.parametrize("name, change, message", [
    (INTERACTIONS, lambda r: "[1, 2]", r"line 1 is a JSON list, not an object"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, rating=4.7)), r"line 1: .*rating 4.7"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, rating=99)), r"line 1: .*rating 99"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, rating=True)), r"line 1: .*rating True"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, rating=-2)), r"line 1: .*rating -2"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, user_id=None)), r"line 1: .*user_id None"),
    (INTERACTIONS, lambda r: json.dumps({k: v for k, v in r.items() if k != "book_id"}),
     r"line 1: malformed record \(KeyError: 'book_id'\)"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, date_added=1234567890)),
     r"line 1: .*bad GoodReads date 1234567890"),
    (INTERACTIONS, lambda r: json.dumps(dict(r, date_added="Mon Aug 45 13:41:57 -0700 2016")),
     r"line 1: .*out of range"),
    (BOOKS, lambda r: json.dumps(dict(r, authors=["x"])), r"books_poetry.json.gz: line 1: "),
    (BOOKS, lambda r: "[3]", r"books_poetry.json.gz: line 1 is a JSON list"),
])
def test_malformed_goodreads_records_name_their_file_and_line(tmp_path, name, change,
                                                              message) -> None:
    d = write_goodreads(tmp_path / "gr", make_synthetic(seed=4))
    _rewrite_first_record(d, name, change)
    with pytest.raises(DataError, match=message):
        _load(d)


def test_a_goodreads_file_that_is_not_gzip_names_the_file(tmp_path) -> None:
    d = write_goodreads(tmp_path / "gr", make_synthetic(seed=5))
    (d / BOOKS).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"books_poetry.json.gz: cannot read it"):
        _load(d)


def test_undated_goodreads_ratings_are_reported(tmp_path) -> None:
    d = write_goodreads(tmp_path / "gr", make_synthetic(seed=6))
    _rewrite_first_record(d, INTERACTIONS, lambda r: json.dumps(
        dict(r, date_added="", date_updated="")))
    with pytest.warns(UserWarning, match="1 rated records have no date"):
        _load(d)


def test_a_genre_list_past_the_ceiling_is_refused_and_repeats_read_once(tmp_path) -> None:
    """One movies.csv line with 20,000 genres made a [items, 20000] table (10 GB at ML-25M's
    62k items)."""
    d = write_ml25m(tmp_path / "m25", make_synthetic(seed=7))
    _edit_line(d / "movies.csv", 4, "3,Three (1993),Drama|Drama|Comedy|Drama")
    ds = _load(d)
    row = list(ds.item_raw_id).index("3")
    assert [ds.genre_vocab[g] for g in ds.item_genre_ids[row] if g] == ["Drama", "Comedy"]
    many = "|".join(f"g{n}" for n in range(65))
    _edit_line(d / "movies.csv", 4, f"3,Three (1993),{many}")
    with pytest.raises(DataError, match=r"item 3 lists 65 genres \(at most 64"):
        _load(d)


def test_the_installed_ml100k_copy_is_written_in_one_step(tmp_path, monkeypatch) -> None:
    """Copied file by file, a failure half-way left files without a manifest, and every
    later load failed on them instead of reading the installed copy."""
    from reclora.data import fetch

    src = tmp_path / "installed"
    src.mkdir()
    for name in fetch.ML100K_FILES:
        (src / name).write_text(f"{name}\n")
    monkeypatch.setattr(fetch, "installed_ml100k_dir", lambda: src)
    (src / fetch.ML100K_FILES[-1]).unlink()  # unreadable half-way
    with pytest.raises(OSError):
        fetch.copy_installed_ml100k(tmp_path / "data")
    assert not (tmp_path / "data" / "ml-100k").exists()
    (src / fetch.ML100K_FILES[-1]).write_text("back\n")
    dest = fetch.copy_installed_ml100k(tmp_path / "data")
    assert sorted(p.name for p in dest.iterdir()) == sorted([*fetch.ML100K_FILES,
                                                             fetch.MANIFEST])


@pytest.mark.parametrize("manifest", ["[]", '{"sha256": ["a"]}', '{"sha256": {"x": 1}}'])
def test_a_malformed_manifest_is_named(tmp_path, manifest) -> None:
    """A manifest that is JSON but not a map of file names to digests raised TypeError, a
    bug's traceback from the CLI."""
    from datagen import write_ml100k_recbole

    from reclora.data.paths import MANIFEST

    d = write_ml100k_recbole(tmp_path / "ml-100k", make_synthetic(seed=8))
    (d / MANIFEST).write_text(manifest)
    with pytest.raises(DataError, match=rf"{MANIFEST} is corrupt"):
        _load(d)
