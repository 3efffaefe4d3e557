"""transformers' own progress bars ("Loading weights", "Writing model shards") follow the
caller's progress switch: a run with --no-progress (a log file, CI) printed them anyway."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def transformers_bars(show: bool) -> Iterator[None]:
    """Inside, transformers draws its bars only if `show` (and they were on before)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
