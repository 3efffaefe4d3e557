"""Plan the Triton launches as on a named GPU, for tools that check or time the GPU path on a
machine without that GPU (scripts/triton_aot_check.py, benchmarks/bench_host_triton.py).

The launch plan (reclora_kernels/triton/launch.py) then takes `card`'s tile table
(reclora_kernels/configs), passes its num_warps / num_stages and sizes the pipeline for the
shared memory a block of that card may opt into, whatever device the tensors are on. Never
used by the op itself: it replaces launch.py's lookups for the rest of the process.
"""

from __future__ import annotations

from . import configs, launch

# Shared memory a block may opt into on an H100 / H200 (sm_90): 227 KiB.
SMEM_PER_BLOCK_OPTIN = 232_448


def use_card_tables(card: str, sms: int | None = None) -> None:
    """Launch as on `card`; `sms`: its SM count for the split-K choice (None keeps the
    tensors' device's, 1 on a CPU)."""
    launch.config = lambda kernel, device, tokens=None, rows=None: configs.card_config(
        card, kernel, tokens, rows)
    launch.interpreting = lambda: False
    launch._smem_budget = lambda device: int(0.8 * SMEM_PER_BLOCK_OPTIN)
    if sms is not None:
        launch._num_sms = lambda device: sms
