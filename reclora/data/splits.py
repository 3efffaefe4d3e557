"""The paper's protocol, shared by every dataset: labels, k-core, history, global-time split.

A reader (movielens.py, goodreads.py) returns ``RawData``; ``build_dataset`` turns it into a
``RecDataset`` (see base.py for the conventions it guarantees).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reclora.data.dataset import RecDataset
from reclora.data.errors import DataError, announce
from reclora.data.text import item_description, user_profile

# (operator, threshold) of a positive label per format (RECLORA.md section 5; ML-100K as ML-1M).
LABEL_RULES: dict[str, tuple[str, float]] = {
    "ml-100k": (">=", 4.0),
    "ml-1m": (">=", 4.0),
    "ml-25m": (">", 3.0),
    "goodreads": (">=", 4.0),
}
# Formats whose item file lists every item their interactions name: there a missing item
# row means a truncated file or mismatched ids, so it is refused rather than dropped.
COMPLETE_ITEM_FILES = {"ml-100k", "ml-1m", "ml-25m"}
# Genres an item may list: MovieLens lists at most 10 (ML-25M), GoodReads is read with 3. A
# hostile 130 KB movies.csv with 20,000 on one line made the [items, longest] table 10 GB
# at ML-25M's 62k items.
MAX_ITEM_GENRES = 64


@dataclass
class RawData:
    """One dataset as read from its files, before the protocol.

    ``user``/``item``: raw ids per interaction (ints or strings), ``rating`` float,
    ``time`` int64 Unix seconds, in file order. ``items``: raw id (as str) -> dict with
    "title" (str), "genres" (list[str]), optional "year" (int) and any other categorical
    fields (str). ``users``: raw id (as str) -> dict of text fields (e.g. gender, age,
    occupation, zip), or None when the data has no user side. ``user_fields``: the fields,
    in order, that become ``user_features`` columns. ``files``: role ("interactions",
    "items", "users") -> the file(s) read, for error messages; for "interactions" the arrays
    must be its data rows in file order (errors name row ``i + 1``).
    """

    name: str
    source: str
    kind: str
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray
    items: dict[str, dict]
    users: dict[str, dict] | None = None
    user_fields: tuple[str, ...] = ()
    item_fields: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def label_from_rating(rating: np.ndarray, source: str) -> np.ndarray:
    """0/1 int64 labels under the format's rule."""
    op, thr = LABEL_RULES[source]
    pos = rating >= thr if op == ">=" else rating > thr
    return pos.astype(np.int64)


def k_core(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of interactions kept by iterative k-core on users and items.

    ``user`` and ``item`` are dense int codes. Repeats until every kept user and item has at
    least ``k`` kept interactions (dropping items can push users under k, and back).
    """
    keep = np.ones(user.shape[0], dtype=bool)
    if k <= 1:
        return keep
    nu, ni = int(user.max()) + 1, int(item.max()) + 1
    while True:
        cu = np.bincount(user[keep], minlength=nu)
        ci = np.bincount(item[keep], minlength=ni)
        new = keep & (cu[user] >= k) & (ci[item] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def repeated_pairs(user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row whose (user, item) pair occurred in an earlier row: (its index, the index of
    the pair's first row), in row order. ``user`` and ``item`` are int codes >= 0, small
    enough that user * (item.max() + 1) fits in int64 (dense codes: below n_rows^2)."""
    none = np.zeros(0, dtype=np.int64)
    if user.size < 2:
        return none, none
    width = int(item.max()) + 1

    def keys() -> np.ndarray:  # one int64 per row
        return user.astype(np.int64) * width + item

    # Sorting the keys in place says whether any repeats in half the time and memory of an
    # argsort (10M rows); the argsort runs only to find them.
    key = keys()
    key.sort()
    if not (key[1:] == key[:-1]).any():
        return none, none
    key = keys()
    order = np.argsort(key, kind="stable")  # stable: a pair's rows stay in row order
    k = key[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(k.size), 0))]
    later, first = order[~starts], first[~starts]
    by_row = np.argsort(later)
    return later[by_row], first[by_row]


def check_unique_pairs(raw: RawData, u_raw: np.ndarray, u_code: np.ndarray,
                       i_raw: np.ndarray, i_code: np.ndarray) -> None:
    """Refuse a (user, item) pair rated twice, naming the file, its rows and the raw ids: the
    later sample's history would hold its own target with its rating (a label leak)."""
    later, first = repeated_pairs(u_code, i_code)
    if later.size:
        a, b = int(first[0]), int(later[0])
        where = raw.files.get("interactions", raw.name)
        raise DataError(f"{where}: data rows {a + 1} and {b + 1} both rate item "
                        f"{str(i_raw[i_code[a]])} by user {str(u_raw[u_code[a]])} (one rating "
                        "per (user, item) pair; duplicate rows are not allowed)")


def _file(raw: RawData, role: str, what: str) -> str:
    """``what`` ("the item file") followed by its path where the reader named it."""
    return f"{what} {raw.files[role]}" if role in raw.files else what


def check_item_rows(raw: RawData, i_raw: np.ndarray, has_meta: np.ndarray,
                    keep: np.ndarray) -> None:
    """Interactions whose item has no metadata row are dropped (nothing describes it to the
    LLM): refused where the format's item file is complete (a truncated file or ids that do
    not match would lose data silently), announced on stderr elsewhere."""
    dropped = int(keep.size - keep.sum())
    if dropped == 0:
        return
    missing = [str(x) for x in i_raw[~has_meta]]
    ids = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    msg = (f"{raw.name}: {dropped} of {keep.size} interactions rate {len(missing)} items that "
           f"have no row in {_file(raw, 'items', 'the item file')} (raw ids {ids})")
    if raw.source in COMPLETE_ITEM_FILES:
        raise DataError(f"{msg}; it looks truncated, or its ids do not match the "
                        "interactions'")
    announce(f"{msg}; those interactions are dropped")


def history_lengths(user: np.ndarray, time: np.ndarray, n_users: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user CSR (ptr, index) in time order and, per interaction, the number of the
    user's interactions strictly before its time.

    ``time`` must be sorted ascending (the dataset order). Within one user, interactions that
    share a timestamp all get the count of the first of them, so same-second ratings never
    count as each other's history.
    """
    index = np.argsort(user, kind="stable")  # stable: keeps time order inside each user
    counts = np.bincount(user, minlength=n_users)
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    u, t = user[index], time[index]
    pos = np.arange(index.size, dtype=np.int64)
    new_group = np.ones(index.size, dtype=bool)
    new_group[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    hist_len = np.empty(index.size, dtype=np.int64)
    hist_len[index] = group_start - ptr[u]
    return ptr, index.astype(np.int64), hist_len


def split_by_time(samples: np.ndarray, time: np.ndarray, fractions: tuple[float, float, float]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Split time-sorted samples at two global timestamps, about ``fractions`` of them each.

    The cut times are the times of the samples at the 80 % and 90 % positions (for 8:1:1);
    every sample at a cut time goes to the later split, so no timestamp is in two splits.
    A fraction of 0 gives an empty split (a cut past the last sample is its time + 1). A
    split with a positive fraction that comes out empty is a DataError: its cut fell inside
    a block of tied timestamps (day-granular times, say), which the later split took whole.
    """
    try:
        f = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        f = np.full(1, np.nan)
    if f.shape != (3,) or not np.isfinite(f).all() or f.min() < 0 or abs(f.sum() - 1) > 1e-6:
        raise ValueError(f"split must be three finite fractions >= 0 summing to 1, got "
                         f"{fractions}")
    n = samples.size
    if n < 3:
        raise DataError(f"only {n} samples after filtering; need at least 3 to split")
    ts = time[samples]
    pos = (0, min(int(round(n * f[0])), n), min(int(round(n * (f[0] + f[1]))), n), n)
    cuts = tuple(int(ts[p]) if p < n else int(ts[-1]) + 1 for p in pos[1:3])
    train = samples[ts < cuts[0]]
    valid = samples[(ts >= cuts[0]) & (ts < cuts[1])]
    test = samples[ts >= cuts[1]]
    check_splits_filled((train, valid, test), f, ts, pos, cuts)
    return train, valid, test, cuts


def check_splits_filled(parts: tuple[np.ndarray, ...], fractions: np.ndarray, ts: np.ndarray,
                        pos: tuple[int, ...], cuts: tuple[int, int]) -> None:
    """Refuse an empty split that was asked for a positive fraction, naming the tied
    timestamp its cut fell in (training then failed far away, in the AUC of an empty set).
    ``pos``: the splits' boundary positions in time order (0, a, b, n)."""
    n = ts.size
    for k, name in enumerate(("train", "valid", "test")):
        if fractions[k] == 0 or parts[k].size:
            continue
        head = f"split {tuple(float(x) for x in fractions)}: the {name} split is empty"
        if pos[k] == pos[k + 1]:
            raise DataError(f"{head}: a fraction of {fractions[k]:g} of {n} samples rounds "
                            "to none; give it a larger fraction")
        cut = cuts[0]  # train and valid: the block at the first cut took their positions
        tied, before = int((ts == cut).sum()), int((ts < cut).sum())
        raise DataError(f"{head}: {tied} of {n} samples share the timestamp {cut} (positions "
                        f"{before / n:.1%} to {(before + tied) / n:.1%} of the time order), "
                        "and a split never cuts through one timestamp; choose fractions "
                        "whose cuts fall outside that block")


def _codes(values: list[str]) -> tuple[np.ndarray, int]:
    """Categorical codes 1..V in sorted order, 0 for missing (""/None); cardinality V + 1."""
    vocab = sorted({v for v in values if v})
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return np.array([index.get(v, 0) if v else 0 for v in values], dtype=np.int64), len(vocab) + 1


def build_dataset(raw: RawData, min_history: int = 5, core: int = 5,
                  split: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> RecDataset:
    """Apply labels, k-core, id remapping, time sort, history and the 8:1:1 time split."""
    n = raw.user.shape[0]
    if n == 0:
        raise DataError(f"{raw.name}: no interactions")
    for arr, nm in ((raw.item, "item"), (raw.rating, "rating"), (raw.time, "time")):
        if arr.shape[0] != n:
            raise DataError(f"{raw.name}: {nm} has {arr.shape[0]} rows, user has {n}")
    rating = raw.rating.astype(np.float32)
    if not np.isfinite(rating).all():
        raise DataError(f"{raw.name}: non-finite ratings")
    u_raw, u_code = np.unique(raw.user, return_inverse=True)
    i_raw, i_code = np.unique(raw.item, return_inverse=True)
    u_code, i_code = u_code.reshape(-1), i_code.reshape(-1)
    check_unique_pairs(raw, u_raw, u_code, i_raw, i_code)
    # Items without metadata cannot be described to the LLM; drop them before the k-core.
    has_meta = np.array([str(x) in raw.items for x in i_raw], dtype=bool)
    keep = has_meta[i_code]
    check_item_rows(raw, i_raw, has_meta, keep)
    if not keep.any():
        raise DataError(f"{raw.name}: no interaction's item has metadata")
    sub = np.flatnonzero(keep)
    sub = sub[k_core(u_code[sub], i_code[sub], core)]
    if sub.size == 0:
        raise DataError(f"{raw.name}: nothing left after {core}-core filtering")
    # Dense 0-based ids of what is left, in raw-id order.
    u_kept, user = np.unique(u_code[sub], return_inverse=True)
    i_kept, item = np.unique(i_code[sub], return_inverse=True)
    time = raw.time[sub].astype(np.int64)
    order = np.argsort(time, kind="stable")
    user, item, time = user[order].astype(np.int64), item[order].astype(np.int64), time[order]
    rating = rating[sub][order]
    label = label_from_rating(rating, raw.source)
    n_users, n_items = u_kept.size, i_kept.size
    user_raw_id = np.array([str(x) for x in u_raw[u_kept]])
    item_raw_id = np.array([str(x) for x in i_raw[i_kept]])

    ptr, index, hist_len = history_lengths(user, time, n_users)
    samples = np.flatnonzero(hist_len >= min_history).astype(np.int64)
    if samples.size < 3:  # said here, where the cause is known: min_history filtered them
        raise DataError(f"{raw.name}: only {samples.size} samples have min_history = "
                        f"{min_history} earlier interactions (the longest history is "
                        f"{int(hist_len.max()) if hist_len.size else 0}); need at least 3 "
                        "to split")
    train, valid, test, split_time = split_by_time(samples, time, split)

    # Item side.
    metas = [raw.items[k] for k in item_raw_id]
    titles = [str(m.get("title", "")).strip() for m in metas]
    # Each genre once, in the file's order (dict keys); the table is [items, longest list].
    genre_lists = [list(dict.fromkeys(g for g in m.get("genres", []) if g)) for m in metas]
    longest = max(range(len(genre_lists)), key=lambda r: len(genre_lists[r]), default=None)
    if longest is not None and len(genre_lists[longest]) > MAX_ITEM_GENRES:
        raise DataError(f"{raw.name}: item {item_raw_id[longest]} lists "
                        f"{len(genre_lists[longest])} genres (at most {MAX_ITEM_GENRES}: the "
                        "genre table holds the longest list for every item) in "
                        f"{raw.files.get('items', 'its items file')}")
    genre_vocab = ["<pad>"] + sorted({g for gl in genre_lists for g in gl})
    gindex = {g: i for i, g in enumerate(genre_vocab)}
    width = max(1, max(len(gl) for gl in genre_lists))
    item_genre_ids = np.zeros((n_items, width), dtype=np.int64)
    for r, gl in enumerate(genre_lists):
        item_genre_ids[r, : len(gl)] = [gindex[g] for g in gl]
    years = [str(m["year"]) if m.get("year") else "" for m in metas]
    cols, names, cards = [item_genre_ids[:, 0]], ["genre"], [len(genre_vocab)]
    year_codes, year_card = _codes(years)
    cols.append(year_codes)
    names.append("year")
    cards.append(year_card)
    for f in raw.item_fields:
        c, card = _codes([str(m.get(f, "") or "") for m in metas])
        cols.append(c)
        names.append(f)
        cards.append(card)
    item_features = np.stack(cols, axis=1)
    item_genres = [", ".join(gl) for gl in genre_lists]
    descriptions = [item_description(raw.kind, t, g, m) for t, g, m in
                    zip(titles, item_genres, metas)]

    # User side.
    profiles = attrs = user_features = None
    ucards: list[int] = []
    if raw.users is not None and raw.user_fields:
        # A user file that lacks users (or whose rows all failed to parse) would leave their
        # profiles and features empty without a word: refuse it.
        missing = [k for k in user_raw_id if k not in raw.users]
        if missing:
            raise DataError(f"{raw.name}: {len(missing)} of {n_users} users have no row in "
                            f"{_file(raw, 'users', 'the user file')} (raw ids "
                            f"{', '.join(missing[:3])}, ...); it looks truncated or corrupt")
        rows = [raw.users[k] for k in user_raw_id]
        fields = list(raw.user_fields) + sorted({k for r in rows for k in r}
                                                 - set(raw.user_fields))
        attrs = {f: [str(r.get(f, "") or "") for r in rows] for f in fields}
        ucols = []
        for f in raw.user_fields:
            c, card = _codes(attrs[f])
            ucols.append(c)
            ucards.append(card)
        user_features = np.stack(ucols, axis=1)
        profiles = [user_profile(raw.source, {f: attrs[f][u] for f in fields})
                    for u in range(n_users)]

    op, thr = LABEL_RULES[raw.source]
    return RecDataset(
        name=raw.name, source=raw.source, kind=raw.kind, label_rule=f"rating {op} {thr:g}",
        n_users=n_users, n_items=n_items, user=user, item=item, rating=rating, time=time,
        label=label, user_raw_id=user_raw_id, item_raw_id=item_raw_id,
        item_title=titles, item_genres=item_genres, item_description=descriptions,
        item_genre_ids=item_genre_ids, genre_vocab=genre_vocab, item_features=item_features,
        item_feature_names=tuple(names), item_feature_cardinalities=tuple(cards),
        user_profile=profiles, user_attrs=attrs, user_features=user_features,
        user_feature_names=tuple(raw.user_fields) if user_features is not None else (),
        user_feature_cardinalities=tuple(ucards),
        hist_ptr=ptr, hist_index=index, hist_len=hist_len, min_history=min_history,
        samples=samples, train=train, valid=valid, test=test, split_time=split_time,
        extra=dict(raw.extra),
    )
