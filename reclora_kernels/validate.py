"""Argument checks for `lora_mix_linear`: every shape, dtype and device rule lives here, once.

`prepare` turns the user's arguments into the canonical packed form every backend takes:
x2d [T, d_in], a RowPlan (which row each token is in), and the sizes. Errors name the argument
and what was expected.

Host syncs: the shape checks read no data. Index ranges are data: row ids are checked when
their RowPlan is made (once per batch when the caller passes `plan`), adapter indices once per
call on the CPU (no device to wait for) and with an asynchronous device assert on a GPU (no
host sync), or not at all when the caller vouches for them (`indices_checked`, as the gates
and RecLoRALinear.set_mixture do after checking once per batch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .plan import RowPlan, implicit_plan, row_plan, tracing

MIX_MODES = {"factor": 0, "output": 1}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_MAX = {t: torch.finfo(t).max for t in FLOAT_DTYPES}
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


class Problem(NamedTuple):  # a NamedTuple: built on every call, ~3x cheaper than a dataclass
    """The op's arguments in canonical packed form (what every backend receives)."""

    x2d: torch.Tensor  # [T, d_in]
    plan: RowPlan  # the row of every token
    adapter_idx: torch.Tensor | None  # [R, k] int64 in [0, M), or None for dense
    lead_shape: tuple[int, ...]  # x's leading dims, restored on the output
    rows: int  # R
    slots: int  # k
    adapters: int  # M
    rank: int  # r
    d_in: int
    d_out: int
    mix: int  # 0 factor, 1 output


def _fail(arg: str, expected: str, got: str) -> None:
    raise ValueError(f"lora_mix_linear: `{arg}` must be {expected}, got {got}")


def _shape(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}"


def _check_strided(arg: str, t: torch.Tensor) -> None:
    # Sparse, CSR or mkldnn tensors failed deep in torch ("Cannot access storage of
    # SparseTensorImpl"), or ran on the reference backend alone.
    if t.layout != torch.strided:
        raise TypeError(f"lora_mix_linear: `{arg}` must be a dense (strided) tensor, got "
                        f"layout {t.layout}")


def _check_tensor(arg: str, t, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lora_mix_linear: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    _check_strided(arg, t)
    if t.dtype != dtype:
        raise TypeError(
            f"lora_mix_linear: `{arg}` must have dtype {dtype} (x's dtype), got {t.dtype}"
        )
    if t.device != device:
        raise ValueError(
            f"lora_mix_linear: `{arg}` must be on device {device} (x's device), got {t.device}"
        )


def _check_index(arg: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lora_mix_linear: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    _check_strided(arg, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"lora_mix_linear: `{arg}` must be an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(
            f"lora_mix_linear: `{arg}` must be on device {device} (x's device), got {t.device}"
        )


def _check_adapter_range(t: torch.Tensor, upper: int) -> None:
    """adapter_idx in [0, upper): an eager check on the CPU, an asynchronous device assert on
    a GPU (no host sync; an index out of range stops the stream instead of reading memory out
    of bounds). While tracing (torch.compile, CUDA-graph capture) the assert goes into the graph
    on every device: a compiled graph runs on later inputs that no eager check saw."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and not tracing():
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= upper:
            raise IndexError(
                f"lora_mix_linear: `adapter_idx` values must lie in [0, {upper}) (adapters in "
                f"the bank), got values in [{lo}, {hi}]"
            )
        return
    torch._assert_async(((t >= 0) & (t < upper)).all(),
                        f"lora_mix_linear: `adapter_idx` values must lie in [0, {upper})")


def prepare(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    adapter_w,
    adapter_idx,
    scale,
    mix,
    row_ids,
    check_finite: bool = False,
    plan: RowPlan | None = None,
    indices_checked: bool = False,
) -> Problem:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lora_mix_linear: `x` must be a torch.Tensor, got {type(x).__name__}")
    _check_strided("x", x)
    if x.dtype not in FLOAT_DTYPES:
        _fail("x", "float16, bfloat16, float32 or float64", str(x.dtype))
    if x.dim() not in (2, 3):
        _fail("x", "[R, L, d_in] or packed [T, d_in]", _shape(x))
    if mix not in MIX_MODES:
        _fail("mix", f"one of {sorted(MIX_MODES)}", repr(mix))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"lora_mix_linear: `scale` must be a float, got {type(scale).__name__}")
    dtype, device = x.dtype, x.device
    # A scale past the dtype's range would be rounded to inf inside a kernel, and then give
    # inf, NaN or an error depending on the backend: reject it here, the same for all.
    if not abs(scale) <= _FLOAT_MAX[dtype]:
        _fail("scale", f"a finite float within {dtype}'s range", repr(scale))
    d_in = x.shape[-1]

    _check_tensor("weight", weight, dtype, device)
    if weight.dim() != 2 or weight.shape[1] != d_in:
        _fail("weight", f"[d_out, d_in={d_in}]", _shape(weight))
    d_out = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, dtype, device)
        if bias.shape != (d_out,):
            _fail("bias", f"[d_out={d_out}] or None", _shape(bias))

    _check_tensor("lora_a", lora_a, dtype, device)
    if lora_a.dim() != 3 or lora_a.shape[2] != d_in:
        _fail("lora_a", f"[M, r, d_in={d_in}]", _shape(lora_a))
    num_adapters, rank = lora_a.shape[0], lora_a.shape[1]
    if num_adapters < 1 or rank < 1:
        _fail("lora_a", "[M, r, d_in] with M >= 1 and r >= 1", _shape(lora_a))
    _check_tensor("lora_b", lora_b, dtype, device)
    if lora_b.shape != (num_adapters, d_out, rank):
        _fail("lora_b", f"[M={num_adapters}, d_out={d_out}, r={rank}]", _shape(lora_b))

    _check_tensor("adapter_w", adapter_w, dtype, device)
    if adapter_w.dim() != 2:
        _fail("adapter_w", "[R, k]", _shape(adapter_w))
    rows, slots = adapter_w.shape

    if x.dim() == 3:
        if row_ids is not None or plan is not None:
            _fail("row_ids", "None when x is [R, L, d_in] (rows are x's first dim)",
                  "a tensor" if row_ids is not None else "a plan")
        if x.shape[0] != rows:
            _fail("adapter_w", f"[R={x.shape[0]}, k] (one row per x row)", _shape(adapter_w))
        tokens = rows * x.shape[1]
        plan = implicit_plan(rows, x.shape[1])
    else:
        tokens = x.shape[0]
        if plan is not None:
            if row_ids is not None:
                _fail("row_ids", "None when `plan` is given (the plan holds the row ids)",
                      "a tensor")
            if not isinstance(plan, RowPlan):
                raise TypeError("lora_mix_linear: `plan` must be a RowPlan (reclora_kernels."
                                f"row_plan), got {type(plan).__name__}")
            if plan.tokens != tokens or plan.rows != rows:
                _fail("plan", f"a plan of T={tokens} tokens in R={rows} rows (x, adapter_w)",
                      f"T={plan.tokens}, R={plan.rows}")
            if plan.device is not None and plan.device != device:
                _fail("plan", f"on device {device} (x's device)", str(plan.device))
        elif row_ids is None:
            # A packed x without row_ids is one token per row, like nn.Linear on [B, d].
            if rows != tokens:
                _fail("adapter_w", f"[R={tokens}, k] (packed x without row_ids: one row per token)",
                      _shape(adapter_w))
            plan = implicit_plan(rows, 1)
        else:
            _check_index("row_ids", row_ids, device)
            if row_ids.shape != (tokens,):
                _fail("row_ids", f"[T={tokens}]", _shape(row_ids))
            plan = row_plan(row_ids, rows)  # checks the range: one host read per call

    if adapter_idx is None:
        if slots != num_adapters:
            _fail("adapter_w", f"[R, M={num_adapters}] when adapter_idx is None (dense)",
                  _shape(adapter_w))
        idx = None
    else:
        _check_index("adapter_idx", adapter_idx, device)
        if adapter_idx.shape != (rows, slots):
            _fail("adapter_idx", f"[R={rows}, k={slots}] (adapter_w's shape)", _shape(adapter_idx))
        if not indices_checked:
            _check_adapter_range(adapter_idx, num_adapters)
        idx = adapter_idx.long()
    if slots < 1:
        _fail("adapter_w", "[R, k] with k >= 1", _shape(adapter_w))

    if check_finite and not tracing():
        if adapter_w.numel() and not bool(torch.isfinite(adapter_w).all()):
            raise ValueError("lora_mix_linear: `adapter_w` holds NaN or infinite values")

    return Problem(
        x2d=x.reshape(tokens, d_in),  # explicit sizes: reshape(-1, 0) is ambiguous at d_in = 0
        plan=plan,
        adapter_idx=idx,
        lead_shape=tuple(x.shape[:-1]),
        rows=rows,
        slots=slots,
        adapters=num_adapters,
        rank=rank,
        d_in=d_in,
        d_out=d_out,
        mix=MIX_MODES[mix],
    )
