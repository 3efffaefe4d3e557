"""Export one row's mixture (one user's adapter) as a standard PEFT LoRA adapter for serving.

For each RecLoRALinear the row's mixture is merged into plain LoRA factors (A', B') with
scale * B_mix(A_mix x) == scale' * B' A' x exactly:
- factor mix: A' = sum_j w_j A[i_j] [r, d_in], B' = sum_j w_j B[i_j] [d_out, r]; rank r.
- output mix: A' = [w_1 A[i_1]; ...; w_k A[i_k]] [k*r, d_in], B' = [B[i_1] | ... | B[i_k]]
  [d_out, k*r]; rank k*r (the sum of k rank-r products is a rank-k*r product).
They are written as adapter_config.json + adapter_model.safetensors in PEFT's layout, with
lora_alpha = scale * rank so that PEFT's scaling lora_alpha / r equals the layer's scale, and
`peft.PeftModel.from_pretrained(base_model, folder)` then gives that row's outputs. The two
files are written as a pair (atomic_write_folder): a folder never holds one export's weights
with another's config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import _summarise, atomic_write_folder
from .injection import names_by_module, personalize, reclora_layers
from .layers import RecLoRALinear, uniform_mixture
from .modes import autocast_off, eval_mode

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what an export writes


def merged_factors(
    layer: RecLoRALinear, weights: torch.Tensor, idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA factors (A' [r', d_in], B' [d_out, r']) of one row's mixture: weights [k],
    idx [k] or None (dense, k = M). The layer's delta is scale * B' A' x."""
    if weights.dim() != 1 or (idx is not None and idx.shape != weights.shape):
        raise ValueError("merged_factors: `weights` must be [k] and `idx` [k] or None, got "
                         f"{list(weights.shape)} and {None if idx is None else list(idx.shape)}")
    if idx is not None and idx.numel():
        # Indexing would wrap a negative index to another adapter (or fail with a bare error).
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= layer.num_adapters:
            raise IndexError(f"merged_factors: `idx` values must lie in [0, "
                             f"{layer.num_adapters}) (adapters in the bank), got [{lo}, {hi}]")
    bank_a = layer.lora_a if idx is None else layer.lora_a[idx]  # [k, r, d_in]
    bank_b = layer.lora_b if idx is None else layer.lora_b[idx]  # [k, d_out, r]
    w = weights.to(bank_a.dtype)
    if layer.mix == "factor":
        return torch.einsum("j,jrd->rd", w, bank_a), torch.einsum("j,jor->or", w, bank_b)
    k, r, d_in = bank_a.shape
    a = (w[:, None, None] * bank_a).reshape(k * r, d_in)
    b = bank_b.permute(1, 0, 2).reshape(layer.out_features, k * r)
    return a, b


def _row_mixture(layer: RecLoRALinear, row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    weights, idx, _ = layer._resolve_mixture()
    if weights is None:  # the uniform 1/M over the bank
        bank = layer.lora_a
        weights = uniform_mixture(1, layer.num_adapters, bank.dtype, bank.dtype, bank.device)
    rows = weights.shape[0]
    if rows != 1 and not 0 <= row < rows:
        raise ValueError(f"export_peft: `row` must lie in [0, {rows}), got {row}")
    pick = 0 if rows == 1 else row
    return weights[pick], None if idx is None else idx[pick]


def _check_row(row: int, user_reps: torch.Tensor) -> None:
    """row must be a row of user_reps ([h]: row 0 only): a one-row batch's mixture
    broadcasts, so _row_mixture alone takes any row."""
    rows = 1 if user_reps.dim() == 1 else user_reps.shape[0]
    if not 0 <= row < rows:
        raise ValueError(f"export_peft: `row` must lie in [0, {rows}) (the rows of "
                         f"`user_reps`, {list(user_reps.shape)}), got {row}")


def _check_finite(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], row: int,
                  user_reps: torch.Tensor | None) -> None:
    """Refuse an adapter with NaN or inf (PEFT would serve NaN), naming the likely cause."""
    bad = [name for name, (a, b) in factors.items()
           if not (a.isfinite().all() and b.isfinite().all())]
    if not bad:
        return
    if user_reps is not None:
        reps = user_reps if user_reps.dim() == 1 else user_reps[row]
        if not reps.isfinite().all():
            raise ValueError(f"export_peft: `user_reps` row {row} holds NaN or inf: its "
                             "adapter would be NaN")
    raise ValueError(f"export_peft: row {row}'s adapter is not finite (NaN or inf) in "
                     f"{_summarise(bad)}: their banks, gates or mixtures hold NaN or inf")


def _check_targets(model: nn.Module, layers: dict[str, RecLoRALinear]) -> None:
    """Every layer must be a module PEFT can adapt: not the model itself, and reached through
    one (parent, attribute) only. PEFT wraps a module once, at its first name, so under
    another parent or attribute name it would run bare. A shared parent is fine (a block
    repeated as ModuleList([block] * n)): setting the attribute on it reaches every path."""
    if "" in layers:
        raise ValueError("export_peft: `model` is a bare RecLoRALinear, which cannot be a PEFT "
                         "target (it has no module name); export a model that holds it")
    names = names_by_module(model)
    for name, layer in layers.items():
        places = set()
        for alias in names[id(layer)]:
            parent, _, attribute = alias.rpartition(".")
            places.add((id(model.get_submodule(parent)), attribute))
        if len(places) > 1:
            raise ValueError(f"export_peft: layer {name!r} is one module under the names "
                             f"{', '.join(names[id(layer)])}; a PEFT adapter cannot adapt a "
                             "module under several parents or attribute names (PEFT wraps "
                             "it at its first name only, the others would run without the "
                             "adapter)")


def _peft_config(layers: dict[str, RecLoRALinear], rank: int, scale: float,
                 base_model_name_or_path: str | None, task_type: str | None) -> str:
    """adapter_config.json's text (PEFT's LoraConfig fields)."""
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": scale * rank,
        # A regex matching exactly the adapted module names (PEFT full-matches a string).
        "target_modules": "(?:" + "|".join(re.escape(name) for name in layers) + ")",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return json.dumps(config, indent=2) + "\n"


def export_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    user_reps: torch.Tensor | None = None,
    row: int = 0,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write row `row`'s adapter of every RecLoRALinear in model as a PEFT LoRA adapter.

    The mixture comes from the gates applied to user_reps ([h] or [R, h]) if given; else from
    whatever each layer would use now (an enclosing personalize(), set_mixture, or uniform).
    Gates run in eval mode (no dropout). Load it with
    `peft.PeftModel.from_pretrained(base_model, out_dir)` on the model as it was before
    inject. base_model_name_or_path (a str or path) and task_type (a str) go into
    adapter_config.json. A layer shared under several parents or attribute names, which PEFT
    cannot represent, is refused. out_dir gets both files or keeps what it held (an earlier
    export); a folder holding other files is refused. Returns out_dir.
    """
    # bool is an int subclass: True would silently export row 1.
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
        raise TypeError(f"export_peft: `row` must be an int (a batch row), got "
                        f"{type(row).__name__} {row!r}")
    row = int(row)
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    for arg, value in (("base_model_name_or_path", base_model_name_or_path),
                       ("task_type", task_type)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"export_peft: `{arg}` must be a str or None, got "
                            f"{type(value).__name__} {value!r}")
    layers = reclora_layers(model)
    if not layers:
        raise ValueError("export_peft: `model` has no RecLoRALinear layers")
    _check_targets(model, layers)
    gates = [layer.gate for layer in layers.values() if layer.gate is not None]
    factors, specs = {}, set()
    with contextlib.ExitStack() as gates_in_eval:
        for gate in gates:
            gates_in_eval.enter_context(eval_mode(gate))
        # Autocast off: the merge in the banks' dtype wherever it is called (inside a
        # serving loop's autocast the files came out in bf16, 3e-3 off).
        devices = [layer.lora_a.device.type for layer in layers.values()]
        with torch.no_grad(), autocast_off(*devices):
            if user_reps is not None:
                with personalize(model, user_reps):
                    _check_row(row, user_reps)
                    mixtures = {name: _row_mixture(layer, row) for name, layer in layers.items()}
            else:
                mixtures = {name: _row_mixture(layer, row) for name, layer in layers.items()}
            for name, layer in layers.items():
                a, b = merged_factors(layer, *mixtures[name])
                factors[name] = (a, b)
                specs.add((a.shape[0], layer.scale))
    if len(specs) != 1:
        raise ValueError(f"export_peft: layers differ in exported (rank, scale): {sorted(specs)}; "
                         "one PEFT adapter holds one rank and alpha")
    rank, scale = specs.pop()
    # Everything that can fail on the arguments runs before the folder is touched.
    _check_finite(factors, row, user_reps)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    config = _peft_config(layers, rank, scale, base_model_name_or_path, task_type)

    def write(folder: Path) -> None:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(config, encoding="utf-8")

    out_dir = Path(out_dir)
    atomic_write_folder(out_dir, write, replaces=PEFT_FILES)
    return out_dir
