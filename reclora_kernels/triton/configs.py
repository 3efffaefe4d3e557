"""Tile configurations, kept as data (reclora_kernels/configs/*.json), per device."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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


def config(kernel: str, device: torch.device, tokens: int | None = None) -> dict:
    """The launch parameters of `kernel` ("fused", "shrink", "outer", "mix") on `device`."""
    if device.type != "cuda":
        return dict(_table("interpret")[kernel])
    table = _table(torch.cuda.get_device_name(device))
    small = f"{kernel}_small_t"
    if tokens is not None and tokens <= table.get("small_t_max", 0) and small in table:
        return dict(table[small])
    return dict(table[kernel])
