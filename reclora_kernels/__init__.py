"""reclora_kernels: the fused, batched per-row LoRA-mixture linear op and its backends.

A kernel library that stands alone: it imports nothing from `reclora`.
"""

from .ops import available_backends, lora_mix_linear, resolve_backend
from .reference import lora_mix_reference

__all__ = ["available_backends", "lora_mix_linear", "lora_mix_reference", "resolve_backend"]
