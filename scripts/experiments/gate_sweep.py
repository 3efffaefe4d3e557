"""Issue 14 item 3: RecLoRA's gate options chosen on validation, with everything else as
`reclora run` would do it (the same Run, subsets, out-of-sample DIN and stage-2 harness).

    .venv/bin/python scripts/experiments/gate_sweep.py --temperature 1 5 --output runs/gate

Trains the DIN once (the run's CRM stage), then RecLoRA once per setting; prints and appends
to <output>/gate_sweep.jsonl each setting's validation AUC and LogLoss (what the choice is
made on) and its test AUC (reported, never used to choose). Any `reclora run` option can be
passed after `--`, e.g. `-- --n 256 --n-test 100`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0, 5.0])
    p.add_argument("--output", default="runs/gate_sweep")
    args, run_args = p.parse_known_args(argv)
    run_args = [a for a in run_args if a != "--"]

    from reclora.llm import scoped_threads
    from reclora.pipeline import GATE_CRM, config_from_args

    cfg = config_from_args(["--output", args.output, "--crms", GATE_CRM, "--no-progress",
                            *run_args])
    with scoped_threads():  # Run installs a thread policy: it ends with the sweep
        return _sweep(cfg, args, run_args)


def _sweep(cfg, args, run_args) -> int:
    from reclora.pipeline import GATE_CRM, Run

    run = Run(cfg)
    run.load_data()
    run.check_model()  # the LLM stages' fingerprints hold the model's digest
    run.crm_stage(GATE_CRM)
    log = Path(args.output) / "gate_sweep.jsonl"
    resolved = run.cfg  # "auto" options resolved on this device, and the digest
    for t in args.temperature:
        run.cfg = replace(resolved, temperature=t)
        run.out = Path(args.output) / f"temperature-{t:g}"
        start = time.perf_counter()
        res = run.llm_stage("reclora")
        row = {"temperature": t, "valid_auc": res["valid"]["auc"],
               "valid_logloss": res["valid"]["logloss"], "best_step": res["best_step"],
               "steps": res["steps"], "test_auc": res["auc"], "n_valid": int(run.valid.size),
               "n_train": res["n_train"], "wall_s": time.perf_counter() - start,
               "options": run_args}
        print(json.dumps(row), flush=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
