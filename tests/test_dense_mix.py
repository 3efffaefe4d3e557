"""The one-launch dense mix (dense_mix_kernel, the tile table's mix.ONE_LAUNCH): A_p = w @ A,
B_p = w @ B and the zeros of the shrink's split-K accumulator in one Triton launch, in dense
factor mode. The kernel against a float64 oracle on NaN-poisoned outputs (odd sizes, one row,
more rows than a program holds, one adapter, rank 1, strided weights, an accumulator longer
than the grid); the op with it on and off against the reference; that it is what ran; that
a bank whose factors are not flat takes the GEMMs; and that one row's NaN stays in its row."""

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


def _mix_launch(rows, slots, rank, d_in, d_out, n_zero, dtype, w_strides=None):
    a_shape = (slots, rank, d_in)
    a_strides = (rank * d_in, d_in, 1)
    b_strides = (d_out * rank, rank, 1)
    return launch._dense_mix_launch(rows, slots, a_shape, a_strides, d_out, b_strides,
                                    w_strides or (slots, 1), n_zero, dtype,
                                    torch.device(DEVICE))


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,slots,rank,d_in,d_out", [
    (3, 6, 3, 29, 23),      # odd sizes
    (1, 1, 1, 1, 1),        # one row, one adapter, rank 1
    (40, 5, 2, 33, 9),      # more rows than a program holds (MAX_ROWS)
    (2, 16, 8, 130, 257),   # factors over several blocks, uneven tails
], ids=["odd", "tiny", "many-rows", "blocks"])
def test_kernel_matches_float64_oracle(dtype, rows, slots, rank, d_in, d_out):
    gen = torch.Generator().manual_seed(rows * 1000 + d_in)
    a = torch.randn(slots, rank, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(slots, d_out, rank, generator=gen, dtype=torch.float64)
    # adapter_w transposed in memory: its strides are not (slots, 1).
    w = torch.randn(slots, rows, generator=gen, dtype=torch.float64).t()
    n_zero = 3 * 4096 + 5  # longer than the grid covers in one sweep: the zeroing loops
    lc = _mix_launch(rows, slots, rank, d_in, d_out, n_zero, dtype, w.stride())
    assert lc is not None
    a_out, b_out = _nan((rows, rank, d_in), dtype), _nan((rows, d_out, rank), dtype)
    s = _nan((n_zero,), torch.float64 if dtype == torch.float64 else torch.float32)
    ad, bd, wd = (t.to(DEVICE, dtype) for t in (a, b, w))
    assert wd.stride() == w.stride()
    launch._run_dense_mix(lc, ad, bd, wd, a_out, b_out, s)
    # The oracle mixes the values the kernel was given (rounded to dtype), in float64.
    ref_a = torch.einsum("rm,mpq->rpq", wd.double().cpu(), ad.double().cpu())
    ref_b = torch.einsum("rm,mpq->rpq", wd.double().cpu(), bd.double().cpu())
    assert rel_err(a_out.cpu(), ref_a) <= TOLERANCE[dtype]
    assert rel_err(b_out.cpu(), ref_b) <= TOLERANCE[dtype]
    assert torch.equal(s.cpu(), torch.zeros_like(s.cpu()))


def test_one_rows_nan_stays_in_its_row():
    rows, slots, rank, d_in, d_out = 5, 4, 2, 21, 19
    a = torch.randn(slots, rank, d_in, device=DEVICE)
    b = torch.randn(slots, d_out, rank, device=DEVICE)
    w = torch.randn(rows, slots, device=DEVICE)
    w[2, 1] = float("nan")
    lc = _mix_launch(rows, slots, rank, d_in, d_out, 0, torch.float32)
    a_out, b_out = _nan((rows, rank, d_in), torch.float32), _nan((rows, d_out, rank),
                                                                   torch.float32)
    launch._run_dense_mix(lc, a, b, w, a_out, b_out, a_out.new_empty(0))
    for out in (a_out, b_out):
        assert out[2].isnan().all()
        others = torch.cat([out[:2], out[3:]])
        assert torch.isfinite(others).all()


@pytest.mark.parametrize("on", [True, False], ids=["one-launch", "gemms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    Case(dense=True),
    Case(dense=True, packed=True, rows=5, tokens_per_row=7),
    Case(dense=True, rank=1, adapters=1, d_in=1),
    Case(dense=True, rows=1, tokens_per_row=1, bias=False),
], ids=["dense", "packed", "rank1-one-adapter-d1", "one-token"])
def test_the_op_with_and_without_it(monkeypatch, on, dtype, case):
    force_one_launch_mix(on, TABLE)
    mixes = count_calls(monkeypatch, launch, "_run_dense_mix")
    gemms = count_calls(monkeypatch, launch, "mix")
    check_against_reference(case, "triton", DEVICE, dtype)
    # The triton forward mixes once (the backward reuses the mixed factors).
    assert (len(mixes), len(gemms)) == ((1, 0) if on else (0, 2))


def test_factors_that_are_not_flat_take_the_gemms(monkeypatch):
    force_one_launch_mix(True, TABLE)
    mixes = count_calls(monkeypatch, launch, "_run_dense_mix")
    case = Case(dense=True)
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    # lora_a [M, r, d_in] as a transposed view: its rank axis is the contiguous one.
    a_t = inp["lora_a"].transpose(1, 2).contiguous().transpose(1, 2)
    args = (inp["x"], inp["weight"], inp["bias"], a_t, inp["lora_b"], inp["adapter_w"])
    y = rk.lora_mix_linear(*args, scale=case.scale, backend="triton")
    ref = rk.lora_mix_linear(*(t.double() for t in args), scale=case.scale,
                             backend="reference")
    assert not mixes
    assert rel_err(y.double(), ref) <= TOLERANCE[torch.float32]
