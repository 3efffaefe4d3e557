"""Every dimension above the largest tile (64 in every interpreter config, see
reclora_kernels/configs/default.json), with strided and transposed operands: a kernel that
advances a pointer by the tile instead of tile x stride, or drops a program id's offset, is
right on one tile and wrong on the next. Forward and every gradient against the float64
reference on contiguous copies of the same values; triton (through TRITON_INTERPRET=1 on
CPU tensors, set by conftest) and the native cpu kernel."""

from __future__ import annotations

import os

import pytest
import torch
from op_cases import TOLERANCE, Case, make_inputs, record, rel_err

import reclora_kernels as rk

BACKENDS = [b for b in ("cpu", "triton") if b in rk.available_backends()]
NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w")


def test_interpreter_is_on_without_a_gpu():
    """The triton cases below run on CPU tensors only through the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the compiled kernels")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" in rk.available_backends()


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims stored column-major (strides (1, rows))."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as every other element of a twice-as-wide last dim."""
    return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]


def _offset(t: torch.Tensor) -> torch.Tensor:
    """The same values at a non-zero storage offset and padded leading stride."""
    pad = torch.nn.functional.pad(t, (3, 2))
    return pad[..., 3:3 + t.shape[-1]]


LAYOUTS = {"contiguous": lambda t: t, "transposed": _transposed, "strided": _strided,
           "offset": _offset}

# d_in and d_out above every 64-wide tile and not a multiple of any tile; k * r = 72 > 64
# (the shrink's column blocks); 3 rows of 30 tokens = 90 > BLOCK_T = 64 token tiles.
BIG = dict(rows=3, tokens_per_row=30, d_in=131, d_out=150, adapters=7, rank=9, slots=8)
CASES = {
    "factor": Case(**BIG),
    "output": Case(**BIG, mix="output"),
    "dense-packed": Case(**{**BIG, "slots": 7}, dense=True, packed=True),
    "output-packed": Case(**BIG, mix="output", packed=True),
}
# Which operand takes which layout, per variant: every operand is strided or transposed in
# at least one; x is strided along d_in > 64 in all but the first.
VARIANTS = {
    "W-and-banks-transposed": dict(weight="transposed", lora_a="transposed",
                                   lora_b="transposed", adapter_w="transposed"),
    "x-strided-W-transposed": dict(x="strided", weight="transposed", bias="strided",
                                   lora_b="strided"),
    "all-strided": dict(x="strided", weight="strided", bias="strided", lora_a="strided",
                        lora_b="strided", adapter_w="strided"),
    "x-transposed-offset": dict(x="transposed", weight="offset", lora_a="offset",
                                lora_b="transposed"),
}


def _check(case: Case, layouts: dict, backend: str, dtype: torch.dtype, seed: int) -> None:
    base = make_inputs(case, dtype=torch.float64, seed=seed)
    grad_out = None
    results = {}
    for which in ("reference", backend):
        leaves, args = {}, {}
        for name, t in base.items():
            if name in NAMES and t is not None:
                leaf = t.detach().clone().to(dtype if which == backend else torch.float64)
                leaf.requires_grad_(True)
                leaves[name] = leaf
                t = LAYOUTS[layouts.get(name, "contiguous")](leaf) if which == backend else leaf
            args[name] = t
        if which == backend:
            for name, kind in layouts.items():
                if kind != "contiguous" and args[name] is not None:
                    assert not args[name].is_contiguous(), (name, kind)
        y = rk.lora_mix_linear(
            args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
            args["adapter_w"], args["adapter_idx"], scale=case.scale, mix=case.mix,
            row_ids=args["row_ids"], backend=which)
        if grad_out is None:
            grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64)
        grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(y.dtype))
        results[which] = (y, dict(zip(leaves, grads)))
    (y_ref, g_ref), (y, g) = results["reference"], results[backend]
    errors = {"y": rel_err(y, y_ref)}
    errors.update({name: rel_err(g[name], ref) for name, ref in g_ref.items()})
    record(backend, dtype, errors)
    tol = TOLERANCE[dtype]
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= tol}
    assert not bad, f"{backend}/{dtype} seed {seed}: relative errors over {tol:g}: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CASES))
def test_large_strided_and_transposed(backend, variant, name, _seeded_rngs):
    _check(CASES[name], VARIANTS[variant], backend, torch.float32, _seeded_rngs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_half_precision(backend, _seeded_rngs):
    """bf16 on the same sizes: the low-precision paths keep their own pointer arithmetic."""
    _check(CASES["factor"], VARIANTS["x-strided-W-transposed"], backend, torch.bfloat16,
           _seeded_rngs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_one_token_rows(backend, _seeded_rngs):
    """Decode-like: 66 rows of one token each (a token tile spans many rows), d > 64."""
    case = Case(rows=66, tokens_per_row=1, d_in=100, d_out=130, adapters=5, rank=4, slots=3,
                packed=True)
    _check(case, {"x": "strided", "weight": "transposed"}, backend, torch.float32,
           _seeded_rngs)
