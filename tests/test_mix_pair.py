"""The one-launch mix of factor mode (mix_pair_kernel, the tile table's mix.ONE_LAUNCH): A_p
and B_p, dense (w @ bank) or gathered (sum_j w[b, j] bank[idx[b, j]]), and the zeros of the
shrink's split-K accumulator in one Triton launch. The kernel against a float64 oracle on
NaN-poisoned outputs (odd sizes, one row, more rows than a program holds, one adapter, rank 1,
repeated indices, strided weights and indices, an accumulator longer than the grid, more row
blocks than the grid's axis 1 takes); the op
with it on and off against the reference; that it is what ran; that a bank whose factors are
not flat takes a mix per factor; and that one row's NaN stays in its row."""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCE, Case, count_calls, make_inputs, rel_err
from test_op import check_against_reference

import reclora_kernels as rk
from reclora_kernels.triton import configs, launch
from reclora_kernels.triton.card_plan import force_one_launch_mix

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = configs.table_key(torch.device(DEVICE))
DTYPES = [torch.float32, torch.bfloat16] + ([] if DEVICE == "cuda" else [torch.float64])


@pytest.fixture(autouse=True)
def tables_as_filed():
    force_one_launch_mix(None, TABLE)
    yield
    force_one_launch_mix(None, TABLE)


def _mix_launch(rows, adapters, rank, d_in, d_out, n_zero, dtype, w, idx):
    a_shape = (adapters, rank, d_in)
    a_strides = (rank * d_in, d_in, 1)
    b_strides = (d_out * rank, rank, 1)
    return launch._mix_pair_launch(rows, w.shape[1], a_shape, a_strides, d_out, b_strides,
                                   w.stride(), None if idx is None else idx.stride(), n_zero,
                                   dtype, torch.device(DEVICE))


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _oracle(w, idx, bank):
    """sum_j w[b, j] bank[idx[b, j]] (dense: idx[b, j] = j) in float64 on the CPU."""
    w, bank = w.double().cpu(), bank.double().cpu()
    if idx is None:
        return torch.einsum("rm,mpq->rpq", w, bank)
    return torch.einsum("rj,rjpq->rpq", w, bank[idx.cpu()])


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,adapters,slots,rank,d_in,d_out", [
    (3, 6, 4, 3, 29, 23),      # odd sizes
    (1, 1, 1, 1, 1, 1),        # one row, one adapter, rank 1, k = 1
    (40, 5, 3, 2, 33, 9),      # more rows than a program holds (MAX_ROWS)
    (2, 16, 5, 8, 130, 257),   # factors over several blocks, uneven tails
], ids=["odd", "tiny", "many-rows", "blocks"])
def test_kernel_matches_float64_oracle(gathered, dtype, rows, adapters, slots, rank, d_in,
                                       d_out):
    gen = torch.Generator().manual_seed(rows * 1000 + d_in)
    a = torch.randn(adapters, rank, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(adapters, d_out, rank, generator=gen, dtype=torch.float64)
    k = slots if gathered else adapters
    # adapter_w (and the index table) transposed in memory: strides not (k, 1).
    w = torch.randn(k, rows, generator=gen, dtype=torch.float64).t()
    idx = None
    if gathered:
        idx = torch.randint(0, adapters, (k, rows), generator=gen).t()
        idx[0, -1] = idx[0, 0]  # a row that takes one adapter twice
        idx = idx.to(DEVICE)
        assert idx.stride() == (1, rows)
    n_zero = 3 * 4096 + 5  # longer than the grid covers in one sweep: the zeroing loops
    wd = w.to(DEVICE, dtype)
    lc = _mix_launch(rows, adapters, rank, d_in, d_out, n_zero, dtype, wd, idx)
    assert lc is not None
    a_out, b_out = _nan((rows, rank, d_in), dtype), _nan((rows, d_out, rank), dtype)
    s = _nan((n_zero,), torch.float64 if dtype == torch.float64 else torch.float32)
    ad, bd = a.to(DEVICE, dtype), b.to(DEVICE, dtype)
    assert wd.stride() == w.stride()
    launch._run_mix_pair(lc, ad, bd, wd, idx, a_out, b_out, s)
    # The oracle mixes the values the kernel was given (rounded to dtype), in float64.
    assert rel_err(a_out.cpu(), _oracle(wd, idx, ad)) <= TOLERANCE[dtype]
    assert rel_err(b_out.cpu(), _oracle(wd, idx, bd)) <= TOLERANCE[dtype]
    assert torch.equal(s.cpu(), torch.zeros_like(s.cpu()))


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
def test_row_blocks_past_the_grid_limit_loop(monkeypatch, gathered):
    """Axis 1 of a CUDA grid stops at 65535 blocks (~2M rows at MAX_ROWS 32): the launch caps
    it there and each program steps over the row blocks. Here the cap is 2 and the rows make
    2.5 blocks of the table's MAX_ROWS (16 in the interpreter, 32 on a GPU), so program 0
    mixes two of them, the last one short."""
    monkeypatch.setattr(launch, "GRID_AXIS_1_MAX", 2)
    rows = configs.config("mix", torch.device(DEVICE))["MAX_ROWS"] * 5 // 2
    w = torch.ones(rows, 3, device=DEVICE)
    lc = _mix_launch(rows, 5, 2, 33, 9, 0, torch.float32, w, None)
    assert lc.grid[1] == 2 and lc.meta.kwargs["BLOCK_ROWS"] * 2 < rows
    test_kernel_matches_float64_oracle(gathered, torch.float32, rows, 5, 3, 2, 33, 9)


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
def test_one_rows_nan_stays_in_its_row(gathered):
    rows, adapters, rank, d_in, d_out = 5, 4, 2, 21, 19
    a = torch.randn(adapters, rank, d_in, device=DEVICE)
    b = torch.randn(adapters, d_out, rank, device=DEVICE)
    w = torch.randn(rows, adapters, device=DEVICE)
    w[2, 1] = float("nan")
    # Gathered: every row takes adapter 1 in slot 1, so the NaN row shares it with the others.
    idx = torch.arange(adapters, device=DEVICE).repeat(rows, 1) if gathered else None
    lc = _mix_launch(rows, adapters, rank, d_in, d_out, 0, torch.float32, w, idx)
    a_out, b_out = _nan((rows, rank, d_in), torch.float32), _nan((rows, d_out, rank),
                                                                   torch.float32)
    launch._run_mix_pair(lc, a, b, w, idx, a_out, b_out, a_out.new_empty(0))
    for out in (a_out, b_out):
        assert out[2].isnan().all()
        others = torch.cat([out[:2], out[3:]])
        assert torch.isfinite(others).all()


@pytest.mark.parametrize("on", [True, False], ids=["one-launch", "per-factor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    Case(dense=True),
    Case(dense=True, packed=True, rows=5, tokens_per_row=7),
    Case(dense=True, rank=1, adapters=1, d_in=1),
    Case(dense=True, rows=1, tokens_per_row=1, bias=False),
    Case(),
    Case(packed=True, rows=4, slots=1, rank=1),
    Case(duplicate=True, adapters=2),
], ids=["dense", "packed", "rank1-one-adapter-d1", "one-token", "gathered",
        "gathered-packed-k1-r1", "gathered-duplicates"])
def test_the_op_with_and_without_it(monkeypatch, on, dtype, case):
    force_one_launch_mix(on, TABLE)
    mixes = count_calls(monkeypatch, launch, "_run_mix_pair")
    per_factor = count_calls(monkeypatch, launch, "mix")
    check_against_reference(case, "triton", DEVICE, dtype)
    # The triton forward mixes once (the backward reuses the mixed factors).
    assert (len(mixes), len(per_factor)) == ((1, 0) if on else (0, 2))


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
def test_factors_that_are_not_flat_take_a_mix_per_factor(monkeypatch, dense):
    force_one_launch_mix(True, TABLE)
    mixes = count_calls(monkeypatch, launch, "_run_mix_pair")
    case = Case(dense=dense)
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    # lora_a [M, r, d_in] as a transposed view: its rank axis is the contiguous one.
    a_t = inp["lora_a"].transpose(1, 2).contiguous().transpose(1, 2)
    args = (inp["x"], inp["weight"], inp["bias"], a_t, inp["lora_b"], inp["adapter_w"])
    idx = inp["adapter_idx"]
    y = rk.lora_mix_linear(*args, idx, scale=case.scale, backend="triton")
    ref = rk.lora_mix_linear(*(t.double() for t in args), idx, scale=case.scale,
                             backend="reference")
    assert not mixes
    assert rel_err(y.double(), ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("one_launch", [False, True], ids=["per-factor", "one-launch"])
def test_factors_longer_than_the_grid_takes(monkeypatch, one_launch):
    """Factors of more blocks than axis 1 of a grid takes (CUDA: 65,535; here capped at 1):
    the per-factor mix, the bank gradient and the mixture weights' gradient loop over the
    blocks (gathered factor mode, forward and backward, against the float64 reference)."""
    force_one_launch_mix(one_launch, TABLE)
    monkeypatch.setattr(launch, "GRID_AXIS_1_MAX", 1)
    block = configs.config("mix", torch.device(DEVICE))["BLOCK"]
    case = Case(rank=3, d_in=block // 2 + 5, d_out=block // 3 + 7, rows=3, tokens_per_row=2)
    assert case.rank * case.d_in > 1 * block and case.rank * case.d_out > block  # 2 blocks
    check_against_reference(case, "triton", DEVICE, torch.float32)
