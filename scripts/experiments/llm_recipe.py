"""Issue 14 item 2: one plain-LoRA (TALLRec/ReLLa-style) training recipe, scored on VALIDATION.

    .venv/bin/python scripts/experiments/llm_recipe.py --n 256 --n-valid 200 --lr 1e-3 \
        --targets qv --tag baseline
    .venv/bin/python scripts/experiments/llm_recipe.py --overfit 8 --steps 30   # one batch

Trains one LoRA (one adapter, no gate: reclora.few2many's harness, the one `reclora run` uses)
on N training samples of ML-100K and scores a fixed validation subset (never the test split):
prints the training loss per step, the validation AUC / LogLoss at each eval point and the
constant (base-rate) LogLoss for reference, and appends one row to --log (a markdown table).
Nothing here touches the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="LLM folder or .gguf file (default: the embedded SmolLM2-135M)")
    p.add_argument("--n", type=int, default=256, help="training samples")
    p.add_argument("--n-valid", type=int, default=200, help="validation subset size")
    p.add_argument("--valid-balance", choices=("natural", "balanced"), default="natural")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-points", type=int, default=2)
    p.add_argument("--k-text", type=int, default=5)
    p.add_argument("--mode", choices=("recent", "semantic"), default="recent")
    p.add_argument("--variant", default="default", help="prompt variant (reclora.data.prompts)")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--amp", default="bf16", choices=("bf16", "off", "auto"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overfit", type=int, default=0,
                   help="instead: train on this many samples repeatedly (one batch) and "
                        "print the loss per step (a pipeline check)")
    p.add_argument("--steps", type=int, default=30, help="steps for --overfit")
    p.add_argument("--zero-shot", action="store_true", help="also score the untrained LLM")
    p.add_argument("--tag", default="")
    p.add_argument("--log", default="results/ml-100k/llm_recipe.md")
    p.add_argument("--no-log", action="store_true")
    return p.parse_args(argv)


def valid_subset(ds, n: int, balance: str, seed: int = 1) -> np.ndarray:
    """The fixed validation subset (seed 1 as `reclora run`); 'balanced': n/2 of each label."""
    from reclora.few2many import sample_subset

    if balance == "natural":
        return sample_subset(ds.valid, n, seed)
    rng = np.random.default_rng(seed)
    out = []
    for lab in (0, 1):
        pool = ds.valid[ds.label[ds.valid] == lab]
        out.append(pool[rng.choice(pool.size, n // 2, replace=False)])
    return np.sort(np.concatenate(out))


def constant_logloss(y: np.ndarray) -> float:
    p = float(np.mean(y))
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    from reclora.data import load_dataset
    from reclora.data.prompts import PromptBuilder
    from reclora.few2many import (
        CTRData,
        Stage2Config,
        evaluate,
        inject_adapters,
        sample_subset,
        train_stage2,
    )
    from reclora.llm import LLMCTR, load_causal_lm

    t_all = time.perf_counter()
    ds = load_dataset("ml-100k")
    model, tok = load_causal_lm(a.model)
    builder = PromptBuilder(tok, max_tokens=a.max_length, variant=a.variant)
    ctr = LLMCTR(model, tok, add_special_tokens=not builder.uses_chat_template)

    def history(samples: np.ndarray):
        if a.mode == "recent":
            return ds.recent_history(samples, a.k_text)
        from reclora.data.embeddings import item_embeddings
        from reclora.retriever import LongShortRetriever

        ret = LongShortRetriever(ds, item_embeddings(ds, progress=False), k_text=a.k_text,
                                 k_id=60)
        return ret.batches(samples)[0]

    def data(samples: np.ndarray) -> CTRData:
        texts = builder.build_batch(ds, samples, history(samples))
        return CTRData(ctr.encode(texts), ds.label[samples], None, samples)

    n_train = a.overfit or a.n
    train = data(sample_subset(ds.train, n_train, a.seed))
    vs = valid_subset(ds, a.n_valid, a.valid_balance)
    valid = data(vs)
    lens = [len(t) for t in train.tokens]
    print(f"train {len(train)} (pos {train.labels.mean():.3f}), valid {len(valid)} "
          f"(pos {valid.labels.mean():.3f}, constant logloss "
          f"{constant_logloss(valid.labels):.4f}); prompt tokens mean {np.mean(lens):.0f} "
          f"max {max(lens)}", flush=True)
    print("example prompt:\n" + tok.decode(train.tokens[0]), flush=True)

    if a.zero_shot:
        t = time.perf_counter()
        m, _ = evaluate(ctr, valid, batch_size=16, amp=a.amp)
        print(f"zero-shot valid: AUC {m['auc']:.4f} logloss {m['logloss']:.4f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)

    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    cfg = Stage2Config(n_train=n_train, num_adapters=1, rank=a.rank, alpha=alpha,
                       target_modules=TARGETS[a.targets], gated=False, lr=a.lr,
                       batch_size=a.batch_size, grad_accum=a.grad_accum, epochs=a.epochs,
                       warmup_ratio=a.warmup, eval_points=a.eval_points, amp=a.amp,
                       seed=a.seed, progress=False)
    inject_adapters(ctr, cfg)
    n_params = sum(p.numel() for p in ctr.parameters() if p.requires_grad)

    if a.overfit:
        return overfit(ctr, train, cfg, a.steps, n_params)

    res = train_stage2(ctr, train, valid, cfg, name=a.tag or "lora")
    losses = [r["loss"] for r in res.history]
    # Train time: step-to-step gaps, minus the gaps that include a validation pass.
    el = [0.0] + [r["elapsed_s"] for r in res.history]
    evaled = {r["step"] for r in res.history if "valid_auc" in r}
    train_s = sum(el[i + 1] - el[i] for i in range(len(res.history))
                  if i == 0 or res.history[i - 1]["step"] not in evaled)
    steps_timed = sum(1 for i in range(len(res.history))
                      if i == 0 or res.history[i - 1]["step"] not in evaled)
    s_per_sample = train_s / max(1, steps_timed * a.batch_size * a.grad_accum)
    print("train loss per step:", " ".join(f"{x:.3f}" for x in losses))
    w = max(1, len(losses) // 8)
    print("loss, mean per window of", w, "steps:",
          " ".join(f"{np.mean(losses[i:i + w]):.3f}" for i in range(0, len(losses), w)))
    for r in res.history:
        if "valid_auc" in r:
            print(f"step {r['step']}/{res.steps}: valid AUC {r['valid_auc']:.4f} "
                  f"logloss {r['valid_logloss']:.4f}")
    best = res.valid
    last = [r for r in res.history if "valid_auc" in r][-1]
    wall = time.perf_counter() - t_all
    print(f"best valid AUC {best['auc']:.4f} logloss {best['logloss']:.4f} at step "
          f"{res.best_step}/{res.steps}; last AUC {last['valid_auc']:.4f} logloss "
          f"{last['valid_logloss']:.4f}; train {s_per_sample:.3f} s/sample; "
          f"trainable {n_params}; wall {wall:.0f} s", flush=True)
    if not a.no_log:
        log_row(a, res, best, last, s_per_sample, wall, float(np.mean(lens)), valid)
    return 0


def overfit(ctr, train, cfg, steps: int, n_params: int) -> int:
    """Train on one fixed batch for `steps` steps at constant lr; the loss must fall to ~0."""
    from reclora.llm import amp_context

    params = [p for p in ctr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    enc = ctr.collate(train.tokens)
    labels = torch.as_tensor(train.labels)
    print(f"overfit: {len(train)} samples, labels {train.labels.tolist()}, trainable {n_params}")
    ctr.train()
    for s in range(steps):
        t = time.perf_counter()
        with amp_context(ctr.device, cfg.amp):
            logits = ctr(**enc)
            loss = ctr.loss(logits, labels)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        p = torch.softmax(logits.detach(), -1)[:, 1]
        print(f"step {s + 1}: loss {loss.item():.4f} grad-norm {gn.item():.3f} "
              f"P(yes) {np.round(p.numpy(), 2).tolist()} ({time.perf_counter() - t:.1f} s)",
              flush=True)
    return 0


HEADER = ("| tag | N | epochs | steps | lr | targets | r | prompt | valid n (pos) | "
          "best AUC (step) | LogLoss at best | last AUC | last LogLoss | train s/sample | "
          "wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def log_row(a, res, best, last, s_per_sample, wall, mean_len, valid) -> None:
    path = Path(a.log)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Plain-LoRA recipe search (issue 14 item 2), validation only\n\n"
                        + HEADER)
    prompt = f"{a.mode} K={a.k_text} {a.variant} ({mean_len:.0f} tok)"
    if a.model:
        prompt += f", {Path(a.model).name}"
    row = (f"| {a.tag} | {a.n} | {a.epochs} | {res.steps} | {a.lr:g} | {a.targets} | "
           f"{a.rank} | {prompt} | {len(valid)} ({valid.labels.mean():.2f}) | "
           f"{best['auc']:.4f} ({res.best_step}) | {best['logloss']:.4f} | "
           f"{last['valid_auc']:.4f} | {last['valid_logloss']:.4f} | {s_per_sample:.2f} | "
           f"{wall:.0f} |\n")
    with path.open("a") as f:
        f.write(row)
    side = path.with_suffix(".jsonl")
    with side.open("a") as f:
        f.write(json.dumps({"args": vars(a), "valid": best, "best_step": res.best_step,
                            "steps": res.steps, "history": res.history,
                            "train_s_per_sample": s_per_sample, "wall_s": wall}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
