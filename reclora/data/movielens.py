"""MovieLens readers: ML-100K (RecBole atomic files or GroupLens u.*), ML-1M, ML-25M.

Each returns ``RawData`` (splits.py applies the protocol). Formats:

- ML-100K, RecBole: ``ml-100k.inter`` (user_id, item_id, rating, timestamp),
  ``ml-100k.item`` (item_id, movie_title, release_year, class = space-separated genres),
  ``ml-100k.user`` (user_id, age, gender, occupation, zip_code); tab-separated with a typed
  header ("user_id:token"), UTF-8.
- ML-100K, GroupLens: ``u.data`` (tab), ``u.item`` and ``u.user`` ("|", latin-1).
- ML-1M: ``ratings.dat``, ``users.dat``, ``movies.dat`` with "::" separators, latin-1.
  These GroupLens files are also read as UTF-8 where a copy was re-saved so
  (_grouplens_text).
- ML-25M (and ML-20M): ``ratings.csv`` (userId,movieId,rating,timestamp) and
  ``movies.csv`` (movieId,title,genres with "|"), UTF-8, quoted titles.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from reclora.data.errors import DataError
from reclora.data.paths import HOW_TO_GET, MANIFEST, ML100K_FILES
from reclora.data.splits import RawData
from reclora.data.text import age_group

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _need(folder: Path, names: tuple[str, ...], dataset: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{dataset}: {folder} lacks {', '.join(missing)}; "
                        + HOW_TO_GET[dataset].format(dir=folder))


def verify_manifest(folder: Path, dataset: str) -> None:
    """If ``folder`` has a fetch manifest, check every file's sha256 against it."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return
    try:
        expected = json.loads(mf.read_text())["sha256"]
        if not (isinstance(expected, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in expected.items())):
            raise ValueError("its sha256 is not a map of file names to digests")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{dataset}: {mf} is corrupt ({e}); "
                        + HOW_TO_GET[dataset].format(dir=folder)) from e
    for name, digest in expected.items():
        p = folder / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            raise DataError(f"{dataset}: {p} is missing or corrupt (sha256 mismatch); "
                            + HOW_TO_GET[dataset].format(dir=folder))


def _numeric_table(text: str, ncols: int, what: str, delimiter: str = "\t") -> np.ndarray:
    """Parse a numeric table (no header) into float64 [N, ncols], naming the file on error."""
    try:
        arr = np.loadtxt(io.StringIO(text), delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{what}: malformed rows ({e})") from e
    if arr.shape[0] == 0 or arr.shape[1] != ncols:
        raise DataError(f"{what}: expected {ncols} columns, got shape {arr.shape}")
    return arr


# Ids and Unix-second timestamps are parsed as float64 (loadtxt's fast path) and must be
# integers float64 holds exactly: |v| <= 2^53.
EXACT_INT = 2.0 ** 53
STARS = (0.5, 5.0)  # every MovieLens release: whole stars, ML-20M/25M halves too


def check_interactions(arr: np.ndarray, what: str) -> None:
    """Reject what the int64 cast in _ml_raw would silently change, naming the data row
    (1-based, blank lines not counted): fractional or out-of-range ids and timestamps
    (past int64 the cast gave INT64_MIN) and non-finite ratings. A (user, item) pair rated
    twice is refused for every format by splits.check_unique_pairs."""
    for col, field in ((0, "user id"), (1, "item id"), (3, "timestamp")):
        v = arr[:, col]
        # 2^53 itself is out: 2^53 + 1 parses to it, so two ids there became one.
        bad = ~np.isfinite(v) | (np.abs(v) >= EXACT_INT) | (v != np.round(v))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            kind = "not a whole number" if np.isfinite(v[i]) and abs(v[i]) < EXACT_INT \
                else "out of range (under 2^53 in magnitude)"
            raise DataError(f"{what}: data row {i + 1}: {field} {float(v[i])!r} is {kind}")
    stars = arr[:, 2]
    # Labels and the prompts' scale come from the ratings: a 40 was a positive and made
    # the prompts say "(-1-40 stars)".
    bad = ~np.isfinite(stars) | (stars < STARS[0]) | (stars > STARS[1]) | (
        stars * 2 != np.round(stars * 2))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what}: data row {i + 1}: rating {float(stars[i])!r} is not on "
                        f"MovieLens' scale ({STARS[0]:g} to {STARS[1]:g} stars in half "
                        "steps)")


def normalise_id(raw: str) -> str:
    """A MovieLens id as the dataset holds it (RecDataset.user_raw_id / item_raw_id): ids are
    whole numbers, and the interactions' are read as numbers, so "007", " 7" and "+7" are
    "7". The user and item files' ids go through it, and so do serving's requests
    (base.id_normaliser). ValueError when it is not a whole number."""
    try:
        return str(int(str(raw)))  # str first: a float 7.5 is refused, not truncated
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number (MovieLens ids are)") from None


def _id_table(rows: list[tuple[int, str, dict]], what: str) -> dict[str, dict]:
    """id -> fields of a user or item file, from its (line number, id, fields) rows.

    MovieLens ids are whole numbers: a key is normalised as the interactions' ids are
    (normalise_id: "007" and " 7" are "7"; unnormalised, their interactions lost their
    item). A repeated id is refused with both lines (the last row silently won)."""
    table: dict[str, dict] = {}
    line_of: dict[str, int] = {}
    for no, raw_id, fields in rows:
        try:
            key = normalise_id(raw_id)
        except ValueError:
            raise DataError(f"{what}: line {no}: id {raw_id!r} is not a whole number") from None
        if key in line_of:
            raise DataError(f"{what}: line {no} repeats id {key} of line {line_of[key]} "
                            "(one row per id)")
        line_of[key] = no
        table[key] = fields
    return table


def _fields(line_no: int, line: str, sep: str, n: int, what: str) -> list[str]:
    """The n fields of one line of a metadata file, or a DataError naming the line."""
    f = line.split(sep)
    if len(f) != n:
        raise DataError(f"{what}: line {line_no} has {len(f)} {sep!r}-separated fields, "
                        f"expected {n}: {line[:80]!r}")
    return f


def _grouplens_text(path: Path) -> str:
    """The text of a GroupLens ML-100K or ML-1M file: UTF-8 if it decodes so, else latin-1.

    The originals are latin-1, but some mirrors and re-exports hold UTF-8 copies, which
    latin-1 (it decodes any bytes) garbled without a word ("MisÃ©rables"). Latin-1 accented
    text is almost never valid UTF-8 (an "é" byte would need two continuation bytes after
    it), so the originals still read as latin-1."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")


def _split_title_year(title: str) -> tuple[str, int | None]:
    m = _YEAR.search(title)
    return title, (int(m.group(1)) if m else None)


def _atomic(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A RecBole atomic file: header names (without ":type") and (line number, fields) of
    each non-blank row."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError(f"{path}: empty file")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [(no, ln.split("\t")) for no, ln in enumerate(lines[1:], 2) if ln]
    return header, rows


def read_ml100k(folder: Path) -> RawData:
    """ML-100K from RecBole atomic files, or from GroupLens u.data/u.item/u.user."""
    folder = Path(folder)
    if (folder / "ml-100k.inter").is_file():
        return _read_ml100k_recbole(folder)
    _need(folder, ("u.data", "u.item", "u.user"), "ml-100k")
    arr = _numeric_table(_grouplens_text(folder / "u.data"), 4, str(folder / "u.data"))
    check_interactions(arr, str(folder / "u.data"))
    rows = []
    for no, ln in enumerate(_grouplens_text(folder / "u.item").splitlines(), 1):
        if not ln.strip():
            continue
        f = _fields(no, ln, "|", 5 + len(ML100K_GENRES), str(folder / "u.item"))
        flags = f[5:5 + len(ML100K_GENRES)]
        genres = [g for g, x in zip(ML100K_GENRES, flags) if x == "1" and g != "unknown"]
        title, year = _split_title_year(f[1])
        rows.append((no, f[0], {"title": title, "genres": genres, "year": year}))
    items = _id_table(rows, str(folder / "u.item"))
    rows = []
    for no, ln in enumerate(_grouplens_text(folder / "u.user").splitlines(), 1):
        if ln.strip():
            f = _fields(no, ln, "|", 5, str(folder / "u.user"))
            rows.append((no, f[0], _ml100k_user(f[1], f[2], f[3], f[4])))
    users = _id_table(rows, str(folder / "u.user"))
    return _ml_raw("ml-100k", arr, items, users, ("gender", "age_group", "occupation", "zip"),
                   folder / "u.data", folder / "u.item", folder / "u.user")


def _ml100k_user(age: str, gender: str, occupation: str, zip_code: str) -> dict:
    a = int(age) if age.strip().isdigit() else None
    return {"age": str(a) if a is not None else "", "gender": gender,
            "occupation": occupation, "zip": zip_code,
            "age_group": age_group(a) if a is not None else ""}


def _read_ml100k_recbole(folder: Path) -> RawData:
    _need(folder, ML100K_FILES, "ml-100k")
    verify_manifest(folder, "ml-100k")
    inter = folder / "ml-100k.inter"
    text = inter.read_text(encoding="utf-8")
    head, _, body = text.partition("\n")
    cols = [h.split(":")[0] for h in head.split("\t")]
    want = ["user_id", "item_id", "rating", "timestamp"]
    if cols[:4] != want:
        raise DataError(f"{inter}: header {cols} is not {want}; "
                        + HOW_TO_GET["ml-100k"].format(dir=folder))
    arr = _numeric_table(body, len(cols), str(inter))[:, :4]
    check_interactions(arr, str(inter))
    header, rows = _atomic(folder / "ml-100k.item")
    ix = {h: i for i, h in enumerate(header)}
    for c in ("item_id", "movie_title", "release_year", "class"):
        if c not in ix:
            raise DataError(f"{folder / 'ml-100k.item'}: no column {c!r}")
    item_rows = []
    for no, f in rows:
        if len(f) != len(header):
            raise DataError(f"{folder / 'ml-100k.item'}: line {no} has {len(f)} fields, "
                            f"header has {len(header)}")
        year = f[ix["release_year"]]
        title = f[ix["movie_title"]]
        # RecBole strips the year from the title; put it back as in ML-1M ("Title (1995)").
        y = int(year) if year.isdigit() else None
        item_rows.append((no, f[ix["item_id"]], {
            "title": f"{title} ({y})" if y else title, "year": y,
            "genres": [g for g in f[ix["class"]].split() if g != "unknown"]}))
    items = _id_table(item_rows, str(folder / "ml-100k.item"))
    ufile = folder / "ml-100k.user"
    header, rows = _atomic(ufile)
    ix = {h: i for i, h in enumerate(header)}
    for c in ("user_id", "age", "gender", "occupation", "zip_code"):
        if c not in ix:
            raise DataError(f"{ufile}: no column {c!r} in its header {header}; "
                            + HOW_TO_GET["ml-100k"].format(dir=folder))
    user_rows = []
    for no, f in rows:
        if len(f) != len(header):
            raise DataError(f"{ufile}: line {no} has {len(f)} fields, header has "
                            f"{len(header)}")
        user_rows.append((no, f[ix["user_id"]], _ml100k_user(
            f[ix["age"]], f[ix["gender"]], f[ix["occupation"]], f[ix["zip_code"]])))
    users = _id_table(user_rows, str(ufile))
    return _ml_raw("ml-100k", arr, items, users, ("gender", "age_group", "occupation", "zip"),
                   inter, folder / "ml-100k.item", ufile)


def _ml_raw(source: str, arr: np.ndarray, items: dict, users: dict | None,
            user_fields: tuple[str, ...], inter_file: Path, item_file: Path,
            user_file: Path | None) -> RawData:
    files = {"interactions": str(inter_file), "items": str(item_file)}
    if users is not None:
        files["users"] = str(user_file)
    return RawData(name=source, source=source, kind="movie",
                   user=arr[:, 0].astype(np.int64), item=arr[:, 1].astype(np.int64),
                   rating=arr[:, 2].astype(np.float32), time=arr[:, 3].astype(np.int64),
                   items=items, users=users,
                   user_fields=user_fields if users is not None else (), files=files)


def read_ml1m(folder: Path) -> RawData:
    """ML-1M: "::"-separated, latin-1 (titles such as "Misérables, Les (1995)") or a UTF-8
    copy."""
    folder = Path(folder)
    _need(folder, ("ratings.dat", "movies.dat"), "ml-1m")
    text = _grouplens_text(folder / "ratings.dat").replace("::", "\t")
    arr = _numeric_table(text, 4, str(folder / "ratings.dat"))
    check_interactions(arr, str(folder / "ratings.dat"))
    rows = []
    for no, ln in enumerate(_grouplens_text(folder / "movies.dat").splitlines(), 1):
        if not ln.strip():
            continue
        f = _fields(no, ln, "::", 3, str(folder / "movies.dat"))
        title, year = _split_title_year(f[1])
        genres = [g for g in f[2].split("|") if g and g != "(no genres listed)"]
        rows.append((no, f[0], {"title": title, "genres": genres, "year": year}))
    items = _id_table(rows, str(folder / "movies.dat"))
    users = None
    if (folder / "users.dat").is_file():
        rows = []
        text = _grouplens_text(folder / "users.dat")
        for no, ln in enumerate(text.splitlines(), 1):
            if ln.strip():
                f = _fields(no, ln, "::", 5, str(folder / "users.dat"))
                rows.append((no, f[0], {"gender": f[1], "age": f[2], "occupation": f[3],
                                        "zip": f[4]}))
        users = _id_table(rows, str(folder / "users.dat"))
    return _ml_raw("ml-1m", arr, items, users, ("gender", "age", "occupation", "zip"),
                   folder / "ratings.dat", folder / "movies.dat", folder / "users.dat")


def read_ml25m(folder: Path) -> RawData:
    """ML-25M (or ML-20M): ratings.csv and movies.csv; no user demographics."""
    folder = Path(folder)
    _need(folder, ("ratings.csv", "movies.csv"), "ml-25m")
    with open(folder / "ratings.csv", encoding="utf-8") as fh:
        head = fh.readline().strip().split(",")
        if head[:4] != ["userId", "movieId", "rating", "timestamp"]:
            raise DataError(f"{folder / 'ratings.csv'}: header {head} is not "
                            "userId,movieId,rating,timestamp")
        try:
            # loadtxt's C parser: 0.27 s per million rows here (2M-row file, 2026-11).
            arr = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(f"{folder / 'ratings.csv'}: malformed rows ({e})") from e
    if arr.shape[0] == 0 or arr.shape[1] < 4:
        raise DataError(f"{folder / 'ratings.csv'}: no rows")
    check_interactions(arr[:, :4], str(folder / "ratings.csv"))
    rows = []
    with open(folder / "movies.csv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        head = next(reader, [])
        if head[:3] != ["movieId", "title", "genres"]:
            raise DataError(f"{folder / 'movies.csv'}: header {head} is not movieId,title,genres")
        for f in reader:
            if not f:
                continue
            if len(f) != 3:  # an unquoted comma in a title put its end into the genres
                raise DataError(f"{folder / 'movies.csv'}: line {reader.line_num} has "
                                f"{len(f)} fields, expected movieId,title,genres (a title "
                                "with a comma is quoted)")
            title, year = _split_title_year(f[1].strip())
            genres = [g for g in f[2].split("|") if g and g != "(no genres listed)"]
            rows.append((reader.line_num, f[0], {"title": title, "genres": genres,
                                                 "year": year}))
    items = _id_table(rows, str(folder / "movies.csv"))
    return _ml_raw("ml-25m", arr[:, :4], items, None, (), folder / "ratings.csv",
                   folder / "movies.csv", None)
