"""Few2Many stage 2: train PLoRA banks and gates on a few samples, with a frozen CRM and LLM.

    cfg = Stage2Config(n_train=512, num_adapters=16, gated=True)
    inject_adapters(ctr, cfg)                         # PLoRA banks (+ gates) on q/v
    res = run_stage2(ctr, train, valid, test, cfg, out_dir="runs/x/reclora")
    res.test["auc"], res.test_probs, res.best_step, res.train_s

Stage 1 (the CRM on the full training split) is reclora.crm.train_crm_on_dataset; its h_u
[N, 256] per sample is the gate input here (`CTRData.user_reps`). The same trainer runs the
plain-LoRA baselines (num_adapters=1, no gate: exactly LoRA) and the uniform-mixture
ablation (num_adapters=k, no gate: weights 1/k), so every LLM model shares one harness.

Training: AdamW (no weight decay, as the paper), linear warm-up then linear decay to 0,
gradient accumulation, bf16 autocast where it pays (CUDA; CPUs with AVX512-BF16), gradient
clipping. The loss (cfg.loss): the cross-entropy of the Yes/No logits ("pair", the default)
or the causal-LM cross-entropy of the answer token over the whole vocabulary ("vocab",
RECLORA.md's). Model selection: the adapters are scored on the validation subset at
`eval_points` evenly spaced steps (the last one included) and the best validation AUC wins;
the test split is scored once, with that model (the reference code picked on test).

Distributed: run under `torchrun --nproc_per_node=N`; `init_distributed()` joins the group
(gloo on CPU, nccl on CUDA), each optimizer step takes one global batch of
batch_size x grad_accum x world samples, rank r the r-th slice of it, and DDP averages the
gradients. A global batch is the same samples in the same order for any world size, so a
2-process run matches a 1-process run with grad_accum doubled (tests/test_few2many.py).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import operator
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from reclora import metrics
from reclora.gates import check_temperature
from reclora.llm import LLMCTR, amp_context, enable_grad_ckpt, retune_threads

__all__ = [
    "CTRData",
    "STAGE2_LOSSES",
    "Stage2Config",
    "Stage2Result",
    "TokenStore",
    "atomic_write_json",
    "close_distributed",
    "dist_info",
    "evaluate",
    "has_gates",
    "init_distributed",
    "inject_adapters",
    "main_first",
    "run_stage2",
    "sample_subset",
    "train_stage2",
    "wait_for_main",
    "ADAPTERS_FILE",
]

# The selected adapters of a stage, in its folder (the best validation step's banks and gates).
ADAPTERS_FILE = "best.safetensors"


# ------------------------------------------------------------------------- config
STAGE2_LOSSES = ("pair", "vocab")  # Stage2Config.loss


@dataclass
class Stage2Config:
    """Stage-2 settings (written as stage2_config.json into the run folder).

    n_train: training samples, a count (int >= 1) or a fraction of the pool (float in
        (0, 1]). num_adapters, rank, alpha, mix, target_modules: the PLoRA bank (paper: 16,
        8, 16, "factor", q/v). gated: a PersonalizedGate per layer fed with h_u (RecLoRA);
        False gives uniform weights 1/k (with k = 1: plain LoRA). temperature, gate_hidden,
        gate_dropout: the gate. lr, gate_lr (None: lr): AdamW learning rates. warmup_ratio:
        share of steps with a linear warm-up. eval_points: validation evaluations spread over
        training for model selection (>= 1; the last step is always one). loss: what training
        minimises, "pair" (the cross-entropy of the two answer logits, the quantity P(yes) is
        read from; what the published results trained with) or "vocab" (RECLORA.md's causal-LM
        cross-entropy of the answer token, a softmax over the whole vocabulary at the answer
        position: it also pushes down every other token). Scoring is P(yes) either way.
    """

    n_train: float = 512
    num_adapters: int = 16
    rank: int = 8
    alpha: float = 16.0
    mix: str = "factor"
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    gated: bool = True
    gate_dim: int = 256
    temperature: float = 1.0
    gate_hidden: int = 60
    gate_dropout: float = 0.1
    lr: float = 1e-3
    gate_lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_points: int = 2
    eval_batch_size: int = 16
    amp: str = "auto"
    seed: int = 0
    progress: bool = True
    grad_ckpt: bool = False  # activation checkpointing of the decoder layers (reclora.llm)
    fsdp: bool = False  # under torchrun: shard the frozen LLM with FSDP2 instead of DDP
    loss: str = "pair"
    # The reference code's gate options (reclora.gates.PersonalizedGate): hard top-k routing
    # (None: soft over all adapters) and the square root of the softmax weights.
    gate_top_k: int | None = None
    gate_sqrt: bool = False

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        n = self.n_train
        if isinstance(n, bool) or not (
            (isinstance(n, int) and n >= 1) or (isinstance(n, float) and 0.0 < n <= 1.0)
            or (isinstance(n, float) and n > 1.0 and n.is_integer())
        ):
            raise ValueError(f"n_train must be a count >= 1 or a fraction in (0, 1], got {n!r}")
        for nm in ("num_adapters", "rank", "batch_size", "grad_accum", "epochs", "eval_points",
                   "eval_batch_size", "gate_dim", "gate_hidden"):
            v = getattr(self, nm)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{nm} must be an int >= 1, got {v!r}")
        if self.mix not in ("factor", "output"):
            raise ValueError(f"mix must be 'factor' or 'output', got {self.mix!r}")
        if not self.lr > 0 or (self.gate_lr is not None and not self.gate_lr > 0):
            raise ValueError(f"lr and gate_lr must be > 0, got {self.lr}, {self.gate_lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_temperature(self.temperature)  # the gates' range, before they are built
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if self.loss not in STAGE2_LOSSES:
            raise ValueError(f"loss must be one of {STAGE2_LOSSES}, got {self.loss!r}")
        top_k = self.gate_top_k
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or not 2 <= top_k <= self.num_adapters):
            raise ValueError(f"gate_top_k must be None or an int in [2, num_adapters="
                             f"{self.num_adapters}], got {top_k!r}")
        if not isinstance(self.gate_sqrt, bool):
            raise ValueError(f"gate_sqrt must be a bool, got {self.gate_sqrt!r}")

    def count(self, pool: int) -> int:
        """How many samples n_train means for a pool of `pool` samples."""
        n = self.n_train
        k = int(n) if (isinstance(n, int) or n > 1.0) else max(1, round(n * pool))
        return min(k, pool)


class TokenStore(Sequence):
    """Token ids of many prompts in one flat int32 array with offsets: 4 B a token, where a
    list of Python ints holds about 36 (a whole test split's prompts are kept for the run).
    Prompt i is ids[offsets[i]:offsets[i + 1]], a list of ints only when read."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        ids, offsets = np.asarray(ids), np.asarray(offsets)
        if ids.dtype != np.int32 or ids.ndim != 1:
            raise ValueError(f"ids must be a flat int32 array, got {ids.dtype} {ids.shape}")
        if (offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.size == 0
                or offsets[0] != 0 or offsets[-1] != ids.size
                or (np.diff(offsets) < 0).any()):
            raise ValueError(f"offsets must be int64, rising from 0 to the {ids.size} ids, "
                             f"got {offsets.dtype} {offsets[:4]} ...")
        self.ids, self.offsets = ids, offsets

    @classmethod
    def from_lists(cls, tokens: Sequence[Sequence[int]]) -> TokenStore:
        """The store of `tokens` (one sequence of ids per prompt; each id in int32)."""
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((int(x) for t in tokens for x in t), dtype=np.int64,
                           count=int(offsets[-1]))
        if flat.size and not (0 <= flat.min() and flat.max() <= np.iinfo(np.int32).max):
            raise ValueError(f"token ids must be in [0, 2**31), got {flat.min()} to "
                             f"{flat.max()}")
        return cls(flat.astype(np.int32), offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenStore]) -> TokenStore:
        """The prompts of `parts`, one after the other."""
        if not parts:
            return cls.from_lists([])
        starts = np.cumsum([0] + [p.ids.size for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]]
                                 + [p.offsets[1:] + a for p, a in zip(parts, starts)])
        return cls(np.concatenate([p.ids for p in parts]), offsets)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per prompt, int64 [N]."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i: int | slice) -> list[int] | TokenStore:
        """Prompt i's ids as a list (negative i counts from the end); a slice gives the
        store of those prompts, as a list of token lists gave a list."""
        n = len(self)
        if isinstance(i, slice):
            return self.take(np.arange(n)[i])
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"prompt {i} out of range for {n} prompts")
        i += n if i < 0 else 0
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def take(self, idx: np.ndarray) -> TokenStore:
        """The store of prompts idx[0], idx[1], ... (a copy; negative indices count from the
        end), gathered in blocks so that the index array never spans the whole store."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and not (-n <= idx.min() and idx.max() < n):
            raise IndexError(f"take: indices must be in [-{n}, {n}), got {idx.min()} to "
                             f"{idx.max()}")
        idx = np.where(idx < 0, idx + n, idx)
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        for a in range(0, idx.size, 4096):
            b = min(a + 4096, idx.size)
            src = np.repeat(starts[a:b] - offsets[a:b], lengths[a:b])
            ids[offsets[a]:offsets[b]] = self.ids[src + np.arange(offsets[a], offsets[b])]
        return TokenStore(ids, offsets)


@dataclass
class CTRData:
    """One split's LLM inputs: token ids per prompt (kept as a TokenStore; lists of ids are
    converted), 0/1 labels, optional h_u [N, h]."""

    tokens: TokenStore
    labels: np.ndarray
    user_reps: torch.Tensor | None = None
    samples: np.ndarray | None = None  # dataset indices, for the record

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, TokenStore):
            self.tokens = TokenStore.from_lists(self.tokens)
        labels = np.asarray(self.labels).reshape(-1)
        if labels.size and not np.isin(labels, (0, 1)).all():  # a cast would floor 0.9 to 0
            raise ValueError("labels must hold only 0 and 1")
        self.labels = labels.astype(np.int64)
        if len(self.tokens) != self.labels.size:
            raise ValueError(f"tokens has {len(self.tokens)} prompts but labels "
                             f"{self.labels.size}")
        if self.user_reps is not None and self.user_reps.shape[0] != self.labels.size:
            raise ValueError(f"user_reps has {self.user_reps.shape[0]} rows for "
                             f"{self.labels.size} prompts")

    def __len__(self) -> int:
        return self.labels.size

    def subset(self, idx: np.ndarray) -> CTRData:
        idx = np.asarray(idx, dtype=np.int64)
        return CTRData(self.tokens.take(idx), self.labels[idx],
                       None if self.user_reps is None else self.user_reps[torch.from_numpy(idx)],
                       None if self.samples is None else self.samples[idx])

    def with_user_reps(self, user_reps: torch.Tensor | None) -> CTRData:
        return CTRData(self.tokens, self.labels, user_reps, self.samples)


@dataclass
class Stage2Result:
    """What stage 2 returns (JSON via summary(); probabilities kept for the report)."""

    name: str
    valid: dict[str, float]
    test: dict[str, float] | None
    test_probs: np.ndarray | None
    best_step: int
    steps: int
    n_train: int
    train_s: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "valid": self.valid, "test": self.test,
                "best_step": self.best_step, "steps": self.steps, "n_train": self.n_train,
                "train_s": self.train_s, "history": self.history}


# -------------------------------------------------------------------------- utils
def atomic_write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    """Write JSON to `path` through a temporary file and os.replace (never half-written).
    allow_nan=False: a NaN or inf raises ValueError instead of writing the bare `NaN` that
    strict JSON readers refuse (a report; a stage file may keep a diverged step's NaN loss)."""
    from reclora.checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default, allow_nan=allow_nan)
            f.write("\n")
            f.flush()

    atomic_write(path, write)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sample_subset(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` samples of `pool` drawn without replacement (seeded), in pool order."""
    pool = np.asarray(pool)
    if n >= pool.size:
        return pool.copy()
    rng = np.random.default_rng(seed)
    return np.sort(pool[rng.choice(pool.size, n, replace=False)]) if n > 0 else pool[:0]


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA, gloo on the
    CPU. Returns this process's device (cuda:LOCAL_RANK under CUDA). Without torchrun it
    does nothing and returns `device` (default: cuda if available, else cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return want
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        torch.cuda.set_device(local)
        want = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return want


def _barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


# How long the other ranks wait for rank 0's own work (a CRM, the embedding cache).
WAIT_TIMEOUT = datetime.timedelta(days=7)
_WAIT_GROUP: dict[int, Any] = {}


def wait_for_main() -> None:
    """Every rank waits here until all have arrived (a barrier), with no timeout a long
    stage of rank 0 can hit: rank 0 may be training a CRM on ML-25M for hours while the
    others wait. The barrier runs on a gloo group of its own, made with a 7-day timeout,
    rather than on the default group: the default group keeps its short timeout, so a hang
    in a collective of the LLM training (NCCL) is still reported in minutes, and a CPU
    barrier holds no GPU while it waits. A rank that dies is not waited for that long:
    torchrun ends the whole job when one rank fails. A no-op outside torch.distributed."""
    rank, world = dist_info()
    if world <= 1:
        return
    key = id(dist.group.WORLD)
    if key not in _WAIT_GROUP:  # every rank reaches its first wait alike: made collectively
        _WAIT_GROUP[key] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    dist.barrier(group=_WAIT_GROUP[key])


def close_distributed() -> None:
    """Leave the process group (and the wait group with it), if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WAIT_GROUP.clear()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first while the other ranks wait (wait_for_main), then on
    the others: for work that fills a cache file once (rank 0 computes and writes it
    atomically, the others read it instead of computing and racing to write it)."""
    rank, world = dist_info()
    if world > 1 and rank != 0:
        wait_for_main()
    yield
    if world > 1 and rank == 0:
        wait_for_main()


# ----------------------------------------------------------------------- adapters
def inject_adapters(ctr: LLMCTR, cfg: Stage2Config) -> dict[str, nn.Module]:
    """PLoRA banks on cfg.target_modules of the LLM (+ gates when cfg.gated); the LLM freezes.

    Seeded by cfg.seed, so every rank (and a rerun) starts from the same adapters."""
    from reclora.injection import inject

    torch.manual_seed(cfg.seed)
    return inject(ctr.model, cfg.target_modules, num_adapters=cfg.num_adapters, rank=cfg.rank,
                  alpha=cfg.alpha, mix=cfg.mix,
                  gate_dim=cfg.gate_dim if cfg.gated else None, gate_hidden=cfg.gate_hidden,
                  gate_dropout=cfg.gate_dropout, temperature=cfg.temperature,
                  top_k=cfg.gate_top_k, sqrt=cfg.gate_sqrt)


def _adapter_state(ctr: LLMCTR) -> dict[str, torch.Tensor]:
    from reclora.checkpoint import adapter_state_dict

    return {k: v.detach().clone() for k, v in adapter_state_dict(ctr.model).items()}


def _load_state(ctr: LLMCTR, state: dict[str, torch.Tensor]) -> None:
    from reclora.checkpoint import adapter_state_dict

    live = adapter_state_dict(ctr.model)
    with torch.no_grad():
        for k, v in state.items():
            live[k].copy_(v)


def has_gates(ctr: LLMCTR) -> bool:
    """Whether any injected layer of ctr has a PersonalizedGate (reads h_u)."""
    from reclora.injection import reclora_layers

    return any(m.gate is not None for m in reclora_layers(ctr.model).values())


# ------------------------------------------------------------------------ scoring
@torch.no_grad()
def evaluate(ctr: LLMCTR, data: CTRData, *, batch_size: int = 16, amp: str = "auto",
             progress: bool = False, desc: str = "score") -> tuple[dict[str, float], np.ndarray]:
    """({"auc", "logloss", "accuracy", "n"}, P(yes) [N]); under DDP each rank scores a
    strided shard of the length-sorted prompts and every rank gets all the probabilities."""
    rank, world = dist_info()
    n = len(data)
    if not has_gates(ctr):  # plain LoRA / uniform mixtures: nothing reads user_reps
        data = data.with_user_reps(None)
    order = np.argsort(data.tokens.lengths, kind="stable")
    mine = order[rank::world]
    real = mine.size
    if world > 1 and is_sharded(ctr) and n:
        # Under FSDP every forward is collective (it all-gathers the layers' shards): every
        # rank scores ceil(n / world) prompts, the short ones a repeat that is dropped.
        want = -(-n // world)
        mine = np.concatenate([mine, np.full(want - real, (mine[-1:] if real else order[:1])[0])])
    reps = None if data.user_reps is None else data.user_reps[torch.from_numpy(mine)]
    probs_mine = ctr.predict(data.tokens.take(mine), batch_size=batch_size,
                             user_reps=reps, amp=amp, progress=progress and rank == 0,
                             desc=desc)
    mine, probs_mine = mine[:real], probs_mine[:real]
    probs = np.empty(n, dtype=np.float64)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (mine, probs_mine))
        for idx, p in gathered:
            probs[idx] = p
    else:
        probs[mine] = probs_mine
    return metrics.evaluate(data.labels, probs), probs


# ----------------------------------------------------------------------- sharding
def is_sharded(ctr: nn.Module) -> bool:
    """Whether ctr was sharded with FSDP2 (shard_llm)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(ctr, FSDPModule)


def _decoder_layers(ctr: LLMCTR) -> list[nn.Module]:
    layers = getattr(ctr.body, "layers", None) or getattr(ctr.body, "h", None)
    if layers is None:
        raise ValueError(f"fsdp: cannot find the decoder layers of {type(ctr.model).__name__}"
                         " (expected body.layers or body.h)")
    return list(layers)


def shard_llm(ctr: LLMCTR) -> None:
    """Shard the frozen LLM of ctr across the ranks with FSDP2 (fully_shard): each decoder
    layer is one unit (its weights all-gathered for its forward and again for the backward,
    freed after), the embeddings, final norm and head the root unit. The trainable adapters
    and gates stay whole on every rank (ignored_params; they are small) and train_stage2
    averages their gradients itself, as DDP would. In place. A ctr sharded by an earlier
    stage is left as it is: adapters injected since are new parameters outside every FSDP
    unit (replicated, averaged the same way), and the projections they wrap keep the whole
    weights the earlier stage's snapshot held (reclora.pipeline restores the original
    modules after each stage); load the LLM afresh per stage to shard those too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(ctr):
        return
    _, world = dist_info()
    trainable = {p for p in ctr.parameters() if p.requires_grad}
    mesh = init_device_mesh(ctr.device.type, (world,))
    for layer in _decoder_layers(ctr):
        fully_shard(layer, mesh=mesh, ignored_params=trainable & set(layer.parameters()))
    fully_shard(ctr, mesh=mesh, ignored_params=trainable)


def _average_grads(params: list[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of params over the ranks, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # At least float32 (half grads sum without rounding), float64 kept (it was rounded).
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads], torch.float32)
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


# ----------------------------------------------------------------------- training
def _schedule(total: int, warmup_ratio: float):
    warm = int(round(total * warmup_ratio))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if warm > 0 and step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _eval_steps(total: int, points: int) -> list[int]:
    """`points` evenly spaced optimizer steps in [1, total], the last one included."""
    return sorted({max(1, round(total * (j + 1) / points)) for j in range(points)})


def train_stage2(ctr: LLMCTR, train: CTRData, valid: CTRData, cfg: Stage2Config,
                 out_dir: str | os.PathLike | None = None, name: str = "reclora",
                 ) -> Stage2Result:
    """Train the adapters of `ctr` (already injected) on `train`; keep the step with the best
    validation AUC and leave those adapters loaded. `train` is used whole (sample it first
    with sample_subset / CTRData.subset). Writes best.safetensors and train_log.json to
    out_dir (rank 0, atomically). cfg.grad_ckpt: activation checkpointing for the
    training steps; cfg.fsdp (under torchrun): shard the LLM with FSDP2 (shard_llm, in
    place) instead of wrapping it in DDP."""
    rank, world = dist_info()
    # Checked before training, not when valid is first scored (with one evaluation point,
    # after the last step): a one-class valid cannot select a step, and a NaN h_u row would
    # reach every adapter through the gradients.
    for split_name, split in (("train", train), ("valid", valid)):
        _check_user_reps(split, split_name, cfg.gated)
    _check_both_labels(valid, "valid", "to select a step")
    params = [p for p in ctr.parameters() if p.requires_grad]
    if not params:
        raise ValueError("ctr has no trainable parameters; call inject_adapters first")
    device = ctr.device
    gate_ids = {id(p) for n, p in ctr.named_parameters() if p.requires_grad and ".gate." in n}
    groups = [{"params": [p for p in params if id(p) not in gate_ids], "lr": cfg.lr}]
    if gate_ids:
        groups.append({"params": [p for p in params if id(p) in gate_ids],
                       "lr": cfg.gate_lr or cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    # A last partial global batch smaller than the world would leave a rank idle (and DDP's
    # all-reduce waiting for it): it is dropped, on every rank alike.
    steps_per_epoch = n // global_batch + (1 if n % global_batch >= world else 0)
    if steps_per_epoch == 0:
        raise ValueError(f"train has {n} samples, fewer than the {world} processes")
    model: nn.Module = ctr
    sharded = cfg.fsdp and world > 1
    if sharded:
        shard_llm(ctr)
    elif world > 1:
        # broadcast_buffers=False: the frozen LLM's buffers (rotary tables) are identical on
        # every rank; re-broadcasting them before each forward is wasted traffic.
        model = nn.parallel.DistributedDataParallel(
            ctr, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if cfg.grad_ckpt:
        enable_grad_ckpt(ctr.model)
    try:
        return _train_loop(ctr, model, train, valid, cfg, out_dir, name, params, opt,
                           sharded, steps_per_epoch)
    finally:
        if cfg.grad_ckpt:
            enable_grad_ckpt(ctr.model, on=False)


def _train_loop(ctr: LLMCTR, model: nn.Module, train: CTRData, valid: CTRData,
                cfg: Stage2Config, out_dir: str | os.PathLike | None, name: str,
                params: list[nn.Parameter], opt: torch.optim.Optimizer,
                sharded: bool, steps_per_epoch: int) -> Stage2Result:
    from reclora.checkpoint import save_adapters

    rank, world = dist_info()
    device = ctr.device
    vocab = cfg.loss == "vocab"
    n = len(train)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    evals = _eval_steps(total, cfg.eval_points)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1000 * rank)  # gate dropout draws differ per rank, as in DDP
    out = Path(out_dir) if out_dir is not None else None
    best_auc, best_step, best_state, best_valid = -math.inf, 0, None, {}
    history: list[dict[str, float]] = []
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {name}", disable=not (cfg.progress and rank == 0),
               unit="step", mininterval=2.0)
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        for s in range(steps_per_epoch):
            ctr.train()
            retune_threads()
            batch = perm[s * global_batch:(s + 1) * global_batch]
            mine = np.array_split(batch, world)[rank]
            micro = [mine[j * cfg.batch_size:(j + 1) * cfg.batch_size]
                     for j in range(cfg.grad_accum)]
            micro = [m for m in micro if m.size]
            weights = [m.size * world / batch.size for m in micro]
            if sharded:
                # Every forward and backward under FSDP is collective: every rank runs as
                # many micro-batches as the fullest one, padding with a sample weighed 0.
                most = math.ceil(math.ceil(batch.size / world) / cfg.batch_size)
                while len(micro) < most:
                    micro.append(batch[:1])
                    weights.append(0.0)
            # Each micro-batch's loss weighs by its share of the global batch, so a short last
            # batch and an uneven split across ranks still average over samples.
            step_loss = torch.zeros((), dtype=torch.float64)
            for j, m in enumerate(micro):
                enc = ctr.collate([train.tokens[i] for i in m])
                labels = torch.as_tensor(train.labels[m], device=device)
                reps = None if train.user_reps is None else train.user_reps[torch.from_numpy(m)]
                sync = j == len(micro) - 1 or world == 1 or sharded
                ctx = model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, ctr.personalized(reps if cfg.gated else None), \
                        amp_context(device, cfg.amp):
                    logits = model(**enc, vocab=vocab)
                    loss = ctr.vocab_loss(logits, labels) if vocab else ctr.loss(logits, labels)
                (loss * weights[j]).backward()
                step_loss += loss.detach().double().cpu() * (m.size if weights[j] else 0)
            if sharded:  # the adapters are not sharded: average their gradients as DDP does
                _average_grads(params, world)
            if world > 1:
                buf = step_loss.to(torch.float32).to(device)
                dist.all_reduce(buf)
                step_loss = buf.double().cpu()
            mean_loss = float(step_loss) / batch.size
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = opt.param_groups[0]["lr"]  # the rate this step uses: sched.step() moves it on
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row: dict[str, float] = {"step": step, "loss": mean_loss, "lr": lr,
                                     "elapsed_s": time.perf_counter() - t0}
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if step in evals:
                val, _ = evaluate(ctr, valid, batch_size=cfg.eval_batch_size, amp=cfg.amp,
                                  desc=f"valid {name}")
                row.update(valid_auc=val["auc"], valid_logloss=val["logloss"])
                if rank == 0 and cfg.progress:
                    tqdm.write(f"{name} step {step}/{total}: loss {mean_loss:.4f}  valid AUC "
                               f"{val['auc']:.4f}  logloss {val['logloss']:.4f}")
                if val["auc"] > best_auc:
                    best_auc, best_step, best_valid = val["auc"], step, val
                    best_state = _adapter_state(ctr)
                    if out is not None and rank == 0:
                        save_adapters(ctr.model, out / ADAPTERS_FILE)
            history.append(row)
            if out is not None and rank == 0 and step in evals:
                atomic_write_json(out / "train_log.json", history)
    bar.close()
    train_s = time.perf_counter() - t0
    assert best_state is not None  # the last step is always evaluated
    _load_state(ctr, best_state)
    ctr.eval()
    _barrier()
    return Stage2Result(name=name, valid=best_valid, test=None, test_probs=None,
                        best_step=best_step, steps=total, n_train=n, train_s=train_s,
                        history=history)


def _check_user_reps(data: CTRData, name: str, gated: bool) -> None:
    if not gated:
        return
    if data.user_reps is None:
        raise ValueError(f"cfg.gated needs user_reps (the CRM's h_u) on the {name} data")
    bad = ~torch.isfinite(data.user_reps).reshape(len(data), -1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name}.user_reps row {int(bad.nonzero()[0, 0])} holds NaN or inf")


def _check_both_labels(data: CTRData, name: str, why: str) -> None:
    if np.unique(data.labels).size < 2:
        raise ValueError(f"{name} needs both positive and negative labels {why} (it has "
                         f"{len(data)} samples)")


def run_stage2(ctr: LLMCTR, train: CTRData, valid: CTRData, test: CTRData | None,
               cfg: Stage2Config, out_dir: str | os.PathLike | None = None,
               name: str = "reclora") -> Stage2Result:
    """Sample cfg.n_train of `train`, train, select on `valid`, score `test` once.

    Writes stage2_config.json (and best.safetensors, train_log.json) into out_dir."""
    rank, _ = dist_info()
    n = cfg.count(len(train))
    pick = sample_subset(np.arange(len(train)), n, cfg.seed)
    if test is not None:  # before training: found after it, the whole stage was lost
        _check_user_reps(test, "test", cfg.gated)
        _check_both_labels(test, "test", "for its AUC")
    res = train_stage2(ctr, train.subset(pick), valid, cfg, out_dir, name)
    if test is not None:
        res.test, res.test_probs = evaluate(ctr, test, batch_size=cfg.eval_batch_size,
                                            amp=cfg.amp, progress=cfg.progress,
                                            desc=f"test {name}")
    if out_dir is not None and rank == 0:
        # Written once the adapters are final: written first, a --resume under other
        # options killed mid-training left it beside a finished stage's adapters, which
        # the resume then reused and serving refused as "another version".
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "stage2_config.json", asdict(cfg))
    return res
