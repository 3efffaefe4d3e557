"""The Triton backend's eager path: the launch plan called directly, around torch's custom op.

The custom op (reclora::triton_lora_mix_forward, ops.py) is what torch.compile, dispatch
modes, tensor subclasses and functorch see. An eager call needs none of its machinery, and it
cost ~50-90 us of host time per call, the autograd layer ~190 us more, on the AMD EPYC
(benchmarks/bench_host_triton.py): at decode sizes that is more than the GPU's work. So an
eager call of plain tensors runs launch.forward itself, or, with a gradient to record, a
torch.autograd.Function over launch.forward / launch.backward. Both paths run the same
launch code; tests/test_triton_eager.py holds them to the same results.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..plan import RowPlan
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
                scale: float, mix: int):
        y, shrink, a_mix, b_mix = launch.forward(x, plan, weight, bias, lora_a, lora_b,
                                                 adapter_w, adapter_idx, scale, mix)
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
                db if need[4] else None, dw if need[5] else None, None, None, None, None)


def forward(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan: RowPlan,
            scale: float, mix: int, record_grad: bool) -> torch.Tensor:
    """y [T, d_out] of packed x [T, d_in]; `record_grad`: through the autograd Function."""
    if torch._C._autograd._profiler_enabled():  # a profile still names the op
        with torch.profiler.record_function(_OP_NAME):
            return _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale,
                        mix, record_grad)
    return _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale, mix,
                record_grad)


def _run(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan, scale, mix,
         record_grad):
    if record_grad:
        return _LoraMix.apply(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, plan,
                              scale, mix)
    return launch.forward(x, plan, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale,
                          mix)[0]
