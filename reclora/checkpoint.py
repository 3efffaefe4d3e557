"""Save and load the trainable part of an injected model: banks, gates and their config.

One safetensors file. Tensors are named "<module name>.lora_a", "<module name>.lora_b" and
"<module name>.gate.<parameter>"; the metadata entry "reclora" holds JSON with the format
version, each layer's adapter_config() (sizes, alpha, mix, gate options) and "aliases" (every
name the saved model reached each layer under: a shared module has several), so a file can be
loaded into a fresh, un-injected model: load_adapters injects the layers it names first.
Writes are atomic: a temporary file in the target's folder, then os.replace
(atomic_write_folder does the same for a folder of files that belong together).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from .gates import PersonalizedGate
from .injection import (
    _refuse_bypassed,
    _replace,
    freeze_all_but_adapters,
    names_by_module,
    reclora_layers,
    wrap_module,
)
from .layers import RecLoRALinear, _is_conv1d

FORMAT = "reclora-adapters"
VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Banks and gate parameters of every RecLoRALinear in model (no base weights)."""
    return _layers_state(reclora_layers(model))


# safetensors' dtype names of the floating dtypes a bank may have.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}


def _layers_state(layers: dict[str, RecLoRALinear], *,
                  keep_vars: bool = False) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_a"] = layer.lora_a
        state[f"{name}.lora_b"] = layer.lora_b
        if layer.gate is not None:
            for key, value in layer.gate.state_dict(keep_vars=keep_vars).items():
                state[f"{name}.gate.{key}"] = value
    return state


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp_path) into a temporary file beside path, fsync it, then os.replace it onto
    path: a reader sees the old file or the new one, never a half-written one. A file
    already at path keeps its mode; through a symbolic link, the file it points to is
    replaced (as atomic_write_folder does)."""
    path = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _settle(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself on disk, as atomic_write_folder does


def _settle(path: str | os.PathLike, mode: int | None = None) -> None:
    """A freshly written file: its mode `mode`, else the one open() would give; fsynced."""
    # mkstemp makes the file 0600 (and safetensors rewrites it 0600): give it the mode
    # open() would have, 0666 less the umask, like any other file the user writes.
    os.chmod(path, 0o666 & ~_umask() if mode is None else mode)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], None], *,
                        replaces: Collection[str]) -> None:
    """write(tmp_dir) fills a temporary folder beside path (its files fsynced), which then
    takes path's place: the folder at path is renamed aside, the new one renamed in, the old
    one's files deleted. A reader sees the old files or the new ones, never a mix (a crash
    between the two renames leaves no folder at path, the old and the new one complete
    beside it).

    A folder already at path is replaced only if it holds nothing but names in `replaces`
    (an earlier write of the same files): anything else raises FileExistsError before
    anything is written, so no other file is ever deleted (one that appears in the folder
    during the write stays in the old folder, kept beside path with a warning). Through a
    symbolic link, the folder it points to is replaced."""
    path = Path(os.path.realpath(path))
    mode = 0o777 & ~_umask()
    if os.path.lexists(path):
        if not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a folder")
        others = sorted(set(os.listdir(path)) - set(replaces))
        if others:
            raise FileExistsError(
                f"{path}: holds {_summarise(others)}, not only {', '.join(sorted(replaces))}; "
                "not replacing it (write into a new or empty folder)")
        mode = stat.S_IMODE(path.stat().st_mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    aside = None
    try:
        os.chmod(tmp, mode)  # mkdtemp makes it 0700
        write(tmp)
        for entry in tmp.iterdir():
            _settle(entry)
        _fsync_dir(tmp)
        if os.path.lexists(path):
            aside = tmp.with_suffix(".old")
            os.rename(path, aside)
        os.rename(tmp, path)
    except BaseException:
        if aside is not None and not os.path.lexists(path):
            os.rename(aside, path)  # put the old folder back
            aside = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        # Only the names checked above: a file another process wrote into the folder during
        # the write is left, in `aside`, never deleted.
        for name in replaces:
            with contextlib.suppress(OSError):
                os.unlink(aside / name)
        try:
            os.rmdir(aside)
        except OSError:
            warnings.warn(f"{path}: written; the folder it replaced, {aside}, is kept: it "
                          f"holds {_summarise(sorted(os.listdir(aside)))}, which appeared "
                          "during the write", stacklevel=2)
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and straight back (which
    os.umask forces; the lock keeps two threads here from seeing each other's value)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write model's banks, gates and layer configs to the safetensors file at path."""
    layers = reclora_layers(model)
    if not layers:
        raise ValueError("save_adapters: `model` has no RecLoRALinear layers")
    # Each layer's banks and gate are stored under its name: two layers holding one gate (or
    # bank) would be written twice (safetensors refuses that on the CPU) and load back apart.
    owners: dict[int, str] = {}
    for key, value in _layers_state(layers, keep_vars=True).items():
        first = owners.setdefault(id(value), key)
        if first != key:
            raise ValueError(f"save_adapters: {first} and {key} are one tensor (the layers "
                             "share a gate or bank); a file holds each layer's own: give "
                             "every RecLoRALinear its own gate and banks")
    tensors = {
        key: value.detach().to("cpu").contiguous() for key, value in
        adapter_state_dict(model).items()
    }
    # load_adapters refuses NaN and inf: written, such a file would have replaced the last
    # loadable one at path (a diverged training step) with one nothing can load.
    check_finite(tensors, f"save_adapters: nothing written to {path}")
    names = names_by_module(model)
    meta = {"format": FORMAT, "version": VERSION,
            "layers": {name: layer.adapter_config() for name, layer in layers.items()},
            "aliases": {name: names[id(layer)] for name, layer in layers.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"reclora": json.dumps(meta)}))


# What load_adapters reads from each layer's saved config to rebuild the layer.
_LAYER_KEYS = ("num_adapters", "rank", "alpha", "mix", "gate")


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON config stored in an adapter file: {"format", "version", "layers": {name:
    adapter_config()}, "aliases": {name: [every name of that module]}} ("aliases" absent in
    older files). Anything else raises ValueError naming the file."""
    with _open_adapters(path) as handle:
        return _adapter_meta(path, handle)


def _open_adapters(path: str | os.PathLike):
    """safe_open(path), or ValueError naming the file."""
    if not Path(path).is_file():
        raise ValueError(f"load_adapters: {path} is not a file (give the .safetensors file "
                         "save_adapters wrote)")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"load_adapters: {path} is not a readable safetensors file "
                         f"({err})") from None


def _adapter_meta(path: str | os.PathLike, handle) -> dict:
    """read_adapter_config's checks, on an open file."""
    raw = (handle.metadata() or {}).get("reclora")
    if raw is None:
        raise ValueError(f"load_adapters: {path} is not a reclora adapter file (no 'reclora' "
                         "metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"load_adapters: {path}: its 'reclora' metadata is not JSON "
                         f"({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"load_adapters: {path}: its 'reclora' metadata holds "
                         f"{type(meta).__name__}, not a dict")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"load_adapters: {path} has format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(c, dict) for c in layers.values()):
        raise ValueError(f"load_adapters: {path}: its metadata's 'layers' is not a dict of "
                         "layer configs")
    for name, config in layers.items():
        missing = [k for k in _LAYER_KEYS if k not in config]
        if missing:
            raise ValueError(f"load_adapters: {path}: layer {name!r}'s config lacks "
                             f"{', '.join(missing)}")
    aliases = meta.get("aliases", {})  # absent in files saved before it was written
    if not isinstance(aliases, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names)
            for names in aliases.values()):
        raise ValueError(f"load_adapters: {path}: its metadata's 'aliases' is not a dict of "
                         "lists of module names")
    return meta


def _check_layer_config(path: str | os.PathLike, name: str, layer: RecLoRALinear,
                        saved: dict) -> None:
    current = layer.adapter_config()
    diffs = [f"{k}: model {current.get(k)!r} vs file {saved.get(k)!r}"
             for k in sorted(set(current) | set(saved)) if current.get(k) != saved.get(k)]
    if diffs:
        raise ValueError(f"load_adapters: {path}: layer {name!r} is configured differently "
                         "from the file: " + "; ".join(diffs))


def _summarise(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_finite(tensors: dict[str, object], where: str) -> None:
    """ValueError "`where`: non-finite values (NaN or inf) in <keys>" if a floating tensor of
    `tensors` holds one (other values are left to the caller's checks): a NaN in one adapter
    or one embedding row reaches only the users that read it, so the whole file is refused."""
    bad = [key for key, value in tensors.items() if isinstance(value, torch.Tensor)
           and value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise ValueError(f"{where}: non-finite values (NaN or inf) in {_summarise(bad)}")


def _check_declared_shapes(path: str | os.PathLike, handle, found: set[str], name: str,
                           module: nn.Module, config: dict) -> None:
    """Before a layer is built around `module` from the file's metadata: the banks and gate
    the metadata declares must have the shapes of the file's tensors. safetensors bounds the
    tensors by the file's length, but nothing bounds the JSON: num_adapters 4e6 in a 700-byte
    file allocated 0.5 GiB of banks before the shapes were compared (1e12: an allocator error)."""
    declared = {}
    if isinstance(module, nn.Linear) or _is_conv1d(module):  # else wrap_module refuses it
        rows, cols = module.weight.shape  # nn.Linear: [out, in]; Conv1D: [in, out]
        d_in, d_out = (rows, cols) if _is_conv1d(module) else (cols, rows)
        m, r = config["num_adapters"], config["rank"]
        declared.update({f"{name}.lora_a": [m, r, d_in], f"{name}.lora_b": [m, d_out, r]})
    if config["gate"] is not None:
        try:  # on the meta device: shapes only, nothing allocated
            gate = PersonalizedGate.from_config(config["gate"], device="meta")
        except (TypeError, KeyError, ValueError):
            gate = None  # a malformed gate config: wrap_module refuses it, naming the error
        if gate is not None:
            declared.update({f"{name}.gate.{key}": list(value.shape)
                             for key, value in gate.state_dict().items()})
    # Worded as load_adapters' own check (which would come after the build), "model" being
    # the layer the metadata declares; a file layer without its tensors is refused even with
    # strict=False (its banks would be random, at a size nothing bounds).
    saved = {key: handle.get_slice(key).get_shape() for key in declared if key in found}
    problems = []
    missing = [key for key in declared if key not in saved]
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    wrong = [f"{key} (file {saved[key]}, model {shape})" for key, shape in declared.items()
             if key in saved and saved[key] != shape]
    if wrong:
        problems.append(f"mis-shaped keys: {_summarise(wrong)}")
    if problems:
        raise ValueError(f"load_adapters: {path} does not fit the model: " + "; ".join(problems)
                         + f" (layer {name!r} as the file's metadata declares it)")


def load_adapters(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict:
    """Load a save_adapters file into model and return its layers by name.

    Modules the file names that are not yet RecLoRALinear are wrapped first (so a freshly
    built base model works); then everything but banks and gates is frozen. Raises ValueError
    naming the file on malformed metadata, missing keys (model layers the file lacks, with
    strict=True; a layer the file declares without its tensors, always), sizes the metadata
    declares that its tensors do not have (checked before anything is built), extra keys,
    shapes that differ, a tensor that is not floating or holds NaN or inf, a layer configured
    differently (rank, alpha, mix, gate options...), modules shared otherwise than in the
    saved model, or (into layers already injected) banks or gates of another dtype than the
    file's."""
    # Build every layer first and check the file against them, so a file that does not fit
    # leaves the model untouched. One open for the metadata and the tensors: a save_adapters
    # between two opens mixed one file's config with the other's banks.
    layers = reclora_layers(model)
    new_layers = {}
    aliases = names_by_module(model)  # a shared module is replaced under every name it has
    seen: dict[int, str] = {}  # id(module) -> the file's layer name for it
    with _open_adapters(path) as handle:
        meta = _adapter_meta(path, handle)
        saved_aliases = meta.get("aliases", {})  # absent in older files: not checked
        found = set(handle.keys())
        for name, config in meta["layers"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"load_adapters: the file has layer {name!r}, which `model` "
                                 "lacks") from None
            # The model must share modules as the saved one did: else two of the file's
            # layers would wrap one module (the last one's banks winning under every name),
            # or a layer saved as shared would leave its other names without adapters.
            if id(module) in seen:
                raise ValueError(f"load_adapters: {path} has layers {seen[id(module)]!r} and "
                                 f"{name!r}, which are one module in `model` (the file comes "
                                 "from a model where they are not shared)")
            seen[id(module)] = name
            saved = saved_aliases.get(name)
            if saved is not None and set(saved) != set(aliases[id(module)]):
                raise ValueError(f"load_adapters: {path}: layer {name!r} was saved as one "
                                 f"module named {sorted(saved)}, but in `model` that module "
                                 f"is named {sorted(aliases[id(module)])} (the file comes "
                                 "from a model whose modules are shared otherwise)")
            if not isinstance(module, RecLoRALinear):
                if not name:  # saved from a bare layer: the root cannot be replaced in place
                    raise ValueError(f"load_adapters: {path} holds a single layer saved as "
                                     f"the model itself, but `model` is a "
                                     f"{type(module).__name__}; load it into a RecLoRALinear "
                                     "(RecLoRALinear.from_linear) or a module that holds one")
                _check_declared_shapes(path, handle, found, name, module, config)
                # In the dtype the file's bank was saved in (else a bf16 bank came back as
                # float32, its gate computing other mixtures than the saved model's).
                bank = f"{name}.lora_a"
                dtype = (_SAFETENSORS_DTYPES.get(handle.get_slice(bank).get_dtype())
                         if bank in found else None)
                try:
                    names = [a for a in aliases[id(module)] if a]
                    for alias in names:  # as inject: where a wrapper would do nothing
                        _refuse_bypassed(model, alias)
                    module = wrap_module(module, num_adapters=config["num_adapters"],
                                         rank=config["rank"], alpha=config["alpha"],
                                         mix=config["mix"], gate=config["gate"],
                                         adapter_dtype=dtype)
                except (TypeError, KeyError, ValueError) as err:  # a malformed layer config
                    raise ValueError(f"load_adapters: {path}: cannot wrap module {name!r}: "
                                     f"{type(err).__name__}: {err}") from None
                new_layers[name] = (module, names)
            _check_layer_config(path, name, module, config)
        layers.update({name: module for name, (module, _) in new_layers.items()})

        expected = _layers_state(layers)
        # A parametrized bank's tensor is computed: copy_ into it wrote nothing that lasted.
        through = [f"{name}.{bank}" for name, layer in layers.items()
                   for bank in ("lora_a", "lora_b") if parametrize.is_parametrized(layer, bank)]
        if through:
            raise ValueError(f"load_adapters: {path}: {_summarise(through)} is parametrized "
                             "(torch.nn.utils.parametrize), and the file's values cannot be "
                             "written back through the parametrization; load before "
                             "registering it, or remove it first")
        missing = sorted(set(expected) - found) if strict else []
        extra = sorted(found - set(expected))
        problems = []
        if missing:
            problems.append(f"missing keys: {_summarise(missing)}")
        if extra:
            problems.append(f"unexpected keys: {_summarise(extra)}")
        shapes = {key: handle.get_slice(key).get_shape() for key in sorted(found & set(expected))}
        wrong = [f"{k} (file {v}, model {list(expected[k].shape)})"
                 for k, v in shapes.items() if list(expected[k].shape) != list(v)]
        if wrong:
            problems.append(f"mis-shaped keys: {_summarise(wrong)}")
        # copy_ would cast an integer tensor into a bank silently.
        dtypes = {key: handle.get_slice(key).get_dtype() for key in shapes}
        typed = [f"{k} (file {dtypes[k]})" for k in shapes
                 if expected[k].is_floating_point() and dtypes[k] not in _SAFETENSORS_DTYPES]
        if typed:
            problems.append(f"keys not of a floating dtype: {_summarise(typed)}")
        # Refused, not cast (nor warned about, which is easy to miss): a layer injected in
        # another dtype than the file's runs its gate in that dtype and so mixes otherwise
        # than the saved model (bf16 banks loaded as float32: logits 3% off).
        cast = [f"{k} (file {dtypes[k]}, model {str(expected[k].dtype).removeprefix('torch.')})"
                for k in shapes if dtypes[k] in _SAFETENSORS_DTYPES
                and _SAFETENSORS_DTYPES[dtypes[k]] != expected[k].dtype]
        if cast:
            problems.append(f"keys of another dtype: {_summarise(cast)} (inject with the "
                            "file's adapter_dtype, or load into a model not injected yet: "
                            "load_adapters builds its layers in the file's dtype)")
        if problems:
            raise ValueError(f"load_adapters: {path} does not fit the model: "
                             + "; ".join(problems))
        values = {key: handle.get_tensor(key) for key in shapes}  # banks are small
    check_finite(values, f"load_adapters: {path}")
    for layer, names in new_layers.values():
        for alias in names:
            _replace(model, alias, layer)
    freeze_all_but_adapters(model)
    with torch.no_grad():
        for key, value in values.items():
            expected[key].copy_(value)
    return reclora_layers(model)
