"""Put RecLoRALinear layers into any transformers (or plain torch) model, and feed their gates.

    layers = reclora.inject(model, ("q_proj", "v_proj"), num_adapters=16, rank=8, alpha=16,
                            gate_dim=256, temperature=5.0)
    with reclora.personalize(model, user_reps):      # user_reps [R, 256], one per batch row
        out = model(input_ids)

`target_modules` matches like PEFT's: a string is a regular expression that must match the
whole module name; a sequence of strings matches module names equal to, or ending in "." plus,
one of them. nn.Linear and transformers' Conv1D (GPT-2 style) are supported; inject refuses
linears whose forward a model bypasses (it reads their weight directly) or runs on
[seq, batch, features] inputs or on tokens routed to an MoE expert (the layer takes x's first
dim as the batch row); with gates, also linears in a multimodal model's vision or audio tower
(its rows are images, not prompts) and MoE shared experts run on the flattened batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from reclora_kernels import RowPlan, row_plan

from .gates import PersonalizedGate
from .layers import (
    ACTIVE_PERSONALIZATION,
    Personalization,
    RecLoRALinear,
    _is_conv1d,
    _is_exporting,
    check_plan_rows,
    default_adapter_dtype,
    jit_trace_error,
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
        for bank in ("lora_a", "lora_b"):
            if parametrize.is_parametrized(layer, bank):
                # The bank is computed from these (requires_grad on the computed tensor
                # was lost at the next forward, the real parameter left frozen).
                for p in layer.parametrizations[bank].parameters():
                    p.requires_grad_(True)
            else:
                getattr(layer, bank).requires_grad_(True)
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
        Gated layers are refused inside a multimodal model's vision / audio tower (and MoE
        shared experts): personalize's rows are the prompts, theirs are images or tokens.
        Without gates such layers are accepted; give them a one-row mixture (or none).
    top_k: None (each gate mixes all M adapters) or k in [2, num_adapters]: each gate keeps
        its k largest logits, ties to the lower adapter index (1 is refused: such a gate gets
        no gradient; see PersonalizedGate).
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

    matched = _targets(model, target_modules, gated=gate_dim is not None)
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
    # Every layer is built before any is put in: a module refused half-way (a hook, a
    # quantized base) leaves the model as it was (building froze the bases it shares), and
    # the error names that module.
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    layers = {}
    for name in matched:
        try:
            layers[name] = wrap_module(
                model.get_submodule(name), num_adapters=num_adapters, rank=rank, alpha=alpha,
                mix=mix, gate=gate, backend=backend, adapter_dtype=adapter_dtype,
            )
        except BaseException as err:  # any failure (a torch error too) leaves it as it was
            for param, was in trainable:
                param.requires_grad_(was)
            if isinstance(err, (TypeError, ValueError)):
                raise type(err)(f"inject: module {name!r}: {err}") from None
            raise
    for name, aliases in matched.items():
        for alias in aliases:
            _replace(model, alias, layers[name])
    freeze_all_but_adapters(model)
    return layers


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name model reaches it under (named_modules lists a shared module
    once; its other names must be replaced too)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _targets(model: nn.Module, target_modules: str | Sequence[str], *,
             gated: bool = False) -> dict[str, list[str]]:
    """The modules to wrap: {first name (as named_modules gives it): every name of that
    module}. A module registered under several names (shared, tied) is wrapped once and
    replaced under all of them, else the other paths kept running it without adapters.
    gated: the layers get gates (personalize's rows are then the model's batch rows)."""
    names = names_by_module(model)
    matched: dict[str, list[str]] = {}
    done: set[int] = set()
    # An earlier inject's layers: their own modules (a gate's nn.Linear) are never targets;
    # wrapped, a gate changed its routing and saved adapters named a layer no fresh model has.
    ours = tuple(n + "." for n, m in model.named_modules(remove_duplicate=False)
                 if n and isinstance(m, RecLoRALinear))
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or id(module) in done or not _matches(name, target_modules):
            continue
        if name.startswith(ours):
            continue
        if isinstance(module, RecLoRALinear):
            raise ValueError(f"inject: module {name!r} is already a RecLoRALinear")
        if any(name.startswith(a + ".") for aliases in matched.values() for a in aliases):
            continue  # inside a module being replaced
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise TypeError(f"inject: module {name!r} matches `target_modules` but is a "
                            f"{type(module).__name__}; only nn.Linear and Conv1D are supported")
        aliases = [a for a in names[id(module)] if a]
        for alias in aliases:
            _refuse_bypassed(model, alias)
            if gated:
                _refuse_other_rows(model, alias, target_modules)
        done.add(id(module))
        matched[aliases[0]] = aliases
    return matched


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules that read some linear children's weights directly, never calling their forward:
# adapters there would do nothing. Class (qualified name, matched over the MRO, so
# transformers is not imported) -> those children's names (None: every child). Found by
# reading torch's and transformers' forward code (transformers 5.25: a child nn.Linear's
# `.weight` used in a matmul, F.linear or fused kernel call).
_WEIGHT_READERS = {
    # out_proj always; the Transformer layers' eval fast path reads linear1 / linear2.
    _qualname(nn.MultiheadAttention): None,
    _qualname(nn.TransformerEncoderLayer): None,
    _qualname(nn.TransformerDecoderLayer): None,
    # matmul with cat([decoder.weight.t(), dense.weight]) and decoder.bias
    "transformers.models.mobilebert.modeling_mobilebert.MobileBertLMPredictionHead": (
        "dense", "decoder"),
    # F.multi_head_attention_forward with the projections' weights and biases
    "transformers.models.wavlm.modeling_wavlm.WavLMAttention": ("q_proj", "k_proj", "v_proj",
                                                               "out_proj"),
    # rel_pos_bias.weight.t()[rel_pos], and the 2-D x / y ones
    "transformers.models.layoutlmv2.modeling_layoutlmv2.LayoutLMv2Encoder": (
        "rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),
    # training: F.linear(modalities, correction_coefs.weight.clamp(...))
    "transformers.models.gemma3n.modeling_gemma3n.Gemma3nTextAltUp": ("correction_coefs",),
    "transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashTopkRouter": (
        "classifier",),
    "transformers.models.neomme.modeling_neomme.NeoMMEForMaskedLM": ("unembedding_projection",),
    # conv2d with k_proj.weight as a 1x1 kernel (DETR-style mask heads)
    "transformers.models.detr.modeling_detr.DetrMHAttentionMap": ("k_proj",),
    "transformers.models.conditional_detr.modeling_conditional_detr."
    "ConditionalDetrMHAttentionMap": ("k_proj",),
    "transformers.models.maskformer.modeling_maskformer.MaskFormerDetrMHAttentionMap": (
        "k_proj",),
    "transformers.models.dab_detr.modeling_dab_detr.DabDetrMHAttentionMap": ("k_linear",),
    # Mamba mixers: the CUDA kernels path (training) passes the weights to fused kernels;
    # Jamba and FalconMamba multiply by dt_proj.weight.
    "transformers.models.mamba.modeling_mamba.MambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer": ("out_proj",),
    "transformers.models.bamba.modeling_bamba.BambaMixer": ("out_proj",),
    "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer": ("out_proj",),
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid."
    "GraniteMoeHybridMambaLayer": ("out_proj",),
    "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer": ("out_proj",),
    "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer": ("out_proj",),
    "transformers.models.jamba.modeling_jamba.JambaMambaMixer": ("dt_proj",),
    "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer": ("dt_proj",),
    # the cached (generation) path multiplies by query_key.weight and value.weight
    "transformers.models.reformer.modeling_reformer.LSHSelfAttention": ("query_key", "value"),
}

# Modules that read a child's weight only under a setting of theirs: class -> (the children,
# whether this instance does, the setting in words). Bloom slices the weights into F.linear.
_BLOOM_TP = (lambda m: m.pretraining_tp > 1 and m.slow_but_exact,
             "pretraining_tp > 1 with slow_but_exact")
_WEIGHT_READERS_IF = {
    "transformers.models.bloom.modeling_bloom.BloomAttention": (("dense",), *_BLOOM_TP),
    "transformers.models.bloom.modeling_bloom.BloomMLP": (("dense_4h_to_h",), *_BLOOM_TP),
}

# transformers modules that run linear children on [seq, batch, features] inputs: the layer
# takes x's first dim as the batch row, so each position would get another row's mixture
# (silently when seq == batch). Same form as _WEIGHT_READERS; found by reading the forwards
# that transpose(0, 1) / permute(1, 0, 2) before calling a projection (transformers 5.25).
_SEQUENCE_FIRST = {
    "transformers.models.fsmt.modeling_fsmt.EncoderLayer": None,
    "transformers.models.fsmt.modeling_fsmt.DecoderLayer": None,
    "transformers.models.longformer.modeling_longformer.LongformerSelfAttention": None,
    "transformers.models.led.modeling_led.LEDEncoderSelfAttention": None,
    "transformers.models.xlnet.modeling_xlnet.XLNetFeedForward": None,
    "transformers.models.mlcd.modeling_mlcd.MLCDAttention": ("out_proj",),
    "transformers.models.bros.modeling_bros.BrosRelationExtractor": None,
    "transformers.models.bros.modeling_bros.BrosSpadeEEForTokenClassification": (
        "initial_token_classifier",),
    "transformers.models.bridgetower.modeling_bridgetower.BridgeTowerResidualAttention": None,
    "transformers.models.perception_lm.modeling_perception_lm."
    "PerceptionLMMultiModalProjector": None,
}


# Modules that run linear children on the tokens routed to one expert, gathered from the
# whole flattened batch ([tokens, features], `hidden_states[None, top_x]`): a RecLoRALinear
# takes each gathered token for a batch row, so token j got row j's mixture whichever row it
# came from (silently when an expert got as many tokens as there are rows). No row plan can
# follow the routing. Same form as _WEIGHT_READERS (transformers 5.25; the MoEs with
# parameter experts have no linear children there).
_ROUTED_TOKENS = {
    "transformers.models.switch_transformers.modeling_switch_transformers."
    "SwitchTransformersExperts": None,
    "transformers.models.nllb_moe.modeling_nllb_moe.NllbMoeExperts": None,
}

# MoE blocks that run their shared expert on the flattened batch [batch * seq, features]:
# personalize's one row per prompt cannot match (refused for gated layers; an ungated layer
# there runs with a uniform or one-row mixture).
_SHARED = ("shared_expert", "shared_expert_gate")
_FLATTENED_TOKENS = {
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": _SHARED,
    "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock": _SHARED,
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeSparseMoeBlock": _SHARED,
    "transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe."
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": _SHARED,
    "transformers.models.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextSparseMoeBlock": _SHARED,
    "transformers.models.llama4.modeling_llama4.Llama4TextMoe": ("shared_expert",),
    "transformers.models.flint.modeling_flint.FlintSparseMoeBlock": ("shared_expert",),
    "transformers.models.lara_mini.modeling_lara_mini.LaraMiniSparseMoeBlock": (
        "shared_expert",),
    "transformers.models.afmoe.modeling_afmoe.AfmoeSparseMoeBlock": ("shared_experts",),
    "transformers.models.cohere2_moe.modeling_cohere2_moe.Cohere2MoeSparseMoeBlock": (
        "shared_experts",),
}

# Sub-models of a multimodal model that encode images, video or audio: their batch is the
# images (or patches, or clips), not the prompts whose user representations personalize()
# gives. Found as a sub-model whose main_input_name is one of these, or by attribute name.
_MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_values")
_MEDIA_ATTRIBUTES = ("vision_tower", "vision_model", "visual", "multi_modal_projector",
                     "audio_tower", "audio_model", "vision_encoder", "image_encoder")


def _media_ancestor(model: nn.Module, name: str) -> str | None:
    """The name of the outermost sub-model above module `name` that encodes media for a
    model whose own input is not media (a Llava's vision tower; not a CLIPVisionModel's own
    encoder), else None."""
    root_input = getattr(model, "main_input_name", None)
    if root_input in _MEDIA_INPUTS:
        return None
    parts = name.split(".")
    for depth in range(1, len(parts)):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if (parts[depth - 1] in _MEDIA_ATTRIBUTES
                or getattr(ancestor, "main_input_name", None) in _MEDIA_INPUTS):
            return ".".join(parts[:depth])
    return None


def _refuse_other_rows(model: nn.Module, name: str,
                       target_modules: str | Sequence[str]) -> None:
    """TypeError when a gated layer at module `name` would not run on personalize's rows."""
    media = _media_ancestor(model, name)
    if media is not None:
        names = (["q_proj", "v_proj"] if isinstance(target_modules, str)
                 else [re.escape(t) for t in target_modules])
        regex = r".*language_model.*\.(" + "|".join(names) + ")"
        raise TypeError(
            f"inject: module {name!r} is inside {media!r} "
            f"({type(model.get_submodule(media)).__name__}), which encodes images or audio: "
            "its rows are images (or patches), not the prompts whose user representations "
            "personalize() gives, so a gated layer there would give an image another "
            "prompt's mixture; limit `target_modules` to the language model, e.g. "
            f"r'{regex}' (or inject there with gate_dim=None: one mixture for all images)")
    owner = _ancestor_in(model, name, _FLATTENED_TOKENS)
    if owner is not None:
        raise TypeError(
            f"inject: module {name!r} is inside a {type(owner).__name__}, which runs it on "
            "the batch flattened to [batch * seq, features]; personalize() gives one "
            "mixture row per prompt, which those tokens cannot be matched with, so gated "
            "layers there are not supported; leave the shared expert out of `target_modules` "
            "(e.g. a regex that excludes 'shared_expert') or inject it with gate_dim=None")


def _ancestor_in(model: nn.Module, name: str, table: dict) -> nn.Module | None:
    """The innermost ancestor of module `name` whose class is in table for that child."""
    parts = name.split(".")
    found = None
    for depth in range(len(parts)):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        for cls in type(ancestor).__mro__:
            if _qualname(cls) in table:
                children = table[_qualname(cls)]
                if children is None or parts[depth] in children:
                    found = ancestor
                break
    return found


def _setting_that_bypasses(model: nn.Module, name: str) -> str | None:
    """The setting in words when module `name`'s parent reads its weight under its present
    settings (_WEIGHT_READERS_IF), else None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for cls in type(parent).__mro__:
        children, reads, setting = _WEIGHT_READERS_IF.get(_qualname(cls), ((), None, None))
        if child in children and reads(parent):
            return f"{type(parent).__name__} with {setting}"
    return None


def _refuse_bypassed(model: nn.Module, name: str) -> None:
    """TypeError when module `name` sits where a RecLoRALinear would not do its job."""
    owner = _ancestor_in(model, name, _WEIGHT_READERS)
    setting = _setting_that_bypasses(model, name)
    if owner is not None or setting is not None:
        raise TypeError(f"inject: module {name!r} is inside a "
                        f"{setting or type(owner).__name__}, which reads its weight directly "
                        "(its forward is never called), so adapters there would do nothing")
    owner = _ancestor_in(model, name, _SEQUENCE_FIRST)
    if owner is not None:
        raise TypeError(f"inject: module {name!r} is inside a {type(owner).__name__}, which "
                        "runs it on [seq, batch, features] inputs; a RecLoRALinear takes x's "
                        "first dim as the batch row, so each position would get another "
                        "row's mixture")
    owner = _ancestor_in(model, name, _ROUTED_TOKENS)
    if owner is not None:
        raise TypeError(f"inject: module {name!r} is inside a {type(owner).__name__}, which "
                        "runs it on the tokens routed to one expert, gathered from the whole "
                        "batch: a RecLoRALinear takes each gathered token for a batch row, so "
                        "tokens would get other rows' mixtures (no row plan can follow the "
                        "routing); target the attention projections instead (e.g. "
                        "('q', 'v'))")


@contextmanager
def personalize(
    model: nn.Module,
    user_reps: torch.Tensor,
    *,
    row_ids: torch.Tensor | None = None,
    plan: RowPlan | None = None,
    expand_size: int = 1,
) -> Iterator[nn.Module]:
    """Within the block, every gated RecLoRALinear in model computes its mixture from
    user_reps [R, h] (row b of every input is user b; a [h] vector is one user for all rows).
    row_ids [T]: for packed inputs, the row of each flattened token; its row plan is made
    here, once for the batch (one host read), and shared by every layer (or pass a ready
    `plan` from reclora_kernels.row_plan). Contexts nest; on exit the previous state comes
    back. Layers without a gate are left as they are.

    expand_size: for `model.generate` with num_beams (or num_return_sequences) n > 1, which
    repeats each of the R input rows n times in a row: give n, and a layer that sees R * n
    rows gives rows b * n ... b * n + n - 1 user b's mixture, while a layer that sees R rows
    (an encoder-decoder's encoder, which runs before the expansion) takes user_reps as they
    are. Not with packed `row_ids` / `plan`.

    Thread-safe: the state lives in a context variable (per thread, per asyncio task), not on
    the modules, so two threads may personalize one model for different users at once.

    The gates run inside each layer's forward, so their gradients flow as usual. With
    activation checkpointing, the recomputing forward runs during backward(): checkpoint
    (non-reentrant) with context_fn=reclora.llm.personalization_context_fn, as
    reclora.llm.enable_grad_ckpt does; it recomputes each layer with the user_reps (or
    set_mixture mixture) its forward used, in any thread. Without it, backward must run inside
    this block, in the same thread, and only for a loss whose checkpointed forwards all ran in
    this block (another block's layers would be recomputed with this block's user_reps).

    Two models that share layers (a value head over the policy's backbone) cannot be
    personalized in nested blocks: the shared layers serve one set of user_reps at a time,
    so that is refused. Under torch.export, enter personalize inside the exported forward
    (user_reps an input of the program), never around the export call."""
    if torch.jit.is_tracing():  # sizes are traced tensors: the checks below would misfire
        raise jit_trace_error("personalize")
    if not isinstance(user_reps, torch.Tensor) or not user_reps.is_floating_point():
        raise TypeError("personalize: `user_reps` must be a floating-point tensor [R, h]")
    if user_reps.dim() not in (1, 2):
        raise ValueError(f"personalize: `user_reps` must be [R, h] or [h], got shape "
                         f"{list(user_reps.shape)}")
    gated = {name: m for name, m in reclora_layers(model).items() if m.gate is not None}
    if not gated:
        raise ValueError("personalize: `model` has no RecLoRALinear with a gate; inject with "
                         "gate_dim=... first")
    dims = {m.gate.in_features for m in gated.values()}
    if user_reps.shape[-1] not in dims or len(dims) > 1:
        raise ValueError(f"personalize: `user_reps` must end in the gates' input size "
                         f"{sorted(dims)}, got shape {list(user_reps.shape)}")
    if row_ids is not None and plan is not None:
        raise ValueError("personalize: give `row_ids` or `plan`, not both")
    if type(expand_size) is not int or expand_size < 1:
        raise ValueError(f"personalize: `expand_size` must be an int >= 1 (generate's num_beams"
                         f" or num_return_sequences), got {expand_size!r}")
    if expand_size > 1 and (row_ids is not None or plan is not None):
        raise ValueError("personalize: `expand_size` applies to rows that are x's first dim; "
                         "it cannot be combined with packed `row_ids` or a `plan`")
    if row_ids is not None:
        rows = user_reps.shape[0] if user_reps.dim() == 2 else 1
        plan = row_plan(row_ids.to(user_reps.device), rows)
    elif plan is not None:
        check_plan_rows("personalize", plan, user_reps.shape[0] if user_reps.dim() == 2 else 1)
    active = dict(ACTIVE_PERSONALIZATION.get() or {})
    _refuse_shared(model, gated, active)
    state = Personalization(user_reps, plan, model=model, in_export=_is_exporting(),
                            expand_size=expand_size)
    active.update({m: state for m in gated.values()})
    token = ACTIVE_PERSONALIZATION.set(active)
    try:
        yield model
    finally:
        ACTIVE_PERSONALIZATION.reset(token)


def _refuse_shared(model: nn.Module, gated: dict[str, RecLoRALinear], active: dict) -> None:
    """ValueError when an enclosing block, entered for another model object, personalizes
    some of model's layers: the layer cannot tell which model calls it, so the enclosing
    model would silently run them with this block's user_reps."""
    shared = [name for name, m in gated.items()
              if m in active and active[m].model is not model]
    if not shared:
        return
    other = active[gated[shared[0]]].model
    names = ", ".join(shared[:4]) + (f" (+{len(shared) - 4} more)" if len(shared) > 4 else "")
    raise ValueError(
        f"personalize: {len(shared)} gated layer(s) of `model` ({type(model).__name__}: "
        f"{names}) are shared with another model ({type(other).__name__}) that an enclosing "
        "personalize() block already covers; inside this block that model would run them "
        "with these user_reps, silently. Personalize the shared layers once (one block, for "
        "the outer model), or run the two models in separate blocks")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after inject: the banks and the gates)."""
    return [p for p in model.parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
