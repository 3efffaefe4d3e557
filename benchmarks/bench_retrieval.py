"""Time the data path on the real ML-100K: load, embed items (MiniLM), retrieve for all samples.

    .venv/bin/python benchmarks/bench_retrieval.py [--threads N] [--repeats 3]

Writes benchmarks/results/retrieval_cpu.md. The embedding is timed cold (fresh cache dir),
then the retrieval preparation (LongShortRetriever.retrieve_all over every sample, K_text=10,
K_id=60) is timed for cosine, dot and recent, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reclora.data import load_dataset
from reclora.data.embeddings import _sentence_encoder, item_embeddings, minilm_dir, use_bf16
from reclora.data.prompts import build_prompt
from reclora.retriever import LongShortRetriever

TARGET_S = 30.0  # issue 5: retrieval preparation for all ML-100K samples on the 2-core box


def timed(fn, repeats: int = 1) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--embed-batch", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrieval_cpu.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []
    load_before = os.getloadavg()

    t_load, _, ds = timed(lambda: load_dataset(args.dataset))
    rows.append(("load + protocol (parse, 5-core, split, history CSR)", f"{t_load:.2f} s"))

    t_model, _, _ = timed(lambda: _sentence_encoder(str(minilm_dir()), "cpu"))
    rows.append(("load MiniLM-L6 (once per process)", f"{t_model:.1f} s"))
    embs = {}
    with tempfile.TemporaryDirectory() as cache:
        for prec in ("fp32", "bf16"):
            if prec == "bf16" and not use_bf16("auto"):
                continue
            t_emb, _, embs[prec] = timed(lambda prec=prec: item_embeddings(
                ds, "minilm", cache_dir=cache, batch_size=args.embed_batch, precision=prec,
                progress=False))
            rows.append((f"embed {ds.n_items} items, MiniLM-L6, {prec} (cold cache)",
                         f"{t_emb:.1f} s"))
            t_embed_default = t_emb  # the last one is what precision="auto" picks
        t_hit, _, _ = timed(lambda: item_embeddings(ds, "minilm", cache_dir=cache,
                                                    precision="fp32", progress=False))
    rows.append(("embed, cache hit (safetensors)", f"{t_hit * 1000:.1f} ms"))
    emb = embs["fp32"]
    agree = None
    if "bf16" in embs:
        agree = float((embs["fp32"] * embs["bf16"]).sum(1).min())

    n = ds.samples.size
    results, best_times = {}, {}
    for sim, mode in (("cosine", "semantic"), ("dot", "semantic"), ("cosine", "recent")):
        def prep(sim=sim, mode=mode):
            r = LongShortRetriever(ds, emb, k_text=10, k_id=60, similarity=sim, mode=mode)
            return r.retrieve_all(progress=False)

        best, all_t, table = timed(prep, args.repeats)
        results[(sim, mode)], best_times[(sim, mode)] = table, best
        name = f"retrieve_all {mode}" + (f" ({sim})" if mode == "semantic" else "")
        rows.append((f"{name}: {n} samples, K_text=10, K_id=60",
                     f"{best:.2f} s (median {statistics.median(all_t):.2f} s, "
                     f"{n / best / 1000:.0f} k samples/s)"))
    table = results[("cosine", "semantic")]
    t_gather, _, _ = timed(lambda: [table.batches(ds.samples[a:a + 4096])
                                    for a in range(0, n, 4096)])
    rows.append(("HistoryBatch gather for all samples (text + id)", f"{t_gather:.2f} s"))

    sub = ds.samples[:2000]
    text_hb, _ = table.batches(sub)
    items, ratings, mask = text_hb.items.numpy(), text_hb.ratings.numpy(), text_hb.mask.numpy()
    t_prompt, _, _ = timed(lambda: [build_prompt(ds, int(i), items[b][mask[b]],
                                                 ratings[b][mask[b]])
                                    for b, i in enumerate(sub)])
    rows.append(("build_prompt, no tokenizer (per prompt)",
                 f"{t_prompt / sub.size * 1e6:.0f} us"))

    # How much semantic retrieval changes the short history, for the record.
    recent_start = torch.from_numpy(ds.hist_len[table.samples] - 10).unsqueeze(1)
    in_recent = (table.text_positions >= recent_start) & table.text_mask
    overlap = float(in_recent.sum()) / float(table.text_mask.sum())

    best_sem = best_times[("cosine", "semantic")]
    cold_total = t_load + t_model + t_embed_default + best_sem
    load_after = os.getloadavg()
    lines = [
        "# Retrieval preparation on the CPU (ML-100K)",
        "",
        "Command: `" + " ".join([".venv/bin/python benchmarks/bench_retrieval.py",
                                 *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the box is "
        "shared, so times are upper bounds). Date: "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Dataset: {ds.name}, {ds.n_users} users, {ds.n_items} items, {ds.n_interactions} "
        f"interactions, {n} samples (history >= {ds.min_history}).",
        "",
        "| step | time |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        f"Target: retrieval preparation for all samples < {TARGET_S:.0f} s: "
        f"{'met' if best_sem < TARGET_S else 'NOT met'} ({best_sem:.2f} s, semantic cosine, "
        "embeddings cached). From nothing (load, MiniLM load, embed with the default "
        f"precision, retrieve): {cold_total:.1f} s.",
        "",
        f"Semantic vs recent, K_text=10: {overlap:.1%} of the semantically retrieved items are "
        "also among the 10 most recent.",
        "",
        "bf16 vs fp32 item embeddings: lowest cosine over all items "
        + (f"{agree:.6f}." if agree is not None else "n/a (no native bf16 here)."),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
