"""Tile configurations, kept as data (reclora_kernels/configs/*.json), per device."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# Read once, as triton itself does when it decorates the kernels (an interpreted kernel stays
# interpreted); os.environ.get costs ~1.4 us, and the launch plan asks several times a call.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def _device_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() + ".json"


@cache
def _table(device_key: str) -> dict:
    base = json.loads((CONFIG_DIR / "default.json").read_text())
    if device_key == "interpret":
        return base["interpret"]
    table = dict(base["cuda"])
    tuned = CONFIG_DIR / _device_file_name(device_key)
    if tuned.exists():
        table.update(json.loads(tuned.read_text()))
    return table


@cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def table_key(device: torch.device) -> str:
    """The tile table `device` plans with: "interpret" for CPU tensors, else the card's
    name as torch.cuda.get_device_name spells it."""
    return "interpret" if device.type != "cuda" else _device_name(device.index)


def config(kernel: str, device: torch.device, tokens: int | None = None,
           rows: int | None = None) -> dict:
    """The launch parameters of `kernel` ("fused", "shrink", "outer", "mix") on `device`.

    The "<kernel>_short_rows" entry applies when rows hold few tokens on average (decode:
    one token per row): a token tile then spans many rows, and the LoRA part loops over
    them, so smaller token tiles keep that loop short.
    """
    if device.type != "cuda":
        return dict(_table("interpret")[kernel])
    return card_config(_device_name(device.index), kernel, tokens, rows)


def card_config(card: str, kernel: str, tokens: int | None = None,
                rows: int | None = None) -> dict:
    """config() on a CUDA card named `card` (as torch.cuda.get_device_name spells it)."""
    table = _table(card)
    short = f"{kernel}_short_rows"
    if tokens is not None and rows and short in table:
        if tokens / rows < table.get("short_rows_below", 0):
            return dict(table[short])
    return dict(table[kernel])


def auto_backend(device: torch.device, tokens: int | None = None,
                 rows: int | None = None) -> str:
    """The backend `backend="auto"` takes on this CUDA card: its table's "auto" entry for the
    size class ("decode" when rows average fewer than short_rows_below tokens, else
    "prefill"), measured by benchmarks/tune_triton.py. A card without one gets "triton" (the
    cuBLAS-anchored path): the hand-written CUDA kernels are chosen only where measured faster."""
    table = _table(_device_name(device.index))
    chosen = table.get("auto", {})
    decode = bool(tokens is not None and rows and tokens / rows < table.get("short_rows_below",
                                                                              0))
    return chosen.get("decode" if decode else "prefill", "triton")


@cache
def _auto_choices(card: str) -> frozenset[str]:
    return frozenset(_table(card).get("auto", {}).values())


def auto_may_pick(device: torch.device, backend: str) -> bool:
    """Whether `backend="auto"` picks `backend` on this CUDA card for some size class (its
    table's "auto" entry; cached per card)."""
    return backend in _auto_choices(_device_name(device.index))
