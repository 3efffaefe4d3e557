"""The dataset API the rest of reclora builds on.

    ds = load_dataset("ml-100k")            # or "ml-1m", "ml-25m", "goodreads", or a path
    ds.train, ds.valid, ds.test             # int64 indices of samples into the interaction arrays
    ds.user[i], ds.item[i], ds.label[i]     # the sample's user, target item and 0/1 label
    items, ratings, times = ds.history(i)   # its user's interactions strictly before ds.time[i]
    hb = ds.recent_history(ds.train[:64], k=60)   # HistoryBatch of padded torch tensors [B, K]

Conventions (the contract; tests in tests/test_data.py hold each one):

- IDs: users and items are 0-based and contiguous after 5-core filtering (``0 <= user <
  n_users``, ``0 <= item < n_items``). ``user_raw_id`` / ``item_raw_id`` map back to the
  dataset's own ids (as strings).
- Interactions: the arrays ``user``, ``item``, ``rating`` (float32), ``time`` (int64, Unix
  seconds), ``label`` (int64 0/1) are sorted by time, ties kept in file order (stable).
  Index ``i`` names one interaction everywhere.
- Labels: ML-100K and ML-1M positive at rating >= 4, ML-25M at rating > 3.0, GoodReads at
  rating >= 4 (``label_rule`` says which).
- History: per-user CSR in time order. ``hist_index[hist_ptr[u]:hist_ptr[u + 1]]`` are user
  ``u``'s interaction indices, oldest first; ``hist_item`` / ``hist_rating`` / ``hist_time``
  are the same gathered. The history of interaction ``i`` is the first ``hist_len[i]``
  entries of its user's row: exactly the interactions with time strictly before ``time[i]``
  (ML-100K has many same-second ratings; those are not history of each other).
- Samples: interactions with ``hist_len >= min_history`` (default 5). ``train``, ``valid``,
  ``test`` split them 8:1:1 by global time: ``time < split_time[0]`` is train,
  ``split_time[0] <= time < split_time[1]`` valid, the rest test, so one timestamp never
  straddles two splits.
- Padded batches (``HistoryBatch``): left-aligned in time order (oldest first), valid
  slots first; padding slots hold item 0, rating 0, time 0 and ``mask == False``. Item 0 is
  a real item, so the mask is the source of truth; ``HistoryBatch.items_plus1()`` gives
  ids shifted by one with 0 free for an ``nn.Embedding(padding_idx=0)``.
- Features: ``user_features`` [n_users, F] and ``item_features`` [n_items, G] are int64
  categorical codes in ``[0, cardinality)`` (names and cardinalities beside them; code 0 is
  "unknown" where a value can be missing). ``item_genre_ids`` [n_items, M] lists each item's
  genres as ids 1..n_genres, padded with 0 (``genre_vocab[0] == "<pad>"``).
- Text: ``item_title``, ``item_genres`` (comma-joined), ``item_description`` (the ReLLa
  sentence used for semantic embeddings) per item; ``user_profile`` per user where the data
  has demographics (ML-100K, ML-1M), else None.

Missing or corrupt files raise ``DataError`` with the command that fixes them; so do rows
the protocol cannot hold as they are (fractional ids, timestamps past 2^53, a (user, item)
pair rated twice, a user file missing users), named by file and row (movielens.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MIN_HISTORY = 5
DATASETS = ("ml-100k", "ml-1m", "ml-25m", "goodreads")

# Where each named dataset comes from, for error messages.
HOW_TO_GET = {
    "ml-100k": "run `reclora data fetch ml-100k` (or `pip install --no-deps recbole==1.2.1`)",
    "ml-1m": "download https://files.grouplens.org/datasets/movielens/ml-1m.zip and unzip it "
    "so that {dir} holds ratings.dat, users.dat and movies.dat",
    "ml-25m": "download https://files.grouplens.org/datasets/movielens/ml-25m.zip and unzip it "
    "so that {dir} holds ratings.csv and movies.csv",
    "goodreads": "download from the UCSD Book Graph "
    "(https://mengtingwan.github.io/data/goodreads) goodreads_interactions_<genre>.json.gz "
    "and goodreads_books_<genre>.json.gz into {dir}",
}


class DataError(RuntimeError):
    """Data files are missing, incomplete or corrupt; the message says how to get them."""


def default_data_dir() -> Path:
    """``$RECLORA_DATA`` if set, else ``~/.cache/reclora/data``. A ``$RECLORA_DATA`` that
    is set but empty, or names a file, raises DataError (it is never silently ignored)."""
    env = os.environ.get("RECLORA_DATA")
    if env is None:
        return Path.home() / ".cache" / "reclora" / "data"
    if not env.strip():
        raise DataError("$RECLORA_DATA is set but empty: unset it (the default is "
                        "~/.cache/reclora/data) or set it to a folder")
    path = Path(env).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"$RECLORA_DATA={env} is a file, not a folder")
    return path


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    """One line on stderr, once per process per message (a fallback the user should see)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, file=sys.stderr, flush=True)


@dataclass
class HistoryBatch:
    """Padded histories for a batch of samples, left-aligned, oldest first.

    ``items`` [B, K] int64 (0 in padding), ``ratings`` [B, K] float32, ``times`` [B, K] int64,
    ``mask`` [B, K] bool (True on real history items), ``lengths`` [B] int64.
    """

    items: torch.Tensor
    ratings: torch.Tensor
    times: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def items_plus1(self) -> torch.Tensor:
        """Item ids + 1 with 0 in the padding slots (for ``nn.Embedding(padding_idx=0)``)."""
        return torch.where(self.mask, self.items + 1, torch.zeros_like(self.items))

    def to(self, device: torch.device | str) -> HistoryBatch:
        return HistoryBatch(*(t.to(device) for t in (self.items, self.ratings, self.times,
                                                     self.mask)))


@dataclass
class RecDataset:
    """One CTR dataset after the paper's protocol (see the module docstring)."""

    name: str  # "ml-100k", ... or the folder name of a path
    source: str  # the format / prompt template: one of DATASETS
    kind: str  # "movie" or "book"
    label_rule: str  # e.g. "rating >= 4"
    n_users: int
    n_items: int
    # interactions, sorted by (time, file order)
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray
    label: np.ndarray
    user_raw_id: np.ndarray
    item_raw_id: np.ndarray
    # item side
    item_title: list[str]
    item_genres: list[str]
    item_description: list[str]
    item_genre_ids: np.ndarray
    genre_vocab: list[str]
    item_features: np.ndarray
    item_feature_names: tuple[str, ...]
    item_feature_cardinalities: tuple[int, ...]
    # user side (None where the data has no demographics)
    user_profile: list[str] | None
    user_attrs: dict[str, list[str]] | None  # raw text per field, e.g. "gender": ["M", ...]
    user_features: np.ndarray | None
    user_feature_names: tuple[str, ...]
    user_feature_cardinalities: tuple[int, ...]
    # history CSR
    hist_ptr: np.ndarray  # [n_users + 1]
    hist_index: np.ndarray  # [N] interaction indices per user, time order
    hist_len: np.ndarray  # [N] number of the user's interactions strictly before time[i]
    # split
    min_history: int
    samples: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    split_time: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hist_item = self.item[self.hist_index]
        self.hist_rating = self.rating[self.hist_index]
        self.hist_time = self.time[self.hist_index]

    # ------------------------------------------------------------------ basics
    @property
    def n_interactions(self) -> int:
        return int(self.user.shape[0])

    def split(self, name: str) -> np.ndarray:
        """The sample indices of ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, name)

    def stats(self) -> dict[str, Any]:
        """Sizes after filtering, positive rate and split timestamps (JSON-serialisable)."""
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "positive_rate": round(float(self.label.mean()), 4),
            "label_rule": self.label_rule,
            "min_history": self.min_history,
            "samples": int(self.samples.size),
            "train": int(self.train.size),
            "valid": int(self.valid.size),
            "test": int(self.test.size),
            "split_time_valid": int(self.split_time[0]),
            "split_time_test": int(self.split_time[1]),
            "time_min": int(self.time.min()),
            "time_max": int(self.time.max()),
            "test_positive_rate": round(float(self.label[self.test].mean()), 4)
            if self.test.size else None,
            "max_history": int(self.hist_len.max()),
            # Share of test samples whose user has a training sample: ID embeddings of the
            # rest are never trained (ML-100K's time split leaves most test users unseen).
            "test_users_seen_in_train": round(float(np.isin(
                self.user[self.test], self.user[self.train]).mean()), 4)
            if self.test.size else None,
        }

    # ----------------------------------------------------------------- history
    def as_samples(self, samples: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        """Interaction indices as a flat int64 array, range-checked (IndexError)."""
        s = np.asarray(samples.cpu() if isinstance(samples, torch.Tensor) else samples)
        s = s.astype(np.int64, copy=False).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= self.n_interactions):
            raise IndexError(f"samples out of range [0, {self.n_interactions})")
        return s

    def history_start(self, samples: np.ndarray) -> np.ndarray:
        """Per sample, the offset of its user's row in the ``hist_*`` arrays."""
        s = self.as_samples(samples)
        return self.hist_ptr[self.user[s]]

    def history(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, ratings, times) of sample ``i``'s history, oldest first."""
        i = int(self.as_samples([i])[0])
        a = self.hist_ptr[self.user[i]]
        b = a + self.hist_len[i]
        return self.hist_item[a:b], self.hist_rating[a:b], self.hist_time[a:b]

    def gather_history(self, samples: np.ndarray, positions: np.ndarray | torch.Tensor,
                       mask: np.ndarray | torch.Tensor) -> HistoryBatch:
        """A HistoryBatch from per-sample positions into each sample's history.

        ``positions`` [B, K] index the sample's history (0 = oldest); only slots with
        ``mask`` True are read. Positions must be < ``hist_len`` (checked).
        """
        s = self.as_samples(samples)
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if pos.shape != m.shape or pos.dim() != 2 or pos.shape[0] != s.size:
            raise ValueError(f"positions {tuple(pos.shape)} and mask {tuple(m.shape)} must "
                             f"both be [B={s.size}, K]")
        hl = torch.from_numpy(self.hist_len[s]).unsqueeze(1)
        if bool(((pos < 0) | (pos >= hl))[m].any()):
            raise ValueError("positions reach outside the samples' histories (leakage)")
        flat = torch.from_numpy(self.hist_ptr[self.user[s]]).unsqueeze(1) + pos
        flat = torch.where(m, flat, torch.zeros_like(flat))
        items = torch.from_numpy(self.hist_item)[flat]
        ratings = torch.from_numpy(self.hist_rating)[flat]
        times = torch.from_numpy(self.hist_time)[flat]
        zero = torch.zeros((), dtype=torch.int64)
        return HistoryBatch(torch.where(m, items, zero),
                            torch.where(m, ratings, torch.zeros((), dtype=ratings.dtype)),
                            torch.where(m, times, zero), m)

    def recent_positions(self, samples: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, k] and mask of the k most recent history items, oldest first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.as_samples(samples)
        hl = torch.from_numpy(self.hist_len[s]).unsqueeze(1)
        n = torch.clamp(hl, max=k)
        ar = torch.arange(k).unsqueeze(0)
        return (hl - n + ar), ar < n

    def recent_history(self, samples: np.ndarray, k: int) -> HistoryBatch:
        """The k most recent history items of each sample, padded (the no-retrieval baseline)."""
        pos, mask = self.recent_positions(samples, k)
        return self.gather_history(samples, pos, mask)

    def targets(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """Per sample: user, item, label (int64), rating (float32), time (int64) tensors."""
        s = self.as_samples(samples)
        return {k: torch.from_numpy(getattr(self, k)[s]) for k in
                ("user", "item", "label", "rating", "time")}


# ---------------------------------------------------------------------- loading
# name -> (module, reader function); each reader takes a folder and returns RawData.
_READERS = {
    "ml-100k": ("reclora.data.movielens", "read_ml100k"),
    "ml-1m": ("reclora.data.movielens", "read_ml1m"),
    "ml-25m": ("reclora.data.movielens", "read_ml25m"),
    "goodreads": ("reclora.data.goodreads", "read_goodreads"),
}


def detect_format(path: Path) -> str | None:
    """Which dataset format a folder holds, from its file names, or None."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if "ml-100k.inter" in names or "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        return "ml-1m"
    if "ratings.csv" in names:
        return "ml-25m"
    if any(n.startswith("goodreads_interactions") and n.endswith(".json.gz") for n in names):
        return "goodreads"
    return None


def resolve_dataset_dir(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None
                        = None) -> tuple[str, str, Path]:
    """(name, format, folder) for a dataset name or a path; raises DataError if absent."""
    s = str(name_or_path)
    if s.lower() in DATASETS:
        name = s.lower()
        explicit = data_dir is not None or "RECLORA_DATA" in os.environ
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if root.exists() and not root.is_dir():
            raise DataError(f"{name}: the data dir {root} is a file, not a folder")
        folder = root / name
        if name == "ml-100k" and not folder.exists():
            # No ML-100K folder at all: read the copy installed with recbole (where the
            # set-up gets it). Said on stderr when the user named a data dir; a folder that
            # exists but is partial or corrupt is an error below, never this fallback.
            from reclora.data.fetch import installed_ml100k_dir

            wheel_dir = installed_ml100k_dir()
            if wheel_dir is not None:
                if explicit:
                    _announce(f"reclora: no {name} folder in {root}; reading {name} from the "
                              f"copy installed with recbole ({wheel_dir})")
                return name, name, wheel_dir
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise DataError(f"{name}: no data at {folder} (it {what}); "
                            + HOW_TO_GET[name].format(dir=folder))
        fmt = detect_format(folder)
        if fmt is None:
            found = sorted(p.name for p in folder.iterdir())[:8]
            raise DataError(f"{name}: {folder} holds none of the expected files (found "
                            f"{found or 'nothing'}); " + HOW_TO_GET[name].format(dir=folder))
        return name, fmt, folder
    folder = Path(s).expanduser()
    if not folder.exists():
        raise DataError(f"name_or_path {s!r} is neither a dataset name {DATASETS} nor an "
                        "existing folder")
    if folder.is_file():
        folder = folder.parent
    fmt = detect_format(folder)
    if fmt is None:
        raise DataError(f"name_or_path {s!r}: no known dataset files in {folder} (expected "
                        "ml-100k.inter or u.data, ratings.dat, ratings.csv, or "
                        "goodreads_interactions_*.json.gz)")
    return folder.name, fmt, folder


def load_dataset(name_or_path: str | os.PathLike = "ml-100k",
                 data_dir: str | os.PathLike | None = None,
                 min_history: int = DEFAULT_MIN_HISTORY, core: int = 5,
                 split: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> RecDataset:
    """Read a dataset and apply the paper's protocol (labels, 5-core, global-time split).

    ``name_or_path``: "ml-100k" (default; from ``data_dir``/ml-100k, else, when that folder
    does not exist, the installed recbole wheel's copy: said on stderr if ``data_dir`` or
    ``$RECLORA_DATA`` was given; a partial folder is an error), "ml-1m", "ml-25m",
    "goodreads" (from ``data_dir``/<name>), or a folder holding one of those formats.
    ``data_dir`` defaults to ``default_data_dir()``.
    ``min_history``: a sample needs at least this many strictly earlier interactions.
    ``core``: iterative k-core on users and items (0 or 1 disables it).
    """
    from reclora.data.splits import build_dataset

    if min_history < 0:
        raise ValueError(f"min_history must be >= 0, got {min_history}")
    name, fmt, folder = resolve_dataset_dir(name_or_path, data_dir)
    module, func = _READERS[fmt]
    reader = getattr(importlib.import_module(module), func)
    how = HOW_TO_GET.get(name, HOW_TO_GET[fmt]).format(dir=folder)
    try:
        raw = reader(folder)
    except DataError as e:
        if how in str(e):
            raise
        raise DataError(f"{e}; the files look corrupt or incomplete: {how}") from e
    except (OSError, ValueError, KeyError, IndexError, EOFError) as e:
        raise DataError(f"{name}: cannot read {folder} as {fmt} ({type(e).__name__}: {e}); "
                        f"the files look corrupt or incomplete: {how}") from e
    raw.name = name
    return build_dataset(raw, min_history=min_history, core=core, split=split)
