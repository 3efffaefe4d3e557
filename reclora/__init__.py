"""reclora: RecLoRA (arXiv 2408.03533), personalized LoRA mixtures for LLM recommenders.

The public names load lazily (PEP 562), so `import reclora` and the CLI stay light: torch
is imported only when a model-layer name is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RecLoRALinear": "reclora.layers",
    "ReclLoRALinear": "reclora.layers",
    "PersonalizedGate": "reclora.gates",
    "GateConfig": "reclora.gates",
    "inject": "reclora.injection",
    "personalize": "reclora.injection",
    "reclora_layers": "reclora.injection",
    "trainable_parameters": "reclora.injection",
    "num_trainable": "reclora.injection",
    "save_adapters": "reclora.checkpoint",
    "load_adapters": "reclora.checkpoint",
    "adapter_state_dict": "reclora.checkpoint",
    "export_peft": "reclora.export",
    "merged_factors": "reclora.export",
    "Recommender": "reclora.serving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reclora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
