"""Test-session setup: Triton runs through its interpreter when there is no GPU, and every
Python-backend output is NaN-poisoned before a kernel writes it."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of reclora_kernels.triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RECLORA_POISON"] = "1"


def pytest_terminal_summary(terminalreporter):
    """The worst relative error per backend and dtype over the op suite (vs float64)."""
    try:
        from op_cases import TOLERANCE, WORST
    except ImportError:
        return
    if not WORST:
        return
    bounds = {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()}
    terminalreporter.write_sep("-", "worst relative error vs the float64 reference")
    for (backend, dtype), err in sorted(WORST.items()):
        terminalreporter.write_line(
            f"{backend:10s} {dtype:9s} {err:.2e}  (bound {bounds[dtype]:.0e})")
