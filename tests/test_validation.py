"""Bad input raises a clear exception that names the argument; never a crash or a wrong answer."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, make_inputs

import reclora_kernels as rk


def call(**overrides):
    case = Case(packed=overrides.pop("packed", False))
    args = make_inputs(case, dtype=torch.float32)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in ("row_ids",) if k in args}
    for key in ("scale", "mix", "backend", "check_finite"):
        if key in args:
            kwargs[key] = args.pop(key)
    return rk.lora_mix_linear(args["x"], args["weight"], args["bias"], args["lora_a"],
                              args["lora_b"], args["adapter_w"], args["adapter_idx"], **kwargs)


def base():
    return make_inputs(Case(), dtype=torch.float32)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(x=torch.randn(29)), ValueError, ["`x`", "[R, L, d_in]"]),
        (dict(weight=torch.randn(23, 30)), ValueError, ["`weight`", "d_in=29"]),
        (dict(bias=torch.randn(22)), ValueError, ["`bias`", "d_out=23"]),
        (dict(lora_a=torch.randn(6, 3, 28)), ValueError, ["`lora_a`", "d_in=29"]),
        (dict(lora_a=torch.randn(6, 3)), ValueError, ["`lora_a`"]),
        (dict(lora_b=torch.randn(6, 23, 4)), ValueError, ["`lora_b`", "r=3"]),
        (dict(adapter_w=torch.randn(2, 4)), ValueError, ["`adapter_w`", "R=3"]),
        (dict(adapter_idx=torch.randint(0, 6, (3, 5))), ValueError, ["`adapter_idx`", "k=4"]),
        (dict(adapter_idx=torch.full((3, 4), 6)), IndexError, ["`adapter_idx`", "[0, 6)"]),
        (dict(adapter_idx=torch.full((3, 4), -1)), IndexError, ["`adapter_idx`"]),
        (dict(adapter_idx=torch.zeros(3, 4)), TypeError, ["`adapter_idx`", "integer"]),
        (dict(adapter_idx=None), ValueError, ["`adapter_w`", "dense"]),
        (dict(weight=torch.randn(23, 29, dtype=torch.float64)), TypeError,
         ["`weight`", "float32"]),
        (dict(lora_b=torch.randn(6, 23, 3, dtype=torch.float16)), TypeError, ["`lora_b`"]),
        (dict(mix="sum"), ValueError, ["`mix`", "factor"]),
        (dict(backend="tpu"), ValueError, ["`backend`"]),
        (dict(scale=float("nan")), ValueError, ["`scale`"]),
        (dict(x=torch.randn(3, 5, 29),
              row_ids=torch.zeros(15, dtype=torch.long)), ValueError, ["`row_ids`"]),
        (dict(x=torch.randn(3, 5, 29).to(torch.int32)), ValueError, ["`x`"]),
        (dict(adapter_w=torch.full((3, 4), float("nan")), check_finite=True), ValueError,
         ["`adapter_w`", "NaN"]),
    ],
)
def test_bad_arguments_name_the_argument(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_packed_row_ids_checked():
    case = Case(packed=True)
    args = make_inputs(case, dtype=torch.float32)
    tokens = args["x"].shape[0]
    with pytest.raises(IndexError, match="`row_ids`"):
        rk.lora_mix_linear(args["x"], args["weight"], None, args["lora_a"], args["lora_b"],
                           args["adapter_w"], args["adapter_idx"],
                           row_ids=torch.full((tokens,), 3))
    with pytest.raises(ValueError, match="`row_ids`"):
        rk.lora_mix_linear(args["x"], args["weight"], None, args["lora_a"], args["lora_b"],
                           args["adapter_w"], args["adapter_idx"],
                           row_ids=torch.zeros(tokens + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="`adapter_w`"):  # packed, no row_ids: R must be T
        rk.lora_mix_linear(args["x"], args["weight"], None, args["lora_a"], args["lora_b"],
                           args["adapter_w"], args["adapter_idx"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    args = base()
    with pytest.raises(ValueError, match="`weight`.*device"):
        rk.lora_mix_linear(args["x"], args["weight"].cuda(), None, args["lora_a"],
                           args["lora_b"], args["adapter_w"], args["adapter_idx"])


def test_device_mismatch_meta():
    """A tensor on another device (meta stands in for a GPU here) is named, not crashed on."""
    args = base()
    with pytest.raises(ValueError, match="`lora_a`.*device"):
        rk.lora_mix_linear(args["x"], args["weight"], None, args["lora_a"].to("meta"),
                           args["lora_b"], args["adapter_w"], args["adapter_idx"])


def test_unavailable_backend_is_named():
    args = base()
    missing = [b for b in rk.ops.BACKENDS if b not in rk.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match="not available"):
        rk.lora_mix_linear(args["x"], args["weight"], None, args["lora_a"], args["lora_b"],
                           args["adapter_w"], args["adapter_idx"], backend=missing[0])
