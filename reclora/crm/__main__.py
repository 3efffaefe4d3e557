"""Stage 1 alone: train CRMs on a dataset and report test AUC (95% bootstrap) and LogLoss.

    python -m reclora.crm                         # DIN, SIM, DeepFM on ML-100K
    python -m reclora.crm --crms din --epochs 4 --output runs/crm

Writes <output>/<name>.pt (the best-on-validation model) and <output>/crm_results.json,
and prints a table plus paired-bootstrap AUC differences between the models. A bad option
or file is one line on stderr and a non-zero exit (--debug or RECLORA_DEBUG=1: traceback).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from reclora import metrics
from reclora.cli import (
    DEBUG_HELP,
    K_ID_MAX,
    LR_RANGE,
    SEED_MAX,
    ArgumentParser,
    StoreOnce,
    device_option,
    float_between,
    guarded,
    int_at_least,
    int_between,
    nonempty_path,
    threads_option,
)
from reclora.crm.train import (
    CRM_CLASSES,
    CRMTrainConfig,
    dataset_splits,
    predict,
    train_crm_on_dataset,
)


def main(argv: list[str] | None = None) -> int:
    return guarded("python -m reclora.crm", _main, argv)


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m reclora.crm",
                       description=__doc__.split("\n")[0] + " " + DEBUG_HELP)
    p.add_argument("--dataset", default="ml-100k", type=nonempty_path,
                   help="dataset name or folder")
    p.add_argument("--crms", default="din,sim,deepfm", help="comma list of CRM names")
    p.add_argument("--output", default="runs/crm", type=nonempty_path, action=StoreOnce,
                   help="folder for checkpoints and JSON")
    d = CRMTrainConfig()
    p.add_argument("--epochs", type=int_at_least(1), default=d.epochs)
    p.add_argument("--patience", type=int_at_least(1), default=d.patience)
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size)
    p.add_argument("--lr", type=float_between(*LR_RANGE), default=d.lr)
    p.add_argument("--k-id", type=int_between(1, K_ID_MAX), default=d.history_len,
                   help=f"history items per sample, 1 to {K_ID_MAX}")
    p.add_argument("--seed", type=int_between(0, SEED_MAX), default=d.seed)
    p.add_argument("--device", type=lambda t: device_option(t, allow_auto=False),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=threads_option(), default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    names = [s.strip().lower() for s in a.crms.split(",") if s.strip()]
    bad = [n for n in names if n not in CRM_CLASSES]
    if not names or bad:
        p.error(f"--crms must list names from {sorted(CRM_CLASSES)}, got {a.crms!r}")
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:  # it trained twice, over its own checkpoint, and was compared with itself
        p.error(f"--crms lists {twice[0]} twice, got {a.crms!r}")
    if a.threads:
        torch.set_num_threads(a.threads)

    from reclora.data.base import load_dataset

    out = Path(a.output)
    t0 = time.perf_counter()
    ds = load_dataset(a.dataset)
    out.mkdir(parents=True, exist_ok=True)
    batches = dataset_splits(ds, a.k_id)
    print(f"{ds.name}: train {ds.train.size}, valid {ds.valid.size}, test {ds.test.size} "
          f"samples, K_id {a.k_id} ({time.perf_counter() - t0:.1f} s)")
    labels = ds.label[ds.test]
    # Intervals over users, as `reclora run` reports them: a user's samples are not
    # independent (166 users hold ML-100K's 9,381 test samples).
    users = ds.user[ds.test]
    results, probs = {}, {}
    for name in names:
        cfg = CRMTrainConfig(epochs=a.epochs, patience=a.patience, batch_size=a.batch_size,
                             lr=a.lr, history_len=a.k_id, seed=a.seed, device=a.device,
                             checkpoint=str(out / f"{name}.pt"), progress=not a.no_progress)
        res = train_crm_on_dataset(name, ds, cfg, batches=batches)
        probs[name] = predict(res.model, batches["test"], device=a.device)
        ci = metrics.bootstrap_auc(labels, probs[name], seed=a.seed, groups=users)
        results[name] = {**res.summary(), "test_auc_ci95": [ci.low, ci.high]}
        print(f"{name}: test AUC {res.test['auc']:.4f} [{ci.low:.4f}, {ci.high:.4f}] "
              f"LogLoss {res.test['logloss']:.4f}, valid AUC {res.valid['auc']:.4f}, best "
              f"epoch {res.best_epoch}/{len(res.epochs)}, {res.train_s:.0f} s")
    diffs = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            dd = metrics.paired_bootstrap_auc(labels, probs[x], probs[y], seed=a.seed,
                                             groups=users)
            diffs[f"{x}-{y}"] = dd.as_dict()
    print("\n| model | test AUC (95% CI) | LogLoss | valid AUC | epochs | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        lo, hi = r["test_auc_ci95"]
        print(f"| {name} | {r['test']['auc']:.4f} ({lo:.4f}-{hi:.4f}) | "
              f"{r['test']['logloss']:.4f} | {r['valid']['auc']:.4f} | "
              f"{r['best_epoch']}/{len(r['epochs'])} | {r['train_s']:.0f} |")
    for k, dd in diffs.items():
        print(f"AUC {k}: {dd['diff']:+.4f} [{dd['low']:+.4f}, {dd['high']:+.4f}] "
              f"{'beyond noise' if dd['significant'] else 'within noise'}")
    from reclora.few2many import atomic_write_json

    atomic_write_json(out / "crm_results.json", {"dataset": ds.name, "k_id": a.k_id,
                                                  "models": results, "paired_auc_diff": diffs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
