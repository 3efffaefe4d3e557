"""The Triton backend's fused GEMM (the config's expand.fused: x W^T, the bias and the LoRA
expand in one kernel, forward and dx), turned on for these tests: the op suite's cases
against the float64 oracle (NaN-poisoned outputs), gradcheck, hostile inputs, and that the
fused kernel is what ran. Off by default until a card's measurement turns it on."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, count_calls, gradcheck_op, make_inputs, rel_err, run
from test_op import CASES, check_against_reference
from test_op_hostile import call as hostile_call
from test_op_hostile import inputs as hostile_inputs
from test_op_hostile import nonfinite_bank_entry, nonfinite_where, same_as_reference

import reclora_kernels as rk
from reclora_kernels.triton import configs, launch
from reclora_kernels.triton.card_plan import force_fused

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


TABLE = configs.table_key(torch.device(DEVICE))


@pytest.fixture(autouse=True)
def fused_on():
    force_fused(True, TABLE)
    yield
    force_fused(None, TABLE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """(fused GEMM launches, expand launches) made during the test."""
    return (count_calls(monkeypatch, launch, "_run_fused"),
            count_calls(monkeypatch, launch, "_run_expand"))


def test_the_fused_kernel_runs_forward_and_dx(kernel_calls):
    fused, expand = kernel_calls
    check_against_reference(Case(dense=True), "triton", DEVICE, torch.float32)
    # Forward and backward of the triton call (the reference takes its own path): two fused
    # launches (y, then dx), and no expand.
    assert len(fused) == 2 and not expand
    # Turned off again (a new table, plans cleared, as card_plan.use_card_tables does): the
    # same call takes the expand + cuBLAS path.
    force_fused(False, TABLE)
    check_against_reference(Case(dense=True), "triton", DEVICE, torch.float32)
    assert len(fused) == 2 and len(expand) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(dtype, name):
    check_against_reference(CASES[name], "triton", DEVICE, dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 is not a GPU target")
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_float64_and_gradcheck(mix, dense):
    case = Case(packed=True, rows=3, tokens_per_row=3, d_in=5, d_out=4, adapters=3, rank=2,
                slots=2, mix=mix, dense=dense)
    check_against_reference(case, "triton", DEVICE, torch.float64)
    assert gradcheck_op(make_inputs(case, dtype=torch.float64, device=DEVICE), case, "triton")


def test_a_strided_weight_is_planned_by_its_strides():
    """The fused GEMM reads W through its strides, so a repeat of a call with W given as a
    transposed view (same shape and dtype) must not replay the contiguous W's plan."""
    case = Case(dense=True, d_in=40, d_out=24)
    dtype = torch.float32
    inp = make_inputs(case, dtype=dtype, device=DEVICE)
    y_contig, _ = run(inp, case, "triton")
    inp_t = dict(inp, weight=inp["weight"].t().contiguous().t())
    assert not inp_t["weight"].is_contiguous()
    y_strided, _ = run(inp_t, case, "triton")
    ref, _ = run({k: (v.double() if v is not None and v.is_floating_point() else v)
                  for k, v in inp.items()}, case, "reference")
    assert rel_err(y_contig.double(), ref) < 2e-5
    assert rel_err(y_strided.double(), ref) < 2e-5


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("where", ["x", "adapter_w"])
def test_nan_stays_in_its_row(mix, where):
    """One-token rows, so a GEMM tile holds nine rows: a NaN in one row's activations or
    mixture weights gives NaN in that row's output only."""
    p = hostile_inputs(1, rows=9, length=1)
    bad_row = 4
    if where == "x":
        p["x"][bad_row, 0, 3] = float("nan")
    else:
        p["adapter_w"][bad_row, 1] = float("nan")
    p = {k: (v.to(DEVICE) if v is not None else v) for k, v in p.items()}
    same_as_reference(p, mix, backends=["triton"])
    y = rk.lora_mix_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                           p["adapter_w"], p["adapter_idx"], scale=0.7, mix=mix,
                           backend="triton")
    assert torch.isnan(y).flatten(1).any(1).tolist() == [r == bad_row for r in range(9)]


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_rows_nonfinite_bank_entry_stays_in_its_row(mix, bad):
    """The epilogue accumulates every row of a tile into the base's one accumulator, so a row's
    non-finite factor entry is zeroed for the tile's dot and its terms added back to that
    row's tokens alone: its outputs at that column are non-finite, no other row's."""
    p = {k: (v.to(DEVICE) if v is not None else v)
         for k, v in nonfinite_bank_entry(bad).items()}
    same_as_reference(p, mix, backends=["triton"])
    assert nonfinite_where(hostile_call(p, "triton", mix)) == [[4, 0, 5]]


def test_ragged_edges_and_zero_width():
    """Sizes off every tile edge (tokens, d_out, d_in not multiples of the tiles), and
    d_in = 0 (y = bias)."""
    for case in (Case(rows=3, tokens_per_row=23, d_in=37, d_out=71, dense=True),
                 Case(rows=1, tokens_per_row=1, d_in=1, d_out=1, rank=1, slots=1)):
        check_against_reference(case, "triton", DEVICE, torch.float32)
    p = hostile_inputs(3, d_in=0)
    p = {k: (v.to(DEVICE) if v is not None else v) for k, v in p.items()}
    y = rk.lora_mix_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                           p["adapter_w"], p["adapter_idx"], backend="triton")
    assert torch.equal(y, p["bias"].expand_as(y))


@pytest.fixture
def shrinks(monkeypatch):
    """Launches that shrink x or g: the shrink kernel's, and the backward's one pass over g
    (v with dB_p, factor mode)."""
    return (count_calls(monkeypatch, launch, "_run_shrink"),
            count_calls(monkeypatch, launch, "_run_grad_pass"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("tiles", [1, 2])
def test_shrink_in_the_main_loop(shrinks, dtype, dense, tiles):
    """Factor mode over x [R, L, d] with L a multiple of the fused token tile (64 in the
    interpreter, 128 on a GPU's table): the fused GEMM runs the shrink itself and writes s
    (poisoned before), so the forward launches no shrink, and the backward, which reads that
    s, gives the oracle's gradients. d_in 70: a ragged K (the A tile's mask)."""
    if DEVICE == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is not a GPU target")
    length = tiles * configs.config("fused", torch.device(DEVICE))["BLOCK_T"]
    case = Case(rows=2, tokens_per_row=length, d_in=70, d_out=90, dense=dense)
    check_against_reference(case, "triton", DEVICE, dtype)
    assert sum(map(len, shrinks)) == 1  # the backward's v = B_p^T g only


@pytest.mark.parametrize("rank", [65, 128])
def test_no_shrink_in_the_loop_over_one_rank_block(shrinks, rank):
    """Rows on the tile, but a rank over the card's MAX_BLOCK_R (64): the in-loop shrink
    and the one pass over g hold one rank block, so the separate shrinks run instead (at
    r = 128 the in-loop shrink once summed half the ranks)."""
    case = Case(rows=2, tokens_per_row=64, rank=rank, d_in=24, d_out=21, dense=True)
    check_against_reference(case, "triton", DEVICE, torch.float32)
    shrink, one_pass = shrinks
    assert len(shrink) == 2 and not one_pass  # x's shrink, then g's


@pytest.mark.parametrize("case", [Case(rows=2, tokens_per_row=64, packed=True),
                                  Case(rows=2, tokens_per_row=64, mix="output"),
                                  Case(rows=2, tokens_per_row=40)],
                         ids=["packed", "output-mode", "rows-off-the-tile"])
def test_no_shrink_in_the_loop_where_a_tile_may_span_rows(shrinks, case):
    check_against_reference(case, "triton", DEVICE, torch.float32)
    assert sum(map(len, shrinks)) == 2  # the forward's and the backward's


def test_float64_takes_the_cublas_order_on_a_gpu(monkeypatch):
    """On an H100's tables the fused GEMM's float64 tiles would need more shared memory than
    a block can get (scripts/triton_aot_check.py compiles them): float64 plans the
    cuBLAS-anchored order there, the other dtypes the fused one; the interpreter keeps
    float64 on the fused GEMM (gradcheck above)."""
    from reclora_kernels.plan import implicit_plan
    from reclora_kernels.triton import card_plan

    for name in ("config", "interpreting", "_smem_optin", "_num_sms"):
        monkeypatch.setattr(launch, name, getattr(launch, name))  # restored after the test
    card = "NVIDIA H100 80GB HBM3"

    def order(dtype):
        rows, length, d_in, d_out, m, r = 2, 128, 40, 24, 3, 4
        x = torch.zeros(rows * length, d_in, dtype=dtype)
        weight = torch.zeros(d_out, d_in, dtype=dtype)
        a, b = torch.zeros(m, r, d_in, dtype=dtype), torch.zeros(m, d_out, r, dtype=dtype)
        w = torch.zeros(rows, m, dtype=dtype)
        return launch.forward_plan_of(x, implicit_plan(rows, length), weight, None, a, b, w,
                                      None, 0).order

    assert order(torch.float64) == launch.ORDER_FUSED  # the interpreter's tables
    try:
        card_plan.use_card_tables(card)
        force_fused(True, card)
        assert order(torch.float64) == launch.ORDER_EXPAND_FIRST
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert order(dtype) == launch.ORDER_FUSED, dtype
    finally:
        force_fused(None, card)
        launch.clear_plans()
