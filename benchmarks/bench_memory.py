"""Peak memory and time of load + split + one CRM epoch on ML-25M-format synthetic data.

    .venv/bin/python benchmarks/bench_memory.py                      # 1M and 10M ratings
    .venv/bin/python benchmarks/bench_memory.py --sizes 1000000 --slice 50000 --out -

For each size, synthetic ratings are written in ML-25M's own files (``ratings.csv``:
userId,movieId,rating,timestamp; ``movies.csv``: movieId,title,genres with "|", quoted
titles) into a temporary folder, with a realistic skew: about 150 ratings per user on
average but lognormal per user (up to a tenth of the items), Zipf-like item popularity
(exponent 1), half-star ratings (a user bias plus an item quality plus noise, centred on
3.6), each user's ratings spread over their own active period. Then a fresh child process
(so the sizes never share a peak) runs

    load_dataset(folder)                 # reader + 5-core + labels + history + time split
    dataset_splits(ds, k=60)             # sample indices only; histories per minibatch
    train_crm(DIN, one epoch over a fixed slice of the training split, validation slice)

and reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the RSS after
each phase and the time of each. The table goes to benchmarks/results/memory.md with the
machine, load average and command. Targets (issue 16): at 10M ratings within 8 GiB peak
RSS; from 1M to 10M ratings peak RSS grows at most 3x.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western")
T0, T1 = 789_652_009, 1_574_327_703  # ML-25M's first and last timestamps


# ------------------------------------------------------------------ the data
def generate(folder: Path, n_ratings: int, seed: int = 0) -> dict:
    """Write ratings.csv and movies.csv with about `n_ratings` distinct (user, item) rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_users = max(100, n_ratings // 150)
    n_items = int(min(60_000, max(2_000, n_ratings // 170)))
    # Ratings per user: lognormal (median ~90, mean ~150, a long tail), at least 10.
    per_user = np.maximum(10, rng.lognormal(np.log(90), 1.0, n_users)).astype(np.int64)
    per_user = np.minimum(per_user, n_items // 10)
    per_user = np.maximum(1, np.round(per_user * n_ratings / per_user.sum())).astype(np.int64)
    # Zipf-like item popularity (p ~ 1 / rank), ids shuffled so popularity is not id order.
    p = 1.0 / np.arange(1, n_items + 1)
    cdf = np.cumsum(p / p.sum())
    item_ids = rng.permutation(n_items) + 1
    # Draw with replacement, drop repeated (user, item) pairs, top up (a few passes) until
    # the count holds.
    need = int(per_user.sum())
    key = np.unique(np.repeat(np.arange(n_users, dtype=np.int64), per_user) * n_items
                    + np.searchsorted(cdf, rng.random(need), side="right").clip(0, n_items - 1))
    for _ in range(8):
        if key.size >= need:
            break
        m = int((need - key.size) * 1.5) + 100
        u = rng.integers(0, n_users, m)
        it = np.searchsorted(cdf, rng.random(m), side="right").clip(0, n_items - 1)
        key = np.unique(np.concatenate([key, u * n_items + it]))
    key = rng.permutation(key)[:need]
    user, item = key // n_items, key % n_items
    del key
    # Time: each user active over their own period inside [T0, T1].
    start = rng.uniform(T0, T1, n_users)
    span = np.minimum(T1 - start, rng.exponential(2 * 365 * 86400, n_users))
    ts = (start[user] + rng.uniform(0, 1, user.size) * span[user]).astype(np.int64)
    # Ratings: a user bias plus an item quality plus noise, so a CRM has something to learn.
    quality, bias = rng.normal(0, 0.6, n_items), rng.normal(0, 0.4, n_users)
    rating = np.clip(np.round((3.6 + bias[user] + quality[item] + rng.normal(0, 0.8, user.size))
                              * 2) / 2, 0.5, 5.0)
    order = np.lexsort((ts, user))  # ML-25M's files are sorted by user, then time
    user, item, rating, ts = user[order] + 1, item_ids[item[order]], rating[order], ts[order]
    with open(folder / "ratings.csv", "w", encoding="utf-8") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
        step = 1_000_000
        for a in range(0, user.size, step):
            b = slice(a, a + step)
            np.savetxt(fh, np.column_stack([user[b], item[b], rating[b], ts[b]]),
                       fmt=["%d", "%d", "%.1f", "%d"], delimiter=",")
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        for i in range(1, n_items + 1):
            k = 1 + int(rng.integers(0, 3))
            g = "|".join(sorted(rng.choice(GENRES, size=k, replace=False)))
            title = f"Movie {i}, The ({1920 + i % 100})" if i % 7 == 0 else \
                f"Movie {i} ({1920 + i % 100})"
            w.writerow([i, title, g])
    return {"ratings": int(user.size), "users": int(n_users), "items": int(n_items),
            "csv_mb": round((folder / "ratings.csv").stat().st_size / 2**20, 1)}


# ------------------------------------------------------------- the measured child
def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB else


def measure(folder: Path, slice_n: int, valid_n: int, crm: str, batch_size: int,
            k: int, seed: int, full_batch: bool = False) -> dict:
    """Load + split + one CRM epoch over a fixed slice, in this process; numbers as a dict.

    full_batch: build every split as one CRMBatch first (`dataset_batches`, the path before
    issue 16), for comparison."""
    import torch

    from reclora.crm import (
        CRMSchema,
        CRMTrainConfig,
        build_crm,
        dataset_batches,
        dataset_splits,
        train_crm,
    )
    from reclora.data.base import load_dataset

    torch.set_num_threads(1)
    out: dict = {"rss_start_mb": _rss_mb()}
    t = time.perf_counter()
    ds = load_dataset(folder)
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load_mb"], out["peak_after_load_mb"] = _rss_mb(), _peak_mb()
    out.update(interactions=ds.n_interactions, users=ds.n_users, items=ds.n_items,
               train=int(ds.train.size))
    t = time.perf_counter()
    splits = (dataset_batches if full_batch else dataset_splits)(ds, k)
    rng = np.random.default_rng(seed)
    train = splits["train"].select(np.sort(rng.choice(len(splits["train"]),
                                                      min(slice_n, len(splits["train"])),
                                                      replace=False)))
    valid = splits["valid"].select(slice(0, valid_n))
    torch.manual_seed(seed)
    model = build_crm(crm, CRMSchema.from_dataset(ds))
    out["split_s"] = time.perf_counter() - t
    cfg = CRMTrainConfig(epochs=1, batch_size=batch_size, history_len=k, seed=seed,
                         progress=False)
    t = time.perf_counter()
    res = train_crm(model, train, valid, None, cfg)
    out["epoch_s"] = time.perf_counter() - t
    out.update(slice=len(train), valid=len(valid), valid_auc=res.valid["auc"],
               path="full batch (before)" if full_batch else "per minibatch",
               rss_end_mb=_rss_mb(), peak_mb=_peak_mb())
    return out


# ------------------------------------------------------------------ the table
NOTES = """Notes:
- About 690 MiB of every peak is the interpreter with torch imported (`rss_start`, before
  any data); the rest is the dataset (about 95 bytes per rating after load: the interaction
  arrays, the per-user history CSR and its gathered item/rating/time copies), the loader's
  temporaries (the load peak is about 1.6x what it keeps) and one evaluation chunk of 4,096
  samples x 60 history items (about 350 MiB in DIN's attention).
- "per minibatch": `dataset_splits` (SplitSamples) hold sample indices only; each training
  step and each evaluation chunk gathers its own histories. "full batch (before)": every
  split built first as one CRMBatch with 60-item histories (`dataset_batches`, what
  `train_crm_on_dataset` did before issue 16): at 1M ratings it doubles the peak; at 10M it
  would need about 10x that extra (~13 GiB), past the 8 GiB target, so it is not run there.
- Epoch times are of a shared 2-core machine under other users' load (load average above):
  compare them only within one run. "CRM data s": building the splits' CRM data (and the
  model). The 10M epoch is slower than the 1M one for the 10x item catalog (larger
  embedding tables under AdamW, more distinct items per minibatch), not for the data
  gathering. Valid AUC > 0.5 because the synthetic ratings carry a user bias and an item
  quality."""


def _table(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 \
        if hasattr(os, "sysconf") else 0
    lines = [
        "# Memory: load + split + one CRM epoch on ML-25M-format synthetic data",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (shared machine); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Each size in a fresh child process (its own peak). CRM: {args.crm}, K_id {args.k}, "
        f"batch {args.batch_size}, 1 thread, one epoch over a fixed random slice of "
        f"{args.slice:,} training samples, scored on the first {args.valid:,} validation "
        "samples. Peak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` of the child.",
        "",
        "| ratings | csv MiB | users | items | train samples | CRM data | load s | "
        "RSS after load MiB | CRM data s | epoch s | peak RSS MiB | valid AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratings']:,} | {r['csv_mb']} | {r['users']:,} | {r['items']:,} | "
            f"{r['train']:,} | {r['path']} | {r['load_s']:.1f} | {r['rss_after_load_mb']:.0f} | "
            f"{r['split_s']:.2f} | {r['epoch_s']:.1f} | {r['peak_mb']:.0f} | "
            f"{r['valid_auc']:.3f} |")
    new = [r for r in rows if r["path"] == "per minibatch"]
    if len(new) >= 2:
        g = new[-1]["peak_mb"] / new[0]["peak_mb"]
        lines += ["", f"Peak RSS growth {new[0]['ratings']:,} -> {new[-1]['ratings']:,} "
                  f"ratings, per-minibatch path: {g:.2f}x (target at most 3x); largest peak "
                  f"{new[-1]['peak_mb'] / 1024:.2f} GiB (target within 8 GiB)."]
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="comma list of rating counts")
    p.add_argument("--slice", type=int, default=200_000, help="training samples in the epoch")
    p.add_argument("--valid", type=int, default=20_000, help="validation samples scored")
    p.add_argument("--crm", default="din")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--k", type=int, default=60, help="K_id history items per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None,
                   help="keep the generated folders here (reused if present); default: a "
                   "temporary folder, removed at the end")
    p.add_argument("--out", default="benchmarks/results/memory.md", help="'-': stdout only")
    p.add_argument("--full-batch-sizes", default="",
                   help="comma list of sizes also run the old way: whole splits as one "
                   "CRMBatch (dataset_batches), for comparison")
    p.add_argument("--full-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: a folder
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps(measure(Path(a.measure), a.slice, a.valid, a.crm, a.batch_size, a.k,
                                 a.seed, a.full_batch)))
        return 0
    sizes = [int(float(s)) for s in a.sizes.split(",") if s.strip()]
    full_sizes = {int(float(s)) for s in a.full_batch_sizes.split(",") if s.strip()}
    root = Path(a.data_dir) if a.data_dir else Path(tempfile.mkdtemp(prefix="reclora-mem-"))
    rows = []
    try:
        for n in sizes:
            folder = root / f"ml25m-synth-{n}"
            info_file = folder / "info.json"
            if info_file.is_file():
                info = json.loads(info_file.read_text())
            else:
                t = time.perf_counter()
                info = generate(folder, n, a.seed)
                info["gen_s"] = time.perf_counter() - t
                info_file.write_text(json.dumps(info))
            print(f"{n:,} ratings: {info}", file=sys.stderr, flush=True)
            for full in ([False, True] if n in full_sizes else [False]):
                cmd = [sys.executable, __file__, "--measure", str(folder), "--slice",
                       str(a.slice), "--valid", str(a.valid), "--crm", a.crm, "--batch-size",
                       str(a.batch_size), "--k", str(a.k), "--seed", str(a.seed)]
                proc = subprocess.run(cmd + (["--full-batch"] if full else []),
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                r = {**info, **json.loads(proc.stdout.strip().splitlines()[-1])}
                r["ratings"] = info["ratings"]
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    finally:
        if not a.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    command = "python benchmarks/bench_memory.py " + " ".join(
        x for x in (argv if argv is not None else sys.argv[1:]))
    text = _table(rows, a, command.strip())
    print(text)
    if a.out != "-":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
