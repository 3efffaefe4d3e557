"""Launch plans of the Triton backend: the forward and backward of lora_mix_linear.

The base GEMM is cuBLAS's (torch.addmm, beta = 1); Triton runs only the memory-bound LoRA
part around it, so the op cannot be slower than the vendor GEMM by more than the LoRA passes.

Forward, factor mode (each row's factors mixed once, then two thin passes):
    A_p, B_p = mix(A), mix(B)                       [R, r, d_in], [R, d_out, r]
                                                    (one launch, which also zeroes s)
    s = shrink(x; A_p[row])                         [T, 1, r] fp32, saved for backward
    y = bias + scale * B_p[row] s                   expand: y written once
    y += x W^T                                      cuBLAS, beta = 1
Forward, output mode: s[:, j] = A[i_j] x (one shrink over the k*r slot columns, x read once),
then the expand writes bias + scale * sum_j w_j B[i_j] s_j, and cuBLAS adds the base.
(`base_first` in the config: y = x W^T + bias by cuBLAS first and the expand adds into y; the
same bytes move, so which is faster is measured per card. `fused`: one Triton GEMM computes
x W^T and adds bias + the expand in its epilogue, y written once and never read back; a
second path, on for a card only where it measured faster.)

Backward, with the mixed factors the forward saved (not mixed again): v = B_p^T g (a shrink
over g), dx = scale * A_p^T v then dx += g W (cuBLAS, beta = 1; or the fused GEMM), per-row
segment sums for dA_p and dB_p, and the transpose of the mixing (dense: GEMMs; gathered: one
fp32 sum per adapter over the pairs sorted by adapter, written once in the bank's dtype). dW =
g^T x and dbias = sum g only when asked (cuBLAS/MKL are at the roofline there).

Rows come as a RowPlan (reclora_kernels.plan), made once per batch: no sort and no host sync
here.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import NamedTuple

import torch
import triton

from ..plan import RowPlan, cached_tensor
from ..poison import new_output
from . import kernels
from .configs import config, interpreting
from .fast_launch import LaunchMeta, launch_meta, run_kernel


# Host-side integer helpers: triton.cdiv / next_power_of_2 are constexpr functions in triton
# 3.8, ~2.6 us a call from host code on the AMD EPYC (nine calls per forward).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_block(n: int, cap: int) -> int:
    """The power of two >= n, clipped to [16, cap]: tl.dot needs every block dimension >= 16."""
    return max(16, min(cap, 1 << (max(n, 1) - 1).bit_length()))


def _flags(dtype: torch.dtype) -> dict:
    interp = interpreting()
    return {
        "DOT_FP32": interp and dtype in (torch.float16, torch.bfloat16),
        # fp32 inputs are multiplied in full fp32 (as torch's F.linear does by default),
        # not in tf32.
        "IEEE": dtype == torch.float32 and not interp,
        "ACC64": dtype == torch.float64,
    }


@lru_cache(maxsize=256)
def _constant(value: float, dtype: torch.dtype, device: torch.device, stream: int = 0
              ) -> torch.Tensor:
    """A one-element device tensor, made once per (value, dtype, device, stream: see
    plan.cached_tensor) and never written: a fresh torch.full per call was one more kernel
    launch (~2 us on a GPU) each time."""
    with torch.inference_mode(False):  # see _arange
        return torch.full((1,), value, device=device, dtype=dtype)


def _scale_tensor(scale: float, like: torch.Tensor) -> torch.Tensor:
    return cached_tensor(_constant, float(scale), _acc_dtype(like.dtype), like.device)


@lru_cache(maxsize=64)
def _arange(n: int, device: torch.device, stream: int = 0) -> torch.Tensor:
    """0..n-1 as int64 (read-only; plan.cached_tensor): the dense slot table and the rows'
    own factors."""
    # Outside inference mode: one made under it (a first call inside torch.inference_mode)
    # has no version counter, and cached_tensor's read of it failed every later call.
    with torch.inference_mode(False):
        return torch.arange(n, device=device, dtype=torch.int64)


@cache
def _smem_optin(device: torch.device) -> int:
    """Shared memory one block of `device` may opt into (232,448 B on an H100 / H200)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def _smem_budget(device: torch.device) -> int:
    """What a pointer-load pipeline may take: 80% of the opt-in, the rest left to the
    compiler's own scratch (layout conversions)."""
    return int(0.8 * _smem_optin(device))


# Shared memory a TMA pipeline needs beside its stage buffers and y's tile (its barriers and
# the in-loop shrink's scratch): 24 B at BLOCK_R = 16, 6,168 B at BLOCK_R = 64
# (scripts/triton_aot_check.py, triton 3.8, sm_90, 128x256x64 bf16 tiles, 2026-12-06).
TMA_SLACK_BYTES = 8 * 1024


def _launch_opts(cfg: dict, stage_bytes: int = 0, device: torch.device | None = None,
                 reserved_bytes: int = 0, tma: bool = False) -> dict:
    """num_warps / num_stages for a GPU launch, the depth cut where the pipeline's tiles of
    `stage_bytes` would overflow shared memory. Pointer loads keep num_stages - 1 tiles
    there (H100, fp32, 64x256x64 tiles at 4 stages: 245,760 B asked for, 232,448 B there);
    TMA loads one a stage, num_stages in all (bf16 128x256x64 at 3 stages: 3 x 49,152 B and
    y's 65,536 B tile). `reserved_bytes`: shared memory the kernel needs beside the pipeline
    (a TMA store's tile)."""
    if interpreting():
        return {}
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    if stage_bytes and device is not None and "num_stages" in opts:
        if tma:
            free = _smem_optin(device) - TMA_SLACK_BYTES - reserved_bytes
            fit = max(0, free) // stage_bytes
        else:
            fit = 1 + max(0, _smem_budget(device) - reserved_bytes) // stage_bytes
        opts["num_stages"] = max(2, min(opts["num_stages"], fit))
    return opts


def _plan_ptrs(plan: RowPlan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, sorted_rows) pointers; a dummy tensor where the layout needs none (never read)."""
    order = plan.order if plan.order is not None else like
    rows = plan.sorted_rows if plan.sorted_rows is not None else like
    return order, rows


def _index_table(n: int, device) -> torch.Tensor:
    """0..n-1 (the dense slot table, the rows' own factors): cached, or fresh while tracing."""
    return cached_tensor(_arange, n, device)


def _sources(adapter_idx, rows: int, slots: int, device) -> tuple[torch.Tensor, int, int]:
    """Factor index table src[row, slot] with its strides; dense uses slot j = adapter j."""
    if adapter_idx is None:
        return _index_table(slots, device), 0, 1
    return adapter_idx, adapter_idx.stride(0), adapter_idx.stride(1)


def _row_sources(rows: int, device) -> tuple[torch.Tensor, int, int]:
    """src[row, 0] = row: each row's own mixed factor."""
    return _index_table(max(rows, 1), device), 1, 0


def mix(bank: torch.Tensor, adapter_w, adapter_idx, out_dtype) -> torch.Tensor:
    """[M, p, q] bank -> [R, p, q] per-row mixtures sum_j w[b, j] bank[idx[b, j]]."""
    rows, slots = adapter_w.shape
    size = bank.shape[1] * bank.shape[2]
    if adapter_idx is None:
        # Dense: one GEMM w [R, M] @ bank [M, size] reads the bank once (a kernel per row
        # would read it R times). torch.mm, and no .to() where the dtypes agree (the op's
        # case): two host calls fewer a mix.
        if adapter_w.dtype != bank.dtype:
            adapter_w = adapter_w.to(bank.dtype)
        flat = torch.mm(adapter_w, bank.reshape(bank.shape[0], size))
        if flat.dtype != out_dtype:
            flat = flat.to(out_dtype)
        return flat.view(rows, bank.shape[1], bank.shape[2])
    bank = bank.contiguous()
    out = new_output((rows, *bank.shape[1:]), device=bank.device, dtype=out_dtype)
    if rows == 0 or size == 0:
        return out.zero_()
    block, meta = _mix_spec(bank.device, bank.dtype == torch.float64)
    run_kernel(meta, (rows, _blocks_on_axis_1(size, block)),
               bank, adapter_w, adapter_idx, out, size, slots,
               bank.stride(0), adapter_w.stride(0), adapter_w.stride(1), adapter_idx.stride(0),
               adapter_idx.stride(1))
    return out


@lru_cache(maxsize=64)
def _mix_spec(device: torch.device, acc64: bool):
    """(BLOCK, LaunchMeta) of a gathered mixing launch."""
    cfg = config("mix", device)
    return cfg["BLOCK"], launch_meta(kernels.mix_factors_kernel, ACC64=acc64, BLOCK=cfg["BLOCK"],
                                     **_launch_opts(cfg))


@lru_cache(maxsize=64)
def _bank_grad_specs(device: torch.device):
    """(BLOCK, bank_grad LaunchMeta, mix_weight_grad LaunchMeta) of a gathered mixing's
    backward."""
    cfg = config("mix", device)
    opts = _launch_opts(cfg)
    return (cfg["BLOCK"], launch_meta(kernels.bank_grad_kernel, BLOCK=cfg["BLOCK"], **opts),
            launch_meta(kernels.mix_weight_grad_kernel, BLOCK=cfg["BLOCK"], **opts))


# CUDA's grid limit on axes 1 and 2 (axis 0 takes 2**31 - 1): a launch that asks for more
# fails. mix_pair_kernel caps its row blocks there and loops (at MAX_ROWS 32, past ~2M rows);
# so do the per-factor mix and its backward over a factor's blocks (at BLOCK 1024, past
# 67,107,840 elements: d_out = 262,144 at r = 256).
GRID_AXIS_1_MAX = 65535


def _blocks_on_axis_1(size: int, block: int) -> int:
    """Axis 1 of a launch whose programs loop over the `block`-element blocks of `size`."""
    return min(_cdiv(size, block), GRID_AXIS_1_MAX)


def _flat_factors(shape: tuple, strides: tuple) -> bool:
    """Whether each adapter's [p, q] factor of a bank with these strides is one flat run."""
    return strides[2] == 1 and (shape[1] <= 1 or strides[1] == shape[2])


def _mix_pair_launch(rows: int, slots: int, a_shape: tuple, a_strides: tuple, d_out: int,
                     b_strides: tuple, w_strides: tuple, idx_strides: tuple | None,
                     n_zero: int, dtype: torch.dtype, device: torch.device) -> Launch | None:
    """The one-launch mix of factor mode (mix_pair_kernel: A_p, B_p and the zeros of s;
    idx_strides None: dense), or None where the card's table keeps a launch per factor
    (mix.ONE_LAUNCH), a bank's factors are not flat, or there are no rows."""
    cfg = config("mix", device)
    rank, d_in = a_shape[1], a_shape[2]
    if (not cfg.get("ONE_LAUNCH", False) or rows == 0
            or not _flat_factors(a_shape, a_strides)
            or not _flat_factors((a_shape[0], d_out, rank), b_strides)):
        return None
    # Dense: BLOCK_ROWS rows share each bank block a program reads; TILE elements a program.
    block_rows = min(1 << (rows - 1).bit_length(), cfg["MAX_ROWS"])
    block = max(16, cfg["TILE"] // block_rows)
    size_a, size_b = rank * d_in, d_out * rank
    a_blocks = _cdiv(size_a, block)
    ab_blocks = a_blocks + _cdiv(size_b, block)
    meta = launch_meta(kernels.mix_pair_kernel, ACC64=dtype == torch.float64, BLOCK=block,
                       BLOCK_ROWS=block_rows, GATHERED=idx_strides is not None,
                       **_launch_opts(cfg))
    ints = (rows, slots, size_a, size_b, a_blocks, ab_blocks, n_zero, a_strides[0],
            b_strides[0], *w_strides, *(idx_strides or (0, 0)))
    return Launch(meta, (max(ab_blocks, 1), min(_cdiv(rows, block_rows), GRID_AXIS_1_MAX)),
                  ints)


def _run_mix_pair(launch: Launch, lora_a, lora_b, adapter_w, adapter_idx, a_out, b_out,
                  s) -> None:
    # Dense: adapter_w stands in for the index table (GATHERED is off: never read).
    idx = adapter_w if adapter_idx is None else adapter_idx
    run_kernel(launch.meta, launch.grid, lora_a, lora_b, adapter_w, idx, a_out, b_out, s,
               *launch.ints)


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@lru_cache(maxsize=1024)
def _shrink_spec(tokens: int, depth: int, width: int, rows: int, ordered: bool,
                 implicit: bool, dtype: torch.dtype, device: torch.device):
    """(grid, split, LaunchMeta) of a shrink launch: worked out once per shape and layout
    (the config lookups, grid and flags cost ~15 us of Python a launch)."""
    cfg = config("shrink", device, tokens, rows)
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    tiles = _cdiv(tokens, cfg["BLOCK_T"]) * _cdiv(width, block_r)
    # Split the d_in reduction when there are too few tiles to fill the GPU (decode sizes);
    # the interpreter config forces a split so the atomic path is tested on the CPU too.
    chunks = _cdiv(depth, cfg["BLOCK_K"])
    split = cfg.get("SPLIT_K") or _cdiv(2 * _num_sms(device), max(tiles, 1))
    split = max(1, min(split, chunks))
    grid = (_cdiv(tokens, cfg["BLOCK_T"]), _cdiv(width, block_r), split)
    stage_bytes = (cfg["BLOCK_T"] + block_r) * cfg["BLOCK_K"] * dtype.itemsize
    meta = launch_meta(kernels.shrink_kernel, BLOCK_T=cfg["BLOCK_T"], BLOCK_R=block_r,
                       BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split, ORDERED=ordered,
                       IMPLICIT=implicit, **_flags(dtype),
                       **_launch_opts(cfg, stage_bytes, device))
    return grid, split, meta


class Launch(NamedTuple):
    """One kernel launch worked out from shapes and strides: its LaunchMeta, grid and
    integer arguments (they follow the tensors). `fallback`: the launch to take instead when
    a call's tensors do not start on 16-byte boundaries (the fused GEMM's TMA variant)."""

    meta: LaunchMeta
    grid: tuple
    ints: tuple
    fallback: Launch | None = None


def _shrink_launch(tokens: int, depth: int, x_strides: tuple, fac_strides: tuple,
                   src_strides: tuple, plan_key: tuple, slots: int, rank: int,
                   dtype: torch.dtype, device: torch.device) -> tuple[Launch | None, bool]:
    """(the shrink's Launch, or None when there is nothing to compute; whether its output
    must start zeroed: split-K partial sums are added atomically)."""
    rows, row_len, ordered, implicit = plan_key
    width = slots * rank
    grid, split, meta = _shrink_spec(tokens, depth, width, rows, ordered, implicit, dtype,
                                     device)
    zeroed = split > 1 or depth == 0
    if tokens == 0 or depth == 0:
        return None, zeroed
    # out [T, slots, rank] is made contiguous: its row stride is the width.
    ints = (tokens, depth, rank, width, max(row_len, 1), *x_strides, *fac_strides,
            *src_strides, width)
    return Launch(meta, grid, ints), zeroed


def _run_shrink(launch: Launch, x, fac, table, out, plan: RowPlan) -> None:
    order, sorted_rows = _plan_ptrs(plan, table)
    run_kernel(launch.meta, launch.grid, x, fac, table, out, order, sorted_rows, *launch.ints)


def _plan_key(plan: RowPlan) -> tuple:
    return plan.rows, plan.row_len, plan.order is not None, plan.implicit


@lru_cache(maxsize=1024)
def _expand_spec(tokens: int, n_out: int, width: int, rows: int, ordered: bool, implicit: bool,
                 accumulate: bool, has_bias: bool, has_coef: bool, dtype: torch.dtype,
                 device: torch.device):
    """(grid, LaunchMeta) of an expand launch, once per shape and layout."""
    cfg = config("expand", device, tokens, rows)
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    grid = (_cdiv(tokens, cfg["BLOCK_T"]), _cdiv(n_out, cfg["BLOCK_N"]))
    meta = launch_meta(kernels.expand_kernel, ACCUMULATE=accumulate, HAS_BIAS=has_bias,
                       HAS_COEF=has_coef, ORDERED=ordered, IMPLICIT=implicit,
                       BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r,
                       **_flags(dtype), **_launch_opts(cfg))
    return grid, meta


def _expand_launch(tokens: int, n_out: int, bias_stride: int | None, fac_strides: tuple,
                   src_strides: tuple, coef_strides: tuple | None, plan_key: tuple, slots: int,
                   rank: int, accumulate: bool, dtype: torch.dtype,
                   device: torch.device) -> Launch | None:
    """The expand's Launch into a contiguous y [T, N] from a shrink's output u (contiguous
    [T, slots, rank]); None when y is empty. bias_stride / coef_strides: None without."""
    if tokens == 0 or n_out == 0:
        return None
    rows, row_len, ordered, implicit = plan_key
    width = slots * rank
    grid, meta = _expand_spec(tokens, n_out, width, rows, ordered, implicit, accumulate,
                              bias_stride is not None, coef_strides is not None, dtype, device)
    ints = (tokens, n_out, rank, width, max(row_len, 1), n_out, 1,
            0 if bias_stride is None else bias_stride, width, *fac_strides, *src_strides,
            *(coef_strides if coef_strides is not None else (0, 0)))
    return Launch(meta, grid, ints)


def _run_expand(launch: Launch, y, bias, u, fac, table, coef, plan: RowPlan, scale_t) -> None:
    order, sorted_rows = _plan_ptrs(plan, table)
    run_kernel(launch.meta, launch.grid, y, bias if bias is not None else y, u, fac, table,
               coef if coef is not None else u, order, sorted_rows, scale_t, *launch.ints)


@lru_cache(maxsize=1024)
def _fused_spec(tokens: int, n_out: int, depth: int, width: int, rows: int, ordered: bool,
                implicit: bool, has_bias: bool, has_coef: bool, shrink: bool, tma: bool,
                w_nk: bool, dtype: torch.dtype, device: torch.device):
    """(grid, LaunchMeta) of a fused GEMM launch, once per shape and layout; `tma`: the
    descriptor variant (W read as [N, K] when `w_nk`, else [K, N])."""
    cfg = config("fused", device, tokens, rows)
    block_t, block_n, block_k = cfg["BLOCK_T"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = _cdiv(tokens, block_t) * _cdiv(n_out, block_n)
    # PROGRAMS_PER_SM > 0: a persistent grid, each program looping over tiles; 0: one a tile.
    per_sm = cfg.get("PROGRAMS_PER_SM", 0)
    grid = (min(tiles, per_sm * _num_sms(device)) if per_sm else tiles,)
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    # A stage holds x's and W's tiles, and A's when the shrink runs in the loop (left out,
    # the bf16 TMA variant at BLOCK_R = 64 asked for 245,784 B of 232,448).
    stage_bytes = ((block_t + block_n) * block_k
                   + (block_k * block_r if shrink else 0)) * dtype.itemsize
    # TMA stores y through a shared-memory tile of its own.
    y_tile = block_t * block_n * dtype.itemsize if tma else 0
    meta = launch_meta(kernels.fused_linear_kernel, HAS_BIAS=has_bias, HAS_COEF=has_coef,
                       ORDERED=ordered, IMPLICIT=implicit, EVEN_K=depth % block_k == 0,
                       SHRINK=shrink, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                       BLOCK_R=block_r, GROUP_T=cfg["GROUP_T"], TMA=tma, W_NK=w_nk and tma,
                       WARP_SPECIALIZE=bool(cfg.get("WARP_SPECIALIZE", False)),
                       FLATTEN=bool(cfg.get("FLATTEN", False)),
                       **_flags(dtype), **_launch_opts(cfg, stage_bytes, device, y_tile, tma))
    return grid, meta


@cache
def _tma_capable(device: torch.device) -> bool:
    """Whether `device` has TMA copies (sm_90 and later); on CPU tensors, the interpreter
    emulates them (or card_plan plans for an sm_90 card)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_rows(strides: tuple, itemsize: int) -> bool:
    """Whether a 2-D operand with these strides suits a tensor descriptor: unit last stride,
    rows 16-byte aligned (TMA's rule for every stride but the last) and apart (an expand()-ed
    operand's stride 0 is aligned too, but a descriptor's strides must be positive)."""
    return strides[1] == 1 and strides[0] > 0 and strides[0] * itemsize % 16 == 0


def _fused_tma(asked: bool, n_out: int, ordered: bool, x_strides: tuple, w_kn_strides: tuple,
               dtype: torch.dtype, device: torch.device) -> tuple[bool, bool]:
    """(whether the fused GEMM takes its TMA variant, whether it reads W as [N, K]): `asked`
    (the card's fused.TMA), tokens in order (TMA cannot gather x's rows), and x, W and y
    (contiguous [T, N]) in descriptor-ready layouts. On a GPU only the tensor-core dtypes:
    fp32's TMA variant (IEEE products) compiled to 294,920 B of shared memory at the default
    128x256x64 tile, past sm_90's 232,448 (scripts/triton_aot_check.py, 2026-12-06), so fp32
    keeps pointer loads; any dtype under the interpreter."""
    if (not asked or ordered or not _tma_capable(device)
            or (not interpreting() and dtype not in (torch.float16, torch.bfloat16))):
        return False, False
    size = dtype.itemsize
    w_nk = _tma_rows(w_kn_strides[::-1], size)  # W[k, o] = weight[o, k]: the forward's
    w_kn = _tma_rows(w_kn_strides, size)  # dx's W = weight itself
    ok = _tma_rows(x_strides, size) and n_out * size % 16 == 0 and (w_nk or w_kn)
    return ok, ok and w_nk


def _fused_launch(tokens: int, n_out: int, depth: int, x_strides: tuple, w_kn_strides: tuple,
                  bias_stride: int | None, fac_strides: tuple, src_strides: tuple,
                  coef_strides: tuple | None, plan_key: tuple, slots: int, rank: int,
                  dtype: torch.dtype, device: torch.device,
                  a_strides: tuple | None = None) -> Launch | None:
    """The fused GEMM's Launch: y [T, N] (contiguous) = x W + bias + the expand of u
    (contiguous [T, slots, rank]); w_kn_strides: W[k, o]'s strides. a_strides: A[f, c, k]'s,
    to run the shrink in the main loop (the kernel's SHRINK; it writes u). None when y is
    empty. The TMA variant carries the pointer variant as its fallback."""
    if tokens == 0 or n_out == 0:
        return None
    rows, row_len, ordered, implicit = plan_key
    width = slots * rank
    ints = (tokens, n_out, depth, rank, width, max(row_len, 1), *x_strides, *w_kn_strides,
            n_out, 0 if bias_stride is None else bias_stride, width, *fac_strides,
            *src_strides, *(coef_strides if coef_strides is not None else (0, 0)),
            *(a_strides if a_strides is not None else (0, 0, 0)))

    def variant(tma: bool, w_nk: bool, fallback: Launch | None = None) -> Launch:
        grid, meta = _fused_spec(tokens, n_out, depth, width, rows, ordered, implicit,
                                 bias_stride is not None, coef_strides is not None,
                                 a_strides is not None, tma, w_nk, dtype, device)
        return Launch(meta, grid, ints, fallback)

    pointers = variant(False, False)
    asked = bool(config("fused", device, tokens, rows).get("TMA", False))
    tma, w_nk = _fused_tma(asked, n_out, ordered, x_strides, w_kn_strides, dtype, device)
    return variant(True, w_nk, pointers) if tma else pointers


@lru_cache(maxsize=256)
def _shrink_in_loop(device: torch.device, tokens: int, rows: int, row_len: int,
                    rank: int) -> bool:
    """Whether the fused GEMM may run the shrink in its main loop for implicit rows of
    row_len tokens: the card's fused entry asks for it (SHRINK), every token tile lies
    inside one row, and the rank fits one BLOCK_R block (the in-loop shrink has no loop over
    rank blocks: at r = 128 it summed only the first 64)."""
    cfg = config("fused", device, tokens, rows)
    return (bool(cfg.get("SHRINK", False)) and row_len > 0 and row_len % cfg["BLOCK_T"] == 0
            and rank <= cfg["MAX_BLOCK_R"])


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for Triton's device-side tensor descriptors (the caching allocator's
    blocks are 512-byte aligned, past any `alignment` Triton asks for)."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def _ensure_scratch_allocator() -> None:
    """Give Triton an allocator for the TMA variant's descriptors where none was set (a
    per-thread setting, so asked on each launch: ~0.1 us); one a user set is kept."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def _run_fused(launch: Launch, y, x, weight, bias, u, fac, table, coef, plan: RowPlan,
               scale_t, a=None) -> None:
    if launch.fallback is not None:  # the TMA variant: rows aligned by plan, bases per call
        if (x.data_ptr() | weight.data_ptr()) & 15:
            launch = launch.fallback
        elif x.is_cuda:
            _ensure_scratch_allocator()
    order, sorted_rows = _plan_ptrs(plan, table)
    run_kernel(launch.meta, launch.grid, y, x, weight, bias if bias is not None else y, u, fac,
               table, coef if coef is not None else u, order, sorted_rows, scale_t,
               a if a is not None else u, *launch.ints)


# How a plan makes y = base + LoRA: the expand writes y and cuBLAS adds x W^T (beta = 1);
# cuBLAS first and the expand adds into y; or one fused Triton GEMM. Per card and size class
# (the config's expand.base_first / expand.fused), by measurement.
ORDER_EXPAND_FIRST, ORDER_BASE_FIRST, ORDER_FUSED = "expand-first", "base-first", "fused"


@lru_cache(maxsize=256)
def _order(device: torch.device, tokens: int, rows: int) -> str:
    """The card's ORDER_* for this size class (expand.fused wins over expand.base_first)."""
    cfg = config("expand", device, tokens, rows)
    if cfg.get("fused", False):
        return ORDER_FUSED
    return ORDER_BASE_FIRST if cfg.get("base_first", False) else ORDER_EXPAND_FIRST


def _lora_output_launch(order: str, tokens: int, n_out: int, depth: int, x_strides: tuple,
                        w_kn_strides: tuple, bias_stride: int | None, fac_strides: tuple,
                        src_strides: tuple, coef_strides: tuple | None, plan_key: tuple,
                        slots: int, rank: int, dtype: torch.dtype, device: torch.device,
                        a_strides: tuple | None = None) -> Launch | None:
    """The Launch that writes the LoRA part (and the bias, but base first) of y for `order`
    (a_strides: the fused GEMM's in-loop shrink, see _fused_launch)."""
    if order == ORDER_FUSED:
        return _fused_launch(tokens, n_out, depth, x_strides, w_kn_strides, bias_stride,
                             fac_strides, src_strides, coef_strides, plan_key, slots, rank,
                             dtype, device, a_strides)
    base_first = order == ORDER_BASE_FIRST
    return _expand_launch(tokens, n_out, None if base_first else bias_stride, fac_strides,
                          src_strides, coef_strides, plan_key, slots, rank, base_first, dtype,
                          device)


def _base_and_expand(x, weight, w_t: bool, bias, order: str, launch: Launch | None,
                     n_out: int, u, fac, table, coef, plan: RowPlan, scale: float, a=None):
    """lora_linear with its expand (or fused GEMM) Launch worked out (`launch` None: nothing
    to launch); `order` is a plan's ORDER_* choice; `a`: the factors of a fused GEMM that
    runs the shrink in its main loop (it then writes u)."""
    mat = weight if w_t else weight.t()
    if order == ORDER_FUSED:
        y = new_output((x.shape[0], n_out), device=x.device, dtype=x.dtype)
        if launch is not None:
            _run_fused(launch, y, x, weight, bias, u, fac, table, coef, plan,
                       _scale_tensor(scale, y), a)
        return y
    if order == ORDER_BASE_FIRST:
        y = torch.addmm(bias, x, mat) if bias is not None else x @ mat
        if launch is not None:
            _run_expand(launch, y, None, u, fac, table, coef, plan, _scale_tensor(scale, y))
        return y
    y = new_output((x.shape[0], n_out), device=x.device, dtype=x.dtype)
    if n_out == 0:
        return y
    if launch is not None:
        _run_expand(launch, y, bias, u, fac, table, coef, plan, _scale_tensor(scale, y))
    return y.addmm_(x, mat)


@lru_cache(maxsize=1024)
def _outer_spec(tokens: int, rows: int, width: int, width_o: int, ordered: bool,
                implicit: bool, has_coef: bool, owned: bool, dtype: torch.dtype,
                device: torch.device):
    """(grid, LaunchMeta) of a segment_outer launch, once per shape and layout."""
    cfg = config("outer", device, tokens, rows)
    block_r = _pow2_block(width, cfg["MAX_BLOCK_R"])
    grid = (rows, _cdiv(width, block_r), _cdiv(width_o, cfg["BLOCK_O"]))
    stage_bytes = (cfg["BLOCK_O"] + block_r) * cfg["BLOCK_T"] * dtype.itemsize
    meta = launch_meta(kernels.segment_outer_kernel, HAS_COEF=has_coef, ORDERED=ordered,
                       IMPLICIT=implicit, OWNED=owned, BLOCK_T=cfg["BLOCK_T"],
                       BLOCK_O=cfg["BLOCK_O"], BLOCK_R=block_r, **_flags(dtype),
                       **_launch_opts(cfg, stage_bytes, device))
    return grid, meta


def _outer_launch(tokens: int, width_o: int, p_strides: tuple, q_row_stride: int,
                  src_strides: tuple, coef_strides: tuple | None, plan_key: tuple, slots: int,
                  rank: int, out_strides: tuple, owned: bool, dtype: torch.dtype,
                  device: torch.device) -> Launch | None:
    """The Launch of out[src[b, j], o, c] += scale * coef[b, j] * sum_{n in row b} p[n, o]
    q[n, j, c] (p [T, width_o], q [T, slots, rank]); None when there is nothing to add.
    out_strides: out's (f, o, c) strides; coef_strides None: no coefficients; owned: src[b]
    is b (each row's own factor), so the kernel stores into an unzeroed out instead of
    adding atomically."""
    rows, row_len, ordered, implicit = plan_key
    if tokens == 0 or rows == 0 or width_o == 0:
        return None
    width = slots * rank
    grid, meta = _outer_spec(tokens, rows, width, width_o, ordered, implicit,
                             coef_strides is not None, owned, dtype, device)
    ints = (width_o, rank, width, max(row_len, 1), *p_strides, q_row_stride, *src_strides,
            *(coef_strides if coef_strides is not None else (0, 0)), *out_strides)
    return Launch(meta, grid, ints)


def _segment_ptrs(plan: RowPlan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, row_start) pointers of the per-row kernels; a dummy where the layout needs
    none (never read)."""
    order = plan.order if plan.order is not None else like
    row_start = plan.row_start if plan.row_start is not None else like
    return order, row_start


def _run_outer(launch: Launch, p, q, table, coef, out, plan: RowPlan, scale_t) -> None:
    order, row_start = _segment_ptrs(plan, table)
    run_kernel(launch.meta, launch.grid, p, q, table, coef if coef is not None else q, out,
               order, row_start, scale_t, *launch.ints)


@lru_cache(maxsize=1024)
def _grad_pass_spec(tokens: int, rows: int, rank: int, d_out: int, ordered: bool,
                    implicit: bool, dtype: torch.dtype, device: torch.device):
    """(grid, LaunchMeta) of a grad_pass launch (the outer kernel's tiles), or None where the
    card's outer entry turns the one pass off (ONE_PASS) or the rank is over one BLOCK_R
    block (the kernel holds all of a row's ranks in one: at r = 128 v and dB_p lost half)."""
    cfg = config("outer", device, tokens, rows)
    if not cfg.get("ONE_PASS", False) or rank > cfg["MAX_BLOCK_R"]:
        return None
    block_r = _pow2_block(rank, cfg["MAX_BLOCK_R"])
    grid = (rows, _cdiv(d_out, cfg["BLOCK_O"]))
    stage_bytes = (cfg["BLOCK_O"] + block_r) * cfg["BLOCK_T"] * dtype.itemsize
    meta = launch_meta(kernels.grad_pass_kernel, ORDERED=ordered, IMPLICIT=implicit,
                       BLOCK_T=cfg["BLOCK_T"], BLOCK_O=cfg["BLOCK_O"], BLOCK_R=block_r,
                       **_flags(dtype), **_launch_opts(cfg, stage_bytes, device))
    return grid, meta


def _grad_pass_launch(tokens: int, d_out: int, g_strides: tuple, s_row_stride: int,
                      b_strides: tuple, plan_key: tuple, rank: int, db_strides: tuple,
                      dtype: torch.dtype, device: torch.device) -> Launch | None:
    """Factor mode's one pass over g (grad_pass_kernel): v += B_p^T g into a zeroed
    contiguous v [T, 1, rank] and dB_p [R, d_out, rank] (db_strides) stored; b_strides: the
    mixed B_p's. None where there is nothing to sum or the card's table turns it off."""
    rows, row_len, ordered, implicit = plan_key
    if tokens == 0 or rows == 0 or d_out == 0:
        return None
    spec = _grad_pass_spec(tokens, rows, rank, d_out, ordered, implicit, dtype, device)
    if spec is None:
        return None
    grid, meta = spec
    ints = (d_out, rank, max(row_len, 1), *g_strides, s_row_stride, 1, *b_strides, rank,
            *db_strides)
    return Launch(meta, grid, ints)


def _run_grad_pass(launch: Launch, g, s, fac, table, v, d, plan: RowPlan, scale_t) -> None:
    order, row_start = _segment_ptrs(plan, table)
    run_kernel(launch.meta, launch.grid, g, s, fac, table, v, d, order, row_start, scale_t,
               *launch.ints)


def gathered_mix_backward(da_mix, db_mix, lora_a, lora_b, adapter_w, adapter_idx,
                          need_a: bool, need_b: bool, need_w: bool):
    """The transpose of a gathered mixing: dA[m] = sum of w * dA_p over the pairs that
    picked m (likewise dB), and dw[b, j] = <dA_p[b], A[i_j]> + <dB_p[b], B[i_j]>. The bank
    gradients are summed per adapter over pairs sorted by adapter and written once in the
    bank's dtype (no fp32 copy of the bank). Only the asked-for gradients are computed (a
    mixed factor's gradient is None when neither its bank's nor the weights' is asked)."""
    rows, slots = adapter_w.shape
    num = lora_a.shape[0]
    acc = (da_mix if da_mix is not None else db_mix).dtype
    if need_a or need_b:
        pairs = adapter_idx.reshape(-1)
        pair_order = torch.argsort(pairs, stable=True).to(torch.int32)
        bounds = _index_table(num + 1, pairs.device)  # cached: no launch a call
        seg_start = torch.searchsorted(pairs[pair_order.long()], bounds).to(torch.int32)
    block, bank_meta, weight_meta = _bank_grad_specs(lora_a.device)
    dw = torch.zeros(rows, slots, device=lora_a.device, dtype=acc) if need_w else None
    grads = []
    for dmix, bank, need_bank in ((da_mix, lora_a, need_a), (db_mix, lora_b, need_b)):
        bank = bank.contiguous()
        size = math.prod(bank.shape[1:])  # not bank[0].numel(): an indexing op a call
        dbank = new_output(bank.shape, device=bank.device, dtype=bank.dtype) if need_bank else None
        if size == 0:
            grads.append(dbank.zero_() if need_bank else None)
            continue
        if need_bank:
            run_kernel(bank_meta, (num, _blocks_on_axis_1(size, block)),
                       dmix, adapter_w, pair_order, seg_start, dbank, size, slots,
                       adapter_w.stride(0), adapter_w.stride(1))
        if need_w and rows:
            run_kernel(weight_meta, (rows, _blocks_on_axis_1(size, block)),
                       dmix, bank, adapter_idx, dw, size, slots, bank.stride(0),
                       adapter_idx.stride(0), adapter_idx.stride(1))
        grads.append(dbank)
    return grads[0], grads[1], dw.to(lora_a.dtype) if need_w else None


# Triton passes an int argument that fits as int32, and the kernels multiply int32 column
# indices (arange over d_in, d_out, the rank) by the operands' strides; only the token and
# factor indices are int64. An operand whose other offsets reach 2**31 elements (a column-major
# x or grad_y with T * d_in >= 2**31, a bank stored transposed) would wrap around and read the
# wrong memory, silently.
INT32_OFFSETS = 2**31


def _span(shape: tuple, strides: tuple) -> int:
    """The largest element offset of a view with these sizes and strides."""
    return sum((n - 1) * s for n, s in zip(shape, strides) if n > 0)


def _wraps(shape: tuple, strides: tuple) -> bool:
    """Whether an operand's offsets past its leading (int64-indexed) dim reach INT32_OFFSETS:
    it is then launched as a contiguous copy, where they stay below its row's size."""
    return _span(shape[1:], strides[1:]) >= INT32_OFFSETS


def _int32_addressable(t: torch.Tensor) -> torch.Tensor:
    """t, or its contiguous copy where _wraps. A storage under INT32_OFFSETS elements cannot
    wrap (the cheap test, ~0.3 us a tensor)."""
    if (t.untyped_storage().nbytes() < INT32_OFFSETS * t.element_size()
            or not _wraps(t.shape, t.stride())):
        return t
    return t.contiguous()


def _fused_addressable(order: str, weight_shape: tuple, weight_strides: tuple,
                       dtype: torch.dtype) -> str:
    """`order`, but the cuBLAS-anchored one where the fused GEMM would address the weight
    past int32 (it indexes both of W's dims with int32 columns: d_out * d_in >= 2**31) or
    float64 runs on a GPU: its tiles (128 x 256 x 64 in configs/default.json) then need
    262,144-442,368 B of shared memory at 2 stages, past an H100's or H200's 232,448
    (compiled for sm_90 by a float64 variant of scripts/triton_aot_check.py, 2026-12-07).
    The interpreter has no such limit and keeps float64 on the fused GEMM for gradcheck."""
    gpu_float64 = dtype == torch.float64 and not interpreting()
    if order == ORDER_FUSED and (gpu_float64 or
                                 _span(weight_shape, weight_strides) >= INT32_OFFSETS):
        return ORDER_EXPAND_FIRST
    return order


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# A factor's strides as the shrink (F[f, c, k]) or the expand (F[f, o, c]) reads it.
def _a_as_shrink(s):  # A[f, c, k] over [M|R, r, d_in]
    return (s[0], s[1], s[2])


def _a_as_expand(s):  # A^T: F[f, o = d_in, c = rank]
    return (s[0], s[2], s[1])


def _b_as_expand(s):  # B[f, o = d_out, c = rank]
    return (s[0], s[1], s[2])


def _b_as_shrink(s):  # B^T: F[f, c = rank, k = d_out]
    return (s[0], s[2], s[1])


def _contiguous_strides(shape: tuple) -> tuple:
    """torch's strides of a contiguous tensor of `shape` (a size-0 dim steps as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _dense_mix_backward(da_mix, db_mix, lora_a, lora_b, adapter_w, need_a: bool,
                        need_b: bool, need_w: bool):
    """dA = w^T dA_p, dB = w^T dB_p, dw = dA_p A^T + dB_p B^T (flattened factors), each only
    when asked (None otherwise)."""
    rows, num = adapter_w.shape
    acc = (da_mix if da_mix is not None else db_mix).dtype
    dtype = lora_a.dtype
    w_t = adapter_w.to(acc).t()
    flat_da = None if da_mix is None else da_mix.reshape(rows, math.prod(lora_a.shape[1:]))
    flat_db = None if db_mix is None else db_mix.reshape(rows, math.prod(lora_b.shape[1:]))
    da = (w_t @ flat_da).view(lora_a.shape).to(dtype) if need_a else None
    db = (w_t @ flat_db).view(lora_b.shape).to(dtype) if need_b else None
    dw = None
    if need_w:
        dw = torch.addmm(flat_da @ lora_a.reshape(num, flat_da.shape[1]).to(acc).t(),
                         flat_db, lora_b.reshape(num, flat_db.shape[1]).to(acc).t()).to(dtype)
    return da, db, dw


class ForwardPlan(NamedTuple):
    """What a forward does, worked out from shapes, strides, dtypes and the row layout alone
    (forward_plan, cached per signature): then run on each call's tensors (run_forward).
    At decode sizes the working-out was most of a call's host time."""

    mix_mode: int
    s_shape: tuple  # the shrink's output [T, slots (1 in factor mode), r], fp32 or fp64
    s_zeroed: bool  # split-K partial sums are added into it
    acc: torch.dtype
    shrink: Launch | None
    order: str  # ORDER_*: how the base and the LoRA part meet in y
    expand: Launch | None  # the expand, or the fused GEMM (ORDER_FUSED)
    d_out: int
    mix: Launch | None  # factor mode: both mixtures (and s's zeros) in one launch
    copies: tuple | None  # (x, A, B): which run_forward copies contiguous first (_wraps)


@lru_cache(maxsize=1024)
def forward_plan(mix_mode: int, tokens: int, d_in: int, x_strides: tuple, d_out: int,
                 weight_strides: tuple, bias_stride: int | None, a_shape: tuple,
                 a_strides: tuple, b_strides: tuple, w_shape: tuple, w_strides: tuple,
                 idx_strides: tuple | None, plan_key: tuple, dtype: torch.dtype,
                 device: torch.device) -> ForwardPlan:
    """The ForwardPlan of forward()'s arguments with these metadata (w_*: adapter_w's;
    idx_strides None: dense; plan_key: _plan_key of the RowPlan)."""
    rank = a_shape[1]
    rows, slots = w_shape
    b_shape = (a_shape[0], d_out, rank)
    copies = (_wraps((tokens, d_in), x_strides), _wraps(a_shape, a_strides),
              _wraps(b_shape, b_strides))
    if any(copies):  # planned for the contiguous copies run_forward makes
        x_strides = _contiguous_strides((tokens, d_in)) if copies[0] else x_strides
        a_strides = _contiguous_strides(a_shape) if copies[1] else a_strides
        b_strides = _contiguous_strides(b_shape) if copies[2] else b_strides
    a_strides_bank, b_strides_bank = a_strides, b_strides
    if mix_mode == 0:
        # Each row's own mixed factors (made contiguous by mix), one slot.
        a_strides = _contiguous_strides((rows, rank, d_in))
        b_strides = _contiguous_strides((rows, d_out, rank))
        src, slots, coef = (1, 0), 1, None
    else:
        src, coef = ((0, 1) if idx_strides is None else idx_strides), w_strides
    order = _fused_addressable(_order(device, tokens, rows), (d_out, d_in), weight_strides,
                               dtype)
    _, row_len, _, implicit = plan_key
    # Factor mode over implicit rows: the fused GEMM may run the shrink itself (x read once).
    in_loop = (order == ORDER_FUSED and mix_mode == 0 and implicit and tokens > 0
               and d_out > 0 and _shrink_in_loop(device, tokens, rows, row_len, rank))
    if in_loop:
        shrink_, zeroed = None, False  # the fused GEMM writes s
    else:
        shrink_, zeroed = _shrink_launch(tokens, d_in, x_strides, _a_as_shrink(a_strides), src,
                                         plan_key, slots, rank, dtype, device)
    # y = x W^T: the fused GEMM reads W[k, o] = weight[o, k].
    expand_ = _lora_output_launch(order, tokens, d_out, d_in, x_strides, weight_strides[::-1],
                                  bias_stride, _b_as_expand(b_strides), src, coef, plan_key,
                                  slots, rank, dtype, device,
                                  _a_as_shrink(a_strides) if in_loop else None)
    mix_ = None
    if mix_mode == 0:
        mix_ = _mix_pair_launch(rows, w_shape[1], a_shape, a_strides_bank, d_out,
                                b_strides_bank, w_strides, idx_strides,
                                tokens * rank if zeroed else 0, dtype, device)
    return ForwardPlan(mix_mode, (tokens, slots, rank), zeroed, _acc_dtype(dtype), shrink_,
                       order, expand_, d_out, mix_, copies if any(copies) else None)


def _strides(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else t.stride()


def forward_plan_of(x, plan: RowPlan, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                    mix_mode: int) -> ForwardPlan:
    """forward_plan for these tensors."""
    return forward_plan(mix_mode, x.shape[0], x.shape[1], x.stride(), weight.shape[0],
                        weight.stride(), None if bias is None else bias.stride(0),
                        lora_a.shape, lora_a.stride(), lora_b.stride(), adapter_w.shape,
                        adapter_w.stride(), _strides(adapter_idx), _plan_key(plan), x.dtype,
                        x.device)


def off_current_device(t: torch.Tensor) -> bool:
    """Whether t is on a CUDA device other than the current one. Triton launches on the
    current device and its stream, while torch's ops run on their tensors' device: with a
    model split over GPUs (transformers' device_map="auto") the kernels would run on another
    device's stream than the GEMMs around them. The launch plans then make t's device current
    for the call (~1 us a call to ask)."""
    return t.is_cuda and t.get_device() != torch.cuda.current_device()


def run_forward(fp: ForwardPlan, x, plan: RowPlan, weight, bias, lora_a, lora_b, adapter_w,
                adapter_idx, scale: float):
    """(y, s, A_p, B_p) of a planned forward; the mixed factors are None in output mode."""
    if off_current_device(x):
        with torch.cuda.device(x.device):
            return run_forward(fp, x, plan, weight, bias, lora_a, lora_b, adapter_w,
                               adapter_idx, scale)
    if fp.copies is not None:
        x, lora_a, lora_b = (t.contiguous() if copy else t
                             for copy, t in zip(fp.copies, (x, lora_a, lora_b)))
    # The one-launch mix zeroes s itself where split-K sums need it.
    zeros = fp.s_zeroed and fp.mix is None
    s = (torch.zeros if zeros else new_output)(fp.s_shape, device=x.device, dtype=fp.acc)
    if fp.mix is not None:  # one launch mixes both factors (and zeroes s)
        rows, rank = adapter_w.shape[0], lora_a.shape[1]
        fa = new_output((rows, rank, x.shape[1]), device=x.device, dtype=x.dtype)
        fb = new_output((rows, fp.d_out, rank), device=x.device, dtype=x.dtype)
        _run_mix_pair(fp.mix, lora_a, lora_b, adapter_w, adapter_idx, fa, fb, s)
    elif fp.mix_mode == 0:
        fa = mix(lora_a, adapter_w, adapter_idx, x.dtype)
        fb = mix(lora_b, adapter_w, adapter_idx, x.dtype)
    if fp.mix_mode == 0:
        table, coef = _index_table(max(adapter_w.shape[0], 1), x.device), None
    else:
        fa, fb, coef = lora_a, lora_b, adapter_w
        table = (adapter_idx if adapter_idx is not None
                 else _index_table(adapter_w.shape[1], x.device))
    if fp.shrink is not None:
        _run_shrink(fp.shrink, x, fa, table, s, plan)
    y = _base_and_expand(x, weight, False, bias, fp.order, fp.expand, fp.d_out, s, fb,
                         table, coef, plan, scale, fa)
    if fp.mix_mode == 0:
        return y, s, fa, fb  # the mixed factors are saved: the backward does not re-mix
    return y, s, None, None


def forward(x, plan: RowPlan, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale,
            mix_mode):
    """(y, s, A_p, B_p): factor mode saves the mixed factors for the backward; output mode
    returns empty tensors in their place (custom-op outputs are tensors)."""
    fp = forward_plan_of(x, plan, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, mix_mode)
    y, s, a_mix, b_mix = run_forward(fp, x, plan, weight, bias, lora_a, lora_b, adapter_w,
                                     adapter_idx, scale)
    if a_mix is None:
        return y, s, x.new_empty(0), x.new_empty(0)
    return y, s, a_mix, b_mix


def _factor_grad(launch: Launch | None, shape: tuple, owned: bool, dtype, device, p, q, table,
                 coef, plan: RowPlan, scale_t) -> torch.Tensor:
    """A factor's gradient by segment sums: stored by the kernel when `owned` (zeros where
    there is nothing to sum), else added into zeros."""
    if launch is None:
        return torch.zeros(shape, device=device, dtype=dtype)
    out = (new_output if owned else torch.zeros)(shape, device=device, dtype=dtype)
    _run_outer(launch, p, q, table, coef, out, plan, scale_t)
    return out


class BackwardPlan(NamedTuple):
    """What a backward launches, worked out from metadata alone (backward_plan, cached per
    signature) as the forward's ForwardPlan is, then run on each call's tensors. The factors
    are the row's mixed ones in factor mode (slots = 1), the bank's in output mode."""

    v_shape: tuple  # v = B^T g [T, slots, r], fp32 or fp64
    v_zeroed: bool  # split-K partial sums are added into it
    v: Launch | None  # the shrink over g
    order: str  # ORDER_*: how dx's g W and its LoRA part meet
    dx: Launch | None  # the expand of v through A^T (or the fused GEMM)
    db_shape: tuple  # the factor gradient buffers (zeroed first, but in factor mode)
    db: Launch | None  # sum over each row's tokens of g (x) s
    da_shape: tuple
    da: Launch | None  # sum over each row's tokens of x (x) v
    vdb: Launch | None  # factor mode: v and dB_p in one pass over g (replaces v and db)


@lru_cache(maxsize=1024)
def backward_plan(mix_mode: int, tokens: int, d_in: int, d_out: int, x_strides: tuple,
                  g_strides: tuple, weight_strides: tuple, s_row_stride: int, a_shape: tuple,
                  a_strides: tuple, b_strides: tuple, w_shape: tuple, w_strides: tuple,
                  idx_strides: tuple | None, plan_key: tuple, dtype: torch.dtype,
                  device: torch.device) -> BackwardPlan:
    """The BackwardPlan of backward()'s arguments with these metadata (a_strides / b_strides:
    the factors the backward reads, the saved mixed ones in factor mode; a_shape: the bank's)."""
    num, rank, _ = a_shape
    rows, slots = w_shape
    if mix_mode == 0:
        src, slots, coef = (1, 0), 1, None  # each row's own mixed factors
        da_shape, db_shape = (rows, rank, d_in), (rows, d_out, rank)
    else:
        src, coef = ((0, 1) if idx_strides is None else idx_strides), w_strides
        da_shape, db_shape = (num, rank, d_in), (num, d_out, rank)
    v, v_zeroed = _shrink_launch(tokens, d_out, g_strides, _b_as_shrink(b_strides), src,
                                 plan_key, slots, rank, dtype, device)
    order = _fused_addressable(_order(device, tokens, rows), (d_out, d_in), weight_strides,
                               dtype)
    # dx = g W: the fused GEMM reads W[k, o] = weight[k, o].
    dx = _lora_output_launch(order, tokens, d_in, d_out, g_strides, weight_strides, None,
                             _a_as_expand(a_strides), src, coef, plan_key, slots, rank, dtype,
                             device)
    owned = mix_mode == 0
    db = _outer_launch(tokens, d_out, g_strides, s_row_stride, src, coef, plan_key, slots, rank,
                       _b_as_expand(_contiguous_strides(db_shape)), owned, dtype, device)
    v_shape = (tokens, slots, rank)  # made contiguous
    da = _outer_launch(tokens, d_in, x_strides, _contiguous_strides(v_shape)[0], src, coef,
                       plan_key, slots, rank, _a_as_expand(_contiguous_strides(da_shape)),
                       owned, dtype, device)
    vdb = None
    if mix_mode == 0:
        vdb = _grad_pass_launch(tokens, d_out, g_strides, s_row_stride, b_strides, plan_key,
                                rank, _b_as_expand(_contiguous_strides(db_shape)), dtype,
                                device)
    return BackwardPlan(v_shape, v_zeroed, v, order, dx, db_shape, db, da_shape, da, vdb)


def backward(grad_y, x, plan: RowPlan, weight, lora_a, lora_b, adapter_w, adapter_idx, s, mixed,
             scale, mix_mode, need_x, need_weight, need_bias, need_a, need_b, need_w):
    """The gradients asked for (need_*: x, weight, bias, lora_a, lora_b, adapter_w); the
    others come back as empty tensors, and nothing is computed only for them."""
    if off_current_device(x):  # see off_current_device
        with torch.cuda.device(x.device):
            return backward(grad_y, x, plan, weight, lora_a, lora_b, adapter_w, adapter_idx, s,
                            mixed, scale, mix_mode, need_x, need_weight, need_bias, need_a,
                            need_b, need_w)
    rows, slots = adapter_w.shape
    acc = _acc_dtype(x.dtype)
    g, x, lora_a, lora_b = (_int32_addressable(t) for t in (grad_y, x, lora_a, lora_b))
    if mix_mode == 0:
        fa, fb = mixed  # saved by the forward: the backward does not mix again
        table, coef = _row_sources(rows, x.device)[0], None
        need_da, need_db = need_a or need_w, need_b or need_w  # dA_p, dB_p
    else:
        fa, fb, coef = lora_a, lora_b, adapter_w
        table = _sources(adapter_idx, rows, slots, x.device)[0]
        need_da, need_db = need_a, need_b
    bp = backward_plan(mix_mode, x.shape[0], x.shape[1], weight.shape[0], x.stride(), g.stride(),
                       weight.stride(), s.stride(0), lora_a.shape, fa.stride(), fb.stride(),
                       adapter_w.shape, adapter_w.stride(), _strides(adapter_idx),
                       _plan_key(plan), x.dtype, x.device)
    scale_t = _scale_tensor(scale, x)
    dx = da = db = dw = da_fac = db_fac = None

    # Dense factor mode: the row's factor gradients go straight into GEMMs over the bank
    # (_dense_mix_backward), so they are stored in x's dtype, as the forward's mixed factors
    # are: no fp32 buffers and no casts of the bank, of dA_p, dB_p, or of the results.
    owned = mix_mode == 0  # each row's own factor: the segment sums store (backward_plan)
    fac_dtype = x.dtype if owned and adapter_idx is None else acc
    need_v = need_x or need_da or need_w
    one_pass = bp.vdb is not None and need_v and need_db
    if one_pass:  # factor mode: v and dB_p from one read of g
        v = torch.zeros(bp.v_shape, device=x.device, dtype=acc)
        db_fac = new_output(bp.db_shape, device=x.device, dtype=fac_dtype)
        _run_grad_pass(bp.vdb, g, s, fb, table, v, db_fac, plan, scale_t)
    elif need_v:
        v = (torch.zeros if bp.v_zeroed else new_output)(bp.v_shape, device=x.device, dtype=acc)
        if bp.v is not None:
            _run_shrink(bp.v, g, fb, table, v, plan)  # B^T g
    if need_x:
        dx = _base_and_expand(g, weight, True, None, bp.order, bp.dx, x.shape[1], v, fa,
                              table, coef, plan, scale)
    if need_db and not one_pass:
        db_fac = _factor_grad(bp.db, bp.db_shape, owned, fac_dtype, x.device, g, s,
                              table, coef, plan, scale_t)
    if need_da:
        da_fac = _factor_grad(bp.da, bp.da_shape, owned, fac_dtype, x.device, x, v,
                              table, coef, plan, scale_t)

    if mix_mode == 0:
        if need_a or need_b or need_w:
            if need_a or need_b:  # the bank gradients read the weights; dw does not
                adapter_w = _weights_of_filled_rows(adapter_w, plan)
            if adapter_idx is None:
                # Dense: the transpose of the mixing is GEMMs over the bank. (The atomic
                # kernel took 115 us per bank here on an H100 at R=64, M=16, r=8, d=4096.)
                da, db, dw = _dense_mix_backward(da_fac, db_fac, lora_a, lora_b, adapter_w,
                                                 need_a, need_b, need_w)
            else:
                da, db, dw = gathered_mix_backward(da_fac, db_fac, lora_a, lora_b, adapter_w,
                                                   adapter_idx, need_a, need_b, need_w)
    else:
        da = da_fac.to(x.dtype) if need_a else None
        db = db_fac.to(x.dtype) if need_b else None
        if need_w:
            # dw[b, j] = scale * sum_{n in b} <B_j^T g_n, A_j x_n>: T*k*r values, torch glue.
            per_token = (v * s).sum(-1) * scale
            if plan.implicit:
                dw = per_token.view(rows, plan.row_len, slots).sum(1)
            else:
                dw = torch.zeros(rows, slots, device=x.device, dtype=acc)
                dw.index_add_(0, plan.row_ids, per_token)
            dw = dw.to(x.dtype)

    dweight = (g.t() @ x) if need_weight else None
    dbias = g.sum(0, dtype=acc).to(x.dtype) if need_bias else None
    # Custom-op outputs may not alias each other: one fresh empty tensor per missing grad.
    return tuple(x.new_empty(0) if t is None else t for t in (dx, dweight, dbias, da, db, dw))


def _weights_of_filled_rows(adapter_w: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """adapter_w with the rows that have no tokens at 0, for the factor-mode bank gradients:
    such a row's dA_p = dB_p = 0 (y does not read it), and a NaN or inf weight there made
    0 * NaN in the gradients of every adapter it lists, which other rows share."""
    if plan.tokens == 0:
        return torch.zeros_like(adapter_w)
    if plan.implicit:  # x [R, L, d] with L > 0: every row has tokens
        return adapter_w
    start = plan.row_start
    return torch.where((start[1:] > start[:-1])[:, None], adapter_w, 0)


def clear_plans() -> None:
    """Forget every launch plan worked out so far: they depend on the tile tables, which
    card_plan.use_card_tables replaces."""
    for planned in (_mix_spec, _bank_grad_specs, _shrink_spec, _expand_spec, _order,
                    _fused_spec, _shrink_in_loop, _grad_pass_spec,
                    _outer_spec, forward_plan, backward_plan):
        planned.cache_clear()
