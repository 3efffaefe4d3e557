"""Search-based Interest Model (Pi et al., CIKM 2020), RecLoRA's CRM for long histories.

Two stages over the rated history (RECLORA.md s. 3: SIM on ML-25M, E = 64, 3 layers):

1. General Search Unit (GSU): score every history item against the target and keep the
   top `search_k`, re-sorted into time order.
   - "soft": cosine of the item vectors (the same learned embeddings as the ESU);
     SIM's soft search. The top-k choice carries no gradient; the kept items do.
   - "hard": the number of genres shared with the target (SIM's category search),
     recency breaking ties.
2. Exact Search Unit (ESU) on the kept items: each rated item vector plus an embedding of
   its time gap to the target (SIM's Delta-t, log2-day buckets), then `n_layers` masked
   self-attention layers (pre-norm transformer blocks), then DIN's target attention
   (masked, no softmax).

    h_u   = MLP_3x256([user id + profile, t, esu interest, mean of kept items])
    logit = Linear(256, 1)(h_u)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reclora.crm.base import (
    CRM,
    HIDDEN_DIM,
    CRMBatch,
    CRMSchema,
    ItemUserEmbedder,
    init_output,
    mlp,
)
from reclora.crm.din import TargetAttention

__all__ = ["SIM", "general_search"]

# Time-gap buckets: floor(log2(1 + gap in days)) up to 2^14 days (45 years); bucket 0 is
# "same day or unknown". 16 rows cover every gap a rating dataset can hold.
_GAP_BUCKETS = 16


def general_search(scores: torch.Tensor, mask: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, k'] of the top-k real history items by `scores`, in time order, and
    their mask (k' = min(k, L); rows with fewer than k real items are padded, mask False).

    Ties go to the more recent item, exactly: a stable sort over the history reversed (a
    float32 position bonus, used before, rounded away on whole genre counts past ~150 items).
    """
    b, length = scores.shape
    k = min(k, length)
    s = scores.detach().masked_fill(~mask, float("-inf")).flip(1)
    top = length - 1 - s.sort(dim=1, descending=True, stable=True).indices[:, :k]
    top_mask = torch.gather(mask, 1, top)
    # Time order among the kept items (history positions are oldest-first); padding last.
    key = torch.where(top_mask, top, top + length)
    order = key.argsort(dim=1)
    return torch.gather(top, 1, order), torch.gather(top_mask, 1, order)


class _Block(nn.Module):
    """Pre-norm self-attention + feed-forward block over the kept items, masked.

    A fused qkv projection + F.scaled_dot_product_attention: the same CPU time here as
    nn.MultiheadAttention (3 blocks, forward + backward at 512 x 20 x 64: 0.14 s both),
    and one code path in training and eval (MHA swaps in a fused kernel in eval mode).
    These blocks are about 80% of a SIM step, which is why SIM trains ~2x slower than DIN.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, k, e = x.shape
        # A row with no real item would attend to nothing (NaN); let it see its first
        # slot instead; its output is zeroed below anyway.
        first = torch.arange(k, device=mask.device) == 0
        keys = mask | (~mask.any(1, keepdim=True) & first)
        q, kk, v = self.qkv(self.norm1(x)).view(b, k, 3, self.heads, e // self.heads).permute(
            2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kk, v, attn_mask=keys[:, None, None, :])
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, k, e)))
        x = x + self.dropout(self.ff(self.norm2(x)))
        return torch.where(mask.unsqueeze(-1), x, 0.0)


class SIM(CRM):
    """SIM: GSU top-`search_k` search then the ESU. See the module docstring.

    search: "soft" or "hard". n_layers: self-attention layers in the ESU (3, the paper's
    ML-25M setting). heads: attention heads (dim must divide by it).
    """

    name = "sim"

    def __init__(self, schema: CRMSchema, dim: int = 64, search: str = "soft",
                 search_k: int = 20, n_layers: int = 3, heads: int = 2, mlp_layers: int = 3,
                 attention_hidden: tuple[int, ...] = (80, 40), dropout: float = 0.1,
                 id_dropout: float = 0.1) -> None:
        super().__init__(schema, dim=dim, search=search, search_k=search_k,
                         n_layers=n_layers, heads=heads, mlp_layers=mlp_layers,
                         attention_hidden=tuple(attention_hidden), dropout=dropout,
                         id_dropout=id_dropout)
        if search not in ("soft", "hard"):
            raise ValueError(f"search must be 'soft' or 'hard', got {search!r}")
        if search_k < 1 or n_layers < 0 or mlp_layers < 1:
            raise ValueError(f"search_k and mlp_layers must be >= 1 and n_layers >= 0, got "
                             f"{search_k}, {mlp_layers}, {n_layers}")
        if heads < 1 or dim % heads:
            raise ValueError(f"heads must be >= 1 and divide dim={dim}, got {heads}")
        self.search = search
        self.search_k = search_k
        self.embed = ItemUserEmbedder(schema, dim, id_dropout)
        self.gap = nn.Embedding(_GAP_BUCKETS, dim)
        nn.init.normal_(self.gap.weight, std=0.05)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(n_layers))
        self.attention = TargetAttention(dim, tuple(attention_hidden))
        in_dim = (self.embed.n_user_slots + 3) * dim
        self.mlp = mlp([in_dim] + [HIDDEN_DIM] * mlp_layers, dropout)
        self.out = nn.Linear(HIDDEN_DIM, 1)
        init_output(self.out)

    def _search_scores(self, batch: CRMBatch, target: torch.Tensor,
                       items: torch.Tensor) -> torch.Tensor:
        if self.search == "soft":
            # Per distinct item, then gathered: ~15x fewer item vectors than B x L slots.
            uniq, inverse = torch.unique(items, return_inverse=True)
            hist = F.normalize(self.embed.item_vectors(uniq, drop=False), dim=-1)[inverse]
            return (hist * F.normalize(target, dim=-1).unsqueeze(1)).sum(-1)
        g_t = self.embed.item_genre_ids[batch.item]  # [B, M]
        g_h = self.embed.item_genre_ids[items]  # [B, L, M]
        shared = (g_h.unsqueeze(-1) == g_t[:, None, None, :]) & (g_h > 0).unsqueeze(-1)
        return shared.any(-1).sum(-1).float()

    def _gap_bucket(self, batch: CRMBatch, pos: torch.Tensor) -> torch.Tensor:
        if batch.time is None or batch.hist_times is None:
            return torch.zeros_like(pos)
        ht = torch.gather(batch.hist_times, 1, pos)
        days = (batch.time.unsqueeze(1) - ht).clamp(min=0).float() / 86400.0
        return torch.log2(1.0 + days).floor().long().clamp(0, _GAP_BUCKETS - 1)

    def forward_hidden(self, batch: CRMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.hist_mask
        items = torch.where(mask, batch.hist_items, torch.zeros_like(batch.hist_items))
        target = self.embed.item_vectors(batch.item)
        with torch.no_grad():
            pos, kept = general_search(self._search_scores(batch, target.detach(), items),
                                       mask, self.search_k)
        sel_items = torch.gather(items, 1, pos)
        sel_ratings = torch.gather(batch.hist_ratings, 1, pos)
        x = self.embed.history_vectors(sel_items, sel_ratings, kept)
        x = x + self.gap(self._gap_bucket(batch, pos)) * kept.unsqueeze(-1)
        for block in self.blocks:
            x = block(x, kept)
        interest, _ = self.attention(target, x, kept)
        mean = x.sum(1) / kept.sum(1, keepdim=True).clamp(min=1)
        z = torch.cat([self.embed.user_vectors(batch.user), target, interest, mean], -1)
        h = self.mlp(z)
        return self.out(h).squeeze(-1), h
