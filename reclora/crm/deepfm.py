"""DeepFM (Guo et al., IJCAI 2017): the simple ID baseline, no behaviour history.

Fields: user id, each user profile field, item id, the item's genres (mean-pooled), each
item field. Every field has a first-order weight and an E-wide vector; the logit is

    bias + sum_f w_f + FM(v_1..v_F) + Linear(256, 1)(h),   h = MLP_3x256([v_1, ..., v_F])

with FM the pairwise interactions 1/2 ((sum v)^2 - sum v^2) summed over E. `h_u` is h,
the deep part's last hidden state (the FM terms are scalars beside it).
"""

from __future__ import annotations

import torch
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

__all__ = ["DeepFM"]


class DeepFM(CRM):
    """DeepFM over user and item fields. dim: E; mlp_layers: 256-wide hidden layers."""

    name = "deepfm"

    def __init__(self, schema: CRMSchema, dim: int = 64, mlp_layers: int = 3,
                 dropout: float = 0.1, id_dropout: float = 0.1) -> None:
        super().__init__(schema, dim=dim, mlp_layers=mlp_layers, dropout=dropout,
                         id_dropout=id_dropout)
        if mlp_layers < 1:
            raise ValueError(f"mlp_layers must be >= 1, got {mlp_layers}")
        self.embed = ItemUserEmbedder(schema, dim, id_dropout)
        # First-order weights: the same fields with width 1 (its rating/history parts unused).
        self.linear = ItemUserEmbedder(schema, 1, id_dropout)
        for p in (*self.linear.rating.parameters(), *self.linear.hist_fuse.parameters()):
            p.requires_grad_(False)
        n_fields = self.embed.n_user_slots + self.embed.n_item_slots
        self.mlp = mlp([n_fields * dim] + [HIDDEN_DIM] * mlp_layers, dropout)
        self.out = nn.Linear(HIDDEN_DIM, 1)
        init_output(self.out)

    def forward_hidden(self, batch: CRMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.stack(self.embed.user_field_vectors(batch.user)
                        + self.embed.item_field_vectors(batch.item), 1)  # [B, F, E]
        first = (self.linear.user_field_vectors(batch.user)
                 + self.linear.item_field_vectors(batch.item))
        first = torch.cat(first, -1).sum(-1)
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1)
        h = self.mlp(v.flatten(1))
        return self.out(h).squeeze(-1) + first + fm, h
