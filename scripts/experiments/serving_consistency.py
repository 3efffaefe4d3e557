"""Does `reclora score` reproduce a finished run's own test predictions? (issue 15 item 4)

    python scripts/experiments/serving_consistency.py --run runs/default [--model reclora]
        [--threads N]

Writes the run's test requests (user_id, item_id, timestamp of predictions.csv) to a
temporary CSV, scores them with `reclora score --run RUN` (the run's thread setting), and
prints the largest absolute difference to the run's column and both AUCs.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from reclora.metrics import auc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--model", default="reclora")
    p.add_argument("--threads", default=None,
                   help="reclora score's --threads (default: the run's setting); under bf16 "
                        "autocast the CPU's sums depend on the thread count")
    a = p.parse_args()
    run = Path(a.run)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with tempfile.TemporaryDirectory() as tmp:
        requests, scores = Path(tmp) / "requests.csv", Path(tmp) / "scores.csv"
        with open(requests, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp"])
            w.writerows([r["user_id"], r["item_id"], r["timestamp"]] for r in rows)
        cli = Path(sys.executable).with_name("reclora")
        subprocess.run([str(cli), "score", "--run", str(run), "--model", a.model, "--input",
                        str(requests), "--output", str(scores), "--no-progress",
                        *(["--threads", a.threads] if a.threads else [])], check=True)
        with open(scores, newline="") as f:
            served = list(csv.DictReader(f))
    keys = [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows]
    assert keys == [(r["user_id"], r["item_id"], r["timestamp"]) for r in served]
    ran = np.array([float(r[a.model]) for r in rows])
    got = np.array([float(r["score"]) for r in served])
    labels = np.array([int(r["label"]) for r in rows])
    diff = np.abs(got - ran)
    print(f"{len(rows)} requests: max |score - run's {a.model}| {diff.max():.3g} "
          f"(mean {diff.mean():.3g}); AUC run {auc(labels, ran):.4f}, "
          f"served {auc(labels, got):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
