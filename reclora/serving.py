"""Serve a finished `reclora run`: score (user, item, time) requests, rank candidates, and take
in new interactions without retraining (issue 15).

    rec = reclora.Recommender.load("runs/default")          # model="reclora" by default
    p = rec.score([{"user_id": "196", "item_id": "242", "timestamp": 881250949}])
    table = rec.score_table("requests.csv")                  # + cold_start, history_len, seen
    top = rec.rank("196", ["242", "302", "377"], top=2)      # [(item_id, P(click)), ...],
                                                             # items 196 rated left out
    rec.observe([{"user_id": "196", "item_id": "302", "timestamp": 881250950,
                  "rating": 5}])                             # the next score sees it

What `load` rebuilds, each piece checked against the run's recorded config (a folder of
another version of reclora, or with a missing or corrupt file, raises RunFolderError naming
the file): the dataset (its digest must be the one the stage was fingerprinted with), the
subsets (subsets.json must be what run_config.json draws), the semantic retriever, the gate
CRM (crm/<name>.pt, its sha256 the one its stage file records), the LLM with the model's
banks and gates (<model>/best.safetensors, <model>/stage2_config.json as the config makes
it), and the h_u standardisation (from the stage-2 training samples, as in the run).

A request is scored as the run scored its test samples, with the pipeline's own functions
(reclora.pipeline.prompt_tokens, crm_user_reps, standardize_reps, llm_spec): the request is
appended to a view of the dataset as one more interaction whose history is exactly its
user's interactions strictly before its timestamp (nothing at or after it leaks in), then
retrieval, h_u, prompt and tokens as in the run. Requests of different users go through the
LLM together, sorted by prompt length into batches of `batch_size`, each row with its own
mixture: `personalize(model, reps)` with the batch's h_u (the per-row path of
lora_mix_linear). Scoring the run's test subset in its order reproduces the run's test
predictions (tests/test_serving.py).

Users and items: raw ids as in the dataset files (strings), normalised as the dataset's reader
normalised the files' ids (reclora.data.base.id_normaliser: MovieLens ids are whole numbers,
so "0196" is user 196, and an id that is not one is refused naming the row; GoodReads ids
are taken verbatim). A user the gate CRM never saw in its training period (no trained id
embedding), or one the dataset does not know at all, goes through the CRM's unseen-user path
(the zero "unseen" id row; profile fields unknown for a new user) and is flagged
`cold_start`. Items must be items of the dataset (an unknown item has no text, no embedding
and no CRM row): an error names the row.

`observe` appends interactions (user_id, item_id, timestamp, rating) to the store the views
are made from: the next score sees them in the history, the retrieval, h_u and so the
mixture. No weight changes: the banks, gates, CRM and LLM stay bit-identical.

Items the user already rated: the dataset holds one rating per (user, item) pair, so no
sample of the run ever had its own item in its history (that is the answer, a label leak).
Serving keeps that rule. `observe` refuses a pair already rated (in the dataset or observed).
A request for an item its user rated before its time is flagged `seen` and scored with that
rating left out of its history (a "shadow" copy of the user in the view: same profile and
CRM embedding, that one interaction less). `rank` leaves such candidates out unless asked
(`seen=True`, `reclora rank --seen`). A table without seen rows is scored exactly as
before; beside seen rows, the others keep their exact inputs (tokens, h_u; the LLM's batch
rounding aside, see `load`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from reclora.cli import CLIError

__all__ = ["Recommender", "RunFolderError", "ServingError", "read_table", "write_scores"]

REQUEST_COLUMNS = ("user_id", "item_id", "timestamp")
OBSERVE_COLUMNS = ("user_id", "item_id", "timestamp", "rating")
# Requests scored at once (histories, retrieval, h_u, prompts, then the LLM), as
# pipeline.PROMPT_CHUNK builds a run's prompts: built for a whole table before its first
# forward, 20,000 requests took +304 MB with a tiny tokenizer (~15 KB a request; ~45 KB a
# prompt with a real one), so a 1e6-row file needed tens of GB.
SCORE_CHUNK = 2048
TIME_LIMIT = 1 << 34  # timestamps are Unix seconds in [0, 2^34) (up to the year 2514)
PAIR_KEY = 1 << 32  # a (user, item) pair as one int64: user * 2^32 + item
SCORE_COLUMNS = ("user_id", "item_id", "timestamp", "score", "cold_start", "history_len",
                 "seen")


class ServingError(CLIError, ValueError):
    """A bad request, interaction or option; the message names the row or the value."""


class RunFolderError(ServingError):
    """The run folder cannot be served: a file is missing or corrupt, or it was made by
    another version of reclora (the message names the file)."""


# ---------------------------------------------------------------------------- tables
def _rows_from(source: Any, what: str
               ) -> tuple[list[dict[str, Any]], str, int, list[str] | None]:
    """(rows as dicts, the source's name for messages, number of the first data row, the
    column names: a CSV's header, a dict's keys; None for a list of dicts)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:  # a BOM is fine
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise ServingError(f"{path}: empty file, expected a header line "
                                       f"{','.join(REQUEST_COLUMNS)}")
                if not any(h.strip() for h in header):
                    raise ServingError(f"{path} line 1: blank, expected a header line "
                                       f"{','.join(REQUEST_COLUMNS)}")
                header = [h.strip() for h in header]
                rows = []
                end = reader.line_num  # the physical line a record ends on
                for fields in reader:
                    # Where it starts: a quoted field may span lines (counting records
                    # named the wrong line after one).
                    line, end = end + 1, reader.line_num
                    if not fields or all(not f.strip() for f in fields):
                        continue
                    if len(fields) != len(header):
                        raise ServingError(f"{path} line {line}: {len(fields)} fields, the "
                                           f"header has {len(header)}")
                    rows.append({"__line": line, **dict(zip(header, fields))})
        except UnicodeDecodeError as e:
            raise ServingError(f"{path}: not a UTF-8 text file ({e.reason})") from None
        except csv.Error as e:
            raise ServingError(f"{path}: malformed CSV ({e})") from None
        return rows, str(path), 2, header
    if isinstance(source, Mapping):
        cols = {k: list(np.asarray(v).reshape(-1)) if not isinstance(v, list) else v
                for k, v in source.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ServingError(f"{what}: columns of different lengths "
                               f"{ {k: len(v) for k, v in cols.items()} }")
        n = lengths.pop() if lengths else 0
        return [{k: cols[k][i] for k in cols} for i in range(n)], what, 0, list(cols)
    if isinstance(source, Iterable):
        rows = list(source)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise ServingError(f"{what} row {i}: expected a dict with "
                                   f"{', '.join(REQUEST_COLUMNS)}, got {type(r).__name__}")
        return [dict(r) for r in rows], what, 0, None
    raise ServingError(f"{what}: expected a CSV path, a dict of columns or a list of dicts, "
                       f"got {type(source).__name__}")


def _where(name: str, row: dict, i: int, first: int) -> str:
    if "__line" in row:
        return f"{name} line {row['__line']}"
    return f"{name} row {i + first}"


def _as_id(value: Any, where: str, column: str) -> str:
    """A raw id as the dataset's string form (196.0 -> "196"). None, an empty string or a NaN
    (what pandas and numpy hold for a missing id in a float column) raises ServingError."""
    if value is None:
        raise ServingError(f"{where}: no {column}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ServingError(f"{where}: {column} is missing ({float(value)})")
        if float(value).is_integer():
            value = int(value)
    text = str(value).strip()
    if not text:
        raise ServingError(f"{where}: empty {column}")
    return text


def _as_int(value: Any, where: str, column: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ServingError(f"{where}: {column} {value!r} is not an integer")
    try:
        f = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):  # 10**400: OverflowError
        raise ServingError(f"{where}: {column} {value!r} is not an integer") from None
    if not math.isfinite(f) or not f.is_integer():
        raise ServingError(f"{where}: {column} {value!r} is not an integer")
    if not 0 <= f < TIME_LIMIT:
        raise ServingError(f"{where}: {column} {value!r} is outside [0, 2^34) (Unix seconds)")
    return int(f)


def _as_float(value: Any, where: str, column: str) -> float:
    try:
        f = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ServingError(f"{where}: {column} {value!r} is not a number") from None
    if not math.isfinite(f):
        raise ServingError(f"{where}: {column} {value!r} is not a finite number")
    return f


def read_table(source: Any, columns: Sequence[str] = REQUEST_COLUMNS, what: str = "requests"
               ) -> dict[str, np.ndarray]:
    """The columns of a request (or interaction) table as arrays: ids as str, timestamps as
    int64, ratings as float64. source: a CSV path (a header line naming the columns; others
    are ignored), a dict of columns, or a list of dicts. A missing or repeated column
    (naming the source), a missing id (None, empty, NaN), a timestamp that is not an integer
    in [0, 2^34) or a non-finite rating raises ServingError naming the row (the file line
    for a CSV)."""
    rows, name, first, header = _rows_from(source, what)
    if header is None and rows:
        header = [k for k in rows[0] if k != "__line"]
    if header is not None:
        _check_header(header, columns, name)
    out: dict[str, list] = {c: [] for c in columns}
    for i, row in enumerate(rows):
        where = _where(name, row, i, first)
        for c in columns:
            if c not in row or row[c] is None:
                raise ServingError(f"{where}: no {c}")
            v = row[c]
            if c == "timestamp":
                out[c].append(_as_int(v, where, c))
            elif c == "rating":
                out[c].append(_as_float(v, where, c))
            else:
                out[c].append(_as_id(v, where, c))
    arrays = {c: np.asarray(v, dtype=object if c.endswith("_id") else
                            np.int64 if c == "timestamp" else np.float64)
              for c, v in out.items()}
    arrays["__where"] = np.asarray([_where(name, r, i, first) for i, r in enumerate(rows)],
                                   dtype=object)
    return arrays


def _check_header(header: Sequence[str], columns: Sequence[str], name: str) -> None:
    """Every column to read present (a header-only file too), none of them named twice (a
    CSV row would silently keep the last)."""
    missing = [c for c in columns if c not in header]
    if missing:
        raise ServingError(f"{name}: no column {', '.join(missing)} (expected "
                           f"{', '.join(columns)}; found {', '.join(sorted(header))})")
    repeated = [c for c in columns if header.count(c) > 1]
    if repeated:
        raise ServingError(f"{name}: column {', '.join(repeated)} appears more than once in "
                           "the header")


def check_output(path: str | os.PathLike, option: str = "--output") -> None:
    """Before any work: a folder or an unwritable place for the scores was found only when
    they were written, after the model had loaded and scored everything."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise ServingError(f"{option} {path}: is a folder; give a file path")
    folder = real.parent
    while not folder.exists():  # atomic_write makes the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ServingError(f"{option} {path}: cannot write in {folder}")


def write_scores(path: str | os.PathLike, table: Mapping[str, Sequence[Any]],
                 columns: Sequence[str] = SCORE_COLUMNS) -> None:
    """A score table as CSV, written atomically (never half-written)."""
    from reclora.checkpoint import atomic_write

    n = len(table[columns[0]])

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.10g}"
        return str(v)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(columns)
            for i in range(n):
                w.writerow([fmt(table[c][i]) for c in columns])

    atomic_write(path, write)


# ------------------------------------------------------------------------ the store
def _outside_autocast(method: Callable) -> Callable:
    """`method` with the caller's torch.autocast off, as the run computed retrieval, the
    CRM's h_u and their statistics (the LLM forward applies the run's amp itself): inside a
    serving loop's bf16 autocast the retrieval table came out bf16 (other history items in
    3 of 24 prompts) and h_u moved by 0.22 after standardisation."""
    @functools.wraps(method)
    def outside(*args, **kwargs):
        from reclora.modes import autocast_off  # torch: not at import (the CLI stays light)

        with autocast_off("cpu", "cuda"):
            return method(*args, **kwargs)
    return outside


@dataclasses.dataclass(frozen=True)
class _Ids:
    """What score reads and observe replaces, published as one object: the user id map, the
    users registered since load, and the interaction store. A score takes it once; read
    field by field, a concurrent observe's new user got the index a score had just given a
    temporary user, who was then scored with that user's history."""

    user_index: dict[str, int]
    new_users: list[str]
    store: _Store


@dataclasses.dataclass
class _Store:
    """The interactions histories are read from: the dataset's, then the observed ones.
    user/item/rating/time/label per interaction; CSR per user in (time, arrival) order."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray
    label: np.ndarray
    n_users: int
    hist_ptr: np.ndarray = dataclasses.field(init=False)
    hist_index: np.ndarray = dataclasses.field(init=False)
    keys: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        order = np.lexsort((np.arange(self.user.size), self.time, self.user))
        self.hist_index = order.astype(np.int64)
        counts = np.bincount(self.user, minlength=self.n_users)
        self.hist_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.keys = self.user[order].astype(np.int64) * TIME_LIMIT + self.time[order]

    def history_len(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Per (user, time): how many of the user's interactions are strictly before time."""
        ptr = np.concatenate([self.hist_ptr, np.full(1, self.hist_ptr[-1])])
        start = ptr[np.minimum(users, self.n_users)]
        pos = np.searchsorted(self.keys, users.astype(np.int64) * TIME_LIMIT + times, "left")
        return np.maximum(pos - start, 0).astype(np.int64)

    def extended(self, user: np.ndarray, item: np.ndarray, rating: np.ndarray,
                 time: np.ndarray, label: np.ndarray, n_users: int) -> _Store:
        """This store with interactions appended (rows N.. in the given order): equal to a
        _Store over the concatenated arrays, but the new rows are merged into the sorted
        orders (copies, O(N)) rather than everything sorted again (O(N log N)). One
        interaction observed into a synthetic 25M-interaction store (ML-25M's size), then
        one lookup: 0.26 s merged against 13.7 s rebuilt (benchmarks/bench_serving_scale.py,
        one core of the 2-core AMD EPYC, 2026-12-07)."""
        n, m = self.user.size, user.size
        new = object.__new__(_Store)
        new.user = np.concatenate([self.user, user])
        new.item = np.concatenate([self.item, item])
        new.rating = np.concatenate([self.rating, rating])
        new.time = np.concatenate([self.time, time])
        new.label = np.concatenate([self.label, label])
        new.n_users = n_users
        # Histories: (user, time, arrival) order. A new row goes after every held row with
        # its key (those arrived earlier), and new rows with equal keys in their own order.
        order = np.lexsort((np.arange(m), time, user))
        keys = user[order].astype(np.int64) * TIME_LIMIT + time[order]
        at = np.searchsorted(self.keys, keys, "right")
        new.hist_index = np.insert(self.hist_index, at, n + order)
        new.keys = np.insert(self.keys, at, keys)
        counts = np.diff(self.hist_ptr)
        counts = np.concatenate([counts, np.zeros(n_users - counts.size, counts.dtype)])
        counts += np.bincount(user, minlength=n_users)
        new.hist_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if "_pairs" in self.__dict__:  # merged too, when this store had sorted them
            held, rows = self._pairs
            pairs = user.astype(np.int64) * PAIR_KEY + item
            order = np.argsort(pairs, kind="stable")
            at = np.searchsorted(held, pairs[order], "right")
            new.__dict__["_pairs"] = (np.insert(held, at, pairs[order]),
                                      np.insert(rows, at, n + order))
        return new

    @functools.cached_property
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(the (user, item) keys of the interactions, sorted; the row of each), at the
        first lookup (a concurrent first lookup computes the same value twice, harmlessly)."""
        keys = self.user.astype(np.int64) * PAIR_KEY + self.item
        order = np.argsort(keys, kind="stable")
        return keys[order], order

    def rated(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Per (user, item): the row of the user's rating of the item, -1 where none. One at
        most: the dataset refuses a second rating of a pair, and so does observe."""
        keys, order = self._pairs
        want = users.astype(np.int64) * PAIR_KEY + items
        if keys.size == 0:
            return np.full(want.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
        return np.where(keys[pos] == want, order[pos], -1).astype(np.int64)

    def rated_before(self, users: np.ndarray, items: np.ndarray, times: np.ndarray
                     ) -> np.ndarray:
        """Per (user, item, time): the row of the user's rating of the item strictly before
        time (what its history would hold: a label leak), -1 where none."""
        rows = self.rated(users, items)
        early = rows >= 0
        early[early] = self.time[rows[early]] < times[early]
        return np.where(early, rows, -1)


def _label_rule(rule: str):
    """The dataset's label rule ("rating >= 4", "rating > 3") as a function of ratings."""
    from reclora.data.prompts import positive_words

    try:
        positive, _ = positive_words(rule)
    except ValueError:
        raise RunFolderError(f"the dataset's label rule {rule!r} is not understood") from None
    return lambda r: positive(r).astype(np.int64)


def _rating_scale(ratings: np.ndarray) -> tuple[float, float, float | None]:
    """(lowest, highest, step) of a dataset's ratings: step 1 for whole stars, 0.5 for half
    stars (ML-25M), None when the ratings are on neither grid."""
    # Exact: whole and half stars are exact in float32, and so is their remainder.
    step = next((s for s in (1.0, 0.5) if not np.mod(ratings, s).any()), None)
    return float(ratings.min()), float(ratings.max()), step


# ---------------------------------------------------------------------- recommender
class _UnseenUserCRM:
    """The gate CRM with users the dataset does not know sent to one extra user row: the
    zero "unseen" id embedding and unknown (code 0) profile fields, i.e. the CRM's own
    unseen-user path. The extra row is added once, at load; no parameter changes."""

    def __init__(self, crm: Any, n_users: int) -> None:
        import torch

        from reclora.crm import ItemUserEmbedder

        self.crm, self.n_users = crm, n_users
        for emb in (m for m in crm.modules() if isinstance(m, ItemUserEmbedder)):
            if emb.user_row.numel() == n_users:
                emb.user_row = torch.cat([emb.user_row, emb.user_row.new_zeros(1)])
                emb.user_features = torch.cat(
                    [emb.user_features, emb.user_features.new_zeros(1, emb.user_features.shape[1])])

    def user_representation(self, batch: Any) -> Any:
        import torch

        batch.user = torch.clamp(batch.user, max=self.n_users)
        return self.crm.user_representation(batch)

    def known(self) -> np.ndarray:
        """Per dataset user: whether the CRM has a trained id embedding for it."""
        from reclora.crm import ItemUserEmbedder

        emb = next(m for m in self.crm.modules() if isinstance(m, ItemUserEmbedder))
        return emb.user_row[: self.n_users].cpu().numpy() > 0


class _ShadowUsersCRM:
    """The gate CRM reading each user of a view as `real[user]`: a shadow user (see
    Recommender._view) as the user it copies (its trained id embedding and profile)."""

    def __init__(self, crm: _UnseenUserCRM, real: np.ndarray) -> None:
        import torch

        self.crm, self.real = crm, torch.from_numpy(real)

    def user_representation(self, batch: Any) -> Any:
        batch.user = self.real.to(batch.user.device)[batch.user]
        return self.crm.user_representation(batch)


class Recommender:
    """A finished run, ready to serve. Build it with `Recommender.load(run_dir)`."""

    def __init__(self) -> None:  # use load()
        self.timings: dict[str, float] = {}
        self.load_s = 0.0  # seconds load() took (each score replaces timings)
        self.crm_file: Path | None = None  # the gate CRM's checkpoint (None: untrained)

    # ------------------------------------------------------------------ loading
    @classmethod
    @_outside_autocast
    def load(cls, run_dir: str | os.PathLike, *, model: str = "reclora",
             device: str = "auto", batch_size: int | None = None, amp: str | None = None,
             threads: int | None = None, progress: bool = False) -> Recommender:
        """Rebuild the served model `model` (an LLM model of the run: reclora by default, or
        zero-shot, tallrec, rella and the ablations it ran) from the run folder. batch_size:
        requests per LLM forward (default: the run's eval batch size); device: auto, cpu,
        cuda; amp: bf16 autocast (default: the run's); threads: CPU threads for torch (None:
        as they are). Under bf16 autocast on a CPU the LLM's rounding depends on the thread
        count and on the batch a request is scored in (its left padding): the run's test
        requests, scored in the run's batches with the count the run used, reproduce its
        scores to ~1e-10; with another count they differ by up to ~0.02 in P(click)
        (SmolLM2-135M), and scored alone or among other requests by up to ~0.01 (Gemma-3-270M;
        in fp32 ~1e-6, measured), enough to swap close candidates in `rank`."""
        t0 = time.perf_counter()  # the imports too: the first load pays for them
        import torch

        from reclora import pipeline as pl
        from reclora.crm import load_crm
        from reclora.data import load_dataset
        from reclora.data.base import DataError
        from reclora.few2many import Stage2Config, inject_adapters, sample_subset
        from reclora.llm import model_digest

        self = cls()
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ServingError(f"threads must be an int >= 1, got {threads!r}")
            torch.set_num_threads(threads)
        run = Path(run_dir)
        if not run.is_dir():
            raise RunFolderError(f"{run}: no run folder there")
        cfg = _read_config(run)
        if model not in pl.LLM_MODELS + pl.ABLATIONS:
            raise ServingError(f"model {model!r} cannot be served; this run's LLM models: "
                               f"{_finished_llm_models(run)}")
        stage_file = run / "stages" / f"{model}.json"
        if not stage_file.is_file():  # named with what the run has (looked up only then)
            raise RunFolderError(f"{stage_file}: missing (the run has not finished model "
                                 f"{model!r}; its LLM models: {_finished_llm_models(run)})")
        stage = _read_json(stage_file, f"the run has not finished model {model!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ServingError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if amp not in (None, "auto", "bf16", "off"):  # else found at the first score
            raise ServingError(f"amp must be None, 'auto', 'bf16' or 'off', got {amp!r}")
        self.run_dir, self.model_name, self.cfg = run, model, cfg
        self.batch_size = batch_size or cfg.eval_batch_size
        self.amp = amp or cfg.amp
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if device == "auto" else device)
        self.progress = progress
        self.spec = pl.llm_spec(model, cfg)

        # The dataset and subsets, as the run drew them.
        try:
            ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
        except DataError as e:
            raise RunFolderError(f"{run / 'run_config.json'}: dataset {cfg.dataset!r}: {e}"
                                 ) from None
        self.ds = ds
        subsets = _read_json(run / "subsets.json", "written by every run")
        s2 = cfg.stage2()
        drawn = {"train": sample_subset(ds.train, s2.count(ds.train.size), cfg.seed),
                 "valid": sample_subset(ds.valid, cfg.n_valid, cfg.seed + 1),
                 "test": ds.test.copy() if cfg.n_test == 0 else
                 sample_subset(ds.test, cfg.n_test, cfg.seed + 2)}
        for k, v in drawn.items():
            try:
                saved = np.asarray(subsets.get(k, []), dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise RunFolderError(f"{run / 'subsets.json'}: its {k} subset is not a list "
                                     "of sample indices") from None
            if not np.array_equal(saved, v):
                raise RunFolderError(
                    f"{run / 'subsets.json'}: its {k} subset is not the one run_config.json "
                    "draws from this dataset: the folder was made by another version of "
                    "reclora or from other data")
        self.train_pool, self.valid, self.test = drawn["train"], drawn["valid"], drawn["test"]

        # The gate CRM, checked against the checkpoint its stage recorded.
        crm = None
        crm_sha: dict[str, str | None] = {}
        if self.spec.gated:
            crm_stage = _read_json(run / "stages" / f"crm_{pl.GATE_CRM}.json",
                                   "the gate CRM's stage file")
            ckpt = run / "crm" / f"{pl.GATE_CRM}.pt"
            try:  # read once: hashed, then loaded from these bytes (a writer cannot slip in)
                data = ckpt.read_bytes()
            except OSError:
                raise RunFolderError(f"{ckpt}: missing (the gate CRM's checkpoint)") from None
            sha = hashlib.sha256(data).hexdigest()
            if sha != crm_stage.get("checkpoint_sha256"):
                raise RunFolderError(f"{ckpt}: not the checkpoint its stage file "
                                     f"{run / 'stages' / f'crm_{pl.GATE_CRM}.json'} records "
                                     "(sha256 differs)")
            crm_sha[pl.GATE_CRM] = sha
            if self.spec.untrained_crm:
                crm = pl.untrained_gate_crm(ds, cfg.seed)
            else:
                try:
                    crm, _ = load_crm(ckpt, data=data)
                except ValueError as e:
                    raise RunFolderError(str(e)) from None
                self.crm_file = ckpt
            crm = crm.eval()

        # The stage's fingerprint: the data, the subsets, the options and the gate CRM the
        # served model was made with must be what this version computes from the folder.
        # The world size is the one the stage was trained under (serving is one process).
        fingerprint = stage.get("fingerprint") or {}
        world = fingerprint.get("world_size", 1) if isinstance(fingerprint, dict) else None
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise RunFolderError(f"{stage_file}: its fingerprint is not a map with a "
                                 "world_size >= 1 (the file is damaged or edited)")
        fake = SimpleNamespace(cfg=cfg, ds=ds, data_digest=pl.data_digest(ds), test=self.test,
                               train_pool=self.train_pool, valid=self.valid, crm_sha=crm_sha,
                               world=world)
        want = pl.Run.fingerprint(fake, model)
        changed = pl._changes(stage.get("fingerprint"), want)
        if changed:
            raise RunFolderError(f"{stage_file}: made with other inputs than this version of "
                                 f"reclora computes from the folder ({changed}): a folder "
                                 "of another version, or the data changed")
        problem = pl._stage_problem(stage, int(self.test.size))
        if problem:
            raise RunFolderError(f"{stage_file}: {problem}")
        self.stage_probs = np.asarray(stage["probs"], dtype=np.float64)

        # The retriever, the LLM and the model's adapters.
        from reclora.retriever import LongShortRetriever

        # By the encoder and in the precision the run recorded (resolved from "auto" on its
        # machine).
        try:
            self.emb = pl.run_item_embeddings(ds, cfg, progress)
        except ValueError as e:  # the LLM encoder's model files are not here
            raise RunFolderError(f"{run / 'run_config.json'}: {e}") from None
        self.retriever = LongShortRetriever(ds, self.emb, k_text=cfg.k_text, k_id=cfg.k_id)
        try:
            self.ctr, self.builder = pl.load_llm(cfg.model, cfg.max_length, self.device,
                                                 cfg.prompt_variant, cfg.llm_dtype, progress)
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{run / 'run_config.json'}: model {cfg.model!r}: {e}"
                                 ) from None
        # The fingerprint above compares the folder with itself for the model: only its
        # files say whether the weights behind --model are still the ones the stage used.
        try:
            digest = model_digest(cfg.model)
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{run / 'run_config.json'}: model {cfg.model!r}: {e}"
                                 ) from None
        if digest != cfg.model_digest:
            raise RunFolderError(
                f"{run / 'run_config.json'}: model {cfg.model!r}: its files (digest {digest}) "
                f"are not the ones the run used ({cfg.model_digest}); the adapters were "
                "trained on those: serve with that model, or `reclora run --resume` redoes "
                "the LLM stages on this one")
        if self.spec.adapters:
            folder = run / model
            s2_file = folder / "stage2_config.json"
            saved = _read_json(s2_file, "written by the model's stage")
            for key, value in _ADDED_STAGE2_OPTIONS.items():
                saved.setdefault(key, value)
            expected = dataclasses.asdict(cfg.model_stage2(model, int(self.train_pool.size)))
            diff = [k for k in sorted(set(saved) | set(expected))
                    if pl._plain(saved.get(k)) != pl._plain(expected.get(k))
                    and k not in pl.RESULT_NEUTRAL]
            if diff:
                raise RunFolderError(f"{s2_file}: differs from what run_config.json makes "
                                     f"({', '.join(diff)}): a folder of another version")
            s2cfg = Stage2Config(**{k: v for k, v in saved.items()})
            inject_adapters(self.ctr, s2cfg)
            weights = folder / pl.ADAPTERS_FILE
            if not weights.is_file():
                raise RunFolderError(f"{weights}: missing (the model's adapters)")
            from reclora.checkpoint import load_adapters

            # Hashed before and after the load (safetensors reads the file itself): a file
            # replaced while it loads changes one of the two digests.
            before = pl._file_sha256(weights)
            try:
                load_adapters(self.ctr.model, weights)
            except Exception as e:  # safetensors raises its own errors on a corrupt file
                raise RunFolderError(f"{weights}: cannot be loaded ({type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:300]})") from None
            if not before == pl._file_sha256(weights) == stage.get("adapters_sha256"):
                raise RunFolderError(f"{weights}: not the adapters {stage_file} was made with "
                                     "(sha256 differs; a run cut off inside the stage "
                                     "rewrites them): `reclora run --resume` redoes it")
        self.ctr.eval()

        # h_u standardisation, from the stage-2 training samples, as the run did.
        self.crm = None
        self.rep_ref = None
        if self.spec.gated:
            self.crm = _UnseenUserCRM(crm, ds.n_users)
            self.crm_known = self.crm.known()
            if cfg.standardize_reps:
                self.rep_ref = pl.crm_user_reps(ds, crm, self.train_pool, self.spec.k_hist,
                                                self.spec.id_mode, self.retriever)
                bad = ~torch.isfinite(self.rep_ref).all(1)
                if bad.any():  # every request would be standardised with NaN statistics
                    raise RunFolderError(
                        f"{self._gate_crm_name()}: its h_u is not finite for "
                        f"{int(bad.sum())} of the {bad.numel()} stage-2 training samples "
                        "(the statistics every request's h_u is standardised with)")
        else:
            from reclora.crm import CRMSchema

            self.crm_known = CRMSchema.from_dataset(ds).user_known.numpy()

        # The interaction store (dataset + observed) and the id maps.
        self._label = _label_rule(ds.label_rule)
        self.rating_scale = _rating_scale(ds.rating)
        # What the prompts state of the scale (every view carries it: a view holds only the
        # histories its requests read); once here, not a 25M scan per request on ML-25M.
        from reclora.data.prompts import rating_range

        self.prompt_rating_range = rating_range(ds)
        self._item_index = {str(v): i for i, v in enumerate(ds.item_raw_id)}
        self._ids = _Ids({str(u): i for i, u in enumerate(ds.user_raw_id)}, [], _Store(
            ds.user.astype(np.int64), ds.item.astype(np.int64), ds.rating.astype(np.float32),
            ds.time.astype(np.int64), ds.label.astype(np.int64), ds.n_users))
        self._observing = threading.Lock()  # one observe at a time (shared by forks)
        self.n_observed = 0
        self.load_s = time.perf_counter() - t0
        self.timings = {"load_s": self.load_s}
        return self

    # ------------------------------------------------------------------ helpers
    def _keys(self, ids: np.ndarray, where: Sequence[str], column: str) -> list[str]:
        """The ids in the form the dataset's reader gave its own (MovieLens: "007" is "7"),
        the keys of the id maps; an id the reader would refuse raises ServingError naming
        the row."""
        from reclora.data.base import id_normaliser

        normalise = id_normaliser(self.ds.source)
        keys = []
        for j, v in enumerate(ids):
            try:
                keys.append(normalise(v))
            except ValueError as e:
                raise ServingError(f"{where[j]}: {column} {e}") from None
        return keys

    def _items(self, ids: np.ndarray, where: np.ndarray) -> np.ndarray:
        out = np.empty(ids.size, dtype=np.int64)
        for j, v in enumerate(self._keys(ids, where, "item_id")):
            i = self._item_index.get(v)
            if i is None:
                raise ServingError(f"{where[j]}: item_id {ids[j]!r} is not an item of the run's "
                                   f"dataset ({self.ds.name}, {self.ds.n_items} items)")
            out[j] = i
        return out

    def _check_ratings(self, ratings: np.ndarray, where: np.ndarray) -> None:
        """Ratings on the dataset's scale only: off it, the CRM's rating level overflows or
        clamps, the label rule and the prompt ("50 stars") see a value no user could give."""
        low, high, step = self.rating_scale
        off = (ratings < low) | (ratings > high)
        if step:
            off |= np.mod(ratings, step) != 0
        if off.any():
            j = int(np.argmax(off))
            grid = f" in steps of {step:g}" if step else ""
            raise ServingError(f"{where[j]}: rating {ratings[j]:g} is not on the dataset's "
                               f"scale, {low:g} to {high:g}{grid}")

    def _users(self, ids: np.ndarray, where: Sequence[str], ids_now: _Ids, *, register: bool
               ) -> tuple[np.ndarray, list[str], _Ids]:
        """Dataset user indices (new users after the dataset's; registered when `register`,
        else only for this call), the temporary new users' ids, and the id maps with the
        registered users (new objects: ids_now, which readers may hold, is left as it was)."""
        keys = self._keys(ids, where, "user_id")  # before any change: a bad id changes nothing
        out = np.empty(ids.size, dtype=np.int64)
        temp: dict[str, int] = {}
        base = self.ds.n_users
        index, new = ids_now.user_index, ids_now.new_users
        if register:
            index, new = dict(index), list(new)
        for j, v in enumerate(keys):
            i = index.get(v)
            if i is None:
                if register:
                    i = index[v] = base + len(new)
                    new.append(v)
                else:
                    i = temp.setdefault(v, base + len(new) + len(temp))
            out[j] = i
        return out, list(temp), dataclasses.replace(ids_now, user_index=index, new_users=new)

    def _view(self, users: np.ndarray, items: np.ndarray, times: np.ndarray,
              temp_users: list[str], ids_now: _Ids, own: np.ndarray):
        """The dataset as of the store, with the requests appended as interactions whose
        history is their user's interactions strictly before their time. A request whose
        user rated its item before its time (`own`: that store row, else -1) gets a shadow
        user, a copy of its user whose history lacks that row: the dataset never shows an
        item in its own history (a label leak). Returns (view, request sample indices,
        history lengths, the user each view user is for the CRM: None without shadows).

        The view holds only the interactions the requests read (each requesting user's
        history up to its latest request, each shadow's, then the requests), so a request
        costs what it reads, not the store's size: a view of every interaction copied and
        gathered about 1.2 GB per request on a 25M-interaction store (1.6 s for 16 requests,
        against 4 ms now; benchmarks/bench_serving_scale.py)."""
        ds, st = self.ds, ids_now.store
        n_new = len(ids_now.new_users) + len(temp_users)
        n_users = ds.n_users + n_new
        hl = st.history_len(users, times)  # temporary users (not in the store) have 0
        seen = np.flatnonzero(own >= 0)
        row_users, real = users, None
        copies = users[:0]  # the users the shadows copy, in shadow order
        if seen.size:  # shadow users after the others, one per (user, own row)
            # Shared by the requests that leave out the same row: one per seen request
            # copied the user's whole history each time (1,000 repeats of one seen request
            # of a 648-interaction user held 648,000 view rows).
            pairs, shadow = np.unique(np.stack([users[seen], own[seen]], 1), axis=0,
                                      return_inverse=True)
            copies = pairs[:, 0]
            row_users = users.copy()
            row_users[seen] = n_users + shadow.reshape(-1)
            real = np.concatenate([np.arange(n_users), copies])
        n_view_users = n_users + copies.size
        # Per view user, how many rows of its user's history it holds: the longest prefix
        # any of its requests reads (a shadow's too).
        held = np.zeros(n_view_users, np.int64)
        np.maximum.at(held, row_users, hl)
        whose = np.arange(n_users) if real is None else real
        listed = np.flatnonzero(held)
        lengths = held[listed]
        first = np.repeat(st.hist_ptr[whose[listed]] - (np.cumsum(lengths) - lengths), lengths)
        rows = st.hist_index[first + np.arange(lengths.sum())]
        row_owner = np.repeat(listed, lengths)
        if seen.size:  # a shadow's history lacks its own row (rated before: in the prefix)
            own_row = np.full(n_view_users, -1, np.int64)
            own_row[row_users[seen]] = own[seen]
            keep = rows != own_row[row_owner]
            rows, row_owner = rows[keep], row_owner[keep]
            hl = hl.copy()
            hl[seen] -= 1
        counts = np.bincount(row_owner, minlength=n_view_users)
        n0, r = rows.size, users.size

        def user_rows(rows: Sequence, new: Any) -> list:
            """Per-user values: the dataset's, `new` for each new user, then the copies'."""
            out = list(rows) + [new] * n_new
            return out + [out[u] for u in copies]

        new_ids = ids_now.new_users + temp_users
        extra_feat = None
        if ds.user_features is not None:
            extra_feat = np.concatenate([ds.user_features, np.zeros(
                (n_new, ds.user_features.shape[1]), dtype=ds.user_features.dtype)])
            extra_feat = np.concatenate([extra_feat, extra_feat[copies]])
        raw_ids = np.concatenate([np.asarray(ds.user_raw_id, dtype=object),
                                  np.asarray(new_ids, dtype=object)])
        view = dataclasses.replace(
            ds, n_users=n_view_users,
            user=np.concatenate([row_owner, row_users]),
            item=np.concatenate([st.item[rows], items]),
            rating=np.concatenate([st.rating[rows], np.zeros(r, np.float32)]),
            time=np.concatenate([st.time[rows], times]),
            label=np.concatenate([st.label[rows], np.zeros(r, np.int64)]),
            user_raw_id=np.concatenate([raw_ids, raw_ids[copies]]),
            user_profile=None if ds.user_profile is None else user_rows(ds.user_profile, ""),
            user_attrs=None if ds.user_attrs is None else
            {k: user_rows(v, "") for k, v in ds.user_attrs.items()},
            user_features=extra_feat,
            # The scale the prompts state is the served dataset's (observe keeps ratings on
            # it), not the range of the few histories the view holds.
            extra={**ds.extra, "rating_range": self.prompt_rating_range},
            hist_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            # One entry past every user's range (the first request's row): the masked
            # gathers read index 0 of the history arrays even when no request has a history.
            hist_index=np.arange(n0 + 1, dtype=np.int64),
            hist_len=np.concatenate([np.zeros(n0, np.int64), hl]),
            samples=np.arange(n0, n0 + r), train=np.arange(0), valid=np.arange(0),
            test=np.arange(n0, n0 + r))
        return view, np.arange(n0, n0 + r, dtype=np.int64), hl, real

    # ------------------------------------------------------------------ serving
    def score_table(self, requests: Any, *, batch_size: int | None = None,
                    progress: bool | None = None) -> dict[str, np.ndarray]:
        """{user_id, item_id, timestamp, score, cold_start, history_len, seen} for a table
        of requests (see read_table), in input order. score: P(click) from the served model;
        cold_start: 1 where the gate CRM has no trained embedding of the user (new to the
        dataset, or unseen in its training period); history_len: the user's interactions
        before the request's time that the score read; seen: 1 where the user rated the item
        before the request's time. A seen row is scored with that rating left out of its
        history (prompt, retrieval and the CRM's h_u; history_len one less): the dataset
        never shows an item in its own history, and the model never learnt to answer with
        the answer in the prompt. Every other row reads the inputs it read before this flag
        existed. self.timings gets the split of the time by stage."""
        return self._score_table(requests, self._ids, batch_size=batch_size,
                                 progress=progress)

    @_outside_autocast
    def _score_table(self, requests: Any, ids_now: _Ids, *, batch_size: int | None,
                     progress: bool | None) -> dict[str, np.ndarray]:
        """score_table on one snapshot of the ids and the store (`ids_now`; an observe
        meanwhile publishes a new one): rank decides what was seen on the same snapshot.
        SCORE_CHUNK requests at a time, each chunk's histories, prompts and tokens dropped
        before the next is built."""
        start = time.perf_counter()
        req = read_table(requests) if not (isinstance(requests, dict) and "__where" in requests
                                           ) else requests
        n = req["user_id"].size
        out = {"user_id": req["user_id"], "item_id": req["item_id"],
               "timestamp": req["timestamp"], "score": np.zeros(n, np.float64),
               "cold_start": np.zeros(n, np.int64), "history_len": np.zeros(n, np.int64),
               "seen": np.zeros(n, np.int64)}
        if n == 0:
            return out
        timings: dict[str, float] = {"parse_s": time.perf_counter() - start}
        tokens = 0.0
        for a in range(0, n, SCORE_CHUNK):
            part = {k: v[a:a + SCORE_CHUNK] for k, v in req.items()}
            got, times, mean_tokens = self._score_chunk(part, ids_now, batch_size, progress)
            for k, v in got.items():
                out[k][a:a + SCORE_CHUNK] = v
            for k, v in times.items():
                timings[k] = timings.get(k, 0.0) + v
            tokens += mean_tokens * part["user_id"].size
        timings["total_s"] = time.perf_counter() - start
        timings["n"] = n
        timings["prompt_tokens"] = tokens / n
        self.timings = timings
        return out

    def _score_chunk(self, req: dict, ids_now: _Ids, batch_size: int | None,
                     progress: bool | None) -> tuple[dict, dict, float]:
        """(score, cold_start, history_len, seen; the time by stage; the prompts' mean
        length) of a table's rows `req`. self.last_inputs gets its tokens and h_u."""
        import torch

        from reclora import pipeline as pl

        marks = [("parse_s", time.perf_counter())]
        items = self._items(req["item_id"], req["__where"])
        users, temp, _ = self._users(req["user_id"], req["__where"], ids_now, register=False)
        marks.append(("parse_s", time.perf_counter()))
        own = ids_now.store.rated_before(users, items, req["timestamp"])
        view, samples, hl, real = self._view(users, items, req["timestamp"], temp, ids_now,
                                             own)
        marks.append(("history_s", time.perf_counter()))
        spec = self.spec
        retr = (_rebind(self.retriever, view) if "semantic" in (spec.mode, spec.id_mode)
                else None)
        text_hist = pl.text_history(view, retr, samples, spec.mode, self.cfg.k_text)
        marks.append(("retrieval_s", time.perf_counter()))
        reps = None
        if spec.gated:
            crm = self.crm if real is None else _ShadowUsersCRM(self.crm, real)
            reps = pl.crm_user_reps(view, crm, samples, spec.k_hist, spec.id_mode, retr)
            if self.rep_ref is not None:
                reps = pl.standardize_reps(reps, self.rep_ref)
            self._check_reps(reps, req)
        marks.append(("crm_s", time.perf_counter()))
        tokens = pl.prompt_tokens(view, self.builder, self.ctr, samples, text_hist)
        marks.append(("prompts_s", time.perf_counter()))
        show = self.progress if progress is None else progress
        with torch.inference_mode():
            probs = self.ctr.predict(tokens, batch_size=batch_size or self.batch_size,
                                     user_reps=reps, amp=self.amp, progress=show,
                                     desc="score")
        marks.append(("llm_s", time.perf_counter()))
        timings: dict[str, float] = {}
        for (_, before), (k, v) in zip(marks, marks[1:]):
            timings[k] = timings.get(k, 0.0) + v - before
        self.last_inputs = {"tokens": tokens, "user_reps": reps}  # for benchmarks
        got = {"score": probs, "cold_start": self._cold(users), "history_len": hl,
               "seen": (own >= 0).astype(np.int64)}
        return got, timings, float(np.mean([len(x) for x in tokens]))

    def _gate_crm_name(self) -> str:
        return str(self.crm_file) if self.crm_file else "the untrained gate CRM"

    def _check_reps(self, reps: Any, req: dict[str, np.ndarray]) -> None:
        """The gate's input h_u must be finite: a CRM weight that is NaN only for some
        users' rows made their scores NaN while every other request looked normal. One
        check (one host sync) per request batch; the error names the rows and users."""
        import torch

        bad = np.flatnonzero(~torch.isfinite(reps).all(1).cpu().numpy())
        if bad.size:
            rows = "; ".join(f"{req['__where'][i]} (user_id {req['user_id'][i]!r})"
                             for i in bad[:5])
            more = f"; and {bad.size - 5} more" if bad.size > 5 else ""
            raise RunFolderError(f"{self._gate_crm_name()}: the gate CRM's h_u is not finite "
                                 f"for {bad.size} of {reps.shape[0]} requests: {rows}{more}; "
                                 "no score for these (NaN or inf in the CRM's weights?)")

    def _cold(self, users: np.ndarray) -> np.ndarray:
        """1 where the gate CRM has no trained id embedding of the user (new users too)."""
        base = self.ds.n_users
        known = self.crm_known[np.minimum(users, base - 1)] & (users < base)
        return (~known).astype(np.int64)

    def is_cold(self, user_id: Any) -> bool:
        """Whether the user is served through the CRM's unseen-user path (cold start)."""
        users, _, _ = self._users(np.asarray([_as_id(user_id, "is_cold", "user_id")],
                                             dtype=object), ["is_cold"], self._ids,
                                  register=False)
        return bool(self._cold(users)[0])

    def score(self, requests: Any, *, batch_size: int | None = None,
              progress: bool | None = None) -> np.ndarray:
        """P(click) per request (user_id, item_id, timestamp), float64, in input order."""
        return self.score_table(requests, batch_size=batch_size, progress=progress)["score"]

    def rank(self, user_id: Any, candidates: Sequence[Any], *, top: int | None = None,
             timestamp: int | None = None, batch_size: int | None = None,
             seen: bool = False) -> list[tuple[str, float]]:
        """The candidates (item ids) by P(click) for the user, best first, the first `top`
        (all by default). timestamp: the moment to rank at (default: one second after the
        latest interaction known, so the user's whole history counts). Candidates the user
        rated before it are left out, as a recommender leaves out what the user already
        has, so fewer may come back than were given; seen=True ranks them too, each scored
        as score_table scores a seen row (its own rating left out of its history). An item
        listed twice (also as "7" and "07" in MovieLens) raises ServingError: ranked twice
        it took two places, and dropping one would leave fewer rows than candidates."""
        if isinstance(candidates, (str, bytes)):  # "52" was ranked as items "5" and "2"
            raise ServingError(f"rank: candidates must be a list of item ids, got the "
                               f"{type(candidates).__name__} {candidates!r} (for one item: "
                               f"[{candidates!r}])")
        cands = [_as_id(c, f"rank: candidates[{i}]", "item_id")
                 for i, c in enumerate(candidates)]
        where = [f"rank: candidates[{i}]" for i in range(len(cands))]
        if not cands:
            return []
        items = self._items(np.asarray(cands, dtype=object), where)
        first: dict[int, int] = {}
        for j, i in enumerate(items):
            k = first.setdefault(int(i), j)
            if k != j:
                raise ServingError(f"{where[j]}: item_id {cands[j]!r} repeats candidates[{k}] "
                                   f"{cands[k]!r} (item {self.ds.item_raw_id[i]}); list each "
                                   "item once")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
            raise ServingError(f"top must be an int >= 1, got {top!r}")
        ids_now = self._ids  # once: the same store decides what was seen and the default time
        if timestamp is None:
            timestamp = int(ids_now.store.time.max()) + 1
        timestamp = _as_int(timestamp, "rank", "timestamp")
        uid = _as_id(user_id, "rank", "user_id")
        users, _, _ = self._users(np.asarray([uid], dtype=object), ["rank"], ids_now,
                                  register=False)  # its errors named as rank's
        if not seen:
            earlier = ids_now.store.rated_before(np.repeat(users, items.size), items,
                                                 np.full(items.size, timestamp, np.int64))
            cands = [c for c, row in zip(cands, earlier) if row < 0]
            if not cands:
                return []
        table = {"user_id": [uid] * len(cands), "item_id": cands,
                 "timestamp": [timestamp] * len(cands)}
        scores = self._score_table(table, ids_now, batch_size=batch_size, progress=None)["score"]
        order = np.argsort(-scores, kind="stable")
        if top is not None:
            order = order[:top]
        return [(cands[i], float(scores[i])) for i in order]

    def observe(self, interactions: Any) -> int:
        """Append interactions (user_id, item_id, timestamp, rating) to the histories the next
        score reads; new users are registered (cold start: no trained CRM embedding). No
        weight changes. Returns how many were added. A rating off the dataset's scale (its
        lowest to highest rating, in whole or half stars as it has them), or of a (user,
        item) pair already rated (in the dataset, by an earlier observe or in this call),
        raises ServingError naming the row, and nothing is taken in: one rating per pair, as
        the dataset has (a second put the item, with its rating, into the history of its own
        requests and took two of the prompt's places)."""
        obs = read_table(interactions, OBSERVE_COLUMNS, "interactions")
        n = obs["user_id"].size
        if n == 0:
            return 0
        items = self._items(obs["item_id"], obs["__where"])
        ratings = obs["rating"]
        self._check_ratings(ratings, obs["__where"])
        with self._observing:  # two observes at once: each would drop the other's rows
            before = self._ids
            users, _, ids = self._users(obs["user_id"], obs["__where"], before, register=True)
            st = before.store
            self._check_pairs(st, users, items, obs)
            store = st.extended(users, items, ratings.astype(np.float32), obs["timestamp"],
                                self._label(ratings), self.ds.n_users + len(ids.new_users))
            self._ids = dataclasses.replace(ids, store=store)  # one assignment: see _Ids
            self.n_observed += n
        return n

    def _check_pairs(self, store: _Store, users: np.ndarray, items: np.ndarray,
                     obs: dict[str, np.ndarray]) -> None:
        """Interactions to observe rate pairs the store does not hold, each pair once: else
        ServingError naming the row, the ids and the rating held (see observe)."""
        rule = ("one rating per (user, item) pair, as in the dataset (a second one would "
                "show the item, rated, in the history of its own requests)")
        held = store.rated(users, items)
        if (held >= 0).any():
            j = int(np.argmax(held >= 0))
            r = held[j]
            source = "the dataset's" if r < self.ds.n_interactions else "an earlier observe's"
            raise ServingError(
                f"{obs['__where'][j]}: user_id {obs['user_id'][j]!r} already rated item_id "
                f"{obs['item_id'][j]!r} ({source} interaction: rating {store.rating[r]:g} at "
                f"timestamp {store.time[r]}); {rule}")
        first: dict[int, int] = {}
        for j, key in enumerate((users * PAIR_KEY + items).tolist()):
            k = first.setdefault(key, j)
            if k != j:
                raise ServingError(
                    f"{obs['__where'][j]}: user_id {obs['user_id'][j]!r} rates item_id "
                    f"{obs['item_id'][j]!r} again ({obs['__where'][k]} rates it too); {rule}")

    def fork(self) -> Recommender:
        """A copy sharing the loaded models, with its own interaction store (observe on one
        leaves the other as it was)."""
        import copy

        return copy.copy(self)

    def test_requests(self) -> dict[str, np.ndarray]:
        """The run's test subset as requests (user_id, item_id, timestamp), in its order."""
        ds, s = self.ds, self.test
        return {"user_id": np.asarray(ds.user_raw_id, dtype=object)[ds.user[s]],
                "item_id": np.asarray(ds.item_raw_id, dtype=object)[ds.item[s]],
                "timestamp": ds.time[s].astype(np.int64)}

    def adapter_bytes(self) -> int:
        """Bytes of the served banks and gates (the same for any number of users)."""
        from reclora.checkpoint import adapter_state_dict

        return sum(v.numel() * v.element_size()
                   for v in adapter_state_dict(self.ctr.model).values())


def _rebind(retriever: Any, view: Any) -> Any:
    """The run's retriever (its similarity table included) over another dataset view."""
    import copy

    import torch

    r = copy.copy(retriever)
    r.dataset = view
    r._hist_item = torch.from_numpy(view.hist_item).to(retriever.device)
    return r


def _finished_llm_models(run: Path) -> str:
    """The LLM models (and ablations) a run folder has finished, for an error message."""
    from reclora import pipeline as pl

    return ", ".join(m for m in pl.LLM_MODELS + pl.ABLATIONS
                     if (run / "stages" / f"{m}.json").is_file()) or "none"


def _read_json(path: Path, why: str) -> dict:
    """A run-folder JSON file, which holds an object: anything else raises RunFolderError."""
    if not path.is_file():
        raise RunFolderError(f"{path}: missing ({why})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: holds {type(data).__name__}, not a JSON object")
    return data


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a run_config.json value is of its RunConfig field's type (int, float, str,
    bool, X | None, tuple[X, ...], which JSON holds as a list). bool and int are told apart
    (True is an int in Python), an int is a float, and a float must be finite."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_is_a(v, typing.get_args(hint)[0])
                                                        for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"_is_a: no check for the RunConfig type {hint}")  # a new field type


def _type_name(hint: Any) -> str:
    """A field's type as a run_config.json reader would say it ("a list of str", ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if hint is float:
        return "a finite number"
    return "null" if hint is type(None) else hint.__name__


# Options added to RunConfig and Stage2Config after folders were made, with the value those
# folders ran under (the default then): such a folder serves as it was trained.
_ADDED_STAGE2_OPTIONS = {"loss": "pair", "gate_top_k": None, "gate_sqrt": False}
_ADDED_OPTIONS = {**_ADDED_STAGE2_OPTIONS, "id_history": "recent",  # run_config.json's
                  "item_encoder": "minilm", "mix": "factor"}


def _read_config(run: Path):
    from reclora.pipeline import RunConfig

    path = run / "run_config.json"
    raw = _read_json(path, "every run writes it first")
    for key, value in _ADDED_OPTIONS.items():  # a folder made before the option existed
        raw.setdefault(key, value)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown, missing = sorted(set(raw) - fields), sorted(fields - set(raw))
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown options {', '.join(unknown)}" if unknown else "",
                                     f"missing options {', '.join(missing)}" if missing
                                     else "") if x)
        raise RunFolderError(f"{path}: made by another version of reclora ({what})")
    hints = typing.get_type_hints(RunConfig)
    for key, value in raw.items():
        if not _is_a(value, hints[key]):
            raise RunFolderError(f"{path}: {key} {value!r}: expected {_type_name(hints[key])}")
    for key in ("crms", "target_modules"):  # tuples, written as JSON lists
        raw[key] = tuple(raw[key])
    try:
        return RunConfig(**raw)
    except (TypeError, ValueError) as e:
        raise RunFolderError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------- CLI
def _common(p) -> None:
    from reclora.cli import device_option, int_at_least, threads_option

    p.add_argument("--run", required=True, help="the run folder (reclora run --output)")
    p.add_argument("--model", default="reclora", help="the run's model to serve (reclora)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="requests per LLM forward (default: the run's eval batch size)")
    p.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=threads_option(), default=None,
                   help="CPU threads (default: torch's); bf16 scores round by thread count")
    p.add_argument("--observe", default=None,
                   help="CSV of interactions (user_id,item_id,timestamp,rating) to take in "
                   "before serving")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(a) -> Recommender:
    rec = Recommender.load(a.run, model=a.model, device=a.device, batch_size=a.batch_size,
                           threads=a.threads, progress=not a.no_progress)
    if a.observe:
        rec.observe(a.observe)
    return rec


def _summary(rec: Recommender, table: dict[str, np.ndarray], wall: float) -> str:
    t = rec.timings
    n = table["score"].size
    stages = ", ".join(f"{k[:-2]} {t[k]:.2f} s" for k in
                       ("parse_s", "history_s", "retrieval_s", "crm_s", "prompts_s", "llm_s")
                       if k in t)
    cold = int(table["cold_start"].sum())
    mean = float(table["score"].mean()) if n else float("nan")
    return (f"scored {n} requests of {len(set(table['user_id'].tolist()))} users with "
            f"{rec.model_name} in {wall:.1f} s ({n / max(wall, 1e-9):.2f} requests/s; load "
            f"{rec.load_s:.1f} s); cold start {cold}; mean P(click) "
            f"{mean:.4f}; time by stage: {stages}")


def score_main(argv: list[str] | None = None) -> int:
    from reclora.cli import guarded

    return guarded("reclora score", _score_main, argv)


def _score_main(argv: list[str]) -> int:
    from reclora.cli import DEBUG_HELP, ArgumentParser

    p = ArgumentParser(prog="reclora score", description="P(click) for each request "
                       "(user_id,item_id,timestamp) of a CSV, from a finished run. "
                       + DEBUG_HELP)
    _common(p)
    p.add_argument("--input", "-i", required=True, help="requests CSV")
    p.add_argument("--output", "-o", required=True, help="scores CSV (written atomically)")
    a = p.parse_args(argv)
    check_output(a.output)
    req = read_table(a.input)  # bad rows fail before the model loads
    rec = _load(a)
    t = time.perf_counter()
    table = rec.score_table(req)
    wall = time.perf_counter() - t
    write_scores(a.output, table)
    print(_summary(rec, table, wall) + f"; wrote {a.output}", file=sys.stderr)
    return 0


def rank_main(argv: list[str] | None = None) -> int:
    from reclora.cli import guarded

    return guarded("reclora rank", _rank_main, argv)


def _rank_main(argv: list[str]) -> int:
    from reclora.cli import DEBUG_HELP, ArgumentParser, int_at_least

    p = ArgumentParser(prog="reclora rank", description="A user's candidate items by "
                       "P(click), best first, from a finished run. " + DEBUG_HELP)
    _common(p)
    p.add_argument("--user", required=True, help="user id (as in the dataset files)")
    p.add_argument("--candidates", required=True,
                   help="comma-separated item ids (242,302,377), or a file of item ids, one a "
                   "line or a CSV with an item_id column: the value is a file when it "
                   "contains a '/' or ends in .txt or .csv (write ./NAME for another file "
                   "here), else a list; each item once")
    p.add_argument("--top", type=int_at_least(1), default=None, help="keep the best N")
    p.add_argument("--timestamp", type=int_at_least(0), default=None,
                   help="rank as of this Unix time (default: after the latest interaction)")
    p.add_argument("--seen", action="store_true",
                   help="also rank the candidates the user rated before that time (left out "
                   "by default), each scored without its own rating in its history")
    p.add_argument("--output", "-o", default=None, help="CSV (default: stdout)")
    a = p.parse_args(argv)
    if a.output:
        check_output(a.output)
    cands = _candidates(a.candidates)
    rec = _load(a)
    t = time.perf_counter()
    ranked = rec.rank(a.user, cands, timestamp=a.timestamp, seen=a.seen)
    wall = time.perf_counter() - t
    left_out = len(cands) - len(ranked)
    ranked = ranked[:a.top]
    cold = rec.is_cold(a.user)
    table = {"rank": list(range(1, len(ranked) + 1)), "user_id": [a.user] * len(ranked),
             "item_id": [i for i, _ in ranked], "score": [s for _, s in ranked],
             "cold_start": [int(cold)] * len(ranked)}
    cols = ("rank", "user_id", "item_id", "score", "cold_start")
    if a.output:
        write_scores(a.output, table, cols)
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        for i in range(len(ranked)):
            w.writerow([table["rank"][i], a.user, table["item_id"][i],
                        f"{table['score'][i]:.10g}", int(cold)])
    note = (f"; left out {left_out} the user already rated (--seen ranks them)"
            if left_out else "")
    print(f"ranked {len(cands) - left_out} candidates for user {a.user}"
          f"{' (cold start)' if cold else ''} in {wall:.1f} s{note}"
          + (f"; wrote {a.output}" if a.output else ""), file=sys.stderr)
    return 0


def _candidates(text: str) -> list[str]:
    """--candidates as item ids. A file exactly when the text contains a path separator or
    ends in .txt or .csv (never from what exists: a mistyped path is not an item id, and an
    item id is not read as a file), else a comma list. Neither may be empty."""
    if "/" in text or os.sep in text or text.lower().endswith((".txt", ".csv")):
        path = Path(text)
        if not path.is_file():
            raise ServingError(f"--candidates {text}: "
                               + ("a folder, not a file" if path.is_dir() else "no such file"))
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()
                     if ln.strip()]
        except UnicodeDecodeError as e:
            raise ServingError(f"{path}: not a UTF-8 text file ({e.reason})") from None
        if lines and "item_id" in [h.strip() for h in lines[0].split(",")]:
            lines = list(read_table(path, ("item_id",), str(path))["item_id"])
        if not lines:
            raise ServingError(f"--candidates {text}: no item ids in the file")
        return lines
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ServingError(f"--candidates {text!r}: no item ids (a comma list or a file)")
    return items
