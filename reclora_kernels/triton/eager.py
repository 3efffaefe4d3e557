"""The Triton backend's eager path: the launch plan called directly, around torch's custom op.

The custom op (reclora::triton_lora_mix_forward, ops.py) is what torch.compile, dispatch
modes, tensor subclasses and functorch see. An eager call needs none of its machinery, and it
cost ~50-90 us of host time per call, the autograd layer ~190 us more, on the AMD EPYC
(benchmarks/bench_host_triton.py): at decode sizes that is more than the GPU's work. So an
eager call of plain tensors runs the launch plan itself (launch.run_forward), or, with a
gradient to record, a torch.autograd.Function over launch.run_forward / launch.backward.
Both paths run the same launch code; tests/test_triton_eager.py holds them to the same
results.

Repeated calls: a call whose arguments have the metadata of an earlier call that passed the
checks (the same shapes, strides, dtypes, devices, scale, mix, backend and a given plan's
layout: `call_key`) skips validate.prepare and the launch plan, and runs the plan kept for it
(`kept`, `replay`). Those checks read nothing else, so a repeat would pass them too; the checks that
read data (an unchecked adapter_idx's range) still run on every call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..plan import RowPlan
from ..validate import _check_adapter_range
from . import launch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_OP_NAME = "reclora::triton_lora_mix_forward"


def eager_ok(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx) -> bool:
    """Whether a call may skip the custom op: not traced, no torch function or dispatch mode,
    no functorch transform, and every tensor a plain torch.Tensor (or Parameter)."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()):
        return False
    return (type(x) in _PLAIN and type(weight) in _PLAIN and type(lora_a) in _PLAIN
            and type(lora_b) in _PLAIN and type(adapter_w) in _PLAIN
            and (bias is None or type(bias) in _PLAIN)
            and (adapter_idx is None or type(adapter_idx) in _PLAIN))


class _LoraMix(torch.autograd.Function):
    """Autograd of the eager path: what ops._triton_setup_context / _triton_backward do for
    the custom op, with launch.backward called directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan: RowPlan,
                scale: float, mix: int, fplan: launch.ForwardPlan):
        y, shrink, a_mix, b_mix = launch.run_forward(fplan, x, plan, weight, bias, lora_a,
                                                     lora_b, adapter_w, adapter_idx, scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_w, adapter_idx, shrink, a_mix,
                              b_mix)
        ctx.plan, ctx.scale, ctx.mix, ctx.has_bias = plan, scale, mix, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, adapter_w, adapter_idx, shrink, a_mix, b_mix = (
            ctx.saved_tensors)
        need = ctx.needs_input_grad
        need_bias = need[2] and ctx.has_bias
        dx, dweight, dbias, da, db, dw = launch.backward(
            grad_y.contiguous(), x, ctx.plan, weight, lora_a, lora_b, adapter_w, adapter_idx,
            shrink, (a_mix, b_mix), ctx.scale, ctx.mix, need[0], need[1], need_bias, need[3],
            need[4], need[5])
        return (dx if need[0] else None, dweight if need[1] else None,
                dbias if need_bias else None, da if need[3] else None,
                db if need[4] else None, dw if need[5] else None, None, None, None, None, None)


def forward(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan: RowPlan,
            scale: float, mix: int, record_grad: bool,
            fplan: launch.ForwardPlan | None = None) -> torch.Tensor:
    """y [T, d_out] of packed x [T, d_in]; `record_grad`: through the autograd Function;
    `fplan`: the call's launch.ForwardPlan if known."""
    if fplan is None:
        fplan = launch.forward_plan_of(x, plan, weight, bias, lora_a, lora_b, adapter_w,
                                       adapter_idx, mix)
    if torch._C._autograd._profiler_enabled():  # a profile still names the op
        with torch.profiler.record_function(_OP_NAME):
            return _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale,
                        mix, record_grad, fplan)
    return _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale, mix,
                record_grad, fplan)


def _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale, mix,
         record_grad, fplan):
    if record_grad:
        return _LoraMix.apply(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan,
                              scale, mix, fplan)
    return launch.run_forward(fplan, x, plan, weight, bias, lora_a, lora_b, adapter_w,
                              adapter_idx, scale)[0]


# --- repeated calls --------------------------------------------------------------------------

class _Call(NamedTuple):
    """What validate.prepare and the launch plan made of a call, for its signature."""

    plan: RowPlan | None  # x's implicit plan (no tensors); None: the call gives its plan
    tokens: int
    d_in: int
    lead_shape: tuple
    d_out: int
    mix: int
    check_range: int  # > 0: the bank size an unchecked adapter_idx is checked against
    fplan: launch.ForwardPlan


# call_key -> _Call. Keys hold only metadata (sizes, strides, dtypes, devices); emptied when
# full, as fast_launch's table is.
_CALLS: dict[tuple, _Call] = {}
_MAX_CALLS = 4096


def _meta(t) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def call_key(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix, backend,
             indices_checked, plan: RowPlan | None) -> tuple | None:
    """The signature of an eager Triton call without row_ids or a finiteness check, or None
    for a call that must take the checked path every time. A given plan enters by its
    layout (the launches take its tensors from the call). A bool scale (equal to 1 or 0 as a
    key) is left to the checks, which refuse it."""
    if (type(mix) is not str or type(scale) not in (float, int) or type(backend) is not str
            or type(indices_checked) is not bool
            or not eager_ok(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx)):
        return None
    layout = None
    if plan is not None:
        if type(plan) is not RowPlan:
            return None
        layout = (plan.rows, plan.tokens, plan.row_len, plan.order is not None, plan.device)
    try:
        # weight by its strides too: the fused GEMM's plan reads it through them.
        return (backend, mix, scale, indices_checked, layout, _meta(x), _meta(weight),
                None if bias is None else _meta(bias),
                _meta(lora_a), _meta(lora_b), _meta(adapter_w),
                None if adapter_idx is None else _meta(adapter_idx))
    except RuntimeError:  # a layout without strides (sparse): the checked path says what
        return None


def remember(key: tuple, problem, weight, bias, lora_a, lora_b, adapter_w,
             indices_checked: bool) -> launch.ForwardPlan:
    """Keep what a call that passed validate.prepare (`problem`) needs to be replayed;
    returns its ForwardPlan."""
    p = problem
    fplan = launch.forward_plan_of(p.x2d, p.plan, weight, bias, lora_a, lora_b, adapter_w,
                                   p.adapter_idx, p.mix)
    if len(_CALLS) >= _MAX_CALLS:
        _CALLS.clear()
    check = p.adapters if p.adapter_idx is not None and not indices_checked else 0
    # A packed plan is the batch's (its tensors are not kept here): replay takes the call's.
    implicit = p.plan if p.plan.row_ids is None else None
    _CALLS[key] = _Call(implicit, p.x2d.shape[0], p.d_in, p.lead_shape, p.d_out, p.mix, check,
                        fplan)
    return fplan


def kept(key: tuple) -> _Call | None:
    """What was kept for a call with this signature that passed the checks, or None."""
    return _CALLS.get(key)


def replay(call: _Call, x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale,
           record_grad: bool, plan: RowPlan | None) -> torch.Tensor:
    """The output of a repeat of `call` (kept(key) of its signature)."""
    if adapter_idx is not None:
        if call.check_range:
            _check_adapter_range(adapter_idx, call.check_range)
        adapter_idx = adapter_idx.long()
    y = forward(x.reshape(call.tokens, call.d_in), weight, bias, lora_a, lora_b, adapter_w,
                adapter_idx, call.plan if plan is None else plan, float(scale), call.mix,
                record_grad, call.fplan)
    return y.view(*call.lead_shape, call.d_out)
