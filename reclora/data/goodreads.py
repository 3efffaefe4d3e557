"""GoodReads reader (UCSD Book Graph, Wan & McAuley 2018), one line of JSON per record.

A folder holding:

- ``goodreads_interactions_<genre>.json.gz`` (one or more): user_id, book_id, rating
  (0 = shelved without a rating: dropped), date_added ("Mon Aug 01 13:41:57 -0700 2016"),
  date_updated, ...;
- ``goodreads_books_<genre>.json.gz``: book_id, title, authors [{author_id, role}],
  publication_year, popular_shelves [{count, name}], publisher, ...;
- optionally ``goodreads_book_genres_initial.json.gz`` (book_id, genres {name: count}) and
  ``goodreads_book_authors.json.gz`` (author_id, name).

The event time is ``date_added`` (present on every record; ``read_at`` is often empty),
falling back to ``date_updated``.

The genre files overlap (a book can be in several genres), so one rating event can appear in
several interaction files: identical records (same user, book, rating and time) in different
files are read once, the first in file-name order. Any other repeat of a (user, book) pair is
refused, naming both files and lines. A book listed in several books files is read from the
first.
"""

from __future__ import annotations

import calendar
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from reclora.data.errors import DataError
from reclora.data.paths import HOW_TO_GET
from reclora.data.splits import RawData, repeated_pairs

_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                       "Sep", "Oct", "Nov", "Dec"), start=1)}
# Shelves that say nothing about a book's content, skipped when shelves stand in for genres.
_NON_GENRE_SHELVES = {"to-read", "currently-reading", "read", "owned", "favorites",
                      "books-i-own", "to-buy", "default", "my-books", "library", "kindle",
                      "wish-list", "ebook", "ebooks", "owned-books", "favourites"}
MAX_GENRES = 3


def normalise_id(raw: object) -> str:
    """A GoodReads user or book id as the dataset holds it: its string, verbatim (ids are
    strings: "007" is not "7"). Serving's requests go through it too (base.id_normaliser)."""
    return str(raw)


def parse_goodreads_time(s: str) -> int:
    """Unix seconds of "Mon Aug 01 13:41:57 -0700 2016" (strptime is 5x slower)."""
    p = s.split()
    if len(p) != 6:
        raise ValueError(f"bad GoodReads date {s!r}")
    hh, mm, ss = (int(x) for x in p[3].split(":"))
    tz = p[4]
    off = (int(tz[1:3]) * 3600 + int(tz[3:5]) * 60) * (-1 if tz[0] == "-" else 1)
    return calendar.timegm((int(p[5]), _MONTHS[p[1]], int(p[2]), hh, mm, ss)) - off


def _jsonl(path: Path, desc: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a gzipped JSON-lines file."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = tqdm(fh, desc=desc, unit=" rows", mininterval=2, disable=None)
        for no, ln in enumerate(lines, 1):
            if ln.strip():
                try:
                    yield no, json.loads(ln)
                except ValueError as e:
                    raise DataError(f"{path}: line {no} is not JSON ({e})") from None


def _drop_repeated_events(users: np.ndarray, books: np.ndarray, ratings: np.ndarray,
                          times: np.ndarray, src: np.ndarray, names: list[str]) -> np.ndarray:
    """Mask of the interactions to keep: an event listed identically (rating and time) in
    several genre files is kept once, the first; any other repeat of a (user, book) pair is
    refused, a pair twice in one file too (a file lists an event once).

    ``src`` [N, 2]: each interaction's file (index into ``names``) and line number.
    """
    user = np.unique(users, return_inverse=True)[1].reshape(-1)
    book = np.unique(books, return_inverse=True)[1].reshape(-1)
    later, first = repeated_pairs(user, book)
    differ = (ratings[later] != ratings[first]) | (times[later] != times[first])
    in_file_later, in_file_first = repeated_pairs(user * len(names) + src[:, 0], book)
    bad_later = np.r_[later[differ], in_file_later]
    if bad_later.size:
        j = int(np.argmin(bad_later))
        b, a = int(bad_later[j]), int(np.r_[first[differ], in_file_first][j])
        raise DataError(
            f"goodreads: {names[src[a, 0]]} line {src[a, 1]} and {names[src[b, 0]]} line "
            f"{src[b, 1]} both rate book {str(books[a])} by user {str(users[a])} (ratings "
            f"{ratings[a]:g} and {ratings[b]:g}, times {times[a]} and {times[b]}); a pair "
            "may be rated once, or repeated identically in overlapping genre files")
    keep = np.ones(users.size, dtype=bool)
    keep[later] = False
    return keep


def read_goodreads(folder: Path) -> RawData:
    folder = Path(folder)
    inter_files = sorted(folder.glob("goodreads_interactions*.json.gz"))
    book_files = sorted(folder.glob("goodreads_books*.json.gz"))
    if not inter_files or not book_files:
        raise DataError(f"goodreads: {folder} needs goodreads_interactions_*.json.gz and "
                        "goodreads_books_*.json.gz; "
                        + HOW_TO_GET["goodreads"].format(dir=folder))
    users, books, ratings, times, src = [], [], [], [], []
    for k, f in enumerate(inter_files):
        for no, r in _jsonl(f, f.name):
            rating = int(r.get("rating", 0) or 0)
            if rating <= 0:
                continue
            date = r.get("date_added") or r.get("date_updated")
            if not date:
                continue
            users.append(normalise_id(r["user_id"]))
            books.append(normalise_id(r["book_id"]))
            ratings.append(rating)
            times.append(parse_goodreads_time(date))
            src.append((k, no))
    if not users:
        raise DataError(f"goodreads: no rated interactions in {[f.name for f in inter_files]}")
    users, books = np.array(users), np.array(books)
    ratings, times = np.array(ratings, dtype=np.float32), np.array(times, dtype=np.int64)
    keep = _drop_repeated_events(users, books, ratings, times,
                                 np.array(src, dtype=np.int64).reshape(-1, 2),
                                 [str(f) for f in inter_files])
    users, books, ratings, times = users[keep], books[keep], ratings[keep], times[keep]
    wanted = set(books.tolist())

    genres: dict[str, list[str]] = {}
    gfile = folder / "goodreads_book_genres_initial.json.gz"
    if gfile.is_file():
        for _, r in _jsonl(gfile, gfile.name):
            b = normalise_id(r["book_id"])
            if b in wanted and r.get("genres"):
                top = sorted(r["genres"].items(), key=lambda kv: -int(kv[1]))[:MAX_GENRES]
                genres[b] = [g for g, _ in top]
    author_names: dict[str, str] = {}
    afile = folder / "goodreads_book_authors.json.gz"
    if afile.is_file():
        author_names = {str(r["author_id"]): r.get("name", "")
                        for _, r in _jsonl(afile, afile.name)}

    items: dict[str, dict] = {}
    for f in book_files:
        for _, r in _jsonl(f, f.name):
            b = normalise_id(r["book_id"])
            if b not in wanted or b in items:  # books files overlap as the genres do
                continue
            authors = [str(a.get("author_id", "")) for a in r.get("authors", []) if a]
            year = str(r.get("publication_year", "") or "")
            g = genres.get(b)
            if g is None:
                shelves = sorted(r.get("popular_shelves", []),
                                 key=lambda s: -int(s.get("count", 0) or 0))
                g = [s["name"] for s in shelves if s.get("name") not in _NON_GENRE_SHELVES]
                g = g[:MAX_GENRES]
            names = [author_names[a] for a in authors if author_names.get(a)]
            items[b] = {
                "title": (r.get("title") or r.get("title_without_series") or "").strip(),
                "genres": g, "year": int(year) if year.isdigit() else None,
                "author": authors[0] if authors else "",
                "authors_text": ", ".join(names[:2]),
            }
    return RawData(name="goodreads", source="goodreads", kind="book", user=users, item=books,
                   rating=ratings, time=times, items=items, users=None,
                   item_fields=("author",),
                   files={"items": ", ".join(str(f) for f in book_files)})
