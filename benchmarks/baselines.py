"""The baselines `bench_lora.py` measures `lora_mix_linear` against, kept apart so that
tests/test_baselines.py can check every one of them against `reclora_kernels.reference` in
float64: a baseline that silently computes something else would make every ratio a lie.

All take the op's arguments with x in the padded [R, L, d_in] layout (R rows of L tokens,
as the RecLoRA reference code and the benchmark feed them) and return y [R, L, d_out]:

    fn(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix) -> y

with lora_a [M, r, d_in], lora_b [M, d_out, r], adapter_w [R, k], adapter_idx [R, k] or None
(dense: k = M), mix "factor" or "output" (semantics: `reclora_kernels.lora_mix_linear`).

- `materialise_bmm`: the RecLoRA reference code's path (RECLORA.md section 6): build each
  row's mixed A_p [R, r, d_in] and B_p [R, d_out, r], then two bmm. Factor mode only: the
  reference code has no output mode.
- `peft_loop`: a per-adapter Python loop in the style of PEFT's mixed-adapter batches (select
  the rows that use an adapter, run its A and B on them, add back). Output mode is one pass;
  factor mode needs two (accumulate the mixed shrink, then expand).
- `naive_two_gemm`: one shrink GEMM over all adapters (dense: x @ [M*r, d_in]^T; gathered:
  a bmm over each row's gathered k*r rows), the mixing step, one expand GEMM; the spec's
  "naive two-GEMM torch form".
- `vllm_style_shrink_expand` (Triton; forward only, k = 1 or M = 1): a stand-in for vLLM's
  punica-style lora_shrink / lora_expand pair, written here from their published design
  (tokens sorted by adapter, fp32 shrink buffer, split-K shrink by atomic_add, expand added
  into the base output). It is not vLLM's code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

MIX = ("factor", "output")


def _check_mix(mix: str) -> None:
    if mix not in MIX:
        raise ValueError(f"mix must be one of {MIX}, got {mix!r}")


def _gathered_bank(lora_a, lora_b, adapter_idx):
    """Each row's k adapters: [R, k, r, d_in] and [R, k, d_out, r] (dense: shared [M, ...])."""
    if adapter_idx is None:
        return lora_a, lora_b
    return lora_a[adapter_idx], lora_b[adapter_idx]


# --- the reference code's path ---------------------------------------------------------------


def materialise_bmm(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix):
    """RecLoRA reference code: materialise A_p, B_p per row, then x A_p^T B_p^T by two bmm."""
    _check_mix(mix)
    if mix != "factor":
        raise ValueError("materialise_bmm: the reference code implements the factor mix only")
    bank_a, bank_b = _gathered_bank(lora_a, lora_b, adapter_idx)
    if adapter_idx is None:
        a_mix = torch.einsum("bm,mrd->brd", adapter_w, bank_a)  # [R, r, d_in]
        b_mix = torch.einsum("bm,mor->bor", adapter_w, bank_b)  # [R, d_out, r]
    else:
        a_mix = torch.einsum("bj,bjrd->brd", adapter_w, bank_a)
        b_mix = torch.einsum("bj,bjor->bor", adapter_w, bank_b)
    delta = torch.bmm(torch.bmm(x, a_mix.transpose(1, 2)), b_mix.transpose(1, 2))
    return F.linear(x, weight, bias) + scale * delta


# --- PEFT-style per-adapter loop -------------------------------------------------------------


def _users(adapter_idx, lora_a, lora_b):
    """(A_m, B_m, rows using m, slots) for every adapter m some row uses: the Python-side
    grouping PEFT does for mixed batches (a host sync, as in PEFT). Dense: rows None (all).

    The used adapters come out of the bank by one gather and one unbind, so that, as with
    PEFT's one Parameter per adapter, the bank's gradient is assembled once: indexing
    lora_a[m] in the loop would build a zero gradient of the whole bank per use (76 s for one
    backward at M = 4096 on the CPU here)."""
    if adapter_idx is None:
        return [(a, b, None, m) for m, (a, b) in enumerate(zip(lora_a.unbind(0), lora_b.unbind(0)))]
    used = torch.unique(adapter_idx)
    groups = []
    for a, b, m in zip(lora_a[used].unbind(0), lora_b[used].unbind(0), used.tolist()):
        r_ids, slots = torch.nonzero(adapter_idx == m, as_tuple=True)
        groups.append((a, b, r_ids, slots))
    return groups


def _rows_of(t, r_ids):
    # Dense: every row uses every adapter, so skip the gather (and its scatter-add backward,
    # which made the loop 10x slower than F.linear on the CPU): the strongest fair loop.
    return t if r_ids is None else t[r_ids]


def _add_rows(out, r_ids, part):
    if r_ids is None:
        out.add_(part)
    else:
        # In place like PEFT's `result[rows] += lora_out`, but index_add_: a row may use
        # one adapter in several slots here, and each use must count.
        out.index_add_(0, r_ids, part)


def peft_loop(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix):
    """Loop over adapters in Python; each runs its A and B on the rows that use it."""
    _check_mix(mix)
    rows, length, _ = x.shape
    rank = lora_a.shape[1]
    y = F.linear(x, weight, bias)
    groups = _users(adapter_idx, lora_a, lora_b)

    def weights(r_ids, slots):
        return (adapter_w[:, slots] if r_ids is None else adapter_w[r_ids, slots]).view(-1, 1, 1)

    if mix == "output":
        for a, b, r_ids, slots in groups:
            part = F.linear(F.linear(_rows_of(x, r_ids), a), b)
            _add_rows(y, r_ids, part * (scale * weights(r_ids, slots)))
        return y
    # factor: B_p (A_p x) = sum_j w_j B_j (sum_i w_i A_i x): a shrink pass, then an expand pass.
    shrink = x.new_zeros(rows, length, rank)
    for a, _, r_ids, slots in groups:
        _add_rows(shrink, r_ids, F.linear(_rows_of(x, r_ids), a) * weights(r_ids, slots))
    for _, b, r_ids, slots in groups:
        part = F.linear(_rows_of(shrink, r_ids), b)
        _add_rows(y, r_ids, part * (scale * weights(r_ids, slots)))
    return y


# --- naive two-GEMM torch form ---------------------------------------------------------------


def naive_two_gemm(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix):
    """One shrink over all of a row's adapters, the mixing step, one expand."""
    _check_mix(mix)
    rows, length, d_in = x.shape
    num_adapters, rank, _ = lora_a.shape
    d_out = lora_b.shape[1]
    slots = adapter_w.shape[1]
    if adapter_idx is None:
        # The whole bank is one [M*r, d_in] matrix: the shrink is one GEMM over all tokens.
        shrink = F.linear(x, lora_a.reshape(num_adapters * rank, d_in))  # [R, L, M*r]
        expand_w = lora_b.permute(1, 0, 2).reshape(d_out, num_adapters * rank)
    else:
        bank_a, bank_b = _gathered_bank(lora_a, lora_b, adapter_idx)
        shrink = torch.bmm(x, bank_a.reshape(rows, slots * rank, d_in).transpose(1, 2))
        expand_w = bank_b.permute(0, 2, 1, 3).reshape(rows, d_out, slots * rank)
    shrink = shrink.view(rows, length, slots, rank)
    w = adapter_w.view(rows, 1, slots, 1)
    if mix == "factor":
        mixed = (shrink * w).sum(2, keepdim=True)  # A_p x: [R, L, 1, r]
        t = mixed * w  # each slot's expand input: w_j * A_p x
    else:
        t = shrink * w
    t = t.reshape(rows, length, slots * rank)
    if adapter_idx is None:
        delta = F.linear(t, expand_w)
    else:
        delta = torch.bmm(t, expand_w.transpose(1, 2))
    return F.linear(x, weight, bias) + scale * delta


# --- vLLM-style shrink + expand pair of Triton kernels (stand-in) ----------------------------


@dataclass(frozen=True)
class TokenMeta:
    """Batch metadata in vLLM's style, built once per batch and reused by every layer:
    token order sorted by adapter, and per active adapter its id, token count and start."""

    sorted_tokens: torch.Tensor  # [T] int32, token indices grouped by adapter
    token_factor: torch.Tensor  # [T] float32 (float64), per-token multiplier of the expand
    lora_ids: torch.Tensor  # [A] int32, active adapters
    counts: torch.Tensor  # [A] int32
    starts: torch.Tensor  # [A] int32
    max_count: int


def vllm_meta(rows: int, length: int, adapter_w, adapter_idx, scale: float, mix: str) -> TokenMeta:
    """Metadata for k = 1 (or M = 1 dense): token n of row b uses adapter idx[b, 0] with
    weight w = adapter_w[b, 0]; the factor mix then scales by w^2 (A_p = w A, B_p = w B),
    the output mix by w."""
    _check_mix(mix)
    if adapter_w.shape[1] != 1:
        raise ValueError("vllm_style_shrink_expand: k = 1 (one adapter per row) only")
    device = adapter_w.device
    ids = (
        adapter_idx[:, 0]
        if adapter_idx is not None
        else torch.zeros(rows, dtype=torch.long, device=device)
    )
    # fp32 (fp64 for fp64 inputs): the expand applies it to its fp32 accumulator.
    w = adapter_w[:, 0].to(torch.float64 if adapter_w.dtype == torch.float64 else torch.float32)
    factor = scale * (w * w if mix == "factor" else w)
    token_ids = ids.repeat_interleave(length)
    order = torch.argsort(token_ids, stable=True)
    lora_ids, counts = torch.unique_consecutive(token_ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return TokenMeta(
        sorted_tokens=order.to(torch.int32),
        token_factor=factor.repeat_interleave(length).contiguous(),
        lora_ids=lora_ids.to(torch.int32),
        counts=counts.to(torch.int32),
        starts=starts.to(torch.int32),
        max_count=int(counts.max()) if counts.numel() else 0,
    )


@lru_cache(maxsize=2)
def _vllm_kernels(interpret: bool):
    """Build the kernels on first use: whether triton.jit interprets is fixed when a kernel is
    decorated, and the tests here turn TRITON_INTERPRET on for CPU tensors."""
    del interpret  # only the cache key
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_kernel(
        x_ptr,
        a_ptr,
        out_ptr,
        sorted_ptr,
        lora_ids_ptr,
        counts_ptr,
        starts_ptr,
        d_in,
        rank,
        sxm,
        sxk,
        sam,
        sar,
        sak,
        som,
        sor,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        UPCAST: tl.constexpr,
        ACC: tl.constexpr,
    ):
        # grid: (SPLIT_K * m-tiles, active adapters); the rank fits one BLOCK_N tile.
        pid = tl.program_id(0)
        pid_lora = tl.program_id(1)
        pid_sk = pid % SPLIT_K
        pid_m = pid // SPLIT_K
        count = tl.load(counts_ptr + pid_lora)
        if pid_m * BLOCK_M >= count:
            return
        start = tl.load(starts_ptr + pid_lora)
        lora = tl.load(lora_ids_ptr + pid_lora).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        tokens = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < rank
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(pid_sk * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_in
            xt = tl.load(
                x_ptr + tokens[:, None] * sxm + offs_k[None, :] * sxk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            at = tl.load(
                a_ptr + lora * sam + offs_n[None, :] * sar + offs_k[:, None] * sak,
                mask=mask_n[None, :] & mask_k[:, None],
                other=0.0,
            )
            if UPCAST:  # the interpreter multiplies bf16 bits wrongly in tl.dot
                xt = xt.to(ACC)
                at = at.to(ACC)
            acc += tl.dot(xt, at, out_dtype=ACC)
        out = out_ptr + tokens[:, None] * som + offs_n[None, :] * sor
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

    @triton.jit
    def expand_kernel(
        s_ptr,
        b_ptr,
        y_ptr,
        factor_ptr,
        sorted_ptr,
        lora_ids_ptr,
        counts_ptr,
        starts_ptr,
        d_out,
        rank,
        ssm,
        ssr,
        sbm,
        sbn,
        sbr,
        sym,
        syn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr,
        ACC: tl.constexpr,
    ):
        # grid: (m-tiles * n-tiles, active adapters); y += factor * (s @ B^T), in place.
        pid = tl.program_id(0)
        pid_lora = tl.program_id(1)
        n_tiles = tl.cdiv(d_out, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        count = tl.load(counts_ptr + pid_lora)
        if pid_m * BLOCK_M >= count:
            return
        start = tl.load(starts_ptr + pid_lora)
        lora = tl.load(lora_ids_ptr + pid_lora).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        tokens = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        st = tl.load(
            s_ptr + tokens[:, None] * ssm + offs_r[None, :] * ssr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + lora * sbm + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
            mask=mask_n[None, :] & mask_r[:, None],
            other=0.0,
        )
        if UPCAST:
            st = st.to(ACC)
            bt = bt.to(ACC)
        else:  # as vLLM: the fp32 buffer goes back to the bank's dtype for the tensor cores
            st = st.to(bt.dtype)
        acc = tl.dot(st, bt, out_dtype=ACC)
        factor = tl.load(factor_ptr + tokens, mask=mask_m, other=0.0)
        acc = acc * factor[:, None].to(ACC)
        yp = y_ptr + tokens[:, None] * sym + offs_n[None, :] * syn
        mask = mask_m[:, None] & mask_n[None, :]
        y_old = tl.load(yp, mask=mask, other=0.0)
        tl.store(yp, (y_old.to(ACC) + acc).to(y_old.dtype), mask=mask)

    return shrink_kernel, expand_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def vllm_style_shrink_expand(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    adapter_w,
    adapter_idx,
    scale,
    mix,
    meta: TokenMeta | None = None,
):
    """Stand-in for vLLM's punica-style pair (forward only): y = F.linear(x) (the base layer),
    then shrink into an fp32 [T, r] buffer and expand added into y. Pass `meta` to reuse the
    batch metadata across calls, as vLLM does across layers."""
    import triton
    import triton.language as tl

    rows, length, d_in = x.shape
    if meta is None:
        meta = vllm_meta(rows, length, adapter_w, adapter_idx, scale, mix)
    rank = lora_a.shape[1]
    d_out = lora_b.shape[1]
    x2d = x.reshape(rows * length, d_in)
    y = F.linear(x2d, weight, bias)
    tokens = x2d.shape[0]
    active = meta.lora_ids.numel()
    if tokens == 0 or active == 0:
        return y.view(rows, length, d_out)
    # vLLM's default tiles: block_m 32 (16 for decode-sized batches), block_k 256, and a deep
    # split-K for few tokens so the thin shrink still fills the GPU.
    block_m = 16 if meta.max_count <= 16 else 32
    block_n = max(16, _next_pow2(rank))
    block_k = min(256, max(16, _next_pow2(d_in)))
    split_k = 64 if tokens < 128 else 8
    split_k = max(1, min(split_k, triton.cdiv(d_in, block_k)))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    shrink_k, expand_k = _vllm_kernels(interpret)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if acc_torch == torch.float64 else tl.float32
    upcast = interpret or x.dtype == torch.float64
    buf = torch.zeros(tokens, rank, dtype=acc_torch, device=x.device)
    m_tiles = triton.cdiv(meta.max_count, block_m)
    shrink_k[(split_k * m_tiles, active)](
        x2d,
        lora_a,
        buf,
        meta.sorted_tokens,
        meta.lora_ids,
        meta.counts,
        meta.starts,
        d_in,
        rank,
        x2d.stride(0),
        x2d.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        buf.stride(0),
        buf.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        UPCAST=upcast,
        ACC=acc_tl,
    )
    e_block_m = 16 if meta.max_count <= 16 else 64
    e_block_n = min(128, max(16, _next_pow2(d_out)))
    block_r = max(16, _next_pow2(rank))
    e_tiles = triton.cdiv(meta.max_count, e_block_m) * triton.cdiv(d_out, e_block_n)
    expand_k[(e_tiles, active)](
        buf,
        lora_b,
        y,
        meta.token_factor,
        meta.sorted_tokens,
        meta.lora_ids,
        meta.counts,
        meta.starts,
        d_out,
        rank,
        buf.stride(0),
        buf.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=e_block_m,
        BLOCK_N=e_block_n,
        BLOCK_R=block_r,
        UPCAST=upcast,
        ACC=acc_tl,
    )
    return y.view(rows, length, d_out)


# Name -> function, for the benchmark's rows and the tests' parametrisation.
TORCH_BASELINES = {
    "materialise+bmm": materialise_bmm,
    "peft loop": peft_loop,
    "naive two-GEMM": naive_two_gemm,
}
