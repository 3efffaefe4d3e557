"""Errors shared by every module of reclora.data (a leaf: imports nothing from reclora).

The package reads from the bottom up: errors -> paths -> text -> dataset -> splits ->
movielens, goodreads -> fetch -> base (load_dataset) -> embeddings, prompts -> cli; a module
imports only modules before it in that order (tests/test_scale.py checks it).
"""

from __future__ import annotations

import sys


class DataError(RuntimeError):
    """Data files are missing, incomplete or corrupt; the message says how to get them."""


_ANNOUNCED: set[str] = set()


def announce(message: str) -> None:
    """One line on stderr, once per process per message (a fallback the user should see)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, file=sys.stderr, flush=True)
