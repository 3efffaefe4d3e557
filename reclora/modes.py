"""Modes for the length of a block: eval mode, with every module's own mode put back
afterwards, and autocast off.

`module.train(was_training)` sets every submodule to the root's flag: an `LLMCTR` (an
nn.Module, in train mode when made) around an eval-mode LLM left the LLM and its gates in
train mode, gate dropout on, after one `predict`. And two threads' blocks over one module
each restored what the other had set (dropout on halfway through the other's forward).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_LOCK = threading.Lock()
# id(module) -> (blocks inside, the modes saved by the first)
_ACTIVE: dict[int, tuple[int, list[tuple[nn.Module, bool]]]] = {}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` and its submodules in eval mode inside; on exit of the last block over it
    (blocks from several threads overlap), each module's own earlier mode again."""
    key = id(module)
    with _LOCK:
        depth, saved = _ACTIVE.get(key, (0, []))
        if depth == 0:
            saved = [(m, m.training) for m in module.modules()]
            module.eval()
        _ACTIVE[key] = (depth + 1, saved)
    try:
        yield module
    finally:
        with _LOCK:
            depth, saved = _ACTIVE.pop(key)
            if depth > 1:
                _ACTIVE[key] = (depth - 1, saved)
            else:
                for m, mode in saved:
                    m.training = mode


def autocast_on(device_type: str) -> bool:
    # is_autocast_enabled raises for a device type without autocast (meta).
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(*device_types: str) -> contextlib.ExitStack:
    """A context with autocast off on each of `device_types` where it is on (a caller's
    autocast must not reach what the run computes in its own precision: the gates' routing,
    export's merge, serving's retrieval and h_u)."""
    stack = contextlib.ExitStack()
    for device_type in dict.fromkeys(device_types):
        if autocast_on(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
