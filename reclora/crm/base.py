"""What every conventional recommender (CRM) shares: the feature schema, the batch, the
embeddings of users, items and rated history items, and the `CRM` interface.

A CRM maps a `CRMBatch` (who, which target item, which rated history) to one CTR logit
per sample, and exposes the 256-d hidden state before its output layer as `h_u`, the
user representation that RecLoRA's gates read (RECLORA.md sections 1 and 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reclora.modes import eval_mode

if TYPE_CHECKING:  # the data layer is only needed to build schemas and batches from it
    from reclora.data.base import HistoryBatch, RecDataset

__all__ = ["CRM", "CRMBatch", "CRMSchema", "ItemUserEmbedder", "mlp"]

HIDDEN_DIM = 256  # h_u width, fixed by the gate's LayerNorm(256) (RECLORA.md section 1)


def _as_long(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer array, got {t.dtype}")
    return t.to(torch.int64)


@dataclass
class CRMSchema:
    """Sizes and per-user / per-item feature tables a CRM is built for.

    user_features [n_users, F_u] and item_features [n_items, F_i]: int64 categorical codes,
    each column below its cardinality. item_genre_ids [n_items, M]: genre ids 1..n_genres-1
    padded with 0 (a multi-valued field, mean-pooled). user_known / item_known [n] bool:
    whether the id occurs in the training period; unknown ids share the zero "unseen"
    embedding, so a test user who never trained does not get an untrained random vector.
    rating_scale: a rating r is embedded at round(r * rating_scale), so 1..5 stars use
    scale 1 and half stars (ML-25M) scale 2; rating_levels is the table size.
    """

    n_users: int
    n_items: int
    user_features: torch.Tensor
    user_cardinalities: tuple[int, ...]
    user_feature_names: tuple[str, ...]
    item_features: torch.Tensor
    item_cardinalities: tuple[int, ...]
    item_feature_names: tuple[str, ...]
    item_genre_ids: torch.Tensor
    n_genres: int
    user_known: torch.Tensor
    item_known: torch.Tensor
    rating_scale: float = 1.0
    rating_levels: int = 6

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"n_users and n_items must be >= 1, got {self.n_users}, "
                             f"{self.n_items}")
        self.user_features = _as_long(self.user_features, "user_features").reshape(
            self.n_users, -1)
        self.item_features = _as_long(self.item_features, "item_features").reshape(
            self.n_items, -1)
        self.item_genre_ids = _as_long(self.item_genre_ids, "item_genre_ids").reshape(
            self.n_items, -1)
        self.user_cardinalities = tuple(int(c) for c in self.user_cardinalities)
        self.item_cardinalities = tuple(int(c) for c in self.item_cardinalities)
        self.user_feature_names = tuple(self.user_feature_names)
        self.item_feature_names = tuple(self.item_feature_names)
        for table, cards, nm in ((self.user_features, self.user_cardinalities, "user"),
                                 (self.item_features, self.item_cardinalities, "item")):
            if table.shape[1] != len(cards):
                raise ValueError(f"{nm}_features has {table.shape[1]} columns but "
                                 f"{len(cards)} cardinalities")
            for j, c in enumerate(cards):
                col = table[:, j]
                if col.numel() and (int(col.min()) < 0 or int(col.max()) >= c):
                    raise ValueError(f"{nm}_features column {j} outside [0, {c})")
        if self.item_genre_ids.numel() and (int(self.item_genre_ids.min()) < 0 or
                                            int(self.item_genre_ids.max()) >= self.n_genres):
            raise ValueError(f"item_genre_ids outside [0, n_genres={self.n_genres})")
        self.user_known = torch.as_tensor(self.user_known, dtype=torch.bool).reshape(-1)
        self.item_known = torch.as_tensor(self.item_known, dtype=torch.bool).reshape(-1)
        if self.user_known.numel() != self.n_users or self.item_known.numel() != self.n_items:
            raise ValueError("user_known / item_known must have n_users / n_items entries")
        if self.rating_scale <= 0 or self.rating_levels < 2:
            raise ValueError("rating_scale must be > 0 and rating_levels >= 2")

    @classmethod
    def from_dataset(cls, ds: RecDataset, max_field_share: float = 0.5) -> CRMSchema:
        """The schema of a `reclora.data` RecDataset. Known users: those with a training
        sample (`ds.train`), the only ones whose id embedding trains (a user with early
        interactions but none with enough history is unseen at training, and at test).
        Known items: those rated in the training period.
        `train_crm` narrows both to the samples it is given (a pool or subset removed): users
        with a sample, items that are a sample's target or history item.

        Categorical fields with more values than `max_field_share` of the rows (the zip
        code of ML-100K: 795 values for 943 users) are near-ids: they never transfer to
        unseen users, so they are left out. The item feature column "genre" (the first
        genre) is dropped as well: the multi-valued `item_genre_ids` carries all genres.
        """
        if not 0.0 < max_field_share <= 1.0:
            raise ValueError(f"max_field_share must be in (0, 1], got {max_field_share}")
        train_period = ds.time < ds.split_time[0]
        user_known = np.bincount(ds.user[ds.train], minlength=ds.n_users) > 0
        item_known = np.bincount(ds.item[train_period], minlength=ds.n_items) > 0

        def pick(table: np.ndarray | None, names: tuple[str, ...], cards: tuple[int, ...],
                 rows: int, drop: tuple[str, ...]) -> tuple[np.ndarray, tuple, tuple]:
            if table is None or not names:
                return np.zeros((rows, 0), dtype=np.int64), (), ()
            keep = [j for j, (n, c) in enumerate(zip(names, cards))
                    if n not in drop and c <= max(2, max_field_share * rows)]
            return (table[:, keep], tuple(names[j] for j in keep),
                    tuple(cards[j] for j in keep))

        uf, un, uc = pick(ds.user_features, ds.user_feature_names,
                          ds.user_feature_cardinalities, ds.n_users, ())
        itf, itn, itc = pick(ds.item_features, ds.item_feature_names,
                             ds.item_feature_cardinalities, ds.n_items, ("genre",))
        # Half-star ratings (ML-25M) need twice the levels; 1..5 stars need 0..5.
        half = bool(np.any(np.abs(ds.rating * 2 - np.round(ds.rating * 2)) < 1e-6) and
                    np.any(np.abs(ds.rating - np.round(ds.rating)) > 1e-6))
        scale = 2.0 if half else 1.0
        levels = int(round(float(ds.rating.max()) * scale)) + 1
        return cls(
            n_users=ds.n_users, n_items=ds.n_items,
            user_features=uf, user_cardinalities=uc, user_feature_names=un,
            item_features=itf, item_cardinalities=itc, item_feature_names=itn,
            item_genre_ids=ds.item_genre_ids, n_genres=len(ds.genre_vocab),
            user_known=user_known, item_known=item_known,
            rating_scale=scale, rating_levels=levels,
        )

    def state(self) -> dict[str, Any]:
        """A dict of plain values and tensors (for checkpoints); `from_state` inverts it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CRMSchema:
        return cls(**state)


@dataclass
class CRMBatch:
    """One batch of CTR samples for a CRM.

    user, item [B] int64; hist_items [B, L] int64, hist_ratings [B, L] float32 and
    hist_mask [B, L] bool (True on real history items; padded slots may hold anything);
    time [B] and hist_times [B, L] int64 Unix seconds (optional, used by SIM's time-gap
    feature); label [B] (optional, 0/1).
    """

    user: torch.Tensor
    item: torch.Tensor
    hist_items: torch.Tensor
    hist_ratings: torch.Tensor
    hist_mask: torch.Tensor
    time: torch.Tensor | None = None
    hist_times: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = self.user.shape[0]
        if self.user.dim() != 1 or self.item.shape != (b,):
            raise ValueError(f"user and item must both be [B], got {tuple(self.user.shape)} "
                             f"and {tuple(self.item.shape)}")
        if self.hist_items.dim() != 2 or self.hist_items.shape[0] != b:
            raise ValueError(f"hist_items must be [B={b}, L], got {tuple(self.hist_items.shape)}")
        shape = self.hist_items.shape
        if self.hist_ratings.shape != shape or self.hist_mask.shape != shape:
            raise ValueError(f"hist_ratings {tuple(self.hist_ratings.shape)} and hist_mask "
                             f"{tuple(self.hist_mask.shape)} must match hist_items {tuple(shape)}")
        if self.hist_mask.dtype != torch.bool:
            raise TypeError(f"hist_mask must be bool, got {self.hist_mask.dtype}")
        if self.hist_times is not None and self.hist_times.shape != shape:
            raise ValueError(f"hist_times must match hist_items {tuple(shape)}")
        for nm in ("time", "label"):
            t = getattr(self, nm)
            if t is not None and t.shape != (b,):
                raise ValueError(f"{nm} must be [B={b}], got {tuple(t.shape)}")
        # Torch indexing wraps -1 to the last row and a NaN rating rounds to level 0: both
        # were scored silently as another user, item or rating.
        for nm in ("user", "item"):
            t = getattr(self, nm)
            if t.is_floating_point() or (t.numel() and bool((t < 0).any())):
                raise ValueError(f"{nm} must hold integer ids >= 0")
        real = self.hist_items[self.hist_mask]
        if self.hist_items.is_floating_point() or (real.numel() and bool((real < 0).any())):
            raise ValueError("hist_items must hold integer ids >= 0 where hist_mask is set")
        if not bool(torch.isfinite(self.hist_ratings[self.hist_mask]).all()):
            raise ValueError("hist_ratings must be finite where hist_mask is set")

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def _map(self, fn) -> CRMBatch:
        return CRMBatch(**{f.name: (None if getattr(self, f.name) is None
                                    else fn(getattr(self, f.name))) for f in fields(self)})

    def to(self, device: torch.device | str) -> CRMBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def select(self, index: torch.Tensor | slice) -> CRMBatch:
        """The samples at `index` (a slice or an index tensor along the batch)."""
        return self._map(lambda t: t[index])

    @classmethod
    def from_history(cls, targets: dict[str, torch.Tensor], hist: HistoryBatch) -> CRMBatch:
        """From `RecDataset.targets(samples)` and any `HistoryBatch` of the same samples
        (recent items, or the LongShortRetriever's K_id items)."""
        return cls(user=targets["user"], item=targets["item"], hist_items=hist.items,
                   hist_ratings=hist.ratings.float(), hist_mask=hist.mask,
                   time=targets.get("time"), hist_times=hist.times,
                   label=targets.get("label"))

    @classmethod
    def from_dataset(cls, ds: RecDataset, samples: np.ndarray | torch.Tensor,
                     k: int = 60, history: HistoryBatch | None = None) -> CRMBatch:
        """The samples' targets with their `k` most recent history items (or `history`)."""
        if history is None:
            history = ds.recent_history(samples, k)
        return cls.from_history(ds.targets(samples), history)


def mlp(sizes: list[int], dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, ReLU (and dropout) after each hidden one."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ItemUserEmbedder(nn.Module):
    """Embeddings of items (id + genres + categorical fields), users (id + profile fields)
    and rated history items (item and rating embeddings -> Linear(2E, E) + ReLU).

    Ids unknown in the training period map to row 0 of their table, a zero vector that
    never trains; during training `id_dropout` sends a fraction of known ids there too, so
    the layers above learn to read an unseen user from history and profile alone (on
    ML-100K most test users are unseen in training).
    """

    def __init__(self, schema: CRMSchema, dim: int = 64, id_dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout}")
        self.dim = dim
        self.id_dropout = id_dropout
        self.rating_scale = schema.rating_scale
        self.rating_levels = schema.rating_levels
        # Row u + 1 for a known user, 0 for an unseen one.
        self.register_buffer("user_row", torch.where(
            schema.user_known, torch.arange(1, schema.n_users + 1), 0), persistent=True)
        self.register_buffer("item_row", torch.where(
            schema.item_known, torch.arange(1, schema.n_items + 1), 0), persistent=True)
        self.register_buffer("user_features", schema.user_features.clone())
        self.register_buffer("item_features", schema.item_features.clone())
        self.register_buffer("item_genre_ids", schema.item_genre_ids.clone())
        self.user_id = nn.Embedding(schema.n_users + 1, dim, padding_idx=0)
        self.item_id = nn.Embedding(schema.n_items + 1, dim, padding_idx=0)
        self.user_fields = nn.ModuleList(nn.Embedding(c, dim) for c in schema.user_cardinalities)
        self.item_fields = nn.ModuleList(nn.Embedding(c, dim) for c in schema.item_cardinalities)
        self.genre = nn.Embedding(schema.n_genres, dim, padding_idx=0)
        self.rating = nn.Embedding(schema.rating_levels, dim)
        self.hist_fuse = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        for emb in (self.user_id, self.item_id, self.genre, self.rating,
                    *self.user_fields, *self.item_fields):
            # Small init (std 0.05 rather than 1) keeps the summed item vectors and the
            # unnormalised attention sums of up to 60 items in a sane range at step 0.
            nn.init.normal_(emb.weight, std=0.05)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    @property
    def n_user_slots(self) -> int:
        """How many E-wide vectors `user_vectors` concatenates."""
        return 1 + len(self.user_fields)

    @property
    def n_item_slots(self) -> int:
        """How many E-wide vectors `item_field_vectors` returns."""
        return 2 + len(self.item_fields)

    @torch.no_grad()
    def keep_users(self, trained: torch.Tensor) -> None:
        """Send every user not in `trained` (user ids) to the unseen row 0: a known user
        without a training sample would score through an id vector that never trained."""
        keep = torch.zeros_like(self.user_row, dtype=torch.bool)
        keep[trained.to(self.user_row.device)] = True
        self.user_row.masked_fill_(~keep, 0)

    @torch.no_grad()
    def keep_items(self, seen: torch.Tensor) -> None:
        """Send every item not marked in `seen` ([n_items] bool: its id row trained) to the
        unseen row 0: an item rated in the training period whose row no training step moved
        kept its random init and was scored through it."""
        self.item_row.masked_fill_(~seen.to(self.item_row.device), 0)

    def _drop_ids(self, rows: torch.Tensor) -> torch.Tensor:
        if self.training and self.id_dropout > 0:
            keep = torch.rand(rows.shape, device=rows.device) >= self.id_dropout
            rows = rows * keep
        return rows

    def item_field_vectors(self, items: torch.Tensor, drop: bool = True) -> list[torch.Tensor]:
        """[..., E] per item field: id, mean of its genre embeddings, each categorical field."""
        rows = self.item_row[items]
        if drop:
            rows = self._drop_ids(rows)
        gids = self.item_genre_ids[items]  # [..., M]
        genre = self.genre(gids).sum(-2) / (gids > 0).sum(-1, keepdim=True).clamp(min=1)
        feats = self.item_features[items]
        return [self.item_id(rows), genre] + [emb(feats[..., j])
                                              for j, emb in enumerate(self.item_fields)]

    def item_vectors(self, items: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """[..., E]: the item field vectors summed.

        Summing (rather than concatenating) keeps one E-wide item vector for the DIN
        attention's [t, h, t-h, t*h] and lets an unseen item still carry its content.
        """
        return torch.stack(self.item_field_vectors(items, drop), 0).sum(0)

    def rating_index(self, ratings: torch.Tensor) -> torch.Tensor:
        idx = torch.round(ratings.float() * self.rating_scale).long()
        return idx.clamp(0, self.rating_levels - 1)

    def history_vectors(self, items: torch.Tensor, ratings: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """[B, L, E]: ReLU(Linear(2E, E)([item vector, rating embedding])), 0 on padding.

        Computed per distinct item and per rating level, then gathered: the Linear splits
        into an item half and a rating half, so a batch of 256 x 60 history slots (about
        1,000 distinct items on ML-100K) runs the item path ~15x fewer times.
        """
        # Padding slots may hold anything (even NaN ratings): read them as item 0, rating 0
        # and zero their vectors, so padding can never change an output.
        items = torch.where(mask, items, torch.zeros_like(items))
        ratings = torch.where(mask, ratings.float(), torch.zeros_like(ratings, dtype=torch.float))
        lin = self.hist_fuse[0]
        uniq, inverse = torch.unique(items, return_inverse=True)
        item_part = F.linear(self.item_vectors(uniq), lin.weight[:, : self.dim])
        rating_part = F.linear(self.rating.weight, lin.weight[:, self.dim :], lin.bias)
        v = torch.relu(item_part[inverse] + rating_part[self.rating_index(ratings)])
        return torch.where(mask.unsqueeze(-1), v, 0.0)

    def user_field_vectors(self, users: torch.Tensor) -> list[torch.Tensor]:
        """[B, E] per user field: the id embedding, then one per profile field."""
        feats = self.user_features[users]
        return [self.user_id(self._drop_ids(self.user_row[users]))] + [
            emb(feats[:, j]) for j, emb in enumerate(self.user_fields)]

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """[B, (1 + F_u) * E]: the user field vectors concatenated."""
        return torch.cat(self.user_field_vectors(users), -1)


class CRM(nn.Module):
    """A conventional recommender: `forward(batch) -> logits [B]`, `h_u` via
    `user_representation(batch) -> [B, 256]` (detached, eval mode).

    Subclasses implement `forward_hidden(batch) -> (logits [B], hidden [B, 256])`.
    `config` holds the constructor keyword arguments, so `build_crm(name, schema,
    **config)` rebuilds the same architecture from a checkpoint.
    """

    name: str = "crm"
    hidden_dim: int = HIDDEN_DIM

    def __init__(self, schema: CRMSchema, **config: Any) -> None:
        super().__init__()
        self.schema_state = schema.state()
        self.config = dict(config)

    def forward_hidden(self, batch: CRMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: CRMBatch) -> torch.Tensor:
        return self.forward_hidden(batch)[0]

    @torch.no_grad()
    def user_representation(self, batch: CRMBatch) -> torch.Tensor:
        """h_u [B, 256]: the hidden state before the output layer, detached, in eval mode
        (no dropout), whatever mode the model is in; the mode is restored afterwards."""
        with eval_mode(self):
            return self.forward_hidden(batch)[1].detach()

    @torch.no_grad()
    def predict_proba(self, batch: CRMBatch) -> torch.Tensor:
        """P(click) [B] in eval mode (mode restored afterwards)."""
        with eval_mode(self):
            return torch.sigmoid(self.forward(batch))


def init_output(layer: nn.Linear, prior: float = 0.5) -> None:
    """Start the output layer at the label prior: zero weights, bias logit(prior)."""
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, math.log(prior / (1 - prior)))
