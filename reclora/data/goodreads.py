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
from reclora.data.splits import RawData

_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                       "Sep", "Oct", "Nov", "Dec"), start=1)}
# Shelves that say nothing about a book's content, skipped when shelves stand in for genres.
_NON_GENRE_SHELVES = {"to-read", "currently-reading", "read", "owned", "favorites",
                      "books-i-own", "to-buy", "default", "my-books", "library", "kindle",
                      "wish-list", "ebook", "ebooks", "owned-books", "favourites"}
MAX_GENRES = 3


def parse_goodreads_time(s: str) -> int:
    """Unix seconds of "Mon Aug 01 13:41:57 -0700 2016" (strptime is 5x slower)."""
    p = s.split()
    if len(p) != 6:
        raise ValueError(f"bad GoodReads date {s!r}")
    hh, mm, ss = (int(x) for x in p[3].split(":"))
    tz = p[4]
    off = (int(tz[1:3]) * 3600 + int(tz[3:5]) * 60) * (-1 if tz[0] == "-" else 1)
    return calendar.timegm((int(p[5]), _MONTHS[p[1]], int(p[2]), hh, mm, ss)) - off


def _jsonl(path: Path, desc: str) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for ln in tqdm(fh, desc=desc, unit=" rows", mininterval=2, disable=None):
            if ln.strip():
                yield json.loads(ln)


def read_goodreads(folder: Path) -> RawData:
    folder = Path(folder)
    inter_files = sorted(folder.glob("goodreads_interactions*.json.gz"))
    book_files = sorted(folder.glob("goodreads_books*.json.gz"))
    if not inter_files or not book_files:
        raise DataError(f"goodreads: {folder} needs goodreads_interactions_*.json.gz and "
                        "goodreads_books_*.json.gz; "
                        + HOW_TO_GET["goodreads"].format(dir=folder))
    users, books, ratings, times = [], [], [], []
    for f in inter_files:
        for r in _jsonl(f, f.name):
            rating = int(r.get("rating", 0) or 0)
            if rating <= 0:
                continue
            date = r.get("date_added") or r.get("date_updated")
            if not date:
                continue
            users.append(str(r["user_id"]))
            books.append(str(r["book_id"]))
            ratings.append(rating)
            times.append(parse_goodreads_time(date))
    if not users:
        raise DataError(f"goodreads: no rated interactions in {[f.name for f in inter_files]}")
    wanted = set(books)

    genres: dict[str, list[str]] = {}
    gfile = folder / "goodreads_book_genres_initial.json.gz"
    if gfile.is_file():
        for r in _jsonl(gfile, gfile.name):
            b = str(r["book_id"])
            if b in wanted and r.get("genres"):
                top = sorted(r["genres"].items(), key=lambda kv: -int(kv[1]))[:MAX_GENRES]
                genres[b] = [g for g, _ in top]
    author_names: dict[str, str] = {}
    afile = folder / "goodreads_book_authors.json.gz"
    if afile.is_file():
        author_names = {str(r["author_id"]): r.get("name", "") for r in _jsonl(afile, afile.name)}

    items: dict[str, dict] = {}
    for f in book_files:
        for r in _jsonl(f, f.name):
            b = str(r["book_id"])
            if b not in wanted:
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
    return RawData(name="goodreads", source="goodreads", kind="book",
                   user=np.array(users), item=np.array(books),
                   rating=np.array(ratings, dtype=np.float32),
                   time=np.array(times, dtype=np.int64), items=items, users=None,
                   item_fields=("author",))
