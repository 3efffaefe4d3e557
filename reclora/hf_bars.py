"""transformers' own progress bars ("Loading weights", the GGUF loader's "de-quantizing")
follow the caller's progress switch: a run with --no-progress (a log file, CI) printed them
anyway."""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator


@contextlib.contextmanager
def transformers_bars(show: bool) -> Iterator[None]:
    """Inside, transformers draws its bars only if `show` (and they were on before)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    # The GGUF loader draws its "de-quantizing" bar with tqdm itself, not through the switch.
    try:
        gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # a transformers without it (or laid out otherwise)
        gguf = None
    gguf_bar = getattr(gguf, "tqdm", None)
    if not show:
        hf_logging.disable_progress_bar()
        if gguf_bar is not None:
            gguf.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf.tqdm = gguf_bar
