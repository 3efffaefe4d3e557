"""Output allocation shared by the Python backends.

With RECLORA_POISON=1 (the test suite sets it) every output is NaN-filled before a kernel
writes it, so an element a kernel forgets to write fails the comparison instead of passing
on leftover memory that happened to be right.
"""

from __future__ import annotations

import os

import torch


def new_output(shape, *, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if os.environ.get("RECLORA_POISON") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out
