"""reclora_kernels: the fused, batched per-row LoRA-mixture linear op and its backends.

A kernel library that stands alone: it imports nothing from `reclora`.
"""

from .ops import available_backends, lora_mix_linear, resolve_backend
from .plan import RowPlan, row_plan
from .reference import lora_mix_reference

__all__ = ["RowPlan", "available_backends", "lora_mix_linear", "lora_mix_reference",
           "resolve_backend", "row_plan"]
