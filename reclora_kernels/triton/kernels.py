"""Triton kernels of lora_mix_linear. Launchers and the forward/backward plans are in launch.py.

Only the LoRA part runs here: the base GEMM is cuBLAS's (launch.py adds it into the same
output with beta = 1). Tokens are visited in row-sorted positions (reclora_kernels.plan):
for implicit rows (x [R, L, d]) position = token and row = position // L, with no tensor at
all; packed rows read `sorted_rows[p]` (the row of sorted position p), `row_start[b]` (where
row b begins) and, when the ids were not sorted, `order` (sorted position -> token id). A tile
of tokens spans rows row(first) .. row(last); the kernels loop over those rows and keep each
row's product for its own tokens, so one tile serves any row layout, from one long row to
one token per row. Masked-off loads touch no memory, so x is still read once per tile.

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
    # out_dtype spelled out: triton 3.6 asserts it equals a float64 acc's dtype (it defaults to
    # float32), where 3.8 takes it from acc.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def mix_factors_kernel(
    bank_ptr, w_ptr, idx_ptr, out_ptr,
    size, slots,
    s_bank_m, s_w_r, s_w_j, s_idx_r, s_idx_j,
    ACC64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[b, :] = sum_j w[b, j] * bank[idx[b, j], :]  over flattened factors of `size`
    (gathered mixtures, one factor a launch, where mix.ONE_LAUNCH is off or a bank's factors
    are not flat; mix_pair_kernel mixes both at once; a dense mixture is then one GEMM).
    Axis 1's programs loop over the factor's blocks (the grid caps it at GRID_AXIS_1_MAX)."""
    row = tl.program_id(0)
    for blk in range(tl.program_id(1), tl.cdiv(size, BLOCK), tl.num_programs(1)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        acc = tl.zeros([BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
        for j in range(0, slots):
            adapter = tl.load(idx_ptr + row * s_idx_r + j * s_idx_j)
            coef = tl.load(w_ptr + row * s_w_r + j * s_w_j).to(acc.dtype)
            vals = tl.load(bank_ptr + adapter.to(tl.int64) * s_bank_m + offs, mask=mask,
                           other=0.0)
            acc += coef * vals.to(acc.dtype)
        tl.store(out_ptr + row.to(tl.int64) * size + offs, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _mix_block(bank_ptr, w_ptr, idx_ptr, out_ptr, block, row0, rows, slots, size, s_bank_m,
               s_w_r, s_w_j, s_idx_r, s_idx_j, ACC64: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_ROWS: tl.constexpr, GATHERED: tl.constexpr):
    """out[row0 : row0 + BLOCK_ROWS, cols] over one block of the flattened factor:
    sum_j w[row, j] bank[j] when dense (each bank block read once per program, however many
    rows), sum_j w[row, j] bank[idx[row, j]] when GATHERED (each row its own adapters)."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    r = row0 + tl.arange(0, BLOCK_ROWS)
    r_mask = r < rows
    acc = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float64 if ACC64 else tl.float32)
    coefs = w_ptr + r * s_w_r
    if GATHERED:
        ids = idx_ptr + r * s_idx_r
        both = r_mask[:, None] & mask[None, :]
        for _ in range(0, slots):
            coef = tl.load(coefs, mask=r_mask, other=0.0).to(acc.dtype)
            adapter = tl.load(ids, mask=r_mask, other=0).to(tl.int64)
            vals = tl.load(bank_ptr + adapter[:, None] * s_bank_m + offs[None, :], mask=both,
                           other=0.0)
            acc += coef[:, None] * vals.to(acc.dtype)
            coefs += s_w_j
            ids += s_idx_j
    else:
        vals_at = bank_ptr + offs
        for _ in range(0, slots):  # pointers step by adapter: 64-bit, however large the bank
            coef = tl.load(coefs, mask=r_mask, other=0.0).to(acc.dtype)
            vals = tl.load(vals_at, mask=mask, other=0.0)
            acc += coef[:, None] * vals.to(acc.dtype)[None, :]
            coefs += s_w_j
            vals_at += s_bank_m
    out = out_ptr + r.to(tl.int64)[:, None] * size + offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & mask[None, :])


@triton.jit
def mix_pair_kernel(
    a_bank_ptr, b_bank_ptr, w_ptr, idx_ptr, a_out_ptr, b_out_ptr, zero_ptr,
    rows, slots, size_a, size_b, a_blocks, ab_blocks, n_zero,
    s_a_m, s_b_m, s_w_r, s_w_j, s_idx_r, s_idx_j,
    ACC64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    GATHERED: tl.constexpr,
):
    """Factor mode's mixtures A_p and B_p (each adapter's factor flat; dense, or GATHERED
    through idx) in one launch, which also zeroes zero[:n_zero] (the shrink's split-K
    accumulator): at decode sizes the two mixes and the memset it replaces (dense: cuBLAS
    GEMMs) cost a launch each.

    Grid: (blocks of A's factor, then of B's, at least 1; blocks of BLOCK_ROWS rows, capped
    at the grid's axis-1 limit: a program steps over row blocks by the grid's size)."""
    pid = tl.program_id(0)
    for row0 in range(tl.program_id(1) * BLOCK_ROWS, rows, tl.num_programs(1) * BLOCK_ROWS):
        if pid < a_blocks:
            _mix_block(a_bank_ptr, w_ptr, idx_ptr, a_out_ptr, pid, row0, rows, slots, size_a,
                       s_a_m, s_w_r, s_w_j, s_idx_r, s_idx_j, ACC64, BLOCK, BLOCK_ROWS,
                       GATHERED)
        elif pid < ab_blocks:
            _mix_block(b_bank_ptr, w_ptr, idx_ptr, b_out_ptr, pid - a_blocks, row0, rows,
                       slots, size_b, s_b_m, s_w_r, s_w_j, s_idx_r, s_idx_j, ACC64, BLOCK,
                       BLOCK_ROWS, GATHERED)
    if tl.program_id(1) == 0:
        for start in range(pid * BLOCK, n_zero, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(zero_ptr + offs, tl.zeros([BLOCK], dtype=zero_ptr.dtype.element_ty),
                     mask=offs < n_zero)


@triton.jit
def _token_ids(order_ptr, pos, t_mask, ORDERED: tl.constexpr):
    """Token ids (int64) of sorted positions `pos`: the argsort order's entries when the row
    ids were not sorted, else the positions themselves; masked-off positions get token 0."""
    if ORDERED:
        tok = tl.load(order_ptr + pos, mask=t_mask, other=0).to(tl.int64)
    else:
        tok = tl.where(t_mask, pos, 0).to(tl.int64)
    return tok


@triton.jit
def _token_rows(order_ptr, rows_ptr, pos, t_mask, row_len,
                ORDERED: tl.constexpr, IMPLICIT: tl.constexpr):
    """(token id, row) of sorted positions `pos`. Implicit rows (x [R, L, d]) need no memory:
    token = pos, row = pos // L. Sorted packed rows read the row ids; unsorted ones also the
    argsort order. Masked-off positions get row -1."""
    tok = _token_ids(order_ptr, pos, t_mask, ORDERED)
    if IMPLICIT:
        row = tl.where(t_mask, pos // row_len, -1)
    else:
        row = tl.load(rows_ptr + pos, mask=t_mask, other=-1)
    return tok, row


@triton.jit
def _row_of(rows_ptr, p, row_len, IMPLICIT: tl.constexpr):
    # One return of one type: Triton's compiler types every return of a function, the one
    # after a constexpr `if` included, and rejected int32 (p // row_len) beside int64 (a
    # loaded row id) for every implicit-rows specialization (scripts/triton_aot_check.py; the
    # interpreter runs the Python and never saw it).
    if IMPLICIT:
        row = (p // row_len).to(tl.int64)
    else:
        row = tl.load(rows_ptr + p).to(tl.int64)
    return row


@triton.jit
def _row_span(row_start_ptr, row, row_len, IMPLICIT: tl.constexpr):
    """[start, end) of row `row`'s sorted positions: [row*L, (row+1)*L) for implicit rows,
    else row_start[row], row_start[row + 1]. One type on both branches (see _row_of)."""
    if IMPLICIT:
        start = (row * row_len).to(tl.int64)
        end = start + row_len
    else:
        start = tl.load(row_start_ptr + row).to(tl.int64)
        end = tl.load(row_start_ptr + row + 1).to(tl.int64)
    return start, end


@triton.jit
def shrink_kernel(
    x_ptr, fac_ptr, src_ptr, out_ptr, order_ptr, rows_ptr,
    n_tokens, K, rank, width, row_len,
    s_x_t, s_x_k, s_f, s_c, s_k, s_src_r, s_src_j, s_out_t,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, ORDERED: tl.constexpr, IMPLICIT: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """out[n, j*r + c] = sum_k x[n, k] * F[src[row(n), j], c, k]   (unscaled).

    The k slots x r ranks form one run of `width` columns, so a dense output-mode bank is
    one GEMM and x is read once, not once per slot. SPLIT_K > 1 splits the reduction over
    programs that add atomically into a zeroed `out` (few tokens, long d_in).
    A tile's tokens may span several rows; each row's product is kept only for its own
    tokens (tl.where, not a zero operand: 0 x NaN would carry one row's NaN into the others).
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = pos < n_tokens
    tok, tok_row = _token_rows(order_ptr, rows_ptr, pos, t_mask, row_len, ORDERED, IMPLICIT)
    first = pid_t * BLOCK_T
    row_lo = _row_of(rows_ptr, first, row_len, IMPLICIT)
    row_hi = _row_of(rows_ptr, tl.minimum(first + BLOCK_T, n_tokens) - 1, row_len, IMPLICIT)
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
        part = tl.zeros([BLOCK_T, BLOCK_R], dtype=acc_type)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + kk
            k_mask = k < k_end
            xt = tl.load(x_ptr + tok[:, None] * s_x_t + k[None, :] * s_x_k,
                         mask=in_row[:, None] & k_mask[None, :], other=0.0)
            ft = tl.load(fac_ptr + f[None, :] * s_f + rk[None, :] * s_c + k[:, None] * s_k,
                         mask=c_mask[None, :] & k_mask[:, None], other=0.0)
            part = _dot(xt, ft, part, DOT_FP32, IEEE)
        acc += tl.where(in_row[:, None], part, 0.0)
    out = out_ptr + tok[:, None] * s_out_t + col[None, :]
    mask = t_mask[:, None] & c_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_lora(acc, row, in_row, tok, o, o_mask,
              u_ptr, fac_ptr, src_ptr, coef_ptr, scale, rank, width,
              s_u_t, s_f, s_n, s_c, s_src_r, s_src_j, s_coef_r, s_coef_j,
              HAS_COEF: tl.constexpr, BLOCK_R: tl.constexpr,
              DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc[n, o] + scale * sum_{j, c} coef[row, j] * u[n, j*r + c] * F[src[row, j], o, c]:
    row `row`'s LoRA sum, right for its tokens (in_row) only. Another token's entry may be
    NaN (its zero u times a NaN or inf of this row's F), so a caller keeps only in_row's."""
    cc = tl.arange(0, BLOCK_R)
    for c0 in range(0, width, BLOCK_R):
        col = c0 + cc
        c_mask = col < width
        slot = col // rank
        f = tl.load(src_ptr + row * s_src_r + slot * s_src_j, mask=c_mask, other=0)
        f = f.to(tl.int64)
        mult = tl.zeros([BLOCK_R], dtype=acc.dtype) + scale
        if HAS_COEF:
            mult *= tl.load(coef_ptr + row * s_coef_r + slot * s_coef_j, mask=c_mask,
                            other=0.0).to(acc.dtype)
        ut = tl.load(u_ptr + tok[:, None] * s_u_t + col[None, :],
                     mask=in_row[:, None] & c_mask[None, :], other=0.0)
        rk = col % rank
        ft = tl.load(fac_ptr + f[:, None] * s_f + o[None, :] * s_n + rk[:, None] * s_c,
                     mask=o_mask[None, :] & c_mask[:, None], other=0.0)
        ut = (ut * mult[None, :]).to(ft.dtype)
        acc = _dot(ut, ft, acc, DOT_FP32, IEEE)
    return acc


@triton.jit
def expand_kernel(
    y_ptr, bias_ptr, u_ptr, fac_ptr, src_ptr, coef_ptr, order_ptr, rows_ptr, scale_ptr,
    n_tokens, N, rank, width, row_len,
    s_y_t, s_y_n, s_bias, s_u_t, s_f, s_n, s_c, s_src_r, s_src_j, s_coef_r, s_coef_j,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr,
    ORDERED: tl.constexpr, IMPLICIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """y[n, o] (+)= bias[o] + scale * sum_{j, c} coef[row, j] * u[n, j*r + c] * F[src[row, j], o, c]

    The LoRA expand alone: a memory-bound pass that writes (ACCUMULATE: reads and writes) y
    once; the base GEMM is cuBLAS's, accumulated into the same y with beta = 1 (launch.py).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = pos < n_tokens
    tok, tok_row = _token_rows(order_ptr, rows_ptr, pos, t_mask, row_len, ORDERED, IMPLICIT)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = o < N
    acc_type = tl.float64 if ACC64 else tl.float32
    first = pid_t * BLOCK_T
    row_lo = _row_of(rows_ptr, first, row_len, IMPLICIT)
    row_hi = _row_of(rows_ptr, tl.minimum(first + BLOCK_T, n_tokens) - 1, row_len, IMPLICIT)
    # scale comes as a tensor: a Python float argument would be rounded to fp32.
    scale = tl.load(scale_ptr).to(acc_type)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + o * s_bias, mask=o_mask, other=0.0).to(acc_type)
    # Each row of the tile stores its own tokens: one accumulator, and another row's NaN
    # (0 x NaN in the dot) is never stored.
    for row in range(row_lo, row_hi + 1):
        in_row = t_mask & (tok_row == row)
        acc = _row_lora(tl.zeros([BLOCK_T, BLOCK_N], dtype=acc_type), row, in_row, tok, o,
                        o_mask, u_ptr, fac_ptr, src_ptr, coef_ptr, scale, rank, width, s_u_t,
                        s_f, s_n, s_c, s_src_r, s_src_j, s_coef_r, s_coef_j, HAS_COEF, BLOCK_R,
                        DOT_FP32, IEEE)
        if HAS_BIAS:
            acc += bias[None, :]
        mask = in_row[:, None] & o_mask[None, :]
        y_ptrs = y_ptr + tok[:, None] * s_y_t + o[None, :] * s_y_n
        if ACCUMULATE:
            acc += tl.load(y_ptrs, mask=mask, other=0.0).to(acc_type)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# (Outside the kernel, where a comment does not change Triton's cache key.) The bias is
# loaded in both epilogue branches, not once above them: loaded before the in-loop shrink's
# LoRA dot, bf16 SHRINK tiles took 228 -> 255 registers and the 128 x 256 x 64 tile with
# BLOCK_R 64 spilled 32 B (scripts/triton_aot_check.py --as-jit, triton 3.8, 2026-12-08).
@triton.jit
def fused_linear_kernel(
    y_ptr, x_ptr, w_ptr, bias_ptr, u_ptr, fac_ptr, src_ptr, coef_ptr, order_ptr, rows_ptr,
    scale_ptr, a_ptr,
    n_tokens, N, K, rank, width, row_len,
    s_x_t, s_x_k, s_w_k, s_w_n, s_y_t, s_bias, s_u_t, s_f, s_n, s_c, s_src_r, s_src_j,
    s_coef_r, s_coef_j, s_a_f, s_a_c, s_a_k,
    HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr, ORDERED: tl.constexpr,
    IMPLICIT: tl.constexpr, EVEN_K: tl.constexpr, SHRINK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_T: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
    TMA: tl.constexpr = False, W_NK: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False, FLATTEN: tl.constexpr = False,
):
    """y[n, o] = sum_k x[n, k] W[k, o] + bias[o] + the expand's LoRA sum (see _row_lora).

    The base GEMM and the expand in one kernel (the config's `fused`; a second path beside
    cuBLAS + the expand, chosen per card by measurement): y is written once and never read
    back. W[k, o] is addressed through two strides (the forward's W^T, the backward's W).
    Tiles are visited in groups of GROUP_T token tiles per column block, so a group's x tiles
    and W's column blocks stay in L2 across it. Each program runs tiles pid, pid + programs,
    ... (a grid of one program a tile, or a persistent grid of a few per SM: the config's
    PROGRAMS_PER_SM). Tokens are visited in row-sorted positions, as in the expand: x is
    gathered through `order` when the row ids were not sorted.

    TMA (Hopper and later; tokens in order, x, W and y with 16-byte aligned rows): x, W and y
    move through tensor descriptors (TMA copies; out-of-range blocks read as zeros and are
    clipped on store, so no masks), W as [N, K] when W_NK (the forward's weight) or [K, N]
    (dx's). WARP_SPECIALIZE / FLATTEN: the tile loop's tl.range options (producer and consumer
    warps; the next tile's loads overlapping this tile's epilogue).

    SHRINK (factor mode, every token tile inside one row): the shrink runs in the main loop
    too, u = x A[src[row]]^T from the x tiles the GEMM loads anyway (x is read once for both),
    and the expand in the epilogue takes it from registers; the programs of the first column
    block store u (the backward's s). Otherwise u comes from a shrink launched before.
    """
    tiles_t = tl.cdiv(n_tokens, BLOCK_T)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * tiles_n
    acc_type = tl.float64 if ACC64 else tl.float32
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[n_tokens, K], strides=[s_x_t, 1],
                                           block_shape=[BLOCK_T, BLOCK_K])
        if W_NK:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[s_w_n, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[s_w_k, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[n_tokens, N], strides=[s_y_t, 1],
                                           block_shape=[BLOCK_T, BLOCK_N])
    kk = tl.arange(0, BLOCK_K)
    cc = tl.arange(0, BLOCK_R)
    c_mask = cc < rank
    scale = tl.load(scale_ptr).to(acc_type)
    for tile in tl.range(tl.program_id(0), tiles_t * tiles_n, tl.num_programs(0),
                         flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        first_t = (tile // per_group) * GROUP_T
        group_rows = tl.minimum(tiles_t - first_t, GROUP_T)
        pid_t = first_t + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = pos < n_tokens
        tok, tok_row = _token_rows(order_ptr, rows_ptr, pos, t_mask, row_len, ORDERED,
                                   IMPLICIT)
        o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_mask = o < N
        # Past the edges the main loop reads token 0 and column 0 (never stored), so its
        # pointer loads need a mask only for a ragged K.
        o_in = tl.where(o_mask, o, 0).to(tl.int64)
        x_ptrs = x_ptr + tok[:, None] * s_x_t + kk[None, :] * s_x_k
        w_ptrs = w_ptr + kk[:, None] * s_w_k + o_in[None, :] * s_w_n
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=acc_type)
        first = pid_t * BLOCK_T
        row_lo = _row_of(rows_ptr, first, row_len, IMPLICIT)
        # SHRINK: the tile's one row, its factor and u's accumulator (unused otherwise).
        f = tl.load(src_ptr + row_lo * s_src_r).to(tl.int64)
        a_ptrs = a_ptr + f * s_a_f + cc[None, :] * s_a_c + kk[:, None] * s_a_k
        u_acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=acc_type)
        for k0 in range(0, K, BLOCK_K):
            k_in = (k0 + kk) < K
            if TMA:
                xt = x_desc.load([first, k0])
                if W_NK:
                    wt = w_desc.load([pid_n * BLOCK_N, k0]).T
                else:
                    wt = w_desc.load([k0, pid_n * BLOCK_N])
            elif EVEN_K:
                xt = tl.load(x_ptrs)
                wt = tl.load(w_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
            acc = _dot(xt, wt, acc, DOT_FP32, IEEE)
            if SHRINK:
                if EVEN_K:
                    at = tl.load(a_ptrs, mask=c_mask[None, :], other=0.0)
                else:
                    at = tl.load(a_ptrs, mask=c_mask[None, :] & k_in[:, None], other=0.0)
                u_acc = _dot(xt, at, u_acc, DOT_FP32, IEEE)
                a_ptrs += BLOCK_K * s_a_k
            x_ptrs += BLOCK_K * s_x_k
            w_ptrs += BLOCK_K * s_w_k
        if SHRINK:
            if pid_n == 0:
                tl.store(u_ptr + tok[:, None] * s_u_t + cc[None, :],
                         u_acc.to(u_ptr.dtype.element_ty),
                         mask=t_mask[:, None] & c_mask[None, :])
            ft = tl.load(fac_ptr + f * s_f + o[None, :] * s_n + cc[:, None] * s_c,
                         mask=o_mask[None, :] & c_mask[:, None], other=0.0)
            # Rounded as the expand rounds u (stored in u's dtype, scaled, then ft's dtype).
            ut = u_acc.to(u_ptr.dtype.element_ty).to(acc_type) * scale
            acc = _dot(ut.to(ft.dtype), ft, acc, DOT_FP32, IEEE)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + o * s_bias, mask=o_mask,
                               other=0.0).to(acc_type)[None, :]
            if TMA:
                y_desc.store([first, pid_n * BLOCK_N], acc.to(y_ptr.dtype.element_ty))
            else:
                tl.store(y_ptr + tok[:, None] * s_y_t + o[None, :],
                         acc.to(y_ptr.dtype.element_ty),
                         mask=t_mask[:, None] & o_mask[None, :])
        else:
            row_hi = _row_of(rows_ptr, tl.minimum(first + BLOCK_T, n_tokens) - 1, row_len,
                             IMPLICIT)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + o * s_bias, mask=o_mask,
                               other=0.0).to(acc_type)[None, :]
            y_ptrs = y_ptr + tok[:, None] * s_y_t + o[None, :]
            # One [T, N] accumulator, never two: summing a tile's rows into acc would need a
            # second one per row (its where keeps a row's NaN or inf factor out of the other
            # rows, 0 x inf), and at 128 x 256 the compiler then spilled acc inside the main
            # loop (scripts/triton_aot_check.py --as-jit: 128 of the loop's ~210 instructions
            # were spill loads and stores). So a tile of several rows stores the base (and
            # bias) first and each row adds its sum to its own tokens, rounded twice as the
            # cuBLAS + expand order is; a tile inside one row adds it in place.
            several = row_hi > row_lo
            if several:
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
                         mask=t_mask[:, None] & o_mask[None, :])
                tl.debug_barrier()  # those stores visible to the threads that read them back
                acc = tl.zeros_like(acc)
            for row in range(row_lo, row_hi + 1):
                in_row = t_mask & (tok_row == row)
                acc = _row_lora(acc, row, in_row, tok, o, o_mask, u_ptr, fac_ptr, src_ptr,
                                coef_ptr, scale, rank, width, s_u_t, s_f, s_n, s_c, s_src_r,
                                s_src_j, s_coef_r, s_coef_j, HAS_COEF, BLOCK_R, DOT_FP32,
                                IEEE)
                mask = in_row[:, None] & o_mask[None, :]
                if several:
                    acc += tl.load(y_ptrs, mask=mask, other=0.0).to(acc_type)
                    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
                else:
                    if TMA:
                        y_desc.store([first, pid_n * BLOCK_N], acc.to(y_ptr.dtype.element_ty))
                    else:
                        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
                acc = tl.zeros_like(acc)


@triton.jit
def segment_outer_kernel(
    p_ptr, q_ptr, src_ptr, coef_ptr, d_ptr, order_ptr, row_start_ptr, scale_ptr,
    O, rank, width, row_len,
    s_p_t, s_p_o, s_q_t, s_src_r, s_src_j, s_coef_r, s_coef_j, s_d_f, s_d_o, s_d_c,
    HAS_COEF: tl.constexpr, ORDERED: tl.constexpr, IMPLICIT: tl.constexpr, OWNED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """D[src[b, j], o, c] += scale * coef[b, j] * sum_{n in row b} p[n, o] * q[n, j*r + c]

    One program per (row, column block, o tile): the row's tokens are one contiguous run of
    sorted positions (implicit rows: [b*L, (b+1)*L)). Rows that share an adapter meet in D,
    so the result is added atomically into a zeroed D; with OWNED (factor mode: row b writes
    only its own mixed factor's gradient D[b]) each program owns its block of D and stores
    it, zeros for a row without tokens: D needs no zeroing and no atomics.
    """
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_o = tl.program_id(2)
    start, end = _row_span(row_start_ptr, row, row_len, IMPLICIT)
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
        tok = _token_ids(order_ptr, pos, t_mask, ORDERED)
        pt = tl.load(p_ptr + tok[None, :] * s_p_t + o[:, None] * s_p_o,
                     mask=t_mask[None, :] & o_mask[:, None], other=0.0)
        qt = tl.load(q_ptr + tok[:, None] * s_q_t + col[None, :],
                     mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _dot(pt, qt.to(pt.dtype), acc, DOT_FP32, IEEE)
    d_ptrs = d_ptr + f[None, :] * s_d_f + o[:, None] * s_d_o + (col % rank)[None, :] * s_d_c
    d_vals = (acc * mult[None, :]).to(d_ptr.dtype.element_ty)
    d_mask = o_mask[:, None] & c_mask[None, :]
    if OWNED:
        tl.store(d_ptrs, d_vals, mask=d_mask)
    elif end > start:
        tl.atomic_add(d_ptrs, d_vals, mask=d_mask)


@triton.jit
def grad_pass_kernel(
    g_ptr, s_ptr, fac_ptr, src_ptr, v_ptr, d_ptr, order_ptr, row_start_ptr, scale_ptr,
    O, rank, row_len,
    s_g_t, s_g_o, s_s_t, s_src_r, s_f, s_n, s_c, s_v_t, s_d_f, s_d_o, s_d_c,
    ORDERED: tl.constexpr, IMPLICIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
):
    """Factor mode's one pass over the output gradient g, per (row b, o tile):

        v[n, c] += sum_{o in tile} g[n, o] F[src[b], o, c]          (n in row b)
        D[b, o, c] = scale * sum_{n in row b} g[n, o] s[n, c]

    v (the shrink of g, unscaled) gets one atomic add per o tile into a zeroed buffer; D (the
    row's factor gradient dB_p) is the program's own block, stored. The two read the same g
    tiles, so g is read once where the shrink and the segment sums read it twice.
    """
    row = tl.program_id(0)
    pid_o = tl.program_id(1)
    start, end = _row_span(row_start_ptr, row, row_len, IMPLICIT)
    acc_type = tl.float64 if ACC64 else tl.float32
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < O
    cc = tl.arange(0, BLOCK_R)
    c_mask = cc < rank
    f = tl.load(src_ptr + row * s_src_r).to(tl.int64)
    ft = tl.load(fac_ptr + f * s_f + o[:, None] * s_n + cc[None, :] * s_c,
                 mask=o_mask[:, None] & c_mask[None, :], other=0.0)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_O, BLOCK_R], dtype=acc_type)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tt
        t_mask = pos < end
        tok = _token_ids(order_ptr, pos, t_mask, ORDERED)
        gt = tl.load(g_ptr + tok[:, None] * s_g_t + o[None, :] * s_g_o,
                     mask=t_mask[:, None] & o_mask[None, :], other=0.0)
        st = tl.load(s_ptr + tok[:, None] * s_s_t + cc[None, :],
                     mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _dot(tl.trans(gt), st.to(gt.dtype), acc, DOT_FP32, IEEE)
        vt = _dot(gt, ft, tl.zeros([BLOCK_T, BLOCK_R], dtype=acc_type), DOT_FP32, IEEE)
        tl.atomic_add(v_ptr + tok[:, None] * s_v_t + cc[None, :],
                      vt.to(v_ptr.dtype.element_ty), mask=t_mask[:, None] & c_mask[None, :])
    scale = tl.load(scale_ptr).to(acc_type)
    tl.store(d_ptr + f * s_d_f + o[:, None] * s_d_o + cc[None, :] * s_d_c,
             (acc * scale).to(d_ptr.dtype.element_ty), mask=o_mask[:, None] & c_mask[None, :])


@triton.jit
def mix_weight_grad_kernel(
    dmix_ptr, bank_ptr, idx_ptr, dw_ptr, size, slots, s_bank_m, s_idx_r, s_idx_j,
    BLOCK: tl.constexpr,
):
    """dw[b, j] += <dmix[b, :], bank[idx[b, j], :]> for one bank (A or B): the mixture
    weights' gradient in factor mode, a dot product per (row, slot) over the factor. Axis
    1's programs loop over the factor's blocks (the grid caps it at GRID_AXIS_1_MAX)."""
    row = tl.program_id(0)
    for blk in range(tl.program_id(1), tl.cdiv(size, BLOCK), tl.num_programs(1)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        grad = tl.load(dmix_ptr + row.to(tl.int64) * size + offs, mask=mask, other=0.0)
        for j in range(0, slots):
            adapter = tl.load(idx_ptr + row * s_idx_r + j * s_idx_j).to(tl.int64)
            vals = tl.load(bank_ptr + adapter * s_bank_m + offs, mask=mask, other=0.0)
            tl.atomic_add(dw_ptr + row * slots + j, tl.sum(grad * vals.to(grad.dtype), axis=0))


@triton.jit
def bank_grad_kernel(
    dmix_ptr, w_ptr, pair_order_ptr, seg_start_ptr, dbank_ptr, size, slots, s_w_r, s_w_j,
    BLOCK: tl.constexpr,
):
    """dbank[m, :] = sum over the (row, slot) pairs that picked adapter m of w * dmix[row, :].

    Pairs come sorted by adapter (pair_order, seg_start [M + 1]), so each adapter's gradient
    is summed in fp32 by one program and written once, in the bank's dtype; an adapter no row
    used gets its zeros from the same store. No fp32 copy of the bank, no atomics, no cast.
    Axis 1's programs loop over the factor's blocks (the grid caps it at GRID_AXIS_1_MAX).
    """
    adapter = tl.program_id(0)
    start = tl.load(seg_start_ptr + adapter)
    end = tl.load(seg_start_ptr + adapter + 1)
    for blk in range(tl.program_id(1), tl.cdiv(size, BLOCK), tl.num_programs(1)):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        acc = tl.zeros([BLOCK], dtype=tl.float64 if dmix_ptr.dtype.element_ty == tl.float64
                       else tl.float32)
        for p in range(start, end):
            pair = tl.load(pair_order_ptr + p).to(tl.int64)
            row = pair // slots
            coef = tl.load(w_ptr + row * s_w_r + (pair % slots) * s_w_j).to(acc.dtype)
            acc += coef * tl.load(dmix_ptr + row * size + offs, mask=mask,
                                  other=0.0).to(acc.dtype)
        tl.store(dbank_ptr + adapter.to(tl.int64) * size + offs,
                 acc.to(dbank_ptr.dtype.element_ty), mask=mask)
