"""Small datasets written in the real file formats, from a fresh random generator.

Every writer takes the same ``Synthetic`` ratings table so tests can compare formats. Times
are drawn from a narrow range so many of a user's ratings share a second, like ML-100K.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Children's", "Film-Noir", "Romance"]
TITLES = ["Misérables, Les", "American President, The", "Toy Story", "Ran", "Heat",
          "Amélie", "Se7en", "Babe", "Casino", "Clueless", "Fargo", "Jumanji", "Sabrina",
          "Nixon", "Balto", "Othello", "Now and Then", "Persuasion", "Twelve Monkeys",
          "Cry, the Beloved Country"]


def fresh_seed() -> int:
    """A seed from numpy's global RNG, which conftest seeds per test from its node id."""
    return int(np.random.randint(0, 2**31 - 1))


@dataclass
class Synthetic:
    seed: int
    user: np.ndarray  # raw ids, 1-based
    item: np.ndarray
    rating: np.ndarray  # 1..5 ints (ML-25M writer maps to half stars)
    time: np.ndarray
    n_users: int
    n_items: int

    def __repr__(self) -> str:
        return f"Synthetic(seed={self.seed}, n={self.user.size})"


def make_synthetic(seed: int | None = None, n_users: int = 14, n_items: int = 20,
                   per_user: tuple[int, int] = (8, 16), time_span: int = 40) -> Synthetic:
    """Each user rates a random subset of items (no repeats) at times with many ties."""
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    us, its, rs, ts = [], [], [], []
    for u in range(1, n_users + 1):
        k = int(rng.integers(per_user[0], min(per_user[1], n_items) + 1))
        items = rng.choice(np.arange(1, n_items + 1), size=k, replace=False)
        times = 1_000_000_000 + rng.integers(0, time_span, size=k)
        us += [u] * k
        its += items.tolist()
        rs += rng.integers(1, 6, size=k).tolist()
        ts += times.tolist()
    perm = rng.permutation(len(us))  # files are not sorted by time
    return Synthetic(seed, np.array(us)[perm], np.array(its)[perm], np.array(rs)[perm],
                     np.array(ts)[perm], n_users, n_items)


def _genres(i: int) -> list[str]:
    return [GENRES[i % len(GENRES)], GENRES[(3 * i + 1) % len(GENRES)]][: 1 + i % 2]


def _title(i: int) -> str:
    return TITLES[(i - 1) % len(TITLES)]


def write_ml100k_recbole(d: Path, s: Synthetic) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "ml-100k.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for row in zip(s.user, s.item, s.rating, s.time):
            f.write("\t".join(str(x) for x in row) + "\n")
    with open(d / "ml-100k.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, s.n_items + 1):
            g = " ".join(_genres(i)) if i != 3 else "unknown"
            f.write(f"{i}\t{_title(i)}\t{1990 + i}\t{g}\n")
    with open(d / "ml-100k.user", "w") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        for u in range(1, s.n_users + 1):
            f.write(f"{u}\t{15 + 3 * u}\t{'MF'[u % 2]}\ttechnician\t{10000 + u}\n")
    return d


def write_ml1m(d: Path, s: Synthetic) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "ratings.dat", "w", encoding="latin-1") as f:
        for row in zip(s.user, s.item, s.rating, s.time):
            f.write("::".join(str(x) for x in row) + "\n")
    with open(d / "movies.dat", "w", encoding="latin-1") as f:
        for i in range(1, s.n_items + 1):
            f.write(f"{i}::{_title(i)} ({1990 + i})::{'|'.join(_genres(i))}\n")
    ages = ["1", "18", "25", "35", "45", "50", "56"]
    with open(d / "users.dat", "w", encoding="latin-1") as f:
        for u in range(1, s.n_users + 1):
            f.write(f"{u}::{'MF'[u % 2]}::{ages[u % 7]}::{u % 21}::{10000 + u}\n")
    return d


def ml25m_rating(r: int, i: int) -> float:
    """Map 1..5 to half stars 0.5..5 deterministically (3 -> 3.0 or 3.5 by parity)."""
    return float(r) - (0.5 if (i % 2 and r > 1) else 0.0) + (0.5 if (i % 3 == 0 and r == 3)
                                                             else 0.0)


def write_ml25m(d: Path, s: Synthetic) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "ratings.csv", "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for j, row in enumerate(zip(s.user, s.item, s.rating, s.time)):
            f.write(f"{row[0]},{row[1]},{ml25m_rating(int(row[2]), j)},{row[3]}\n")
    with open(d / "movies.csv", "w", encoding="utf-8") as f:
        f.write("movieId,title,genres\n")
        for i in range(1, s.n_items + 1):
            t = f"{_title(i)} ({1990 + i})"
            t = f'"{t}"' if "," in t else t
            g = "|".join(_genres(i)) if i != 2 else "(no genres listed)"
            f.write(f"{i},{t},{g}\n")
    return d


def goodreads_date(t: int, tz_hours: int) -> str:
    """The GoodReads format for Unix time t shown in a UTC offset of tz_hours."""
    tz = timezone(timedelta(hours=tz_hours))
    return datetime.fromtimestamp(int(t), tz).strftime("%a %b %d %H:%M:%S %z %Y")


def write_goodreads(d: Path, s: Synthetic, unrated_every: int = 5) -> Path:
    """Interactions (every ``unrated_every``-th also appears shelved with rating 0), books,
    genres and authors, gzipped JSON lines."""
    d.mkdir(parents=True, exist_ok=True)
    uid = {u: f"{u:032x}" for u in range(1, s.n_users + 1)}
    with gzip.open(d / "goodreads_interactions_poetry.json.gz", "wt", encoding="utf-8") as f:
        for j, (u, i, r, t) in enumerate(zip(s.user, s.item, s.rating, s.time)):
            rec = {"user_id": uid[int(u)], "book_id": str(1000 + int(i)), "review_id": f"r{j}",
                   "is_read": True, "rating": int(r),
                   "date_added": goodreads_date(int(t), -7 + j % 10),
                   "date_updated": goodreads_date(int(t) + 99, 0), "read_at": "",
                   "started_at": ""}
            f.write(json.dumps(rec) + "\n")
            if j % unrated_every == 0:  # a shelved, unrated book: must be dropped
                rec = dict(rec, rating=0, book_id=str(1000 + 1 + int(i) % s.n_items))
                f.write(json.dumps(rec) + "\n")
    with gzip.open(d / "goodreads_books_poetry.json.gz", "wt", encoding="utf-8") as f:
        for i in range(1, s.n_items + 1):
            rec = {"book_id": str(1000 + i), "title": f"Poems {_title(i)}",
                   "title_without_series": f"Poems {_title(i)}",
                   "authors": [{"author_id": str(50 + i % 4), "role": ""}],
                   "publication_year": str(1990 + i) if i % 4 else "",
                   "popular_shelves": [{"count": "90", "name": "to-read"},
                                       {"count": "12", "name": f"shelf-{i % 3}"}]}
            f.write(json.dumps(rec) + "\n")
    with gzip.open(d / "goodreads_book_genres_initial.json.gz", "wt", encoding="utf-8") as f:
        for i in range(1, s.n_items + 1, 2):  # odd books only: the rest fall back to shelves
            f.write(json.dumps({"book_id": str(1000 + i),
                                "genres": {"poetry": 10, "fiction": 3 + i}}) + "\n")
    with gzip.open(d / "goodreads_book_authors.json.gz", "wt", encoding="utf-8") as f:
        for a in range(50, 54):
            f.write(json.dumps({"author_id": str(a), "name": f"Poet {a}"}) + "\n")
    return d


def write_ml100k_grouplens(d: Path, s: Synthetic) -> Path:
    """The original GroupLens ML-100K files: u.data (tab), u.item and u.user ("|", latin-1,
    19 genre flags, titles with the year)."""
    from reclora.data.movielens import ML100K_GENRES

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "u.data", "w") as f:
        for row in zip(s.user, s.item, s.rating, s.time):
            f.write("\t".join(str(x) for x in row) + "\n")
    with open(d / "u.item", "w", encoding="latin-1") as f:
        for i in range(1, s.n_items + 1):
            flags = ["1" if g in _genres(i) else "0" for g in ML100K_GENRES]
            f.write(f"{i}|{_title(i)} ({1990 + i})|01-Jan-{1990 + i}||http://x|"
                    + "|".join(flags) + "\n")
    with open(d / "u.user", "w", encoding="latin-1") as f:
        for u in range(1, s.n_users + 1):
            f.write(f"{u}|{15 + 3 * u}|{'MF'[u % 2]}|technician|{10000 + u}\n")
    return d


def one_heavy_user(name: str, n_light: int, heavy: int, light: int, n_items: int,
                   title: str, n_titles: int, seed: int = 0):
    """A built dataset (ML-25M format) where user 0 rated `heavy` items and `n_light` other
    users `light` each: a long-tailed history length, in random times. Items are titled
    "<title> <i mod n_titles>" (few words, for tiny tokenizers)."""
    from reclora.data.splits import RawData, build_dataset

    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_light + 1):
        k = heavy if u == 0 else light
        users += [u] * k
        items += rng.choice(n_items, k, replace=False).tolist()
    n = len(users)
    raw = RawData(name, "ml-25m", "movie", np.array(users), np.array(items),
                  rng.integers(1, 6, n).astype(np.float32), rng.permutation(n).astype(np.int64),
                  {str(i): {"title": f"{title} {i % n_titles}", "genres": ["Drama"]}
                   for i in range(n_items)})
    return build_dataset(raw, min_history=1, core=1)
