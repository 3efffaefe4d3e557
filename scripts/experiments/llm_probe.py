"""Issue 14 item 2, diagnostic: is the label readable from the FROZEN LLM's hidden states?

    .venv/bin/python scripts/experiments/llm_probe.py --n 256 --n-valid 160 --variant default

Scores the untrained SmolLM2 on N training prompts and the fixed validation subset, keeps the
hidden state at the answer position of a few layers (and the mean over the prompt's tokens of
the last layer), fits an L2 logistic regression on the training prompts and prints its
validation AUC. If a linear probe reads the label, the information is in the model and a
LoRA that fails to learn it fails by optimisation (steps, lr, noise), not by capacity.
Validation only, never the test split.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> torch.Tensor:
    """Weights [d + 1] of an L2 logistic regression (LBFGS) on standardised features."""
    w = torch.zeros(x.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    xb = torch.cat([x, torch.ones(x.shape[0], 1)], 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y) \
            + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--n-valid", type=int, default=160)
    p.add_argument("--k-text", type=int, default=5)
    p.add_argument("--variant", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", default="8,16,24,30")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)

    from llm_recipe import valid_subset

    from reclora.data import load_dataset
    from reclora.data.prompts import PromptBuilder
    from reclora.few2many import sample_subset
    from reclora.llm import LLMCTR, amp_context, load_causal_lm
    from reclora.metrics import auc

    ds = load_dataset("ml-100k")
    model, tok = load_causal_lm(None)
    builder = PromptBuilder(tok, max_tokens=320, variant=a.variant)
    ctr = LLMCTR(model, tok, add_special_tokens=not builder.uses_chat_template)
    layers = [int(x) for x in a.layers.split(",")]

    def feats(samples: np.ndarray) -> dict[str, torch.Tensor]:
        texts = builder.build_batch(ds, samples, ds.recent_history(samples, a.k_text))
        enc = ctr.encode(texts)
        out: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(enc), 16):
            batch = ctr.collate(enc[s:s + 16])
            with torch.no_grad(), amp_context(ctr.device, "bf16"):
                hs = ctr.body(**batch, use_cache=False, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"]
            last = (mask.shape[1] - 1) - mask.flip(1).argmax(1)
            rows = torch.arange(mask.shape[0])
            for layer in layers:
                out.setdefault(f"last@{layer}", []).append(hs[layer][rows, last].float())
            m = mask.unsqueeze(-1).float()
            out.setdefault("mean@30", []).append((hs[-1].float() * m).sum(1) / m.sum(1))
        return {k: torch.cat(v) for k, v in out.items()}

    t = time.perf_counter()
    tr = sample_subset(ds.train, a.n, 0)
    va = valid_subset(ds, a.n_valid, "natural")
    ftr, fva = feats(tr), feats(va)
    ytr = torch.as_tensor(ds.label[tr], dtype=torch.float32)
    yva = ds.label[va]
    print(f"features in {time.perf_counter() - t:.0f} s; variant {a.variant}, N {a.n}, "
          f"valid {len(va)}")
    for name in ftr:
        mu, sd = ftr[name].mean(0), ftr[name].std(0) + 1e-6
        xtr, xva = (ftr[name] - mu) / sd, (fva[name] - mu) / sd
        res = []
        for l2 in (1e-3, 1e-2, 1e-1):
            w = fit_logreg(xtr, ytr, l2)
            s = (torch.cat([xva, torch.ones(len(va), 1)], 1) @ w).numpy()
            str_ = (torch.cat([xtr, torch.ones(len(tr), 1)], 1) @ w).numpy()
            res.append(f"l2 {l2:g}: valid AUC {auc(yva, s):.4f} "
                       f"(train {auc(ds.label[tr], str_):.3f})")
        print(f"{name}: " + "; ".join(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
