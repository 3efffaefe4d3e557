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


@pytest.mark.parametrize("backend", rk.available_backends())
@pytest.mark.parametrize("name", ["x", "weight", "bias", "lora_a", "adapter_w", "adapter_idx"])
def test_sparse_operands_name_the_argument(backend, name):
    """A sparse operand failed deep inside torch ("Cannot access storage of
    SparseTensorImpl"), or ran on the reference backend alone."""
    sparse = base()[name].to_sparse()
    with pytest.raises(TypeError, match=f"`{name}` must be a dense"):
        call(**{name: sparse, "backend": backend})


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


# ------------------------------------------------- validate.prepare, by hand
# The reference and every backend receive prepare's Problem, so a bug there (a transposed
# plan, a wrong row of a token, int indices not widened) is invisible to the op suite's
# comparisons: these expectations are written out by hand instead.
def _operands(d_in=3, d_out=2, m=4, r=2, rows=2, k=3):
    w = torch.arange(d_out * d_in, dtype=torch.float32).reshape(d_out, d_in)
    return dict(weight=w, bias=torch.zeros(d_out), lora_a=torch.ones(m, r, d_in),
                lora_b=torch.ones(m, d_out, r), adapter_w=torch.ones(rows, k))


def _prepare(x, ops, adapter_idx=None, row_ids=None, mix="factor", **kw):
    from reclora_kernels.validate import prepare

    return prepare(x, ops["weight"], ops["bias"], ops["lora_a"], ops["lora_b"],
                   ops["adapter_w"], adapter_idx, 1.0, mix, row_ids, **kw)


def test_prepare_rows_of_length_l_by_hand():
    """x [R=2, L=3, d_in=3]: tokens 0-2 in row 0, 3-5 in row 1, x2d the rows stacked."""
    x = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3)
    idx = torch.tensor([[3, 0, 1], [2, 2, 0]], dtype=torch.int32)
    p = _prepare(x, _operands(), idx, mix="output")
    assert p.x2d.shape == (6, 3)
    assert p.x2d.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14],
                              [15, 16, 17]]
    assert p.plan.token_rows(torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1]
    assert (p.plan.rows, p.plan.tokens) == (2, 6)
    assert p.lead_shape == (2, 3)
    assert (p.rows, p.slots, p.adapters, p.rank, p.d_in, p.d_out, p.mix) == (2, 3, 4, 2, 3, 2, 1)
    assert p.adapter_idx.dtype == torch.int64
    assert p.adapter_idx.tolist() == [[3, 0, 1], [2, 2, 0]]


def test_prepare_packed_by_hand():
    """x [T=5, d_in] with row_ids: each token keeps its row, in x's order; the sorted view
    lists the tokens row by row (stable), and row_start where each row's run begins."""
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    ops = _operands(rows=3, k=4)
    rows = torch.tensor([2, 0, 2, 1, 0])
    p = _prepare(x, ops, None, row_ids=rows)
    assert torch.equal(p.x2d, x)
    assert p.plan.token_rows(torch.device("cpu")).tolist() == [2, 0, 2, 1, 0]
    assert p.plan.order.tolist() == [1, 4, 3, 0, 2]
    assert p.plan.sorted_rows.tolist() == [0, 0, 1, 2, 2]
    assert p.plan.row_start.tolist() == [0, 2, 3, 5]
    assert (p.rows, p.slots, p.adapters, p.mix, p.lead_shape) == (3, 4, 4, 0, (5,))
    assert p.adapter_idx is None  # dense: every row mixes all M = 4
    # Sorted ids need no permutation.
    q = _prepare(x, ops, None, row_ids=torch.tensor([0, 0, 1, 2, 2]))
    assert q.plan.order is None and q.plan.row_start.tolist() == [0, 2, 3, 5]


def test_prepare_packed_without_row_ids_is_one_token_per_row():
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    p = _prepare(x, _operands(rows=4, k=4), None)
    assert p.plan.token_rows(torch.device("cpu")).tolist() == [0, 1, 2, 3]
    assert p.lead_shape == (4,) and p.rows == 4


def test_prepare_strided_x_keeps_values():
    """A strided x reaches the backends with the same values in the same token order."""
    full = torch.arange(36, dtype=torch.float32).reshape(2, 3, 6)
    x = full[..., ::2]
    p = _prepare(x, _operands(), torch.zeros(2, 3, dtype=torch.int64))
    assert p.x2d.tolist() == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18, 20, 22],
                              [24, 26, 28], [30, 32, 34]]
    assert p.plan.token_rows(torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1]
