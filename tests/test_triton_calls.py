"""Repeated eager Triton calls (reclora_kernels/triton/eager.py: call_key, remember, replay).

A call with the metadata of an earlier call that passed the checks skips validate.prepare and
the launch plan. A repeat must give what the checked path gives, on fresh data (outputs are
NaN-poisoned before the kernels write them: conftest sets RECLORA_POISON), every metadata
change must take the checked path again, and a call the checks reject must still be rejected.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_cases import TOLERANCE, Case, count_calls, make_inputs, rel_err, run

import reclora_kernels as rk
from reclora_kernels import validate

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64


@pytest.fixture(autouse=True)
def no_kept_calls():
    from reclora_kernels.triton import eager

    eager._CALLS.clear()
    yield
    eager._CALLS.clear()


@pytest.fixture
def prepared(monkeypatch) -> list[int]:
    """validate.prepare's calls, counted (a repeat must not make one)."""
    return count_calls(monkeypatch, validate, "prepare")


def _op(inp, case: Case, backend="triton", **kw):
    kw.setdefault("scale", case.scale)
    kw.setdefault("mix", case.mix)
    return rk.lora_mix_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_a"],
                              inp["lora_b"], inp["adapter_w"], inp["adapter_idx"],
                              backend=backend, **kw)


def _check(inp, case: Case, y, **kw):
    ref = _op(inp, case, backend="reference", **kw)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= TOLERANCE[DTYPE]


CASES = [
    Case(mix=mix, dense=dense, bias=bias, noncontiguous=strided, tokens_per_row=3, d_in=19,
         d_out=17)
    for mix in ("factor", "output") for dense in (True, False) for bias in (True, False)
    for strided in (False, True)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c.mix}-{'dense' if c.dense else 'gathered'}-{'bias' if c.bias else 'nobias'}"
    f"-{'strided' if c.noncontiguous else 'contig'}"))
def test_a_repeat_skips_the_checks_and_matches_the_oracle(prepared, case):
    first = make_inputs(case, dtype=DTYPE, device=DEVICE)
    _check(first, case, _op(first, case))
    assert len(prepared) == 2  # the triton call, then the reference's
    again = make_inputs(case, dtype=DTYPE, device=DEVICE)  # fresh data, same metadata
    y = _op(again, case)
    assert len(prepared) == 2, "a repeated call must not run validate.prepare again"
    _check(again, case, y)
    from reclora_kernels.triton import eager

    eager._CALLS.clear()
    checked = _op(again, case)
    assert len(prepared) == 4
    torch.testing.assert_close(y, checked, rtol=0, atol=0)


def test_one_token_rows_and_a_repeat():
    """A 2-D x without a plan is one token per row."""
    case = Case(rows=5, dense=False)
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    inp["x"] = inp["x"][:, 0]
    for _ in range(2):
        _check(inp, case, _op(inp, case))


def _variants(inp):
    """Calls with the first call's shapes but other metadata (name, inputs, op kwargs)."""
    x_t = inp["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same shape, other strides
    lora_b_t = inp["lora_b"].transpose(0, 2).contiguous().transpose(0, 2)
    yield "x strides", dict(inp, x=x_t), {}
    yield "lora_b strides", dict(inp, lora_b=lora_b_t), {}
    yield "scale", inp, {"scale": 0.25}
    yield "integer scale", inp, {"scale": 2}
    yield "int32 indices", dict(inp, adapter_idx=inp["adapter_idx"].int()), {}
    yield "no bias", dict(inp, bias=None), {}
    yield "output mode", inp, {"mix": "output"}
    yield "float32", {k: v if v is None or not v.is_floating_point() else v.float()
                      for k, v in inp.items()}, {}


@pytest.mark.parametrize("variant", [v[0] for v in _variants(make_inputs(Case()))])
def test_other_metadata_takes_the_checked_path(prepared, variant):
    case = Case(mix="factor", dense=False)
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    _op(inp, case)
    _, changed, kw = next(v for v in _variants(inp) if v[0] == variant)
    before = len(prepared)
    y = _op(changed, case, **kw)
    assert len(prepared) == before + 1, f"a call with other {variant} must be checked anew"
    dtype = changed["x"].dtype
    ref = _op(changed, case, backend="reference", **kw)
    assert rel_err(y, ref) <= TOLERANCE[dtype]


def test_a_repeat_the_checks_reject_still_fails():
    case = Case(dense=False, scale=1.0)
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    _op(inp, case)
    with pytest.raises(TypeError, match="`scale`"):
        _op(inp, case, scale=True)  # hashes and compares equal to 1 (and 1.0)
    with pytest.raises(ValueError, match="`scale`"):
        _op(inp, case, scale=math.inf)
    with pytest.raises(ValueError, match="`scale`"):
        _op(inp, case, scale=math.nan)
    with pytest.raises(TypeError, match="`weight`"):
        _op(dict(inp, weight=inp["weight"].to(torch.float16)), case)
    with pytest.raises(ValueError, match="`mix`"):
        _op(inp, case, mix="factors")


def test_unchecked_indices_are_checked_on_every_repeat():
    """The range of adapter_idx is data: a repeat with indices_checked=False still reads it
    (eagerly on the CPU, by a device assert on a GPU)."""
    case = Case(dense=False)
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    _op(inp, case)
    _op(inp, case)
    bad = inp["adapter_idx"].clone()
    bad[1, 2] = case.adapters
    if DEVICE == "cpu":
        with pytest.raises(IndexError, match="`adapter_idx`"):
            _op(dict(inp, adapter_idx=bad), case)
    # Vouched for: the caller's word is taken, on a repeat as on the first call.
    _op(inp, case, indices_checked=True)
    y = _op(inp, case, indices_checked=True)
    _check(inp, case, y)


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_a_repeat_with_gradients(prepared, mix):
    """A repeat that records a gradient runs the same plan through the autograd Function."""
    case = Case(mix=mix, dense=False, tokens_per_row=2)
    names = ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w")
    with torch.no_grad():
        _op(make_inputs(case, dtype=DTYPE, device=DEVICE), case)
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in names}
        before = len(prepared)
        y = _op(dict(inp, **leaves), case, backend=backend)
        assert len(prepared) == before + (backend == "reference")
        grad_y = torch.ones_like(y)
        grads[backend] = torch.autograd.grad(y, list(leaves.values()), grad_y)
    for got, want in zip(grads["triton"], grads["reference"]):
        assert rel_err(got, want) <= TOLERANCE[DTYPE]


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
def test_a_repeated_backward_replays_its_plan(mix, dense):
    """The backward is planned once per signature (launch.backward_plan): a second backward
    with the same metadata on fresh data runs the kept plan, and one with strided x (other
    strides) is planned anew; every gradient matches the float64 oracle each time."""
    from reclora_kernels.triton import launch

    contiguous = Case(mix=mix, dense=dense, tokens_per_row=3, d_in=19, d_out=17)
    strided = Case(mix=mix, dense=dense, tokens_per_row=3, d_in=19, d_out=17,
                   noncontiguous=True)
    launch.backward_plan.cache_clear()
    for case, plans in ((contiguous, 1), (contiguous, 1), (strided, 2)):
        inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
        grad_y = torch.randn(case.rows, case.tokens_per_row, case.d_out, dtype=torch.float64)
        _, got = run(inp, case, "triton", grad_y)
        ref_inp = {k: v if v is None or not v.is_floating_point() else v.double()
                   for k, v in inp.items()}
        _, want = run(ref_inp, case, "reference", grad_y)
        assert got.keys() == want.keys() and len(got) == 6
        for name in want:
            assert rel_err(got[name], want[name]) <= TOLERANCE[DTYPE], name
        assert launch.backward_plan.cache_info().currsize == plans


def _packed(case: Case, ids: torch.Tensor):
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    inp["x"] = inp["x"].reshape(-1, case.d_in)
    return inp, rk.row_plan(ids.to(DEVICE), case.rows)


def _ids(case: Case, sort: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.rows, (case.rows * case.tokens_per_row,), generator=gen)
    return ids.sort().values if sort else ids


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_a_repeat_takes_the_calls_own_plan(prepared, mix, sort):
    """A packed call's plan enters the signature by its layout: a repeat with another batch's
    plan of the same layout reuses the launch plan and runs on the new plan's rows."""
    case = Case(mix=mix, dense=False, rows=4, tokens_per_row=3)
    for seed in (1, 2):
        inp, plan = _packed(case, _ids(case, sort, seed))
        y = _op(inp, case, plan=plan)
        ref = _op(inp, case, backend="reference", plan=plan)
        assert rel_err(y, ref) <= TOLERANCE[DTYPE]
    assert len(prepared) == 3, "the second batch's call must be a repeat"


def test_a_plan_of_another_layout_is_checked_anew(prepared):
    case = Case(dense=False, rows=4, tokens_per_row=3)
    inp, plan = _packed(case, _ids(case, True, 1))
    _op(inp, case, plan=plan)
    inp, unsorted = _packed(case, torch.tensor([3, 0, 2, 1] * 3))
    before = len(prepared)
    y = _op(inp, case, plan=unsorted)
    assert len(prepared) == before + 1
    assert rel_err(y, _op(inp, case, backend="reference", plan=unsorted)) <= TOLERANCE[DTYPE]
    short = rk.row_plan(torch.arange(4, device=DEVICE).repeat(2), case.rows)  # 8 tokens, not 12
    with pytest.raises(ValueError, match="`plan`"):
        _op(inp, case, plan=short)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_repeats_on_a_gpu_equal_the_checked_path(prepared, dense, mix, dtype):
    """On a GPU (benchmarks/gpu_check.sh's `-m cuda` step), at decode sizes: a repeat is a
    repeat (no validate.prepare) and gives the checked path's output bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from reclora_kernels.triton import eager

    case = Case(mix=mix, dense=dense, rows=8, tokens_per_row=1, d_in=96, d_out=80)
    inp = make_inputs(case, dtype=dtype, device="cuda")
    _op(inp, case)
    calls = len(prepared)
    again = make_inputs(case, dtype=dtype, device="cuda")
    y = _op(again, case)
    assert len(prepared) == calls
    eager._CALLS.clear()
    torch.testing.assert_close(y, _op(again, case), rtol=0, atol=0)
    ref = _op({k: v if v is None or not v.is_floating_point() else v.double()
               for k, v in again.items()}, case, backend="reference")
    assert rel_err(y, ref) <= TOLERANCE[dtype]


def test_new_tile_tables_forget_the_kept_plans(monkeypatch):
    """card_plan.use_card_tables replaces the tile tables the plans were made from: the kept
    calls and launch plans go with them."""
    from reclora_kernels.triton import card_plan, eager, launch

    for name in ("config", "interpreting", "_smem_optin", "_num_sms"):
        monkeypatch.setattr(launch, name, getattr(launch, name))  # restored after the test
    case = Case(dense=False)
    _op(make_inputs(case, dtype=DTYPE, device=DEVICE), case)
    run(make_inputs(case, dtype=DTYPE, device=DEVICE), case, "triton",
        torch.ones(case.rows, case.tokens_per_row, case.d_out))
    assert eager._CALLS and launch.forward_plan.cache_info().currsize
    assert launch.backward_plan.cache_info().currsize
    card_plan.use_card_tables("NVIDIA H200")
    assert not eager._CALLS
    assert launch.forward_plan.cache_info().currsize == 0
    assert launch.backward_plan.cache_info().currsize == 0
    assert launch._shrink_spec.cache_info().currsize == 0
