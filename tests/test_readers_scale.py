"""Scale audit findings 2 and 4: the GoodReads reader holds compact arrays, not Python objects
per interaction, and the GroupLens MovieLens files load from a UTF-8 copy as from the
latin-1 original."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from datagen import make_synthetic, write_goodreads, write_ml1m, write_ml100k_grouplens

from reclora.data import DataError, load_dataset
from reclora.data.goodreads import parse_goodreads_time, read_goodreads


# ------------------------------------------------------------- 2: GoodReads memory
def test_goodreads_reader_memory_per_interaction(tmp_path: Path) -> None:
    """The reader kept a Python str per user and book, an int per time and a tuple per
    (file, line) for every interaction: 572 B each traced here (777 B of RSS at 500k rows).
    Codes in flat arrays and one shared str per distinct id: 99 B here (44 B of arrays, the
    rest the book and id tables); fixed-width "<U32" id arrays would be 228 B."""
    d = write_goodreads(tmp_path / "g", make_synthetic(seed=3, n_users=500, n_items=40,
                                                       per_user=(10, 10)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        raw = read_goodreads(d)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert raw.user.size == 5000
    assert peak / raw.user.size < 150, f"{peak / raw.user.size:.0f} B per interaction"


def _write_interactions(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in lines))


def test_goodreads_reader_matches_a_plain_python_oracle(tmp_path: Path) -> None:
    """Raw ids verbatim ("007" is not "7"; a JSON number 7 is "7"), file-name order, blank
    and unrated lines skipped, and a record repeated in an overlapping genre file read once:
    the codes the reader streams into give back exactly the rows a plain parse gives."""
    date = "Mon Aug 01 13:41:57 -0700 2016"
    recs = [{"user_id": u, "book_id": b, "rating": r, "date_added": date if k % 3 else "",
             "date_updated": f"Tue Aug 02 0{k % 10}:00:00 +0530 2016"}
            for k, (u, b, r) in enumerate([("u1", "007", 5), ("u1", "7", 3), ("u2", 7, 4),
                                           ("u3", "007", 0), ("u3", "12", 2), ("u2", "12", 1),
                                           ("u10", "007", 4)])]
    a = [json.dumps(r) for r in recs[:5]]
    b = [json.dumps(recs[2]), "", json.dumps(recs[5]), json.dumps(recs[6])]
    _write_interactions(tmp_path / "goodreads_interactions_b.json.gz", b)
    _write_interactions(tmp_path / "goodreads_interactions_a.json.gz", ["", *a])
    _write_interactions(tmp_path / "goodreads_books_a.json.gz",
                        [json.dumps({"book_id": x, "title": f"B{x}"}) for x in ("7", "007")])
    raw = read_goodreads(tmp_path)
    seen, want = set(), []
    for name in ("a", "b"):  # the oracle
        with gzip.open(tmp_path / f"goodreads_interactions_{name}.json.gz", "rt") as f:
            for r in (json.loads(ln) for ln in f if ln.strip()):
                key = (str(r["user_id"]), str(r["book_id"]), r["rating"],
                       parse_goodreads_time(r["date_added"] or r["date_updated"]))
                if r["rating"] > 0 and key not in seen:
                    seen.add(key)
                    want.append(key)
    got = list(zip(raw.user.tolist(), raw.item.tolist(), raw.rating.tolist(),
                   raw.time.tolist()))
    assert got == want and len(want) == 6
    assert raw.rating.dtype == np.float32 and raw.time.dtype == np.int64
    assert sorted(raw.items) == ["007", "7"]  # book "12" has no row in the books file
    # Nothing rated at all: refused, naming the files.
    for name in ("a", "b"):
        _write_interactions(tmp_path / f"goodreads_interactions_{name}.json.gz",
                            [json.dumps(recs[3])])
    with pytest.raises(DataError, match=r"no rated interactions in \['goodreads_interactions_a"):
        read_goodreads(tmp_path)


# ------------------------------------------------ 4: GroupLens files saved as UTF-8
@pytest.mark.parametrize("writer", [write_ml1m, write_ml100k_grouplens])
def test_grouplens_utf8_copy_loads_as_the_latin1_original(tmp_path: Path, writer) -> None:
    """latin-1 decodes any bytes, so a UTF-8 copy of movies.dat or u.item loaded with every
    accented title garbled ("MisÃ©rables"); it is read as UTF-8 now, the original as
    latin-1, to the same dataset."""
    syn = make_synthetic(n_items=20)
    original = load_dataset(writer(tmp_path / "latin1", syn), min_history=1, core=1)
    d = writer(tmp_path / "utf8", syn)
    for p in d.iterdir():
        p.write_text(p.read_text(encoding="latin-1"), encoding="utf-8")
    assert b"Mis\xc3\xa9rables" in (d / ("movies.dat" if writer is write_ml1m
                                          else "u.item")).read_bytes()
    copy = load_dataset(d, min_history=1, core=1)
    assert "Misérables, Les (1991)" in copy.item_title
    assert copy.item_title == original.item_title
    assert copy.user_profile == original.user_profile
    assert np.array_equal(copy.user, original.user) and np.array_equal(copy.time,
                                                                       original.time)
