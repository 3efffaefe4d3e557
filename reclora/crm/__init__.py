"""Conventional recommenders (CRMs): stage 1 of Few2Many and the source of h_u.

API (what the trainer and the pipeline use):

    from reclora.crm import (CRMBatch, CRMSchema, CRMTrainConfig, build_crm, load_crm,
                             train_crm_on_dataset, dataset_splits, predict)

    ds = load_dataset("ml-100k")
    res = train_crm_on_dataset("din", ds, CRMTrainConfig(checkpoint="out/crm_din.pt"))
    res.model, res.test, res.valid, res.best_epoch, res.train_s, res.summary()

    # h_u for any samples, with the K_id history the CRM was trained on (default: the
    # 60 most recent items; or pass the retriever's HistoryBatch as `history`)
    batch = CRMBatch.from_dataset(ds, samples, k=60)          # or history=retriever(...)
    h_u = res.model.user_representation(batch)               # [B, 256], detached, eval mode
    p = predict(res.model, batch)                             # numpy P(click) [B]
    logits = res.model(batch)                                 # [B], with grad

    model, meta = load_crm("out/crm_din.pt")                  # resume without retraining
    untrained = build_crm("din", CRMSchema.from_dataset(ds))  # the "no Few2Many" ablation

- CRMBatch fields: user, item [B] int64; hist_items [B, L] int64; hist_ratings [B, L]
  float; hist_mask [B, L] bool; optional time [B], hist_times [B, L], label [B].
  `CRMBatch.from_history(ds.targets(samples), history_batch)` builds one from any
  reclora.data HistoryBatch; `.to(device)`, `.select(index)`.
- Every CRM: `forward(batch) -> logits [B]`, `forward_hidden(batch) -> (logits, h [B, 256])`,
  `user_representation(batch) -> h_u [B, 256]` (no grad), `predict_proba(batch)`,
  `hidden_dim == 256`, `name` in {"din", "sim", "deepfm"}.
- `dataset_splits(ds, k)` -> {"train", "valid", "test"}: `SplitSamples`, the sample indices
  of each split whose CRMBatches (targets + K_id history) are gathered per minibatch, so
  memory grows with the batch, not the split (`dataset_batches` builds whole splits at once,
  for small data; the same numbers for a fixed seed).
- `train_crm(model, train, valid, test, config)` (CRMBatch or SplitSamples each) is the
  generic loop (AdamW, early stopping on validation AUC, best checkpoint kept, atomic writes).
- `python -m reclora.crm` trains DIN, SIM and DeepFM on ML-100K and prints test AUC with
  95% bootstrap intervals and paired differences. Measured here (1 thread, shared 2-core
  CPU): DIN 0.757 (33 s), SIM 0.757 (100 s), DeepFM 0.709 (4 s) test AUC.
"""

from reclora.crm.base import CRM, HIDDEN_DIM, CRMBatch, CRMSchema, ItemUserEmbedder
from reclora.crm.deepfm import DeepFM
from reclora.crm.din import DIN, TargetAttention
from reclora.crm.sim import SIM, general_search
from reclora.crm.train import (
    CRM_CLASSES,
    CRMTrainConfig,
    CRMTrainResult,
    SplitSamples,
    build_crm,
    dataset_batches,
    dataset_splits,
    load_crm,
    predict,
    save_crm,
    take,
    train_crm,
    train_crm_on_dataset,
)

__all__ = [
    "CRM",
    "CRM_CLASSES",
    "CRMBatch",
    "CRMSchema",
    "CRMTrainConfig",
    "CRMTrainResult",
    "DIN",
    "DeepFM",
    "HIDDEN_DIM",
    "ItemUserEmbedder",
    "SIM",
    "SplitSamples",
    "TargetAttention",
    "build_crm",
    "dataset_batches",
    "dataset_splits",
    "general_search",
    "load_crm",
    "predict",
    "save_crm",
    "take",
    "train_crm",
    "train_crm_on_dataset",
]
