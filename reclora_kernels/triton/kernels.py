"""Triton kernels of lora_mix_linear. Launchers and the forward/backward plans are in launch.py.

Tokens are visited in row-sorted order (`order`: sorted position -> token id) so that the
tokens of one row are adjacent; `sorted_rows[p]` is the row of sorted position p and
`row_start[b]` (R + 1 entries) where row b begins. A tile of tokens spans rows
sorted_rows[first] .. sorted_rows[last]; the LoRA part loops over those rows and masks the
tokens of each, so one tile serves any row layout, from one long row to one token per row.
Masked-off loads touch no memory, so x is still read once per tile.

Bank operands are addressed as F[f, c, k] through three strides: f picks the factor (an
adapter of the bank, or a row's mixed factor), c runs over the rank, k over the reduction
(shrink) or output (expand) dimension. The backward pass reuses the same kernels by swapping
strides (B^T g is a shrink over B's d_out axis, A^T v an expand over A's d_in axis).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    # Under TRITON_INTERPRET the interpreter multiplies bf16 operands as raw uint16 bits
    # (seen with triton 3.8), so half types are widened to fp32 there (DOT_FP32).
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def mix_factors_kernel(
    bank_ptr, w_ptr, idx_ptr, out_ptr,
    size, slots,
    s_bank_m, s_w_r, s_w_j, s_idx_r, s_idx_j,
    DENSE: tl.constexpr, ACC64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[b, :] = sum_j w[b, j] * bank[idx[b, j], :]  over flattened factors of `size`."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    for j in range(0, slots):
        if DENSE:
            adapter = j
        else:
            adapter = tl.load(idx_ptr + row * s_idx_r + j * s_idx_j)
        coef = tl.load(w_ptr + row * s_w_r + j * s_w_j).to(acc.dtype)
        vals = tl.load(bank_ptr + adapter.to(tl.int64) * s_bank_m + offs, mask=mask, other=0.0)
        acc += coef * vals.to(acc.dtype)
    tl.store(out_ptr + row.to(tl.int64) * size + offs, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def shrink_kernel(
    x_ptr, fac_ptr, src_ptr, out_ptr, order_ptr, rows_ptr,
    n_tokens, K, rank, width,
    s_x_t, s_x_k, s_f, s_c, s_k, s_src_r, s_src_j, s_out_t,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """out[n, j*r + c] = sum_k x[n, k] * F[src[row(n), j], c, k]   (unscaled).

    The k slots x r ranks form one run of `width` columns, so a dense output-mode bank is
    one GEMM and x is read once, not once per slot. SPLIT_K > 1 splits the reduction over
    programs that add atomically into a zeroed `out` (few tokens, long d_in).
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = pos < n_tokens
    tok = tl.load(order_ptr + pos, mask=t_mask, other=0).to(tl.int64)
    tok_row = tl.load(rows_ptr + pos, mask=t_mask, other=-1)
    first = pid_t * BLOCK_T
    row_lo = tl.load(rows_ptr + first)
    row_hi = tl.load(rows_ptr + tl.minimum(first + BLOCK_T, n_tokens) - 1)
    col = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
    c_mask = col < width
    slot = col // rank
    rk = col % rank
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(K, k_begin + k_span)
    kk = tl.arange(0, BLOCK_K)
    acc_type = tl.float64 if ACC64 else tl.float32
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=acc_type)
    for row in range(row_lo, row_hi + 1):
        in_row = t_mask & (tok_row == row)
        f = tl.load(src_ptr + row * s_src_r + slot * s_src_j, mask=c_mask, other=0).to(tl.int64)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + kk
            k_mask = k < k_end
            xt = tl.load(x_ptr + tok[:, None] * s_x_t + k[None, :] * s_x_k,
                         mask=in_row[:, None] & k_mask[None, :], other=0.0)
            ft = tl.load(fac_ptr + f[None, :] * s_f + rk[None, :] * s_c + k[:, None] * s_k,
                         mask=c_mask[None, :] & k_mask[:, None], other=0.0)
            acc = _dot(xt, ft, acc, DOT_FP32, IEEE)
    out = out_ptr + tok[:, None] * s_out_t + col[None, :]
    mask = t_mask[:, None] & c_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fused_expand_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, fac_ptr, src_ptr, coef_ptr, y_ptr, order_ptr, rows_ptr,
    scale_ptr, n_tokens, N, K, rank, width,
    s_x_t, s_x_k, s_w_n, s_w_k, s_u_t, s_f, s_n, s_c,
    s_src_r, s_src_j, s_coef_r, s_coef_j, s_y_t, s_y_n,
    HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_T: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """y[n, o] = sum_k x[n, k] W[o, k] + bias[o]
                 + scale * sum_{j, c} coef[row, j] * u[n, j*r + c] * F[src[row, j], o, c]

    One output tile, written once: the base GEMM and the LoRA expand share the accumulator,
    the expand being a short extra K-loop over the `width` = k*r slot-rank columns.
    """
    pid = tl.program_id(0)
    n_t = tl.cdiv(n_tokens, BLOCK_T)
    n_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_T token tiles sweep the N tiles together, so W tiles are
    # reused from L2 while they are hot.
    group = pid // (GROUP_T * n_n)
    first_t = group * GROUP_T
    group_size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % (GROUP_T * n_n)) % group_size
    pid_n = (pid % (GROUP_T * n_n)) // group_size

    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = pos < n_tokens
    # Out-of-range tokens read token 0, so x loads need no token mask (only the store
    # does); with EVEN_K and EVEN_N the main loop has no masks at all: a plain pipelined GEMM.
    # o is masked, not clamped with tl.where: a clamp hides W's contiguity along N from the
    # compiler, and the dx pass reads W^T along N (the suspect of its slowness on an H100).
    tok = tl.load(order_ptr + pos, mask=t_mask, other=0).to(tl.int64)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = o < N
    kk = tl.arange(0, BLOCK_K)
    acc_type = tl.float64 if ACC64 else tl.float32
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=acc_type)
    x_ptrs = x_ptr + tok[:, None] * s_x_t + kk[None, :] * s_x_k
    w_ptrs = w_ptr + o[None, :] * s_w_n + kk[:, None] * s_w_k
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            if EVEN_N:
                wt = tl.load(w_ptrs)
            else:
                wt = tl.load(w_ptrs, mask=o_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + kk) < K
            xt = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[:, None] & o_mask[None, :], other=0.0)
        acc = _dot(xt, wt, acc, DOT_FP32, IEEE)
        x_ptrs += BLOCK_K * s_x_k
        w_ptrs += BLOCK_K * s_w_k

    tok_row = tl.load(rows_ptr + pos, mask=t_mask, other=-1)
    first = pid_t * BLOCK_T
    row_lo = tl.load(rows_ptr + first)
    row_hi = tl.load(rows_ptr + tl.minimum(first + BLOCK_T, n_tokens) - 1)
    # scale comes as a tensor: a Python float argument would be rounded to fp32.
    scale = tl.load(scale_ptr).to(acc_type)
    cc = tl.arange(0, BLOCK_R)
    for row in range(row_lo, row_hi + 1):
        in_row = t_mask & (tok_row == row)
        for c0 in range(0, width, BLOCK_R):
            col = c0 + cc
            c_mask = col < width
            slot = col // rank
            f = tl.load(src_ptr + row * s_src_r + slot * s_src_j, mask=c_mask, other=0)
            f = f.to(tl.int64)
            mult = tl.zeros([BLOCK_R], dtype=acc_type) + scale
            if HAS_COEF:
                mult *= tl.load(coef_ptr + row * s_coef_r + slot * s_coef_j, mask=c_mask,
                                other=0.0).to(acc_type)
            ut = tl.load(u_ptr + tok[:, None] * s_u_t + col[None, :],
                         mask=in_row[:, None] & c_mask[None, :], other=0.0)
            rk = col % rank
            ft = tl.load(fac_ptr + f[:, None] * s_f + o[None, :] * s_n + rk[:, None] * s_c,
                         mask=o_mask[None, :] & c_mask[:, None], other=0.0)
            ut = (ut * mult[None, :]).to(ft.dtype)
            acc = _dot(ut, ft, acc, DOT_FP32, IEEE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(acc_type)[None, :]
    tl.store(y_ptr + tok[:, None] * s_y_t + o[None, :] * s_y_n,
             acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def segment_outer_kernel(
    p_ptr, q_ptr, src_ptr, coef_ptr, d_ptr, order_ptr, row_start_ptr, scale_ptr,
    O, rank, width,
    s_p_t, s_p_o, s_q_t, s_src_r, s_src_j, s_coef_r, s_coef_j, s_d_f, s_d_o, s_d_c,
    HAS_COEF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """D[src[b, j], o, c] += scale * coef[b, j] * sum_{n in row b} p[n, o] * q[n, j*r + c]

    One program per (row, column block, o tile): the row's tokens are one contiguous sorted
    segment, and the result is added atomically, since rows that share an adapter meet in D.
    """
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_o = tl.program_id(2)
    start = tl.load(row_start_ptr + row)
    end = tl.load(row_start_ptr + row + 1)
    if end > start:
        acc_type = tl.float64 if ACC64 else tl.float32
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = o < O
        col = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
        c_mask = col < width
        slot = col // rank
        f = tl.load(src_ptr + row * s_src_r + slot * s_src_j, mask=c_mask, other=0)
        f = f.to(tl.int64)
        mult = tl.zeros([BLOCK_R], dtype=acc_type) + tl.load(scale_ptr).to(acc_type)
        if HAS_COEF:
            mult *= tl.load(coef_ptr + row * s_coef_r + slot * s_coef_j, mask=c_mask,
                            other=0.0).to(acc_type)
        tt = tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_O, BLOCK_R], dtype=acc_type)
        for t0 in range(start, end, BLOCK_T):
            pos = t0 + tt
            t_mask = pos < end
            tok = tl.load(order_ptr + pos, mask=t_mask, other=0).to(tl.int64)
            pt = tl.load(p_ptr + tok[None, :] * s_p_t + o[:, None] * s_p_o,
                         mask=t_mask[None, :] & o_mask[:, None], other=0.0)
            qt = tl.load(q_ptr + tok[:, None] * s_q_t + col[None, :],
                         mask=t_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _dot(pt, qt.to(pt.dtype), acc, DOT_FP32, IEEE)
        tl.atomic_add(d_ptr + f[None, :] * s_d_f + o[:, None] * s_d_o
                      + (col % rank)[None, :] * s_d_c,
                      (acc * mult[None, :]).to(d_ptr.dtype.element_ty),
                      mask=o_mask[:, None] & c_mask[None, :])


@triton.jit
def mix_backward_kernel(
    dmix_ptr, bank_ptr, w_ptr, idx_ptr, dbank_ptr, dw_ptr,
    size, slots,
    s_bank_m, s_w_r, s_w_j, s_idx_r, s_idx_j,
    DENSE: tl.constexpr, NEED_DW: tl.constexpr, BLOCK: tl.constexpr,
):
    """The transpose of mix_factors_kernel, for one bank (A or B):
    dbank[idx[b, j], :] += w[b, j] * dmix[b, :];   dw[b, j] += <dmix[b, :], bank[idx[b, j], :]>
    """
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    grad = tl.load(dmix_ptr + row.to(tl.int64) * size + offs, mask=mask, other=0.0)
    for j in range(0, slots):
        if DENSE:
            adapter = j
        else:
            adapter = tl.load(idx_ptr + row * s_idx_r + j * s_idx_j)
        base = adapter.to(tl.int64) * s_bank_m
        coef = tl.load(w_ptr + row * s_w_r + j * s_w_j).to(grad.dtype)
        tl.atomic_add(dbank_ptr + base + offs, coef * grad, mask=mask)
        if NEED_DW:
            vals = tl.load(bank_ptr + base + offs, mask=mask, other=0.0).to(grad.dtype)
            tl.atomic_add(dw_ptr + row * slots + j, tl.sum(grad * vals, axis=0))
