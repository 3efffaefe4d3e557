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
the protocol cannot hold as they are, named by file and row or raw id: fractional ids,
timestamps past 2^53 (movielens.py), a repeated id in a user or item file, a (user, item)
pair rated twice (GoodReads: unless the same record repeats in overlapping genre files, read
once), a user file missing users, a MovieLens item file missing items (GoodReads: said on
stderr and dropped), and a split with a positive fraction left empty by tied timestamps
(splits.py).

Module layout, bottom up (a module imports only those before it; tests/test_scale.py checks
it): errors (DataError) -> paths (DATASETS, HOW_TO_GET, default_data_dir) -> text ->
dataset (RecDataset, HistoryBatch) -> splits (RawData, build_dataset) -> movielens,
goodreads (readers) -> fetch -> base (this module: load_dataset; re-exports the classes and
errors) -> embeddings, prompts -> cli.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from reclora.data.dataset import DEFAULT_MIN_HISTORY, HistoryBatch, RecDataset
from reclora.data.errors import DataError, announce
from reclora.data.fetch import installed_ml100k_dir
from reclora.data.paths import DATASETS, HOW_TO_GET, default_data_dir
from reclora.data.splits import build_dataset

__all__ = ["DATASETS", "DEFAULT_MIN_HISTORY", "HOW_TO_GET", "DataError", "HistoryBatch",
           "RecDataset", "default_data_dir", "detect_format", "id_normaliser", "load_dataset",
           "resolve_dataset_dir"]


# ---------------------------------------------------------------------- loading
# name -> (module, reader function); each reader takes a folder and returns RawData.
_READERS = {
    "ml-100k": ("reclora.data.movielens", "read_ml100k"),
    "ml-1m": ("reclora.data.movielens", "read_ml1m"),
    "ml-25m": ("reclora.data.movielens", "read_ml25m"),
    "goodreads": ("reclora.data.goodreads", "read_goodreads"),
}


def id_normaliser(fmt: str) -> Callable[[str], str]:
    """The function mapping a raw user or item id to the form the reader of dataset format
    `fmt` (RecDataset.source) gives its ids, ``user_raw_id`` / ``item_raw_id``: the reader's
    own ``normalise_id`` (MovieLens: whole numbers, "007" is "7"; GoodReads: verbatim), so
    that ids from elsewhere (serving's requests) are looked up as the files' were. It raises
    ValueError for an id the reader would refuse."""
    if fmt not in _READERS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {DATASETS}")
    return importlib.import_module(_READERS[fmt][0]).normalise_id


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
            wheel_dir = installed_ml100k_dir()
            if wheel_dir is not None:
                if explicit:
                    announce(f"reclora: no {name} folder in {root}; reading {name} from the "
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
