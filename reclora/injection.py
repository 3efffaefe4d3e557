"""Put RecLoRALinear layers into any transformers (or plain torch) model, and feed their gates.

    layers = reclora.inject(model, ("q_proj", "v_proj"), num_adapters=16, rank=8, alpha=16,
                            gate_dim=256, temperature=5.0)
    with reclora.personalize(model, user_reps):      # user_reps [R, 256], one per batch row
        out = model(input_ids)

`target_modules` matches like PEFT's: a string is a regular expression that must match the
whole module name; a sequence of strings matches module names equal to, or ending in "." plus,
one of them. nn.Linear and transformers' Conv1D (GPT-2 style) are supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from reclora_kernels import RowPlan, row_plan

from .gates import PersonalizedGate
from .layers import (
    ACTIVE_PERSONALIZATION,
    Personalization,
    RecLoRALinear,
    _is_conv1d,
    default_adapter_dtype,
)


def reclora_layers(model: nn.Module) -> dict[str, RecLoRALinear]:
    """Every RecLoRALinear in model, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RecLoRALinear)}


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_all_but_adapters(model: nn.Module) -> None:
    """requires_grad only on the banks and gates of model's RecLoRALinear layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in reclora_layers(model).values():
        layer.lora_a.requires_grad_(True)
        layer.lora_b.requires_grad_(True)
        if layer.gate is not None:
            for p in layer.gate.parameters():
                p.requires_grad_(True)


def wrap_module(
    module: nn.Module,
    *,
    num_adapters: int,
    rank: int,
    alpha: float | None = None,
    mix: str = "factor",
    gate: dict | None = None,
    backend: str = "auto",
    adapter_dtype: torch.dtype | None = None,
) -> RecLoRALinear:
    """One RecLoRALinear around module (sharing its base weights), with a gate built from the
    `gate` dict of PersonalizedGate's arguments (in_features, num_adapters, hidden, ...)."""
    adapter_dtype = adapter_dtype or default_adapter_dtype(module.weight.dtype)
    new_gate = None
    if gate is not None:
        new_gate = PersonalizedGate.from_config(gate, device=module.weight.device,
                                                dtype=adapter_dtype)
    layer = RecLoRALinear.from_linear(
        module, num_adapters=num_adapters, rank=rank, alpha=alpha, mix=mix, gate=new_gate,
        backend=backend, adapter_dtype=adapter_dtype,
    )
    # New modules start in training mode; follow the model's (an eval model must not get
    # gate dropout).
    return layer.train(module.training)


def inject(
    model: nn.Module,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    *,
    num_adapters: int,
    rank: int,
    alpha: float | None = None,
    gate_dim: int | None = None,
    mix: str = "factor",
    gate_hidden: int = 60,
    gate_dropout: float = 0.1,
    temperature: float = 1.0,
    top_k: int | None = None,
    sqrt: bool = False,
    backend: str = "auto",
    adapter_dtype: torch.dtype | None = None,
) -> dict[str, RecLoRALinear]:
    """Replace the matching nn.Linear / Conv1D modules of model, in place, by RecLoRALinear
    layers that share their base weights; freeze everything but the banks and gates.

    gate_dim: size of the user representation; each layer then gets its own
        PersonalizedGate(gate_dim, num_adapters, hidden=gate_hidden, dropout=gate_dropout,
        temperature=temperature, top_k=top_k, sqrt=sqrt) and is driven by personalize().
        None: no gates; mixtures come from layer.set_mixture (uniform 1/M when unset).
    adapter_dtype: dtype of banks and gates (default float32 under a half-precision base).
    Returns the new layers by module name (what save_adapters / export_peft walk too).
    """
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"inject: `target_modules` is not a valid regex: {err}") from None
    elif not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError("inject: `target_modules` must be a regex string or a non-empty "
                         f"sequence of module names, got {target_modules!r}")
    if gate_dim is not None and (not isinstance(gate_dim, int) or gate_dim < 1):
        raise ValueError(f"inject: `gate_dim` must be None or an int >= 1, got {gate_dim!r}")

    matched = []
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if isinstance(module, RecLoRALinear):
            raise ValueError(f"inject: module {name!r} is already a RecLoRALinear")
        if any(name.startswith(done + ".") for done in matched):
            continue  # inside a module being replaced
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise TypeError(f"inject: module {name!r} matches `target_modules` but is a "
                            f"{type(module).__name__}; only nn.Linear and Conv1D are supported")
        owner = _weight_reader(model, name)
        if owner is not None:
            raise TypeError(f"inject: module {name!r} is inside a {type(owner).__name__}, "
                            "which reads its weight directly (its forward is never called), "
                            "so adapters there would do nothing")
        matched.append(name)
    if not matched:
        candidates = sorted({
            name.rpartition(".")[2] for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or _is_conv1d(m)
        })
        raise ValueError(f"inject: no module matches `target_modules`={target_modules!r}; "
                         f"linear modules here are named {candidates[:20]}")

    gate = None
    if gate_dim is not None:
        gate = {"in_features": gate_dim, "num_adapters": num_adapters, "hidden": gate_hidden,
                "dropout": gate_dropout, "temperature": temperature, "top_k": top_k,
                "sqrt": sqrt}
    layers = {}
    for name in matched:
        layer = wrap_module(
            model.get_submodule(name), num_adapters=num_adapters, rank=rank, alpha=alpha,
            mix=mix, gate=gate, backend=backend, adapter_dtype=adapter_dtype,
        )
        _replace(model, name, layer)
        layers[name] = layer
    freeze_all_but_adapters(model)
    return layers


# torch modules that read their linear children's weights directly: MultiheadAttention
# (out_proj) always, the Transformer layers on their eval fast path.
_WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                   nn.TransformerDecoderLayer)


def _weight_reader(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost ancestor of module `name` that reads its weights without calling it."""
    parts = name.split(".")
    found = None
    for depth in range(len(parts)):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if isinstance(ancestor, _WEIGHT_READERS):
            found = ancestor
    return found


@contextmanager
def personalize(
    model: nn.Module,
    user_reps: torch.Tensor,
    *,
    row_ids: torch.Tensor | None = None,
    plan: RowPlan | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every gated RecLoRALinear in model computes its mixture from
    user_reps [R, h] (row b of every input is user b; a [h] vector is one user for all rows).
    row_ids [T]: for packed inputs, the row of each flattened token; its row plan is made
    here, once for the batch (one host read), and shared by every layer (or pass a ready
    `plan` from reclora_kernels.row_plan). Contexts nest; on exit the previous state comes
    back. Layers without a gate are left as they are.

    Thread-safe: the state lives in a context variable (per thread, per asyncio task), not on
    the modules, so two threads may personalize one model for different users at once.

    The gates run inside each layer's forward, so their gradients flow as usual. With
    activation checkpointing, the recomputing forward runs during backward(): call backward
    inside the block, in the same thread (on CUDA, torch runs backward in its own threads,
    which do not see this context: checkpoint outside the gated layers there)."""
    if not isinstance(user_reps, torch.Tensor) or not user_reps.is_floating_point():
        raise TypeError("personalize: `user_reps` must be a floating-point tensor [R, h]")
    if user_reps.dim() not in (1, 2):
        raise ValueError(f"personalize: `user_reps` must be [R, h] or [h], got shape "
                         f"{list(user_reps.shape)}")
    gated = [m for m in reclora_layers(model).values() if m.gate is not None]
    if not gated:
        raise ValueError("personalize: `model` has no RecLoRALinear with a gate; inject with "
                         "gate_dim=... first")
    dims = {m.gate.in_features for m in gated}
    if user_reps.shape[-1] not in dims or len(dims) > 1:
        raise ValueError(f"personalize: `user_reps` must end in the gates' input size "
                         f"{sorted(dims)}, got shape {list(user_reps.shape)}")
    if row_ids is not None and plan is not None:
        raise ValueError("personalize: give `row_ids` or `plan`, not both")
    if row_ids is not None:
        rows = user_reps.shape[0] if user_reps.dim() == 2 else 1
        plan = row_plan(row_ids.to(user_reps.device), rows)
    elif plan is not None and not isinstance(plan, RowPlan):
        raise TypeError(f"personalize: `plan` must be a RowPlan, got {type(plan).__name__}")
    state = Personalization(user_reps, plan)
    active = dict(ACTIVE_PERSONALIZATION.get() or {})
    active.update({m: state for m in gated})
    token = ACTIVE_PERSONALIZATION.set(active)
    try:
        yield model
    finally:
        ACTIVE_PERSONALIZATION.reset(token)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after inject: the banks and the gates)."""
    return [p for p in model.parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
