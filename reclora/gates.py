"""PersonalizedGate: a user representation -> mixture weights over a bank of meta-LoRAs.

The gate of RecLoRA (arXiv 2408.03533; RECLORA.md section 1), one per adapted projection:

    LayerNorm(h) -> Linear(h, 60) -> ReLU -> Dropout(0.1) -> Linear(60, M)
    -> divide by the temperature -> softmax over the M adapters [-> sqrt]

Soft routing returns dense weights [R, M] (adapter index None: slot j is adapter j). Hard
top-k routing keeps each row's k largest logits (k >= 2; equal logits: the lower adapter index
first), softmaxes over those k alone (the others get weight exactly 0) and returns the weights
with their adapter indices [R, k], so the op gathers k adapters per row instead of mixing all M.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .modes import autocast_on

# Rows of user_reps larger than this are scaled to it before the LayerNorm: its variance
# (a sum of squares over the row) stays far inside float32's 3.4e38.
_LARGEST_NORMALISED = 1e15
# The temperature's range. The logits are divided by it in float32 (float64 for a float64
# gate). At 1e-6 the quotient stays finite for any logit below 3e32 (a gate's
# are O(1)-O(100): a LayerNorm'd row through two Linear layers); at 1e-300 (0 in float32)
# it was inf/inf = NaN weights. At 1e6 logit gaps of O(1) still give distinct weights (their
# exps ~17 float32 ulps apart); past ~1e7 they round away, to an exactly uniform gate at 1e8.
TEMPERATURE_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class GateConfig:
    """Everything needed to rebuild a PersonalizedGate (saved with the adapters as JSON)."""

    in_features: int
    num_adapters: int
    hidden: int = 60
    dropout: float = 0.1
    temperature: float = 1.0
    top_k: int | None = None
    sqrt: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """ValueError naming `name` unless temperature is a number in TEMPERATURE_RANGE."""
    low, high = TEMPERATURE_RANGE
    if not (isinstance(temperature, (int, float)) and low <= temperature <= high):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {temperature!r}")


class PersonalizedGate(nn.Module):
    """Maps user representations [R, in_features] to per-row mixture weights.

    Args:
        in_features: size h of the user representation (256 in the paper, the CRM's last
            hidden state).
        num_adapters: M, the number of meta-LoRAs in the bank this gate routes over.
        hidden: width of the gate's hidden layer (60 in the reference code).
        dropout: dropout after the ReLU (0.1 in the reference code).
        temperature: logits are divided by it before the softmax (paper: 5 on ML-1M, 5-15 on
            ML-25M, 1 on GoodReads); larger is flatter; within TEMPERATURE_RANGE.
        top_k: None for soft routing over all M adapters; an int k in [2, M] for hard top-k.
            Each row keeps its k largest logits; among equal logits the lower adapter index
            is kept first (a stable sort: the same choice on every device, where torch.topk
            leaves tied order unspecified; a constant h_u ties every logit at init). k = 1 is
            refused: the softmax over one kept logit is 1, so the gate would get no gradient.
            The gate learns only from the kept logits' differences to each other.
        sqrt: take the square root of the softmax weights (an option of the reference code:
            in factor mode each weight multiplies both A and B, so sqrt keeps the product of
            the two mixing weights equal to the softmax probability for a one-hot mixture).

    forward(user_reps) returns (weights, idx): weights [R, M] and idx None (soft), or
    weights [R, k] and idx [R, k] int64 (hard top-k), in the gate's parameter dtype.

    Hard top-k differs from the reference code on purpose: that code writes
    `logits[~indices] = 0`, which zeroes the logits at the (negative) positions -(i+1)
    rather than masking the adapters outside the top k; here the adapters outside the top k
    get weight exactly 0, which is what the option is meant to do. The temperature applies in
    both modes (the reference code skips it under hard routing; at temperature 1 they agree).
    """

    def __init__(
        self,
        in_features: int,
        num_adapters: int,
        *,
        hidden: int = 60,
        dropout: float = 0.1,
        temperature: float = 1.0,
        top_k: int | None = None,
        sqrt: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("num_adapters", num_adapters),
                           ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PersonalizedGate: `{arg}` must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PersonalizedGate: `dropout` must lie in [0, 1), got {dropout!r}")
        check_temperature(temperature, "PersonalizedGate: `temperature`")
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k == 1:
            # The weights are a softmax over the kept logits: over one logit it is 1 whatever
            # the gate computes, so no gradient reaches the gate (it routes by its random init).
            raise ValueError("PersonalizedGate: `top_k` = 1 is refused: a gate with one kept "
                             "adapter has no gradient (the softmax over one kept logit is "
                             "always 1), so it never learns; use top_k >= 2, or None to mix "
                             "all adapters")
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or not 2 <= top_k <= num_adapters
        ):
            raise ValueError(
                f"PersonalizedGate: `top_k` must be None or an int in [2, num_adapters="
                f"{num_adapters}], got {top_k!r}"
            )
        if not isinstance(sqrt, bool):  # bool("false") is True: a config string turned it on
            raise TypeError(f"PersonalizedGate: `sqrt` must be True or False, got {sqrt!r}")
        self.config = GateConfig(in_features, num_adapters, hidden, float(dropout),
                                 float(temperature), top_k, bool(sqrt))
        factory = {"device": device, "dtype": dtype}
        self.net = nn.Sequential(
            nn.LayerNorm(in_features, **factory),
            nn.Linear(in_features, hidden, **factory),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_adapters, **factory),
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: GateConfig | dict, **factory) -> PersonalizedGate:
        fields = config.to_dict() if isinstance(config, GateConfig) else dict(config)
        in_features, num_adapters = fields.pop("in_features"), fields.pop("num_adapters")
        return cls(in_features, num_adapters, **fields, **factory)

    @property
    def in_features(self) -> int:
        return self.config.in_features

    @property
    def num_adapters(self) -> int:
        return self.config.num_adapters

    def reset_parameters(self) -> None:
        """As the reference code: Linear weights kaiming-uniform (a = sqrt 5), biases zero;
        LayerNorm at identity."""
        self.net[0].reset_parameters()
        for linear in (self.net[1], self.net[4]):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            nn.init.zeros_(linear.bias)

    def logits(self, user_reps: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits [R, M]."""
        if not isinstance(user_reps, torch.Tensor) or not user_reps.is_floating_point():
            raise TypeError("PersonalizedGate: `user_reps` must be a floating-point tensor, got "
                            f"{getattr(user_reps, 'dtype', type(user_reps).__name__)}")
        if user_reps.dim() == 1:
            user_reps = user_reps.unsqueeze(0)
        if user_reps.dim() != 2 or user_reps.shape[1] != self.in_features:
            raise ValueError(
                f"PersonalizedGate: `user_reps` must be [R, {self.in_features}] (or "
                f"[{self.in_features}] for one row), got shape {list(user_reps.shape)}"
            )
        first = self.net[1].weight
        user_reps = user_reps.to(device=first.device, dtype=first.dtype)
        # LayerNorm's variance overflows float32 past |x| ~ 1e19 (the row's weights came out
        # uniform or NaN); it is scale-invariant, so such rows are scaled down first. Other
        # rows are divided by exactly 1 (no host sync to ask which rows are large).
        if user_reps.shape[0] and user_reps.shape[1]:
            peak = user_reps.detach().abs().amax(dim=1, keepdim=True)
            user_reps = user_reps / torch.clamp(peak / _LARGEST_NORMALISED, min=1.0)
        # Outside autocast: routing is a discrete choice, and bf16 logits sent 13 of 2,048
        # rows to another top-2 set than the fp32 gate's own (and than export_peft's). The
        # division in float32 at least: fp16 logits past 65,504 x T became inf (NaN rows).
        if autocast_on(first.device.type):
            with torch.autocast(first.device.type, enabled=False):
                logits = self.net(user_reps)
        else:  # no context to enter: 13 us a call on the CPU, more than the rest of the gate
            logits = self.net(user_reps)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return logits / self.config.temperature

    def forward(self, user_reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(user_reps)
        dtype = self.net[1].weight.dtype  # the weights in the gate's dtype, from float32 math
        if self.config.top_k is None:
            kept, idx = logits, None
        else:
            # Softmax over the k kept logits == softmax over all M with the rest at -inf.
            # A stable descending sort, not torch.topk (whose order among equal logits is
            # unspecified and may differ between CPU and GPU): ties keep the lower index.
            # Costs ~25 us a call at R = 64, M = 16 on one CPU thread (gate 123 -> 148 us).
            ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
            kept, idx = ordered[:, : self.config.top_k], order[:, : self.config.top_k]
        if self.config.sqrt:
            # sqrt(softmax) as exp(log_softmax / 2): the same values, but a weight that
            # underflows to 0 gave sqrt's backward inf there, and the softmax's 0 * inf = NaN
            # reached every gate parameter (a confident gate, or fp16 at a logit gap of ~17).
            return torch.exp(0.5 * torch.log_softmax(kept, dim=-1)).to(dtype), idx
        return torch.softmax(kept, dim=-1).to(dtype), idx

    def extra_repr(self) -> str:
        c = self.config
        return (f"temperature={c.temperature}, top_k={c.top_k}, sqrt={c.sqrt}")
