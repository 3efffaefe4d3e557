"""RecLoRALinear (alias ReclLoRALinear): nn.Linear plus a bank of M meta-LoRAs, mixed per row.

    y = x W^T + bias + scale * LoRA-mixture_row(x),   scale = alpha / rank

All of the math is one call to `reclora_kernels.lora_mix_linear`; this module only decides
which mixture weights each row gets and casts the operands to one dtype.

Which mixture a forward uses, first match wins:
1. inside `reclora.personalize(model, user_reps)`: the layer's gate applied to user_reps (held
   per thread and per asyncio task in a context variable, never on the module, so concurrent
   requests on one model cannot see each other's users);
2. the mixture given to `set_mixture(weights, idx)` (kept until `clear_mixture()`);
3. a layer with a gate but neither of the above raises: its adapters were trained to be
   mixed per user, and any fixed guess would silently serve every user a wrong model;
4. a layer without a gate uses uniform weights 1/M over the whole bank. Why: the layer is
   then a drop-in nn.Linear that needs no extra call. With M = 1 this is exactly plain LoRA
   (weight 1); at initialisation (B = 0) it is exactly the base layer; for a trained bank in
   factor mode it applies the bank's mean adapter, the natural "average user".

Rows: x [R, L, d_in] has R rows (any x of 3 or more dims: its first dim is the row, so the
batch must come first: a model that runs its linears on [seq, batch, d] gives each position
another row's mixture, and `inject` refuses the transformers modules known to do so); a 2-D x
[N, d_in] is one token per row (as nn.Linear on a batch of vectors); a 1-D x is one row. With
`row_ids` (packed sequences, e.g. HF's [1, T, d] packing) the tokens of x, flattened, belong to
the rows row_ids[t]. A mixture with one row (or a 1-D weights vector) applies to every row.

Per batch, not per layer: the row plan of packed tokens (reclora_kernels.row_plan) is made once
by personalize() or set_mixture() and shared by every layer; the adapter indices are checked
once (set_mixture) or are in range by construction (the gates' top-k), so a forward through
many layers reads nothing back from the device.
"""

from __future__ import annotations

import math
import numbers
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn.utils import parametrize

from reclora_kernels import RowPlan, lora_mix_linear, row_plan
from reclora_kernels.ops import BACKENDS
from reclora_kernels.plan import INDEX_DTYPES, cached_tensor

from .gates import PersonalizedGate

BACKEND_NAMES = ("auto", *BACKENDS)  # availability is checked per call (per device)

MIX_MODES = ("factor", "output")

# torch.export's flag (torch >= 2.3; dynamo folds both to constants, so torch.compile sees
# False for each and keeps no check in its graph). Bound here: one attribute walk less per
# forward.
_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)
_jit_is_tracing = torch.jit.is_tracing


def jit_trace_error(where: str) -> RuntimeError:
    """Under torch.jit.trace every size is a traced tensor: the shape checks and row plans
    then fail with errors that blame the wrong argument, so tracing is refused up front."""
    return RuntimeError(
        f"{where}: torch.jit.trace (TorchScript tracing) is not supported; use "
        "torch.export.export with a wrapper whose forward takes user_reps (or the mixture) "
        "as an input and enters reclora.personalize itself (or calls set_mixture), or "
        "torch.compile")


@dataclass(frozen=True, eq=False)
class Personalization:
    """What personalize() gives the gated layers of one model: the batch's user
    representations and its row plan (None: rows are x's first dim); the model object the
    block was entered for, whether it was entered while torch.export traced (else
    user_reps would be baked into the program), and generate's batch expansion (a layer that
    sees R * expand_size rows gives each user's mixture to expand_size rows in a row)."""

    user_reps: torch.Tensor
    plan: RowPlan | None
    model: nn.Module | None = None
    in_export: bool = False
    expand_size: int = 1


# layer -> Personalization, set by reclora.personalize for the current thread / task only.
ACTIVE_PERSONALIZATION: ContextVar[dict | None] = ContextVar("reclora_personalization",
                                                             default=None)

# Activation checkpointing recomputes a layer during backward(), when set_mixture may hold
# another mixture (a second forward, a refilled buffer). reclora.llm.personalization_context_fn
# sets (records, replay): around a checkpointed forward `records` ends in a fresh dict that
# each layer fills with the (_mixture, _mixture_plan, their versions) it used (the dicts
# before it: enclosing checkpoints'); around its recompute `replay` is that dict, so the layer
# uses the same mixture again (None: no replay).
CHECKPOINT_MIXTURES: ContextVar[tuple[tuple[dict, ...], dict | None] | None] = ContextVar(
    "reclora_checkpoint_mixtures", default=None)


def _versions(mixture: tuple | None) -> tuple:
    """The in-place version counters of a set_mixture (weights, idx)."""
    return () if mixture is None else tuple(None if t is None else t._version for t in mixture)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style: weight [d_in, d_out]). Checked without importing
    transformers: if it is not imported yet, no module can be one of its Conv1D."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


# Attributes that hold a quantized linear's scales or zero points (transformers' FP8, fbgemm,
# compressed-tensors integrations, bitsandbytes' weights): its weight alone is not the base.
_QUANT_STATE = ("weight_scale_inv", "weight_scale", "weight_scales", "weight_global_scale",
                "activation_scale", "input_scale", "input_scale_ub", "weight_zero_point",
                "qzeros", "scales", "SCB", "quant_state")

# nn.Linear subclasses whose own forward computes exactly x W^T + b (by qualified name, so
# transformers is not imported): FalconLinear writes it as `input @ weight.T + bias`.
_SAME_AS_LINEAR = ("transformers.models.falcon.modeling_falcon.FalconLinear",)


# nn.Module's per-module hook registries that change or observe a forward or backward.
_MODULE_HOOKS = (("forward-pre", "_forward_pre_hooks"), ("forward", "_forward_hooks"),
                 ("backward-pre", "_backward_pre_hooks"), ("backward", "_backward_hooks"))


def _computes_linear(module: nn.Module) -> bool:
    """Whether module's forward is nn.Linear's (or Conv1D's) own: a subclass with its own
    forward (extra outputs, activation quantization, a router's top-k) or an instance whose
    forward was replaced would lose that when wrapped."""
    if "forward" in vars(module):
        return False
    cls = type(module)
    if _is_conv1d(module):
        return cls.forward is sys.modules["transformers.pytorch_utils"].Conv1D.forward
    return ((isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward)
            or f"{cls.__module__}.{cls.__qualname__}" in _SAME_AS_LINEAR)


def _check_base(linear: nn.Module) -> None:
    """Raise a TypeError naming `linear` unless its weight and bias are plain float Parameters
    that are the whole base: the layer shares them and computes x W^T + b with nothing else."""
    where = f"RecLoRALinear.from_linear: `linear` ({type(linear).__name__})"
    weight = linear.weight  # float8 is floating point too, but holds codes
    if not weight.is_floating_point() or weight.dtype.itemsize == 1:
        raise TypeError(f"{where} has a {weight.dtype} weight; quantized bases are not "
                        "supported (float16, bfloat16, float32 or float64)")
    scales = [n for n in _QUANT_STATE if hasattr(linear, n) or hasattr(weight, n)]
    if scales:
        raise TypeError(f"{where} carries quantization state ({', '.join(scales)}); "
                        "quantized bases are not supported (float16, bfloat16, float32 or "
                        "float64 weights with no scales)")
    if not _computes_linear(linear):
        raise TypeError(f"{where} has a forward of its own, which wrapping would drop; "
                        "supported: nn.Linear (and subclasses that keep its forward) and "
                        "transformers' Conv1D")
    hooks = [kind for kind, attr in _MODULE_HOOKS if getattr(linear, attr, None)]
    if hooks:
        # The wrapper is a new module: hooks on this one would stop running, silently.
        raise TypeError(f"{where} has {' and '.join(hooks)} hooks, which would not run on "
                        "the wrapped layer; remove them (handle.remove()) before wrapping "
                        "and register them on the RecLoRALinear it returns")
    if parametrize.is_parametrized(linear):
        # Its weight is computed: the layer would freeze a snapshot and drop the parameters.
        raise TypeError(f"{where} is parametrized (torch.nn.utils.parametrize, e.g. "
                        "weight_norm); remove the parametrization first")
    for name in ("weight", "bias"):
        value = getattr(linear, name)
        if value is not None and not isinstance(value, nn.Parameter):
            raise TypeError(f"{where}: its {name} is a {type(value).__name__}, not an "
                            "nn.Parameter; supported: a base whose weight and bias are "
                            "Parameters")


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Banks and gates train in float32 under a half-precision base (as PEFT does), and
    follow a float32/float64 base."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call when it would return t itself: ~2 us a call on the AMD
    EPYC, and the forward made six (the layer's host cost at tiny sizes went from 65 to ~45
    us with this; benchmarks/bench_host.py)."""
    return t if t.dtype == dtype else t.to(dtype)


def _make_uniform(rows, adapters, bank_dtype, dtype, device, stream=0) -> torch.Tensor:
    # stream: a cache key only (cached_tensor). 1/M in the bank's dtype, then the compute
    # dtype: the values the layer always used.
    # Outside inference mode: one cached under it (a served batch) could not be saved for a
    # later training forward's backward.
    with torch.inference_mode(False):
        return torch.full((rows, adapters), 1.0 / adapters, dtype=bank_dtype,
                          device=device).to(dtype)


_cached_uniform = lru_cache(maxsize=64)(_make_uniform)


def uniform_mixture(rows: int, adapters: int, bank_dtype: torch.dtype, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """The default mixture [rows, M] of 1/M, made once per size and never written: made per
    forward it was a fill, an expand copy and a cast, each a kernel launch on a GPU. Made
    fresh while tracing (a tensor made during CUDA-graph capture holds nothing until replay)."""
    return cached_tensor(_cached_uniform, rows, adapters, bank_dtype, dtype, device)


def _registered(module: nn.Module, params: dict, name: str):
    """module.<name>, from its _parameters dict when registered there (see _operands)."""
    value = params.get(name)
    return getattr(module, name) if value is None else value


def check_plan_rows(where: str, plan, rows: int) -> None:
    """A batch's `plan` must be a RowPlan for the mixture's rows (or any plan when one mixture
    row serves every token): else the forward blamed x for the plan's row count."""
    if not isinstance(plan, RowPlan):
        raise TypeError(f"{where}: `plan` must be a RowPlan (reclora_kernels.row_plan), got "
                        f"{type(plan).__name__}")
    if rows != 1 and plan.rows != rows:
        raise ValueError(f"{where}: `plan` has {plan.rows} rows but the mixture has {rows}; "
                         "make the plan for this batch (row_plan(row_ids, rows))")


def _positive_int(arg: str, value) -> int:
    """value as an int (a numpy integer too), or ValueError naming `arg`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"RecLoRALinear: `{arg}` must be an int >= 1, got {value!r}")
    return int(value)


def _check_float_dtype(arg: str, value) -> None:
    # An integer dtype failed deep inside torch ("Only Tensors of floating point ... can
    # require gradients"), a string in torch.empty: neither named the argument.
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"RecLoRALinear: `{arg}` must be None or a floating torch.dtype "
                         f"(torch.float32, torch.bfloat16, ...), got {value!r}")


class RecLoRALinear(nn.Module):
    """Drop-in nn.Linear with a bank of M meta-LoRAs mixed per row (RecLoRA's PLoRA).

    Parameters: `weight` [out_features, in_features] (or [in, out] when fan_in_fan_out, the
    layout of transformers' Conv1D), `bias` [out_features] or None, `lora_a` [M, r, in] and
    `lora_b` [M, out, r]; optional `gate` (a PersonalizedGate). `scale = alpha / rank`
    (alpha None means alpha = rank, scale 1). `mix` is "factor" (RecLoRA: mix A and B, then
    apply) or "output" (MoE-LoRA: apply each, then mix). The base is frozen unless
    freeze_base=False. Init as the paper: each A_i kaiming-uniform (a = sqrt 5, fan-in
    in_features), every B_i zero, so a new layer computes exactly its base.

    Rows are x's first dim (batch first): x [R, ..., d_in] gives row b to x[b], a 2-D x is one
    token per row, and packed inputs map tokens to rows with `row_ids` / a RowPlan. A model
    that calls its linears on [seq, batch, d_in] would mix by position, not by user.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_adapters: int,
        rank: int,
        alpha: float | None = None,
        mix: str = "factor",
        freeze_base: bool = True,
        fan_in_fan_out: bool = False,
        gate: PersonalizedGate | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
        _base: tuple[nn.Parameter, nn.Parameter | None] | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features, num_adapters, rank = (
            _positive_int(arg, value) for arg, value in (
                ("in_features", in_features), ("out_features", out_features),
                ("num_adapters", num_adapters), ("rank", rank)))
        if mix not in MIX_MODES:
            raise ValueError(f"RecLoRALinear: `mix` must be one of {MIX_MODES}, got {mix!r}")
        if alpha is not None and (not isinstance(alpha, numbers.Real) or isinstance(alpha, bool)
                                  or not math.isfinite(alpha)):
            raise ValueError(f"RecLoRALinear: `alpha` must be a finite float or None, got "
                             f"{alpha!r}")
        if backend not in BACKEND_NAMES:  # named here, not at the first forward
            raise ValueError(f"RecLoRALinear: `backend` must be one of {list(BACKEND_NAMES)}, "
                             f"got {backend!r}")
        _check_float_dtype("dtype", dtype)
        _check_float_dtype("adapter_dtype", adapter_dtype)
        if gate is not None:
            if not isinstance(gate, PersonalizedGate):
                raise TypeError("RecLoRALinear: `gate` must be a PersonalizedGate or None, got "
                                f"{type(gate).__name__}")
            if gate.num_adapters != num_adapters:
                raise ValueError(f"RecLoRALinear: `gate` routes over {gate.num_adapters} "
                                 f"adapters but num_adapters={num_adapters}")
        self.in_features, self.out_features = in_features, out_features
        self.num_adapters, self.rank = num_adapters, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.mix, self.fan_in_fan_out, self.backend = mix, fan_in_fan_out, backend

        base_shape = (in_features, out_features) if fan_in_fan_out else (out_features,
                                                                          in_features)
        if _base is None:
            factory = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.empty(base_shape, **factory))
            self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
            self.reset_base_parameters()
        else:  # from_linear: share the wrapped layer's Parameters, no copy
            self.weight, self.bias = _base
            if tuple(self.weight.shape) != base_shape:
                raise ValueError(f"RecLoRALinear: base weight has shape {list(self.weight.shape)}"
                                 f", expected {list(base_shape)}")
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

        bank_factory = {
            "device": self.weight.device,
            "dtype": adapter_dtype or default_adapter_dtype(self.weight.dtype),
        }
        self.lora_a = nn.Parameter(torch.empty(num_adapters, rank, in_features, **bank_factory))
        self.lora_b = nn.Parameter(torch.empty(num_adapters, out_features, rank, **bank_factory))
        self.reset_lora_parameters()
        self.register_module("gate", gate)

        # The mixture of set_mixture (plain attributes, never saved in the state dict).
        # personalize() keeps its state in ACTIVE_PERSONALIZATION instead (thread-safe).
        self._mixture: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._mixture_plan: RowPlan | None = None
        # ((idx, row_ids), their versions at set_mixture): see _check_not_refilled.
        self._mixture_watch: tuple[tuple, tuple] | None = None
        # Whether set_mixture ran while torch.export traced (see _baked_state_error).
        self._mixture_in_export = False
        # The base weight's shape the banks were made for: a weight replaced later (e.g. by
        # resize_token_embeddings re-tying an lm_head) is named when the op refuses it.
        self._weight_shape = base_shape

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        num_adapters: int,
        rank: int,
        alpha: float | None = None,
        mix: str = "factor",
        freeze_base: bool = True,
        gate: PersonalizedGate | None = None,
        backend: str = "auto",
        adapter_dtype: torch.dtype | None = None,
    ) -> RecLoRALinear:
        """Wrap an nn.Linear (or transformers' Conv1D), sharing its weight and bias Parameters
        (no copy: the base stays where it is, in its dtype). The bank is created on the base's
        device, in `adapter_dtype` (default: float32 under a half base, else the base dtype)."""
        if isinstance(linear, RecLoRALinear):
            raise TypeError("RecLoRALinear.from_linear: `linear` is already a RecLoRALinear")
        if isinstance(linear, nn.Linear):
            d_in, d_out, fan_in_fan_out = linear.in_features, linear.out_features, False
        elif _is_conv1d(linear):
            d_in, d_out, fan_in_fan_out = linear.weight.shape[0], linear.weight.shape[1], True
        else:
            raise TypeError("RecLoRALinear.from_linear: `linear` must be an nn.Linear or "
                            f"transformers' Conv1D, got {type(linear).__name__}")
        _check_base(linear)
        return cls(
            d_in, d_out, linear.bias is not None, num_adapters=num_adapters, rank=rank,
            alpha=alpha, mix=mix, freeze_base=freeze_base, fan_in_fan_out=fan_in_fan_out,
            gate=gate, backend=backend, adapter_dtype=adapter_dtype,
            _base=(linear.weight, linear.bias),
        )

    def reset_base_parameters(self) -> None:
        """nn.Linear's init (kaiming-uniform a = sqrt 5; bias uniform +-1/sqrt(fan_in))."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        """The constructor's initialisation again, for deferred (meta-device) init: torch's
        to_empty idiom and FSDP's meta init call reset_parameters() on every module that
        has one, then load the base checkpoint. Base as nn.Linear, banks as the paper (B = 0,
        so the layer equals its base), and the gate's own init."""
        self.reset_base_parameters()
        self.reset_lora_parameters()
        if self.gate is not None and hasattr(self.gate, "reset_parameters"):
            self.gate.reset_parameters()

    def reset_lora_parameters(self) -> None:
        """A_i: kaiming-uniform with a = sqrt 5 and fan-in in_features, i.e. U(+-1/sqrt(d_in))
        (torch's kaiming_uniform_ on the [M, r, d_in] bank would take fan-in r * d_in); B = 0."""
        gain = math.sqrt(2.0 / (1.0 + 5.0))
        bound = gain * math.sqrt(3.0 / self.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound)
            self.lora_b.zero_()

    # --- routing ----------------------------------------------------------------------------

    def set_mixture(
        self,
        weights: torch.Tensor,
        idx: torch.Tensor | None = None,
        *,
        row_ids: torch.Tensor | None = None,
        plan: RowPlan | None = None,
    ) -> None:
        """Mixture weights for the forwards that follow: weights [R, k] (or [k] / [1, k] for
        every row), idx [R, k] adapter indices or None for dense (k = M, slot j = adapter j).
        row_ids [T] maps the flattened tokens of a packed input to their rows (or give the
        batch's `plan`, reclora_kernels.row_plan, to share one among layers). Gradients flow
        to `weights` if it requires grad. The indices and row ids are checked here, once, not
        at every forward. Module state: for concurrent users use personalize()."""
        if _jit_is_tracing():
            raise jit_trace_error("RecLoRALinear.set_mixture")
        weights, idx = self._check_mixture(weights, idx)
        if row_ids is not None and plan is not None:
            raise ValueError("RecLoRALinear.set_mixture: give `row_ids` or `plan`, not both")
        if plan is not None:
            check_plan_rows("RecLoRALinear.set_mixture", plan, weights.shape[0])
        if weights.shape[0] == 1:
            plan = None  # one mixture for every token: which row a token is in does not matter
        elif row_ids is not None:
            plan = row_plan(row_ids, weights.shape[0])
        self._mixture = (weights, idx)
        self._mixture_plan = plan
        self._mixture_in_export = _is_exporting()  # else export would bake it in
        # idx was range-checked and row_ids copied into the plan here, once: their version
        # counters (Python ints, no host read) tell a forward that the caller refilled them.
        watched = (idx, row_ids if plan is not None else None)
        self._mixture_watch = (watched, _versions(watched))

    def clear_mixture(self) -> None:
        self._mixture, self._mixture_plan, self._mixture_watch = None, None, None
        self._mixture_in_export = False

    def _check_not_refilled(self) -> None:
        """Raise if set_mixture's idx or row_ids were modified in place since: idx was
        range-checked there once (the op trusts it), and the plan is a snapshot of row_ids."""
        watch = self._mixture_watch
        if watch is None or _versions(watch[0]) == watch[1]:
            return
        idx, row_ids = watch[0]
        name = ("idx" if idx is not None and idx._version != watch[1][0] else "row_ids")
        raise RuntimeError(
            f"RecLoRALinear: the `{name}` given to set_mixture was modified in place after "
            f"set_mixture checked it (set_mixture checks idx's range and snapshots row_ids "
            f"once); call set_mixture again with the new batch's tensors")

    @property
    def has_mixture(self) -> bool:
        return self._mixture is not None

    def _check_mixture(self, weights, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError("RecLoRALinear.set_mixture: `weights` must be a floating-point "
                            f"tensor, got {getattr(weights, 'dtype', type(weights).__name__)}")
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.dim() != 2:
            raise ValueError("RecLoRALinear.set_mixture: `weights` must be [R, k] or [k], got "
                             f"shape {list(weights.shape)}")
        if idx is None:
            if weights.shape[1] != self.num_adapters:
                raise ValueError(
                    f"RecLoRALinear.set_mixture: `weights` must be [R, M={self.num_adapters}] "
                    f"when idx is None (dense), got shape {list(weights.shape)}"
                )
        else:
            if not isinstance(idx, torch.Tensor) or idx.dtype not in INDEX_DTYPES:
                raise TypeError("RecLoRALinear.set_mixture: `idx` must be an integer tensor of "
                                f"{', '.join(map(str, INDEX_DTYPES))}, got "
                                f"{getattr(idx, 'dtype', type(idx).__name__)}")
            if idx.dim() == 1:
                idx = idx.unsqueeze(0)
            if idx.shape != weights.shape:
                raise ValueError(
                    f"RecLoRALinear.set_mixture: `idx` must have weights' shape "
                    f"{list(weights.shape)}, got {list(idx.shape)}"
                )
            if idx.numel():
                lo, hi = (int(v) for v in torch.aminmax(idx))  # once per mixture, not per call
                if lo < 0 or hi >= self.num_adapters:
                    raise IndexError(
                        f"RecLoRALinear.set_mixture: `idx` values must lie in [0, "
                        f"{self.num_adapters}) (adapters in the bank), got [{lo}, {hi}]")
        return weights, idx

    def _resolve_mixture(self) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                        RowPlan | None]:
        """(weights [R or 1, k], idx or None, plan or None) for this forward; weights None:
        the uniform 1/M over the bank."""
        return self._resolve()[:3]

    def _resolve(self) -> tuple[torch.Tensor | None, torch.Tensor | None, RowPlan | None,
                                int]:
        """_resolve_mixture's three and personalize's expand_size (1 outside a block)."""
        personal = (ACTIVE_PERSONALIZATION.get() or {}).get(self)
        if personal is not None:
            if self.gate is None:
                raise RuntimeError(
                    "RecLoRALinear: personalize() gave user representations but this layer has "
                    "no gate; inject with gate_dim=... or use set_mixture(weights, idx)"
                )
            gate = self.gate
            # The gate may have been replaced after __init__: its top-k indices go to the op
            # unchecked, so it must route over this bank (Python ints, no host read).
            if not isinstance(gate, PersonalizedGate) or gate.num_adapters != self.num_adapters:
                raise RuntimeError(
                    f"RecLoRALinear: the layer's `gate` must be a PersonalizedGate routing over "
                    f"num_adapters={self.num_adapters} adapters (the bank), got "
                    f"{type(gate).__name__} with num_adapters="
                    f"{getattr(gate, 'num_adapters', None)}; it was replaced after construction")
            top_k = gate.config.top_k
            if top_k is not None and not 1 <= top_k <= self.num_adapters:
                raise RuntimeError(f"RecLoRALinear: the layer's `gate` has top_k={top_k}, "
                                   f"not in [1, num_adapters={self.num_adapters}]")
            if not personal.in_export and _is_exporting():
                raise self._baked_state_error("personalize")
            weights, idx = gate(personal.user_reps)
            return weights, idx, personal.plan, personal.expand_size
        mixture, mixture_plan = self._mixture, self._mixture_plan
        checkpoint = CHECKPOINT_MIXTURES.get()
        if checkpoint is not None:
            records, replay = checkpoint
            if replay is not None and self in replay:
                mixture, mixture_plan, versions = replay[self]
                if versions != _versions(mixture):
                    raise RuntimeError(
                        "RecLoRALinear: the mixture given to set_mixture was modified in place "
                        "after the checkpointed forward that used it, so activation "
                        "checkpointing would recompute this layer with other weights; give "
                        "set_mixture a new tensor instead of refilling it before backward()")
            for record in records:
                record.setdefault(self, (mixture, mixture_plan, _versions(mixture)))
        if mixture is not None:
            if mixture is self._mixture:
                self._check_not_refilled()
                if _is_exporting() and not self._mixture_in_export:
                    raise self._baked_state_error("set_mixture")
            return (*mixture, mixture_plan, 1)
        if self.gate is not None:
            if torch._C._current_graph_task_id() != -1:  # a forward run by backward()
                raise RuntimeError(
                    "RecLoRALinear: this gated layer was recomputed by activation "
                    "checkpointing during backward(), outside the `reclora.personalize` block "
                    "its forward ran in; checkpoint with context_fn="
                    "reclora.llm.personalization_context_fn (non-reentrant; "
                    "reclora.llm.enable_grad_ckpt does it), or call backward() inside the block"
                )
            # A block that is active but not for this layer: most often a copy of the model
            # (copy.deepcopy) run inside the original's block.
            other = (" (a personalize() block is active, but for another model object: it "
                     "covers the layers of the model it was given, not copies of them such as "
                     "copy.deepcopy(model))") if ACTIVE_PERSONALIZATION.get() else ""
            raise RuntimeError(
                "RecLoRALinear: this layer has a gate but no user representation; run the "
                "forward inside `with reclora.personalize(model, user_reps):` or call "
                f"set_mixture(weights, idx){other}"
            )
        return None, None, None, 1  # uniform: _mixed_linear makes it for the input's rows

    @staticmethod
    def _baked_state_error(source: str) -> RuntimeError:
        """torch.export lifts a tensor read from outside the traced call into the program as
        a constant: the user_reps of a personalize() (or the mixture of a set_mixture) made
        before export would be served to every later request, silently."""
        if source == "personalize":
            what = ("user_reps of a `reclora.personalize` block entered outside the exported "
                    "call")
            fix = ("a wrapper module whose forward(input_ids, user_reps) enters "
                   "`with reclora.personalize(self.model, user_reps):` itself")
        else:
            what = "mixture given to set_mixture outside the exported call"
            fix = ("a wrapper module whose forward(x, weights) calls layer.set_mixture(weights) "
                   "itself (the mixture an input of the program)")
        return RuntimeError(
            f"RecLoRALinear: torch.export is tracing this layer with the {what}: they would "
            f"become constants of the program, which would then serve them to every request "
            f"(a later {source} would not change it); export {fix}")

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx, plan, expand = self._resolve()
        device = x.device
        # torch.is_autocast_enabled raises for a device type without autocast (meta).
        if device.type != "meta" and torch.is_autocast_enabled(device.type):
            # The op is not autocast-aware: cast its operands here as F.linear would be, and
            # run it with autocast off (a native kernel's internal matmuls must not be recast).
            dtype = torch.get_autocast_dtype(device.type)
            if x.dtype == torch.float64:  # autocast leaves float64 alone (so F.linear does)
                dtype = x.dtype
            with torch.autocast(device.type, enabled=False):
                return self._mixed_linear(_in_dtype(x, dtype), weights, idx, plan, device,
                                          expand)
        return self._mixed_linear(x, weights, idx, plan, device, expand)

    def _mixed_linear(self, x, weights, idx, plan, device, expand=1) -> torch.Tensor:
        """The op on x (already in the compute dtype) with this forward's mixture.
        Written for the host cost at decode sizes: sizes through dim()/size() (no torch.Size
        objects) and the parameters read from _parameters (see _operands)."""
        d_in, ndim = self.in_features, x.dim()
        last = x.size(-1) if ndim else None
        # Under torch.jit.trace sizes are tensors (and `last != d_in` a falsy one): caught
        # here, where the size is read anyway, not by a call per forward (0.1 us).
        if last != d_in or type(last) is not int:
            if _jit_is_tracing():
                raise jit_trace_error("RecLoRALinear")
            if last != d_in:  # else a symbolic size (torch.compile / torch.export)
                raise ValueError(f"RecLoRALinear: `x` must end in in_features={d_in}, got "
                                 f"shape {list(x.shape)}")
        if plan is not None:
            x_op = x.reshape(-1, d_in)
            if plan.tokens != x_op.size(0):
                raise ValueError(
                    f"RecLoRALinear: the batch's `row_ids` cover {plan.tokens} tokens but x has "
                    f"{x_op.size(0)} (shape {list(x.shape)})"
                )
            rows = plan.rows
            if weights.size(0) == 1 and rows != 1:
                # One mixture for every token: the packed input is a single row.
                x_op, plan, rows = x_op.unsqueeze(0), None, 1
        elif ndim == 3:
            x_op, rows = x, x.size(0)
        elif ndim < 3:
            x_op = x.reshape(-1, d_in)  # one token per row
            rows = x_op.size(0)
        else:
            # first dim = rows (sizes spelled out: -1 is ambiguous for an empty batch)
            x_op = x.reshape(x.size(0), math.prod(x.shape[1:-1]), d_in)
            rows = x_op.size(0)
        if weights is None:
            weights = uniform_mixture(rows, self.num_adapters, self.lora_a.dtype, x.dtype,
                                       device)
        elif weights.size(0) != rows:
            if expand > 1 and rows == weights.size(0) * expand:
                # generate's expanded batch (personalize's expand_size): user b's rows are
                # b * expand ... (b + 1) * expand - 1, as repeat_interleave lays them out.
                weights = weights.repeat_interleave(expand, 0)
                idx = None if idx is None else idx.repeat_interleave(expand, 0)
            elif weights.size(0) != 1:
                source = (f"the batch's plan has {rows}" if plan is not None else
                          f"the input has {rows} (x's first dim; one per token for a 2-D x)")
                also = (f" (or {weights.size(0) * expand}, personalize's expand_size="
                        f"{expand} per user)" if expand > 1 else
                        "; under generate with num_beams or num_return_sequences n > 1, "
                        "personalize(..., expand_size=n)")
                raise ValueError(
                    f"RecLoRALinear: the mixture has {weights.size(0)} rows but {source}; "
                    f"give one mixture row per input row, or a single row for all{also}"
                )
            # Materialised (it is tiny) so no backend meets a stride-0 row dimension.
            weights = weights.expand(rows, -1).contiguous()
            idx = None if idx is None else idx.expand(rows, -1).contiguous()

        dtype = x.dtype
        weight, bias, lora_a, lora_b = self._operands()
        base = weight
        if self.fan_in_fan_out:
            weight = weight.t()
        if weights.dtype != dtype or weights.device != device:
            weights = weights.to(device=device, dtype=dtype)
        if idx is not None and idx.device != device:
            idx = idx.to(device)
        # The indices were checked by set_mixture or come from a gate's top-k (in range by
        # construction): no per-layer range check, so no per-layer host sync.
        try:
            y = lora_mix_linear(
                x_op, _in_dtype(weight, dtype), None if bias is None else _in_dtype(bias, dtype),
                _in_dtype(lora_a, dtype), _in_dtype(lora_b, dtype), weights, idx,
                scale=self.scale, mix=self.mix, plan=plan, backend=self.backend,
                indices_checked=True,
            )
        except (ValueError, RuntimeError):
            # The op blames lora_b when the base weight was replaced: name the weight. Checked
            # only once the op has refused (a shape read per forward cost ~0.3 us here).
            if base.shape != self._weight_shape:
                raise self._replaced_weight_error(base) from None
            raise
        # A 3-D x without a plan is the op's own layout: y has x's leading shape already.
        return y if x_op is x else y.reshape(*x.shape[:-1], self.out_features)

    def _replaced_weight_error(self, weight: torch.Tensor) -> ValueError:
        return ValueError(
            f"RecLoRALinear: its base `weight` has shape {list(weight.shape)} but the layer "
            f"and its banks were made for {list(self._weight_shape)} (lora_a "
            f"{list(self.lora_a.shape)}, lora_b {list(self.lora_b.shape)}; out_features is "
            f"now {self.out_features}): the base weight was replaced after the layer was "
            "built, e.g. by resize_token_embeddings on a tied, injected lm_head; resize the "
            "vocabulary before inject (resizing an adapted layer is not supported)")

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(weight, bias, lora_a, lora_b), read from _parameters where they are registered:
        `self.weight` goes through nn.Module.__getattr__, which on Python 3.11 is reached only
        after an AttributeError has been raised and cleared (~1 us a read on the AMD EPYC).
        Anything else (a bias of None, a parametrized weight, which is a property) by getattr."""
        params = self._parameters
        return (_registered(self, params, "weight"), _registered(self, params, "bias"),
                _registered(self, params, "lora_a"), _registered(self, params, "lora_b"))

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickle: set_mixture may hold a gate's or router's output,
        part of an autograd graph, which deepcopy refuses; the copy gets the same values, cut
        from the graph (the mixture is transient, never in the state dict)."""
        state = super().__getstate__()
        state.pop("_mixture_watch", None)  # the copy's tensors have their own versions
        if self._mixture is not None:
            state["_mixture"] = tuple(t if t is None or t.is_leaf else t.detach()
                                      for t in self._mixture)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # The copied idx / row_ids are the values set_mixture checked: watch them from here.
        # (row_ids is not kept: the copy's plan is its own snapshot.)
        watched = (None if self._mixture is None else self._mixture[1], None)
        self._mixture_watch = (watched, _versions(watched))
        # Layers pickled before these attributes existed.
        self.__dict__.setdefault("_mixture_in_export", False)
        if "_weight_shape" not in self.__dict__:
            self._weight_shape = ((self.in_features, self.out_features) if self.fan_in_fan_out
                                  else (self.out_features, self.in_features))

    # --- description ------------------------------------------------------------------------

    def adapter_config(self) -> dict:
        """What it takes to rebuild this layer's adapter part around a base (saved as JSON)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_adapters": self.num_adapters,
            "rank": self.rank,
            "alpha": self.alpha,
            "mix": self.mix,
            "fan_in_fan_out": self.fan_in_fan_out,
            "gate": None if self.gate is None else self.gate.config.to_dict(),
        }

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_adapters={self.num_adapters}, "
                f"rank={self.rank}, scale={self.scale:g}, mix={self.mix!r}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


# The spelling users asked for (issue 4); the same class.
ReclLoRALinear = RecLoRALinear
