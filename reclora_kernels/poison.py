"""Output allocation shared by the Python backends.

With RECLORA_POISON=1 at import (the test suite sets it) every output is NaN-filled before a
kernel writes it, so an element a kernel forgets to write fails the comparison instead of
passing on leftover memory that happened to be right.
"""

from __future__ import annotations

import os

import torch

# Read when reclora_kernels is imported (as $RECLORA_BACKEND): a read per output was ~1.4 us.
POISON = os.environ.get("RECLORA_POISON") == "1"


def new_output(shape, *, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out
