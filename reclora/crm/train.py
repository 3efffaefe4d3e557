"""Stage 1 of Few2Many: train a CRM on the full training split, select it on validation.

    result = train_crm_on_dataset("din", ds, CRMTrainConfig(checkpoint="runs/x/din.pt"))
    result.model            # the best-on-validation CRM, in eval mode
    result.test             # {"auc", "logloss", "accuracy", "n"} of that model on test

Early stopping and model selection use validation AUC only; the test split is scored once,
with the selected model (the reference code picked the epoch on test: RECLORA.md s. 6).
Checkpoints are written atomically (temporary file in the same folder, then os.replace),
so an interrupted run never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from reclora import metrics
from reclora.checkpoint import atomic_write, check_finite
from reclora.crm.base import CRM, CRMBatch, CRMSchema, ItemUserEmbedder
from reclora.crm.deepfm import DeepFM
from reclora.crm.din import DIN
from reclora.crm.sim import SIM
from reclora.modes import eval_mode

if TYPE_CHECKING:
    from reclora.data.base import HistoryBatch, RecDataset

__all__ = [
    "CRM_CLASSES",
    "CRMTrainConfig",
    "CRMTrainResult",
    "SplitSamples",
    "build_crm",
    "dataset_batches",
    "dataset_splits",
    "load_crm",
    "predict",
    "save_crm",
    "take",
    "train_crm",
    "train_crm_on_dataset",
]

CRM_CLASSES: dict[str, type[CRM]] = {"din": DIN, "sim": SIM, "deepfm": DeepFM}


def build_crm(name: str, schema: CRMSchema, **kwargs: Any) -> CRM:
    """A fresh CRM by name ("din", "sim", "deepfm") with its keyword arguments."""
    key = name.lower()
    if key not in CRM_CLASSES:
        raise ValueError(f"name must be one of {sorted(CRM_CLASSES)}, got {name!r}")
    return CRM_CLASSES[key](schema, **kwargs)


@dataclass
class CRMTrainConfig:
    """Stage-1 settings, chosen on ML-100K (1 CPU thread, validation AUC only).

    epochs: upper bound; early stopping usually ends sooner. patience: epochs in a row
    without a better validation AUC after which training stops (>= 1). 1, because on
    ML-100K every CRM peaked on validation at epoch 1-3 and then only overfit the seen
    users (train loss 0.60 -> 0.54, validation AUC flat or falling; decaying the lr by
    0.3 per epoch did not move the peak). batch_size 512 with lr 2e-3: the same DIN
    validation AUC as 256 / 1e-3 (0.7465 vs 0.7452) for less CPU per epoch (per 10k
    samples: 2.4 s at batch 256, 1.5 s at 1024). history_len: K_id, history items per sample
    (60 in the paper). max_train_samples: a random subset of the training split (None:
    all of it, as Few2Many prescribes; smaller only for quick runs and tests).
    checkpoint: where the best model is written (None: kept in memory only).
    """

    epochs: int = 8
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 1
    history_len: int = 60
    eval_batch_size: int = 4096
    max_train_samples: int | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for nm in ("epochs", "batch_size", "history_len", "eval_batch_size"):
            if getattr(self, nm) < 1:
                raise ValueError(f"{nm} must be >= 1, got {getattr(self, nm)}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 or None, got "
                             f"{self.max_train_samples}")


@dataclass
class CRMTrainResult:
    """What stage 1 returns: the selected model and its numbers."""

    model: CRM
    name: str
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float] | None
    epochs: list[dict[str, float]] = field(default_factory=list)
    train_s: float = 0.0
    n_train: int = 0
    checkpoint: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable numbers (no model)."""
        return {"name": self.name, "best_epoch": self.best_epoch, "valid": self.valid,
                "test": self.test, "epochs": self.epochs, "train_s": self.train_s,
                "n_train": self.n_train, "checkpoint": self.checkpoint}


# ------------------------------------------------------------------ checkpoints
def save_crm(model: CRM, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Write `model` (architecture, schema, weights, `meta`) to `path` atomically."""
    payload = {"name": model.name, "config": model.config, "schema": model.schema_state,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": meta or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_crm(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
             data: bytes | None = None) -> tuple[CRM, dict[str, Any]]:
    """(model in eval mode, meta) from a checkpoint written by `save_crm`; `data`: the
    file's bytes, read by the caller already (who checked their hash: the file is not read
    again, so a writer in between cannot slip other bytes in), `path` then only names it.

    The file is read with torch.load(weights_only=True): tensors and plain containers only,
    so a crafted file (a run folder someone sent) cannot run code while it loads. A file
    that is not such a checkpoint (truncated, empty, random bytes, a pickle of other
    objects, wrong contents) raises ValueError naming the file.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r}: no CRM checkpoint there")
    # Checked first: torch.load's error for a device blamed the file (below).
    try:
        where = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_crm: map_location {map_location!r} is not a device") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_crm: map_location {map_location!r}: no CUDA device here")
    try:
        payload = torch.load(path if data is None else io.BytesIO(data),
                             map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ... all mean: not ours
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"path {str(path)!r} is not a CRM checkpoint that loads safely "
                         f"(tensors and plain values only): {reason[:200]}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"path {str(path)!r} is not a CRM checkpoint (holds "
                         f"{type(payload).__name__}, not a dict)")
    for key in ("name", "config", "schema", "state_dict"):
        if key not in payload:
            raise ValueError(f"path {str(path)!r} is not a CRM checkpoint (no {key!r})")
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"path {str(path)!r} is not a CRM checkpoint (its 'state_dict' holds "
                         f"{type(state).__name__}, not a dict)")
    # A NaN in one embedding row reached only the users and items that read it.
    check_finite(state, f"path {str(path)!r}")
    try:
        schema = CRMSchema.from_state(payload["schema"])
        _check_layer_counts(payload["config"], len(state))
        # Shapes first, on the meta device: the schema and config size every table, and a
        # schema saying 4e6 rating levels allocated 1 GiB before load_state_dict compared it.
        with torch.device("meta"):
            shell = build_crm(payload["name"], _on_meta(schema), **payload["config"])
        shell.load_state_dict(state, assign=True)  # assign: no copy into meta (a warning)
        model = build_crm(payload["name"], schema, **payload["config"])
        model.load_state_dict(state)
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        # Whole, on one line: line 0 of a load_state_dict error is only its heading.
        reason = " ".join(str(e).split())
        raise ValueError(f"path {str(path)!r}: the CRM checkpoint does not build a model "
                         f"({type(e).__name__}: {reason[:400]})") from None
    return model.to(map_location).eval(), payload.get("meta", {})


# Config values that count layers, each layer holding tensors of the state dict: a count
# above the state's number of tensors cannot fit it, and building that many modules takes
# minutes and gigabytes even on the meta device (10,000 MLP layers: 5 s).
_LAYER_COUNTS = ("mlp_layers", "n_layers", "attention_hidden")


def _check_layer_counts(config: Any, n_tensors: int) -> None:
    if not isinstance(config, dict):
        raise TypeError(f"its 'config' holds {type(config).__name__}, not a dict")
    for key in _LAYER_COUNTS:
        value = config.get(key, 0)
        count = len(value) if isinstance(value, (tuple, list)) else value
        if isinstance(count, int) and count > n_tensors:
            raise ValueError(f"config {key} {count} is more layers than the file's "
                             f"{n_tensors} tensors can hold")


def _on_meta(schema: CRMSchema) -> CRMSchema:
    """A copy of schema (checked already) whose tensors are on the meta device, so a model
    built from it under torch.device("meta") has only meta tensors."""
    out = copy.copy(schema)
    for f in fields(schema):
        value = getattr(schema, f.name)
        if isinstance(value, torch.Tensor):
            setattr(out, f.name, value.to("meta"))
    return out


# -------------------------------------------------------------------- data
class SplitSamples:
    """The samples of one split, gathered into CRMBatches one minibatch at a time.

    Holds the sample indices only (8 bytes per sample): targets and the `history_len`
    history items of each sample are read from the dataset's arrays when a minibatch is
    asked for (`batch(index)`), so memory grows with the minibatch, not with the split
    (ML-25M's training split as one CRMBatch with 60-item histories is ~24 GB).

    history_fn(samples, k) -> HistoryBatch chooses the history items (e.g. the
    LongShortRetriever's K_id items); the default is the k most recent ones
    (`ds.recent_history`). `batch(index)` equals `dataset_batches(...)[split].select(index)`
    value for value.
    """

    def __init__(self, ds: RecDataset, samples: np.ndarray | torch.Tensor | list[int],
                 history_len: int = 60,
                 history_fn: Callable[[np.ndarray, int], HistoryBatch] | None = None) -> None:
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.ds = ds
        self.samples = ds.as_samples(samples)
        self.history_len = history_len
        self.history_fn = history_fn

    def __len__(self) -> int:
        return int(self.samples.size)

    @property
    def label(self) -> torch.Tensor:
        """[N] int64 labels of the samples (cheap: no history)."""
        return torch.from_numpy(self.ds.label[self.samples])

    @property
    def user(self) -> torch.Tensor:
        """[N] int64 users of the samples (cheap: no history)."""
        return torch.from_numpy(self.ds.user[self.samples])

    def _rows(self, index: torch.Tensor | np.ndarray | slice | None) -> np.ndarray:
        if index is None:
            return self.samples
        if isinstance(index, slice):
            return self.samples[index]
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return self.samples[np.asarray(index, dtype=np.int64)]

    def select(self, index: torch.Tensor | np.ndarray | slice) -> SplitSamples:
        """The samples at `index` (positions into this split), still ungathered."""
        return SplitSamples(self.ds, self._rows(index), self.history_len, self.history_fn)

    def history(self, samples: np.ndarray) -> HistoryBatch:
        """The `history_len` history items of `samples` (history_fn, or the most recent)."""
        fn = self.history_fn or self.ds.recent_history
        return fn(samples, self.history_len)

    def batch(self, index: torch.Tensor | np.ndarray | slice | None = None) -> CRMBatch:
        """The CRMBatch of the samples at `index` (all of them if None: the whole split at
        once, only for small splits)."""
        s = self._rows(index)
        return CRMBatch.from_history(self.ds.targets(s), self.history(s))



def take(data: CRMBatch | SplitSamples, index: torch.Tensor | np.ndarray | slice) -> CRMBatch:
    """The CRMBatch of the samples at `index` of a CRMBatch (a slice of it) or of a
    SplitSamples (gathered now)."""
    if isinstance(data, CRMBatch):
        return data.select(index)
    return data.batch(index)


def dataset_splits(ds: RecDataset, history_len: int = 60,
                   history_fn: Callable[[np.ndarray, int], HistoryBatch] | None = None,
                   splits: tuple[str, ...] = ("train", "valid", "test")
                   ) -> dict[str, SplitSamples]:
    """One SplitSamples per split (gathered per minibatch by `train_crm` and `predict`)."""
    return {s: SplitSamples(ds, ds.split(s), history_len, history_fn) for s in splits}


def dataset_batches(ds: RecDataset, history_len: int = 60,
                    history_fn: Callable[[np.ndarray, int], HistoryBatch] | None = None,
                    splits: tuple[str, ...] = ("train", "valid", "test")
                    ) -> dict[str, CRMBatch]:
    """One CRMBatch per split holding all its samples (ML-100K train: 75k x 60 history).

    The full-batch path: memory grows with the split (use `dataset_splits` beyond small
    data). history_fn(samples, k) -> HistoryBatch chooses the K_id history items (e.g. the
    LongShortRetriever's); the default is the k most recent ones.
    """
    return {s: d.batch() for s, d in dataset_splits(ds, history_len, history_fn,
                                                    splits).items()}


# -------------------------------------------------------------------- helpers
@torch.no_grad()
def predict(model: CRM, batch: CRMBatch | SplitSamples, batch_size: int = 4096,
            device: str | torch.device | None = None) -> np.ndarray:
    """P(click) for every sample of `batch` (a CRMBatch, or a SplitSamples gathered
    `batch_size` samples at a time), as float64 numpy, in eval mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        out = [torch.sigmoid(model(take(batch, slice(i, i + batch_size)).to(device))).cpu()
               for i in range(0, len(batch), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def _score(model: CRM, batch: CRMBatch | SplitSamples, batch_size: int, device: torch.device
           ) -> dict[str, float]:
    if batch.label is None:
        raise ValueError("batch.label is needed to score a split")
    return metrics.evaluate(batch.label.numpy(), predict(model, batch, batch_size, device))


# ------------------------------------------------------------------ training
def _check_both_labels(labels: torch.Tensor, split: str, why: str) -> None:
    classes = torch.unique(labels).tolist()
    if len(classes) < 2:
        held = f"only label {classes[0]}" if classes else "no samples"
        raise ValueError(f"train_crm: the {split} set has {held} ({why} positives and "
                         "negatives)")


def train_crm(model: CRM, train: CRMBatch | SplitSamples, valid: CRMBatch | SplitSamples,
              test: CRMBatch | SplitSamples | None = None,
              config: CRMTrainConfig | None = None,
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> CRMTrainResult:
    """Train `model` on `train` with AdamW and BCE; keep the epoch with the best validation
    AUC (stop after `patience` epochs in a row without a better one); score `test` once
    with it.

    Each split is a CRMBatch (all in memory) or a SplitSamples (each minibatch's histories
    gathered when it is drawn: memory bounded by the batch size); for a fixed seed both give
    the same minibatches, so the same model. The returned model holds the best weights and
    is in eval mode. If config.checkpoint is
    set, the best model is written there (atomically) each time validation improves.
    """
    cfg = config or CRMTrainConfig()
    if train.label is None or valid.label is None:
        raise ValueError("train and valid batches need labels")
    for split_name, split in (("train", train), ("valid", valid)):
        if not bool(((split.label == 0) | (split.label == 1)).all()):  # ratings 1..5 trained
            raise ValueError(f"train_crm: {split_name}'s labels must be 0 or 1")
    if len(train) == 0:  # before keep_users, which would send every user to the unseen row
        raise ValueError("train_crm: the training set is empty")
    # Model selection is by validation AUC: one class would fail only after the first epoch;
    # the test AUC, after every epoch ran.
    _check_both_labels(valid.label, "validation", "selecting by AUC needs")
    if test is not None and test.label is not None:
        _check_both_labels(test.label, "test", "its AUC needs")
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and id dropout draws
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.select(torch.randperm(len(train), generator=gen)[:cfg.max_train_samples])
    embedders = [m for m in model.modules() if isinstance(m, ItemUserEmbedder)]
    for emb in embedders:  # users with no sample here take the unseen-user path
        emb.keep_users(train.user)
    model.to(device)
    # Items whose id row this training never moves take the unseen-item path too. A row is
    # trained when it gets a nonzero gradient in the first epoch (which draws every sample):
    # what a model reads is its own affair (DeepFM reads no history, SIM only the items its
    # search picks, id dropout skips some), so "a target or history item" kept random rows.
    # Applied before the first validation, so no checkpoint holds the untrained rows.
    rows_trained = [torch.zeros(emb.item_id.num_embeddings, dtype=torch.bool, device=device)
                    for emb in embedders]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(train)
    steps = math.ceil(n / cfg.batch_size)
    best_auc, best_epoch, best_state, best_valid = -math.inf, 0, None, {}
    history: list[dict[str, float]] = []
    stale = 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        bar = tqdm(range(steps), desc=f"{model.name} epoch {epoch}", disable=not cfg.progress,
                   leave=False, mininterval=1.0)
        for step in bar:
            b = take(train, perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]).to(device)
            loss = loss_fn(model(b), b.label.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if epoch == 1:
                for trained, emb in zip(rows_trained, embedders):
                    grad = emb.item_id.weight.grad
                    if grad is not None:
                        trained |= grad.ne(0).any(1)  # no host sync
            opt.step()
            total += float(loss.detach()) * len(b)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{total / min(n, (step + 1) * cfg.batch_size):.4f}")
        if epoch == 1:
            for trained, emb in zip(rows_trained, embedders):
                emb.keep_items(trained[emb.item_row])  # row 0 (padding) never trains
        val = _score(model, valid, cfg.eval_batch_size, device)
        row = {"epoch": epoch, "train_loss": total / n, "valid_auc": val["auc"],
               "valid_logloss": val["logloss"], "elapsed_s": time.perf_counter() - t0}
        history.append(row)
        if cfg.progress:
            tqdm.write(f"{model.name} epoch {epoch}: train loss {row['train_loss']:.4f}  "
                       f"valid AUC {val['auc']:.4f}  logloss {val['logloss']:.4f}")
        if on_epoch is not None:
            on_epoch(row)
        if val["auc"] > best_auc:
            best_auc, best_epoch, best_valid, stale = val["auc"], epoch, val, 0
            best_state = copy.deepcopy(model.state_dict())
            if cfg.checkpoint:
                save_crm(model, cfg.checkpoint, {"epoch": epoch, "valid": val,
                                                 "train_config": asdict(cfg)})
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    train_s = time.perf_counter() - t0
    assert best_state is not None  # at least one epoch ran (epochs >= 1)
    model.load_state_dict(best_state)
    model.eval()
    test_metrics = _score(model, test, cfg.eval_batch_size, device) if test is not None else None
    if cfg.checkpoint:
        save_crm(model, cfg.checkpoint, {"epoch": best_epoch, "valid": best_valid,
                                         "test": test_metrics, "train_s": train_s,
                                         "train_config": asdict(cfg), "epochs": history})
    return CRMTrainResult(model=model, name=model.name, best_epoch=best_epoch,
                          valid=best_valid, test=test_metrics, epochs=history,
                          train_s=train_s, n_train=n, checkpoint=cfg.checkpoint)


def train_crm_on_dataset(name: str, ds: RecDataset, config: CRMTrainConfig | None = None,
                         history_fn: Callable[[np.ndarray, int], HistoryBatch] | None = None,
                         batches: dict[str, CRMBatch | SplitSamples] | None = None,
                         **model_kwargs: Any) -> CRMTrainResult:
    """Build the CRM `name` for `ds` and run `train_crm` on its train/valid/test splits.

    batches: `dataset_splits(ds, ...)` (default: built here; histories gathered per
    minibatch) or `dataset_batches(ds, ...)` (whole splits in memory) to share between CRMs.
    """
    cfg = config or CRMTrainConfig()
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_crm(name, CRMSchema.from_dataset(ds), **model_kwargs)
    b = batches or dataset_splits(ds, cfg.history_len, history_fn)
    return train_crm(model, b["train"], b["valid"], b["test"], cfg)
