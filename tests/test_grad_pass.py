"""Factor mode's one pass over the output gradient (grad_pass_kernel, the tile table's
outer.ONE_PASS): v = B_p^T g and dB_p from one read of g, against the float64 oracle
(NaN-poisoned outputs) on every row layout; the same with the one pass off (a shrink and a
segment sum); and that a NaN in one row's gradient stays in that row."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, count_calls
from test_op import check_against_reference

import reclora_kernels as rk
from reclora_kernels.triton import configs, eager, launch

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float64] if DEVICE == "cpu" else [])
CASES = {
    "dense": Case(dense=True, d_out=90),  # two o tiles of the interpreter's 64
    "gathered": Case(d_out=70),
    "packed": Case(packed=True, rows=5, tokens_per_row=7),
    "one-token-rows": Case(rows=40, tokens_per_row=1, packed=True),
    "long-rows": Case(rows=2, tokens_per_row=70, d_in=17, d_out=19, dense=True),
}


@pytest.fixture
def launches(monkeypatch):
    return {name: count_calls(monkeypatch, launch, f"_run_{name}")
            for name in ("grad_pass", "shrink", "outer")}


def set_one_pass(monkeypatch, on: bool) -> None:
    table = configs._table(configs.table_key(torch.device(DEVICE)))
    monkeypatch.setitem(table, "outer", dict(table["outer"], ONE_PASS=on))
    launch.clear_plans()
    eager._CALLS.clear()


@pytest.fixture(autouse=True)
def forget_plans():
    yield
    launch.clear_plans()
    eager._CALLS.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_one_pass_matches_the_oracle(launches, monkeypatch, name, dtype):
    set_one_pass(monkeypatch, True)
    check_against_reference(CASES[name], "triton", DEVICE, dtype)
    # Forward: one shrink. Backward: the one pass (v, dB_p), then dA_p's segment sum.
    assert (len(launches["grad_pass"]), len(launches["shrink"]), len(launches["outer"])) \
        == (1, 1, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_two_passes_match_the_oracle(launches, monkeypatch, name):
    set_one_pass(monkeypatch, False)
    check_against_reference(CASES[name], "triton", DEVICE, torch.float32)
    assert (len(launches["grad_pass"]), len(launches["shrink"]), len(launches["outer"])) \
        == (0, 2, 2)


def test_output_mode_keeps_two_passes(launches, monkeypatch):
    """Output mode's dB sums rows into shared adapters (atomics): no one pass there."""
    set_one_pass(monkeypatch, True)
    check_against_reference(Case(mix="output"), "triton", DEVICE, torch.float32)
    assert not launches["grad_pass"]


def test_a_nan_in_one_rows_gradient_stays_in_that_row(monkeypatch):
    """One-token rows (a token tile spans them all): NaN in row 4's output gradient gives NaN
    in row 4's dx only, and dB_p = NaN only through row 4's own factor."""
    set_one_pass(monkeypatch, True)
    gen = torch.Generator().manual_seed(0)
    rows, d = 9, 24
    x = torch.randn(rows, 1, d, generator=gen).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(d, d, generator=gen) / d**0.5).to(DEVICE)
    a = (torch.randn(5, 3, d, generator=gen) / d**0.5).to(DEVICE)
    b = torch.randn(5, d, 3, generator=gen).to(DEVICE).requires_grad_(True)
    w = torch.randn(rows, 5, generator=gen).to(DEVICE).requires_grad_(True)
    y = rk.lora_mix_linear(x, weight, None, a, b, w, scale=0.7, backend="triton")
    grad_out = torch.ones_like(y)
    grad_out[4, 0, 3] = float("nan")
    dx, dw = torch.autograd.grad(y, [x, w], grad_out)
    assert torch.isnan(dx).flatten(1).any(1).tolist() == [r == 4 for r in range(rows)]
    assert torch.isnan(dw).any(1).tolist() == [r == 4 for r in range(rows)]
