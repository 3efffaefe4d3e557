"""Long-Short Modality Retriever (RECLORA.md section 2).

For a sample (user, target item, time), rank the user's history (interactions strictly before
the sample's time) by the similarity of each history item's semantic embedding to the
target's, keep the top ``k_text`` for the LLM prompt and the top ``k_id`` for the ID-based
recommender, and re-sort both into time order. ``mode="recent"`` keeps the most recent items
instead (the no-retrieval baseline of TALLRec and the ablations).

Semantics, per sample b with history h[0..L_b) (oldest first) and target t_b:

    score[b, j] = sim(E[h[j]], E[t_b])             cosine or dot
    keep        = the min(k, L_b) positions j of highest score (ties: the more recent)
    out[b]      = h[sorted(keep)]                  time order, padded, with a mask

Everything is vectorised over a batch of samples: one padded [B, L_max] gather of
similarities, one sort; no Python loop over samples or history items. Samples are processed
in buckets of similar history length so padding stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from reclora.data.base import HistoryBatch, RecDataset

# Below this many items the full item-item similarity table is precomputed (8192^2 fp32 =
# 256 MiB at most); above it, similarities are computed per batch from gathered embeddings.
MAX_TABLE_ITEMS = 8192
# Elements of the [B, L, D] gathered-embedding tensor per chunk on the no-table path
# (32M fp32 = 128 MiB).
MAX_GATHER_ELEMENTS = 32 * 1024 * 1024


@dataclass
class Retrieved:
    """Positions into each sample's history (0 = oldest) and their masks, time order.

    ``text_positions``/``text_mask`` [B, k_text] for the prompt, ``id_positions``/``id_mask``
    [B, k_id] for the recommender. ``dataset.gather_history(samples, pos, mask)`` or
    ``LongShortRetriever.batches`` turn them into item ids and ratings.
    """

    samples: np.ndarray
    text_positions: torch.Tensor
    text_mask: torch.Tensor
    id_positions: torch.Tensor
    id_mask: torch.Tensor


class LongShortRetriever:
    """Semantic (or recent) retrieval of a short and a long history per sample.

    Args:
        dataset: the RecDataset whose histories are searched.
        item_embeddings: [n_items, D] float tensor (or array) of semantic item embeddings;
            may be None for ``mode="recent"``.
        k_text: history length for the prompt (paper: 10; 30 and 60 also tried).
        k_id: history length for the ID-based recommender (paper: 60).
        similarity: "cosine" (paper, ML-1M) or "dot" (paper, ML-25M).
        mode: "semantic" or "recent".
        device: where similarities are computed ("cpu" or "cuda").
        precompute_table: precompute the [n_items, n_items] similarity table (default: when
            n_items <= MAX_TABLE_ITEMS); else gather embeddings per batch.
    """

    def __init__(self, dataset: RecDataset, item_embeddings: torch.Tensor | np.ndarray | None,
                 k_text: int = 10, k_id: int = 60, similarity: str = "cosine",
                 mode: str = "semantic", device: str | torch.device = "cpu",
                 precompute_table: bool | None = None) -> None:
        if k_text < 1 or k_id < 1:
            raise ValueError(f"k_text and k_id must be >= 1, got {k_text}, {k_id}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
        if mode not in ("semantic", "recent"):
            raise ValueError(f"mode must be 'semantic' or 'recent', got {mode!r}")
        self.dataset, self.k_text, self.k_id = dataset, k_text, k_id
        self.similarity, self.mode, self.device = similarity, mode, torch.device(device)
        self.emb: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        if mode == "semantic":
            if item_embeddings is None:
                raise ValueError("item_embeddings is required for mode='semantic'")
            emb = torch.as_tensor(np.asarray(item_embeddings) if not isinstance(
                item_embeddings, torch.Tensor) else item_embeddings).float().to(self.device)
            if emb.dim() != 2 or emb.shape[0] != dataset.n_items:
                raise ValueError(f"item_embeddings must be [n_items={dataset.n_items}, D], "
                                 f"got {tuple(emb.shape)}")
            if not torch.isfinite(emb).all():
                raise ValueError("item_embeddings has non-finite values")
            if similarity == "cosine":
                emb = torch.nn.functional.normalize(emb, dim=1)
            # |<a, b>| <= |a| |b| bounds every partial sum too: under half float32's max,
            # no similarity overflows to -inf and ties with the padding's mask.
            elif float(emb.double().norm(dim=1).max()) ** 2 >= 0.5 * torch.finfo(
                    torch.float32).max:
                raise ValueError("item_embeddings are too large for similarity='dot': their "
                                 "dot products overflow float32 (scale them down)")
            self.emb = emb
            if precompute_table or (precompute_table is None
                                    and dataset.n_items <= MAX_TABLE_ITEMS):
                self.table = emb @ emb.T
        self._hist_item = torch.from_numpy(dataset.hist_item).to(self.device)
        self._k = max(k_text, k_id)

    # ------------------------------------------------------------------ core
    def _scores(self, targets: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """sim(E[hist[b, j]], E[targets[b]]) as [B, L] float32."""
        if self.table is not None:
            return self.table[targets.unsqueeze(1), hist]
        assert self.emb is not None
        b, length = hist.shape
        d = self.emb.shape[1]
        rows = max(1, MAX_GATHER_ELEMENTS // max(1, length * d))
        out = torch.empty(b, length, device=self.device)
        for a in range(0, b, rows):  # chunks over samples bound the [B, L, D] memory
            e_h = self.emb[hist[a:a + rows]]
            # A product and a sum over D, not einsum: einsum is a GEMV for one sample and a
            # bmm for many, which round differently, so near-ties would go another way when
            # one request is served alone than in the run's batches.
            e_t = self.emb[targets[a:a + rows]]
            out[a:a + rows] = (e_h * e_t.unsqueeze(1)).sum(-1)
        return out

    def _rank(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, k] (k = max(k_text, k_id)) in ranking order, best first, and
        the count of real ones per sample (min(k, hist_len))."""
        ds = self.dataset
        hl = torch.from_numpy(ds.hist_len[samples]).to(self.device)
        k = self._k
        count = torch.clamp(hl, max=k)
        lmax = int(hl.max()) if samples.size else 0
        if lmax == 0:
            return torch.zeros(samples.size, k, dtype=torch.int64, device=self.device), count
        ar = torch.arange(lmax, device=self.device)
        valid = ar.unsqueeze(0) < hl.unsqueeze(1)  # strictly-before-time history only
        start = torch.from_numpy(ds.hist_ptr[ds.user[samples]]).to(self.device)
        flat = torch.where(valid, start.unsqueeze(1) + ar, torch.zeros((), dtype=torch.int64,
                                                                          device=self.device))
        hist = self._hist_item[flat]
        targets = torch.from_numpy(ds.item[samples]).to(self.device)
        score = self._scores(targets, hist).masked_fill(~valid, float("-inf"))
        # Reverse so that the stable sort breaks ties in favour of the more recent item.
        order = torch.sort(score.flip(1), dim=1, descending=True, stable=True).indices
        pos = (lmax - 1) - order[:, :k]
        if pos.shape[1] < k:
            pos = torch.nn.functional.pad(pos, (0, k - pos.shape[1]))
        return pos, count

    @staticmethod
    def _time_order(pos: torch.Tensor, count: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first min(k, count) ranked positions, sorted ascending (time order), padded."""
        pos = pos[:, :k]
        mask = torch.arange(k, device=pos.device).unsqueeze(0) < torch.clamp(count, max=k
                                                                             ).unsqueeze(1)
        big = torch.iinfo(torch.int64).max
        srt = torch.sort(torch.where(mask, pos, torch.full_like(pos, big)), dim=1).values
        return torch.where(mask, srt, torch.zeros_like(srt)), mask

    def retrieve(self, samples: np.ndarray | torch.Tensor | list[int]) -> Retrieved:
        """K_text and K_id history positions (time order, masked) for a batch of samples."""
        ds = self.dataset
        s = ds.as_samples(samples)
        if self.mode == "recent":
            tp, tm = ds.recent_positions(s, self.k_text)
            ip, im = ds.recent_positions(s, self.k_id)
            return Retrieved(s, tp, tm, ip, im)
        pos, count = self._rank(s)
        tp, tm = self._time_order(pos, count, self.k_text)
        ip, im = self._time_order(pos, count, self.k_id)
        return Retrieved(s, tp.cpu(), tm.cpu(), ip.cpu(), im.cpu())

    def batches(self, samples: np.ndarray | torch.Tensor | list[int]
                ) -> tuple[HistoryBatch, HistoryBatch]:
        """(text history, id history) as HistoryBatches of item ids, ratings, times, masks."""
        r = self.retrieve(samples)
        ds = self.dataset
        return (ds.gather_history(r.samples, r.text_positions, r.text_mask),
                ds.gather_history(r.samples, r.id_positions, r.id_mask))

    def retrieve_all(self, samples: np.ndarray | None = None, batch_size: int = 2048,
                     progress: bool = True) -> RetrievalTable:
        """Retrieve for many samples at once (default: every sample of the dataset).

        Samples are bucketed by history length (sorted) so each batch pads to a similar
        L_max; the results come back in the order of ``samples``.
        """
        ds = self.dataset
        s = ds.samples if samples is None else ds.as_samples(samples)
        order = np.argsort(ds.hist_len[s], kind="stable")
        n = s.size
        tp = torch.zeros(n, self.k_text, dtype=torch.int32)
        tm = torch.zeros(n, self.k_text, dtype=torch.bool)
        ip = torch.zeros(n, self.k_id, dtype=torch.int32)
        im = torch.zeros(n, self.k_id, dtype=torch.bool)
        for a in tqdm(range(0, n, batch_size), desc=f"retrieve ({self.mode})",
                      disable=not progress, unit="batch"):
            idx = order[a:a + batch_size]
            r = self.retrieve(s[idx])
            t_idx = torch.from_numpy(idx)
            tp[t_idx], tm[t_idx] = r.text_positions.int(), r.text_mask
            ip[t_idx], im[t_idx] = r.id_positions.int(), r.id_mask
        return RetrievalTable(ds, s, tp, tm, ip, im)


@dataclass
class RetrievalTable:
    """Precomputed retrievals for a set of samples; look them up by sample index."""

    dataset: RecDataset
    samples: np.ndarray
    text_positions: torch.Tensor
    text_mask: torch.Tensor
    id_positions: torch.Tensor
    id_mask: torch.Tensor

    def __post_init__(self) -> None:
        self._row = np.full(self.dataset.n_interactions, -1, dtype=np.int64)
        self._row[self.samples] = np.arange(self.samples.size)

    def rows(self, samples: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
        s = self.dataset.as_samples(samples)
        r = self._row[s]
        if (r < 0).any():
            raise KeyError(f"samples {s[r < 0][:5].tolist()} were not retrieved in this table")
        return r

    def batches(self, samples: np.ndarray | torch.Tensor | list[int]
                ) -> tuple[HistoryBatch, HistoryBatch]:
        """(text history, id history) HistoryBatches for these samples."""
        s = self.dataset.as_samples(samples)
        r = torch.from_numpy(self.rows(s))
        ds = self.dataset
        return (ds.gather_history(s, self.text_positions[r].long(), self.text_mask[r]),
                ds.gather_history(s, self.id_positions[r].long(), self.id_mask[r]))
