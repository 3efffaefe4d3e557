"""Serving's bookkeeping at the paper's scale: what `observe` and `score` cost before the LLM,
on a store of ML-25M's size (25M interactions, 162,541 users, 59,047 items; synthetic ids,
ratings and times; no model, no dataset download).

    python benchmarks/bench_serving_scale.py                     # 25M interactions
    python benchmarks/bench_serving_scale.py --interactions 2e6  # a quick look

Rows (median of --reps, each side by side with the design it replaced, in one run):

- observe one interaction: the store merged (`_Store.extended`) against a store built over
  every row again (what observe did before), each followed by one pair lookup (the next
  request's "rated before?" check, which sorted the pairs again after a rebuild).
- the view of 16 requests (`Recommender._view`: the histories they read, as a dataset)
  against copying every interaction into the view and gathering its history arrays (what
  the view did before: about 1.2 GB per request at 25M).

Writes benchmarks/results/serving_scale_cpu.md with the machine's name. A CPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, load_avg, provenance, write_markdown  # noqa: E402

from reclora.data.dataset import RecDataset  # noqa: E402
from reclora.serving import Recommender, _Ids, _Store  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "serving_scale_cpu.md"
USERS, ITEMS = 162_541, 59_047  # ML-25M's


def synthetic_store(n: int, seed: int = 0) -> tuple[_Store, RecDataset]:
    """A store of n interactions and the served dataset around it (ids, ratings on ML-25M's
    half-star scale, times in time order)."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, USERS, n), rng.integers(0, ITEMS, n)
    times = np.sort(rng.integers(800_000_000, 1_600_000_000, n))
    rating = (rng.integers(1, 11, n) / 2).astype(np.float32)
    label = (rating > 3).astype(np.int64)
    st = _Store(user, item, rating, times, label, USERS)
    none = np.arange(0)
    ds = RecDataset(
        "synthetic", "ml-25m", "movie", "rating > 3", USERS, ITEMS, user, item, rating, times,
        label, np.array([str(u) for u in range(USERS)], dtype=object),
        np.array([str(i) for i in range(ITEMS)], dtype=object), [""] * ITEMS, [""] * ITEMS,
        [""] * ITEMS, np.zeros((ITEMS, 1), np.int64), [], np.zeros((ITEMS, 1), np.int64),
        ("item",), (1,), None, None, None, (), (), st.hist_ptr, st.hist_index,
        np.zeros(n, np.int64), 1, none, none, none, none, (0, 0))
    return st, ds


def rebuilt(st: _Store, rows: tuple[np.ndarray, ...]) -> _Store:
    """The store observe built before: every row sorted again."""
    return _Store(*(np.concatenate([getattr(st, f), a]) for f, a in
                    zip(("user", "item", "rating", "time", "label"), rows)), st.n_users)


def copied_view(st: _Store, items: np.ndarray, times: np.ndarray) -> object:
    """The view's O(N) work before: every interaction copied, its history arrays gathered."""
    r = items.size
    cat = [np.concatenate([st.user, np.zeros(r, np.int64)]), np.concatenate([st.item, items]),
           np.concatenate([st.rating, np.zeros(r, np.float32)]),
           np.concatenate([st.time, times]), np.concatenate([st.label, np.zeros(r, np.int64)]),
           np.zeros(st.user.size + r, np.int64)]
    return [cat[1][st.hist_index], cat[2][st.hist_index], cat[3][st.hist_index]]


def median_s(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interactions", type=float, default=25e6)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    n = int(a.interactions)
    load0 = load_avg()
    st, ds = synthetic_store(n)
    st.rated(np.zeros(1, np.int64), np.zeros(1, np.int64))  # the pair index, as after a request
    one = (np.array([5]), np.array([7]), np.array([4.0], np.float32),
           np.array([1_000_000_000]), np.array([1]))
    probe = (np.array([1]), np.array([2]))
    merge = median_s(lambda: st.extended(*one, USERS).rated(*probe), a.reps)
    rebuild = median_s(lambda: rebuilt(st, one).rated(*probe), a.reps)

    rng = np.random.default_rng(1)
    rows = rng.choice(n, 16, replace=False)
    users, items, times = st.user[rows], rng.integers(0, ITEMS, 16), st.time[rows] + 1
    own = st.rated_before(users, items, times)
    fake = types.SimpleNamespace(ds=ds, prompt_rating_range=(0.5, 5.0))
    ids = _Ids({}, [], st)
    view = median_s(lambda: Recommender._view(fake, users, items, times, [], ids, own), a.reps)
    copy = median_s(lambda: copied_view(st, items, times), a.reps)
    held = Recommender._view(fake, users, items, times, [], ids, own)[0].n_interactions

    prov = provenance(torch.device("cpu"))
    lines = [
        f"# Serving bookkeeping at {n:,} interactions (synthetic, ML-25M's users and items)",
        "",
        f"{device_name(torch.device('cpu'))}; commit {prov['commit'][:10]}; {prov['timestamp']}; "
        f"1-min load {load0:.2f} -> {load_avg():.2f}; median of {a.reps}. A CPU figure.",
        "",
        "| step | now | before | before / now |",
        "|---|---|---|---|",
        f"| observe 1 interaction + 1 lookup | {merge:.3f} s (merged) | {rebuild:.3f} s "
        f"(rebuilt) | {rebuild / merge:.0f}x |",
        f"| view of 16 requests | {view * 1e3:.1f} ms ({held:,} interactions) | "
        f"{copy * 1e3:.0f} ms (all {n + 16:,}) | {copy / view:.0f}x |",
        "",
        "Command: `python benchmarks/bench_serving_scale.py"
        + (f" --interactions {n}" if n != 25_000_000 else "") + "`",
    ]
    write_markdown(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
