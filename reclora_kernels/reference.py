"""The oracle: plain, differentiable torch, written for obviousness rather than speed.

Tokens are padded into [R, L_max, d_in] so each row's math is a batched matmul; nothing of
size [T, M, d] is ever built (the largest gathered tensor is the bank slice [R, k, r, d]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_rows(row_ids: torch.Tensor, rows: int):
    """Token -> (row, position) in a padded [rows, L_max] layout, plus the sort order."""
    order = torch.argsort(row_ids, stable=True)
    sorted_rows = row_ids[order]
    counts = torch.bincount(row_ids, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(row_ids.numel(), device=row_ids.device) - starts[sorted_rows]
    max_len = int(counts.max()) if rows > 0 and row_ids.numel() > 0 else 0
    return order, sorted_rows, position, max_len


def lora_delta_reference(
    x2d: torch.Tensor,
    row_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_w: torch.Tensor,
    adapter_idx: torch.Tensor | None,
    mix: int,
) -> torch.Tensor:
    """The LoRA part only, unscaled: [T, d_out], in float32 for half inputs: the last
    contraction accumulates and stays in float32, as the native and Triton backends keep it
    until the scale is applied (in fp16 an unscaled B s past 65,504 was inf where
    scale * B s fits)."""
    tokens, d_in = x2d.shape
    acc = torch.promote_types(x2d.dtype, torch.float32)
    rows = adapter_w.shape[0]
    d_out = lora_b.shape[1]
    if tokens == 0:
        return (x2d.new_zeros(0, d_out, dtype=acc) + 0 * adapter_w.sum() + 0 * lora_a.sum()
                + 0 * lora_b.sum())
    order, sorted_rows, position, max_len = pad_rows(row_ids, rows)
    x_pad = x2d.new_zeros(rows, max_len, d_in).index_put((sorted_rows, position), x2d[order])
    # The shrinks are masked at the pads: 0 * NaN there (a NaN adapter of a row with fewer
    # tokens, or none) reached that row's gradients and, through the mix, every adapter it
    # lists, though y does not depend on it.
    real = torch.zeros(rows, max_len, dtype=torch.bool, device=x2d.device)
    real[sorted_rows, position] = True
    # A row without tokens: its weights are not read (y has none of its tokens), so a NaN
    # or inf there must not make 0 * NaN in the gradients of adapters other rows share.
    adapter_w = torch.where(real.any(1)[:, None], adapter_w, 0)

    if adapter_idx is None:  # dense: every row mixes the whole bank
        bank_a, bank_b = lora_a, lora_b
        if mix == 0:
            a_mix = torch.einsum("bm,mrd->brd", adapter_w, bank_a)
            b_mix = torch.einsum("bm,mor->bor", adapter_w, bank_b)
        else:
            shrink = torch.einsum("bld,mrd->blmr", x_pad, bank_a)
            shrink = torch.where(real[..., None, None], shrink, 0)
            delta = torch.einsum("blmr,bm,mor->blo", shrink.to(acc), adapter_w.to(acc),
                                 bank_b.to(acc))
    else:
        bank_a, bank_b = lora_a[adapter_idx], lora_b[adapter_idx]  # [R, k, r, d]
        if mix == 0:
            a_mix = torch.einsum("bj,bjrd->brd", adapter_w, bank_a)
            b_mix = torch.einsum("bj,bjor->bor", adapter_w, bank_b)
        else:
            shrink = torch.einsum("bld,bjrd->bljr", x_pad, bank_a)
            shrink = torch.where(real[..., None, None], shrink, 0)
            delta = torch.einsum("bljr,bj,bjor->blo", shrink.to(acc), adapter_w.to(acc),
                                 bank_b.to(acc))
    if mix == 0:
        shrink = torch.where(real[..., None], torch.bmm(x_pad, a_mix.transpose(1, 2)), 0)
        delta = torch.bmm(shrink.to(acc), b_mix.to(acc).transpose(1, 2))

    delta_sorted = delta[sorted_rows, position]
    return delta_sorted[torch.argsort(order)]


def lora_mix_reference(
    x2d, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale: float, mix: int
) -> torch.Tensor:
    """y = x W^T + bias + scale * LoRA-mixture(x), packed [T, d_out]."""
    delta = lora_delta_reference(x2d, row_ids, lora_a, lora_b, adapter_w, adapter_idx, mix)
    base = F.linear(x2d, weight, bias)
    return (base + scale * delta).to(base.dtype)  # half inputs: scaled, then rounded once
