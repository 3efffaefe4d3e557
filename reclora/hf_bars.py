"""transformers' own progress bars ("Loading weights", the GGUF loader's "de-quantizing")
follow the caller's progress switch: a run with --no-progress (a log file, CI) printed them
anyway."""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Iterator

# The switches are process-wide: quiet blocks are counted, and the first one in saves what
# the last one out restores (two threads' overlapping blocks had restored each other's
# patched state, leaving the GGUF bar off for good).
_LOCK = threading.Lock()
_QUIET = {"blocks": 0, "saved": None}


@contextlib.contextmanager
def transformers_bars(show: bool) -> Iterator[None]:
    """Inside, transformers draws its bars only if `show` (and they were on before). While
    any thread is inside a quiet block, they are off for the whole process."""
    if show:
        yield
        return
    with _LOCK:
        if _QUIET["blocks"] == 0:
            _QUIET["saved"] = _silence()
        _QUIET["blocks"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _QUIET["blocks"] -= 1
            if _QUIET["blocks"] == 0:
                _restore(*_QUIET["saved"])


def _silence() -> tuple:
    """Turn the bars off; return what _restore needs to put them back."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader draws its bar with tqdm itself, not through transformers' switch.
    try:
        gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # a transformers without it (or laid out otherwise)
        gguf = None
    bar = getattr(gguf, "tqdm", None)
    if bar is not None:
        gguf.tqdm = functools.partial(bar, disable=True)
    return was_on, gguf, bar


def _restore(was_on: bool, gguf, bar) -> None:
    from transformers.utils import logging as hf_logging

    if was_on:
        hf_logging.enable_progress_bar()
    if bar is not None:
        gguf.tqdm = bar
