"""Launch plans of the Triton backend: the forward and backward of lora_mix_linear.

Forward, factor mode (each row's factors mixed once, then two thin passes):
    A_p, B_p = mix(A), mix(B)                       [R, r, d_in], [R, d_out, r]
    s = shrink(x; A_p[row])                         [T, 1, r] fp32, saved for backward
    y = x W^T + bias + scale * B_p[row] s           one fused kernel, y written once
Forward, output mode: s[:, j] = A[i_j] x (shrink over k slots), then the fused kernel
expands sum_j w_j B[i_j] s_j into the same accumulator as the base GEMM.

Backward reuses the same kernels with transposed strides; dW = g^T x and dbias = sum g are
plain torch GEMM/reductions (cuBLAS/MKL already do those at the roofline).
"""

from __future__ import annotations

from functools import cache

import torch
import triton

from ..poison import new_output
from . import kernels
from .configs import config, interpreting


def _pow2_block(n: int, cap: int) -> int:
    """tl.dot needs every block dimension >= 16."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _flags(dtype: torch.dtype) -> dict:
    interp = interpreting()
    return {
        "DOT_FP32": interp and dtype in (torch.float16, torch.bfloat16),
        # fp32 inputs are multiplied in full fp32 (as torch's F.linear does by default),
        # not in tf32.
        "IEEE": dtype == torch.float32 and not interp,
        "ACC64": dtype == torch.float64,
    }


def _scale_tensor(scale: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), scale, device=like.device, dtype=_acc_dtype(like.dtype))


@cache
def _smem_budget(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(0.8 * getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _launch_opts(cfg: dict, stage_bytes: int = 0, device: torch.device | None = None) -> dict:
    """num_warps / num_stages for a GPU launch. The pipeline keeps num_stages - 1 tiles of
    `stage_bytes` in shared memory, so the depth is cut where a wide dtype would overflow
    it (H100, fp32, 64x256x64 tiles at 4 stages: 245,760 B asked for, 232,448 B there)."""
    if interpreting():
        return {}
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    if stage_bytes and device is not None and "num_stages" in opts:
        fit = 1 + _smem_budget(device) // stage_bytes
        opts["num_stages"] = max(2, min(opts["num_stages"], fit))
    return opts


class RowPlan:
    """Row-sorted token order, shared by every kernel of one call."""

    def __init__(self, row_ids: torch.Tensor, rows: int):
        self.order = torch.argsort(row_ids, stable=True)
        self.sorted_rows = row_ids[self.order].to(torch.int32)
        bounds = torch.arange(rows + 1, device=row_ids.device, dtype=torch.int32)
        # searchsorted (not bincount) keeps the plan free of host syncs (CUDA graphs).
        self.row_start = torch.searchsorted(self.sorted_rows, bounds).to(torch.int32)
        self.order = self.order.to(torch.int32)
        self.rows = rows


def _sources(adapter_idx, rows: int, slots: int, device) -> tuple[torch.Tensor, int, int]:
    """Factor index table src[row, slot] with its strides; dense uses slot j = adapter j."""
    if adapter_idx is None:
        table = torch.arange(slots, device=device, dtype=torch.int64)
        return table, 0, 1
    return adapter_idx, adapter_idx.stride(0), adapter_idx.stride(1)


def _row_sources(rows: int, device) -> tuple[torch.Tensor, int, int]:
    """src[row, 0] = row: each row's own mixed factor."""
    return torch.arange(max(rows, 1), device=device, dtype=torch.int64), 1, 0


def mix(bank: torch.Tensor, adapter_w, adapter_idx, out_dtype) -> torch.Tensor:
    """[M, *shape] bank -> [R, *shape] per-row mixtures sum_j w[b, j] bank[idx[b, j]]."""
    rows, slots = adapter_w.shape
    bank = bank.contiguous()
    size = bank[0].numel()
    out = new_output((rows, *bank.shape[1:]), device=bank.device, dtype=out_dtype)
    if rows == 0:
        return out
    cfg = config("mix", bank.device)
    idx, s_ir, s_ij = _sources(adapter_idx, rows, slots, bank.device)
    grid = (rows, triton.cdiv(size, cfg["BLOCK"]))
    kernels.mix_factors_kernel[grid](
        bank, adapter_w, idx, out, size, slots,
        bank.stride(0), adapter_w.stride(0), adapter_w.stride(1), s_ir, s_ij,
        DENSE=adapter_idx is None, ACC64=bank.dtype == torch.float64, BLOCK=cfg["BLOCK"],
        **_launch_opts(cfg),
    )
    return out


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def shrink(x, fac, fac_strides, src, plan: RowPlan, slots: int, rank: int, acc_dtype):
    """out[n, j, c] = sum_k x[n, k] F[src[row(n), j], c, k]; fac_strides = (s_f, s_c, s_k)."""
    tokens, depth = x.shape
    width = slots * rank
    table, s_sr, s_sj = src
    cfg = config("shrink", x.device, tokens, plan.rows)
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    tiles = triton.cdiv(tokens, cfg["BLOCK_T"]) * triton.cdiv(width, block_r)
    # Split the d_in reduction when there are too few tiles to fill the GPU (decode sizes);
    # the interpreter config forces a split so the atomic path is tested on the CPU too.
    chunks = triton.cdiv(depth, cfg["BLOCK_K"])
    split = cfg.get("SPLIT_K") or triton.cdiv(2 * _num_sms(x.device), max(tiles, 1))
    split = max(1, min(split, chunks))
    alloc = torch.zeros if split > 1 else new_output
    out = alloc((tokens, slots, rank), device=x.device, dtype=acc_dtype)
    if tokens == 0:
        return out
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(width, block_r), split)
    kernels.shrink_kernel[grid](
        x, fac, table, out, plan.order, plan.sorted_rows,
        tokens, depth, rank, width,
        x.stride(0), x.stride(1), *fac_strides, s_sr, s_sj, out.stride(0),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
        **_flags(x.dtype),
        **_launch_opts(cfg, (cfg["BLOCK_T"] + block_r) * cfg["BLOCK_K"] * x.element_size(),
                       x.device),
    )
    return out


def fused_expand(x, w, w_strides, n_out, bias, u, fac, fac_strides, src, coef, plan: RowPlan,
                 slots: int, rank: int, scale: float):
    """y = x W^T + bias + scale * sum_j coef_j F[src_j] u_j, with W given as (ptr, strides)
    over [n_out, K] so that W^T (backward) is the same call with swapped strides."""
    tokens, depth = x.shape
    y = new_output((tokens, n_out), device=x.device, dtype=x.dtype)
    if tokens == 0:
        return y
    table, s_sr, s_sj = src
    cfg = config("fused", x.device, tokens, plan.rows)
    width = slots * rank
    block_r = _pow2_block(width, 64)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    coef_t = coef if coef is not None else u
    kernels.fused_expand_kernel[grid](
        x, w, bias if bias is not None else y, u, fac, table, coef_t, y,
        plan.order, plan.sorted_rows, _scale_tensor(scale, x),
        tokens, n_out, depth, rank, width,
        x.stride(0), x.stride(1), *w_strides, u.stride(0), *fac_strides,
        s_sr, s_sj,
        coef.stride(0) if coef is not None else 0, coef.stride(1) if coef is not None else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_COEF=coef is not None,
        EVEN_K=depth % cfg["BLOCK_K"] == 0, EVEN_N=n_out % cfg["BLOCK_N"] == 0,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r, GROUP_T=cfg["GROUP_T"], **_flags(x.dtype),
        **_launch_opts(cfg, (cfg["BLOCK_T"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * x.element_size(),
                       x.device),
    )
    return y


def segment_outer(p, q, src, coef, plan: RowPlan, out, out_strides, slots: int, rank: int,
                  scale: float):
    """out[src[b, j], o, c] += scale * coef[b, j] * sum_{n in row b} p[n, o] q[n, j, c]."""
    tokens, width_o = p.shape
    if tokens == 0 or plan.rows == 0:
        return out
    table, s_sr, s_sj = src
    cfg = config("outer", p.device, tokens, plan.rows)
    width = slots * rank
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    grid = (plan.rows, triton.cdiv(width, block_r), triton.cdiv(width_o, cfg["BLOCK_O"]))
    kernels.segment_outer_kernel[grid](
        p, q, table, coef if coef is not None else q, out, plan.order, plan.row_start,
        _scale_tensor(scale, out), width_o, rank, width,
        p.stride(0), p.stride(1), q.stride(0), s_sr, s_sj,
        coef.stride(0) if coef is not None else 0, coef.stride(1) if coef is not None else 0,
        *out_strides,
        HAS_COEF=coef is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_O=cfg["BLOCK_O"],
        BLOCK_R=block_r, **_flags(p.dtype),
        **_launch_opts(cfg, (cfg["BLOCK_O"] + block_r) * cfg["BLOCK_T"] * p.element_size(),
                       p.device),
    )
    return out


def mix_backward(dmix, bank, adapter_w, adapter_idx, dbank, dw, need_dw: bool):
    """dbank[idx] += w * dmix; dw += <dmix, bank[idx]> (both fp32/fp64 buffers)."""
    rows, slots = adapter_w.shape
    if rows == 0:
        return
    bank = bank.contiguous()
    size = bank[0].numel()
    cfg = config("mix", bank.device)
    idx, s_ir, s_ij = _sources(adapter_idx, rows, slots, bank.device)
    grid = (rows, triton.cdiv(size, cfg["BLOCK"]))
    kernels.mix_backward_kernel[grid](
        dmix, bank, adapter_w, idx, dbank, dw, size, slots,
        bank.stride(0), adapter_w.stride(0), adapter_w.stride(1), s_ir, s_ij,
        DENSE=adapter_idx is None, NEED_DW=need_dw, BLOCK=cfg["BLOCK"], **_launch_opts(cfg),
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _a_as_shrink(a):  # A[f, c, k] over [M|R, r, d_in]
    return (a.stride(0), a.stride(1), a.stride(2))


def _a_as_expand(a):  # A^T: F[f, o = d_in, c = rank]
    return (a.stride(0), a.stride(2), a.stride(1))


def _b_as_expand(b):  # B[f, o = d_out, c = rank]
    return (b.stride(0), b.stride(1), b.stride(2))


def _b_as_shrink(b):  # B^T: F[f, c = rank, k = d_out]
    return (b.stride(0), b.stride(2), b.stride(1))


def _dense_mix_backward(da_mix, db_mix, lora_a, lora_b, adapter_w):
    """dA = w^T dA_p, dB = w^T dB_p, dw = dA_p A^T + dB_p B^T (flattened factors)."""
    rows, num = adapter_w.shape
    acc = da_mix.dtype
    w_t = adapter_w.to(acc).t()
    flat_da, flat_db = da_mix.reshape(rows, -1), db_mix.reshape(rows, -1)
    da = (w_t @ flat_da).view(lora_a.shape)
    db = (w_t @ flat_db).view(lora_b.shape)
    dw = flat_da @ lora_a.reshape(num, -1).to(acc).t() + flat_db @ lora_b.reshape(num, -1).to(
        acc).t()
    dtype = lora_a.dtype
    return da.to(dtype), db.to(dtype), dw.to(dtype)


def forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix_mode):
    rows, slots = adapter_w.shape
    rank = lora_a.shape[1]
    d_out = weight.shape[0]
    plan = RowPlan(row_ids, rows)
    acc = _acc_dtype(x.dtype)
    w_strides = (weight.stride(0), weight.stride(1))
    if mix_mode == 0:
        a_mix = mix(lora_a, adapter_w, adapter_idx, x.dtype)
        b_mix = mix(lora_b, adapter_w, adapter_idx, x.dtype)
        own = _row_sources(rows, x.device)
        s = shrink(x, a_mix, _a_as_shrink(a_mix), own, plan, 1, rank, acc)
        y = fused_expand(x, weight, w_strides, d_out, bias, s, b_mix, _b_as_expand(b_mix), own,
                         None, plan, 1, rank, scale)
    else:
        src = _sources(adapter_idx, rows, slots, x.device)
        s = shrink(x, lora_a, _a_as_shrink(lora_a), src, plan, slots, rank, acc)
        y = fused_expand(x, weight, w_strides, d_out, bias, s, lora_b, _b_as_expand(lora_b), src,
                         adapter_w, plan, slots, rank, scale)
    return y, s


def backward(grad_y, x, row_ids, weight, lora_a, lora_b, adapter_w, adapter_idx, s, scale,
             mix_mode, need_x, need_weight, need_bias, need_lora):
    rows, slots = adapter_w.shape
    num_adapters, rank, d_in = lora_a.shape
    plan = RowPlan(row_ids, rows)
    acc = _acc_dtype(x.dtype)
    g = grad_y
    wt_strides = (weight.stride(1), weight.stride(0))  # W^T: [d_in, d_out]
    # Custom-op outputs may not alias each other: one fresh empty tensor per missing grad.
    dx, da, db, dw = (x.new_empty(0) for _ in range(4))

    if mix_mode == 0:
        a_mix = mix(lora_a, adapter_w, adapter_idx, x.dtype)
        b_mix = mix(lora_b, adapter_w, adapter_idx, x.dtype)
        own = _row_sources(rows, x.device)
        v = shrink(g, b_mix, _b_as_shrink(b_mix), own, plan, 1, rank, acc)  # B_p^T g
        if need_x:
            dx = fused_expand(g, weight, wt_strides, d_in, None, v, a_mix, _a_as_expand(a_mix),
                              own, None, plan, 1, rank, scale)
        if need_lora:
            da_mix = torch.zeros(rows, rank, d_in, device=x.device, dtype=acc)
            db_mix = torch.zeros(rows, weight.shape[0], rank, device=x.device, dtype=acc)
            segment_outer(g, s, own, None, plan, db_mix, _b_as_expand(db_mix), 1, rank, scale)
            segment_outer(x, v, own, None, plan, da_mix, _a_as_expand(da_mix), 1, rank, scale)
            if adapter_idx is None:
                # Dense: the transpose of the mixing is two GEMMs over the bank. (The atomic
                # kernel took 115 us per bank here on an H100 at R=64, M=16, r=8, d=4096.)
                da, db, dw = _dense_mix_backward(da_mix, db_mix, lora_a, lora_b, adapter_w)
            else:
                da32 = torch.zeros(lora_a.shape, device=x.device, dtype=acc)
                db32 = torch.zeros(lora_b.shape, device=x.device, dtype=acc)
                dw32 = torch.zeros(rows, slots, device=x.device, dtype=acc)
                mix_backward(da_mix, lora_a, adapter_w, adapter_idx, da32, dw32, True)
                mix_backward(db_mix, lora_b, adapter_w, adapter_idx, db32, dw32, True)
                da, db, dw = da32.to(x.dtype), db32.to(x.dtype), dw32.to(x.dtype)
    else:
        src = _sources(adapter_idx, rows, slots, x.device)
        v = shrink(g, lora_b, _b_as_shrink(lora_b), src, plan, slots, rank, acc)  # B_j^T g
        if need_x:
            dx = fused_expand(g, weight, wt_strides, d_in, None, v, lora_a, _a_as_expand(lora_a),
                              src, adapter_w, plan, slots, rank, scale)
        if need_lora:
            da32 = torch.zeros(lora_a.shape, device=x.device, dtype=acc)
            db32 = torch.zeros(lora_b.shape, device=x.device, dtype=acc)
            segment_outer(g, s, src, adapter_w, plan, db32, _b_as_expand(db32), slots, rank,
                          scale)
            segment_outer(x, v, src, adapter_w, plan, da32, _a_as_expand(da32), slots, rank,
                          scale)
            # dw[b, j] = scale * sum_{n in b} <B_j^T g_n, A_j x_n>: T*k*r values, torch glue.
            per_token = (v * s).sum(-1) * scale
            dw = torch.zeros(rows, slots, device=x.device, dtype=acc)
            dw.index_add_(0, row_ids, per_token)
            da, db, dw = da32.to(x.dtype), db32.to(x.dtype), dw.to(x.dtype)

    dweight = (g.t() @ x) if need_weight else x.new_empty(0)
    dbias = g.sum(0, dtype=acc).to(x.dtype) if need_bias else x.new_empty(0)
    return dx, dweight, dbias, da, db, dw
