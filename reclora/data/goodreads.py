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
import warnings
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
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
    """Unix seconds of "Mon Aug 01 13:41:57 -0700 2016" (strptime is 5x slower). ValueError
    for anything else: calendar.timegm checks nothing (Aug 45 came back as Sep 14, a zone
    "0700" without its sign as +70 hours)."""
    p = s.split() if isinstance(s, str) else ()
    if len(p) != 6:
        raise ValueError(f"bad GoodReads date {s!r}")
    try:
        hh, mm, ss = (int(x) for x in p[3].split(":"))
        year, month, day = int(p[5]), _MONTHS[p[1]], int(p[2])
        tz = p[4]
        if len(tz) != 5 or tz[0] not in "+-" or not tz[1:].isdigit():
            raise ValueError
        tz_h, tz_m = int(tz[1:3]), int(tz[3:5])
    except (ValueError, KeyError):
        raise ValueError(f"bad GoodReads date {s!r}") from None
    if not (1 <= day <= calendar.monthrange(year, month)[1] and hh < 24 and mm < 60
            and ss < 61 and tz_h < 24 and tz_m < 60 and min(hh, mm, ss) >= 0):
        raise ValueError(f"bad GoodReads date {s!r} (a field out of range)")
    off = (tz_h * 3600 + tz_m * 60) * (-1 if tz[0] == "-" else 1)
    return calendar.timegm((year, month, day, hh, mm, ss)) - off


def _jsonl(path: Path, desc: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a gzipped JSON-lines file; DataError
    naming the file and line for a line that is not a JSON object or cannot be read."""
    no = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = tqdm(fh, desc=desc, unit=" rows", mininterval=2, disable=None)
            for no, ln in enumerate(lines, 1):
                if ln.strip():
                    try:
                        record = json.loads(ln)
                    except ValueError as e:
                        raise DataError(f"{path}: line {no} is not JSON ({e})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}: line {no} is a JSON "
                                        f"{type(record).__name__}, not an object")
                    yield no, record
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8
        raise DataError(f"{path}: cannot read it after line {no} ({type(e).__name__}: "
                        f"{e})") from None


# What reading a record's fields raises when they are not what the format says.
_FIELD_ERRORS = (KeyError, TypeError, AttributeError, ValueError)


def _malformed(path: Path, no: int, err: Exception) -> DataError:
    """The error for a record whose fields are not what the format says (one of
    _FIELD_ERRORS, raised reading them)."""
    return DataError(f"{path}: line {no}: malformed record ({type(err).__name__}: {err})")


def _id(r: dict, key: str) -> str:
    """A record's user_id / book_id / author_id: a string or a whole number, never null
    (str(None) made a user "None")."""
    value = r[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{key} {value!r} is not an id (a string or a whole number)")
    return normalise_id(value)


def _stars(r: dict) -> int:
    """A record's rating: a whole number of stars from 0 (shelved, unrated) to 5 (int() made
    4.7 a 4 and took 99)."""
    raw = r.get("rating", 0)
    if raw is None or raw == "":
        return 0
    try:
        stars = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        stars = None
    if stars is None or stars != int(stars) or not 0 <= stars <= 5:
        raise ValueError(f"rating {raw!r} is not a whole number of stars from 0 to 5")
    return int(stars)


@dataclass
class _Events:
    """The rated records of the interaction files, in file order, as flat arrays (44 B a
    row; lists of Python objects took 777 B): a row's user and book are codes into
    ``user_ids`` / ``book_ids`` (raw ids, in order of first appearance)."""

    user: np.ndarray  # int64 codes
    book: np.ndarray  # int64 codes
    rating: np.ndarray  # float32
    time: np.ndarray  # int64 Unix seconds
    file: np.ndarray  # index of the row's file in the list read (for error messages)
    line: np.ndarray  # its line number there (for error messages)
    user_ids: list[str]
    book_ids: list[str]


def _read_events(files: list[Path]) -> _Events:
    """Stream the rated records (rating > 0, with a date) of ``files`` into ``_Events``."""
    user_code: dict[str, int] = {}  # raw id -> code; its keys, in order, are the id table
    book_code: dict[str, int] = {}
    user, book, time, line = array("q"), array("q"), array("q"), array("q")
    rating = array("d")  # holds any whole-number rating exactly until the float32 cast
    per_file = []
    undated = 0
    for f in files:
        start = len(user)
        for no, r in _jsonl(f, f.name):
            try:
                stars = _stars(r)
                if stars == 0:
                    continue
                date = r.get("date_added") or r.get("date_updated")
                if not date:
                    undated += 1
                    continue
                u, b, t = _id(r, "user_id"), _id(r, "book_id"), parse_goodreads_time(date)
            except _FIELD_ERRORS as e:
                raise _malformed(f, no, e) from None
            user.append(user_code.setdefault(u, len(user_code)))
            book.append(book_code.setdefault(b, len(book_code)))
            rating.append(stars)
            time.append(t)
            line.append(no)
        per_file.append(len(user) - start)
    if undated:  # the split orders by time: a rating without one cannot be placed
        warnings.warn(f"goodreads: {undated} rated records have no date_added or "
                      "date_updated and were left out", stacklevel=2)
    # np.asarray views the arrays' buffers (int64, float64): no copy.
    return _Events(user=np.asarray(user), book=np.asarray(book),
                   rating=np.asarray(rating).astype(np.float32), time=np.asarray(time),
                   file=np.repeat(np.arange(len(files), dtype=np.int64), per_file),
                   line=np.asarray(line), user_ids=list(user_code), book_ids=list(book_code))


def _drop_repeated_events(ev: _Events, names: list[str]) -> np.ndarray:
    """Mask of the interactions to keep: an event listed identically (rating and time) in
    several genre files is kept once, the first; any other repeat of a (user, book) pair is
    refused, a pair twice in one file too (a file lists an event once). ``names``: the
    files ``ev.file`` indexes."""
    later, first = repeated_pairs(ev.user, ev.book)
    differ = (ev.rating[later] != ev.rating[first]) | (ev.time[later] != ev.time[first])
    in_file_later, in_file_first = repeated_pairs(ev.user * len(names) + ev.file, ev.book)
    bad_later = np.r_[later[differ], in_file_later]
    if bad_later.size:
        j = int(np.argmin(bad_later))
        b, a = int(bad_later[j]), int(np.r_[first[differ], in_file_first][j])
        raise DataError(
            f"goodreads: {names[ev.file[a]]} line {ev.line[a]} and {names[ev.file[b]]} line "
            f"{ev.line[b]} both rate book {ev.book_ids[ev.book[a]]} by user "
            f"{ev.user_ids[ev.user[a]]} (ratings {ev.rating[a]:g} and {ev.rating[b]:g}, "
            f"times {ev.time[a]} and {ev.time[b]}); a pair may be rated once, or repeated "
            "identically in overlapping genre files")
    keep = np.ones(ev.user.size, dtype=bool)
    keep[later] = False
    return keep


def _id_array(ids: list[str]) -> np.ndarray:
    """``ids`` as an object array: indexed by codes it gives RawData one shared str per
    distinct id, 8 B a row (a "<U32" copy: 128 B). build_dataset's np.unique sorts it as
    fast, in far less memory (2M rows, 80k distinct 32-hex ids as GoodReads' users: 2.3 s
    and a peak of 50 B a row, vs 2.5 s and 414 B for "<U32")."""
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out


def _interactions(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                               set[str]]:
    """Raw user and book ids, ratings and times of the interactions in ``files`` (repeats
    across genre files read once), and the set of books they rate. The codes, lines and
    file indices are dropped on return, before the books are read."""
    ev = _read_events(files)
    if not ev.user.size:
        raise DataError(f"goodreads: no rated interactions in {[f.name for f in files]}")
    keep = _drop_repeated_events(ev, [str(f) for f in files])
    users, books = _id_array(ev.user_ids)[ev.user[keep]], _id_array(ev.book_ids)[ev.book[keep]]
    # A dropped row repeats a kept one, so every book keeps a row.
    return users, books, ev.rating[keep], ev.time[keep], set(ev.book_ids)


def _book(r: dict, genres: list[str] | None, author_names: dict[str, str]) -> dict:
    """A books-file record's fields (genres: the genres file's, else its popular shelves)."""
    authors = [str(a.get("author_id", "")) for a in r.get("authors") or [] if a]
    year = str(r.get("publication_year", "") or "")
    if genres is None:
        shelves = sorted(r.get("popular_shelves") or [],
                         key=lambda s: -int(s.get("count", 0) or 0))
        genres = [str(s["name"]) for s in shelves if s.get("name") not in _NON_GENRE_SHELVES]
        genres = genres[:MAX_GENRES]
    names = [author_names[a] for a in authors if author_names.get(a)]
    return {
        "title": str(r.get("title") or r.get("title_without_series") or "").strip(),
        "genres": genres, "year": int(year) if year.isdigit() else None,
        "author": authors[0] if authors else "",
        "authors_text": ", ".join(names[:2]),
    }


def read_goodreads(folder: Path) -> RawData:
    folder = Path(folder)
    inter_files = sorted(folder.glob("goodreads_interactions*.json.gz"))
    book_files = sorted(folder.glob("goodreads_books*.json.gz"))
    if not inter_files or not book_files:
        raise DataError(f"goodreads: {folder} needs goodreads_interactions_*.json.gz and "
                        "goodreads_books_*.json.gz; "
                        + HOW_TO_GET["goodreads"].format(dir=folder))
    users, books, ratings, times, wanted = _interactions(inter_files)

    genres: dict[str, list[str]] = {}
    gfile = folder / "goodreads_book_genres_initial.json.gz"
    if gfile.is_file():
        for no, r in _jsonl(gfile, gfile.name):
            try:
                b = _id(r, "book_id")
                if b in wanted and r.get("genres"):
                    top = sorted(r["genres"].items(), key=lambda kv: -int(kv[1]))[:MAX_GENRES]
                    genres[b] = [str(g) for g, _ in top]
            except _FIELD_ERRORS as e:
                raise _malformed(gfile, no, e) from None
    author_names: dict[str, str] = {}
    afile = folder / "goodreads_book_authors.json.gz"
    if afile.is_file():
        for no, r in _jsonl(afile, afile.name):
            try:
                author_names[_id(r, "author_id")] = str(r.get("name") or "")
            except _FIELD_ERRORS as e:
                raise _malformed(afile, no, e) from None

    items: dict[str, dict] = {}
    for f in book_files:
        for no, r in _jsonl(f, f.name):
            try:
                b = _id(r, "book_id")
                if b not in wanted or b in items:  # books files overlap as the genres do
                    continue
                items[b] = _book(r, genres.get(b), author_names)
            except _FIELD_ERRORS as e:
                raise _malformed(f, no, e) from None
    return RawData(name="goodreads", source="goodreads", kind="book", user=users, item=books,
                   rating=ratings, time=times, items=items, users=None,
                   item_fields=("author",),
                   files={"items": ", ".join(str(f) for f in book_files)})
