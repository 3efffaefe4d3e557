"""Test-session setup: Triton runs through its interpreter when there is no GPU, and every
Python-backend output is NaN-poisoned before a kernel writes it."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of reclora_kernels.triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RECLORA_POISON"] = "1"
