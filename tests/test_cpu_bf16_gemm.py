"""The CPU op's bf16 LoRA GEMMs, both paths: csrc/cpu/bf16_gemm.h's AVX512-BF16 loops (the
default on CPUs with AVX512-BF16) and MKL's gemm_bf16bf16f32, switched with
reclora::cpu_bf16_gemm.

The loops are checked directly against float64 matmul on bf16 values (C poisoned with NaN
where beta = 0, strided operands, every tail of the 32-wide steps, the 8-wide column tiles and
the 3-row tiles, the padding past a row left alone) and through the op (forward and every
gradient against the float64 reference, both mixes, dense and gathered) in both modes.
"""

from __future__ import annotations

import native_switch
import pytest
import torch
from op_cases import Case
from test_bf16_probe import read_cpu_flags
from test_op import CASES, check_against_reference

from reclora_kernels import ops

pytestmark = pytest.mark.skipif(not ops.NATIVE_CPU, reason="native CPU kernels not built")

HAS_LOOPS = {"avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq"} <= read_cpu_flags()
MODES = ["mkl"] + (["avx512"] if HAS_LOOPS else [])
needs_loops = pytest.mark.skipif(not HAS_LOOPS, reason="this CPU has no AVX512-BF16")


@pytest.fixture(params=MODES)
def bf16_mode(request):
    with native_switch.mode(torch.ops.reclora.cpu_bf16_gemm, int(request.param == "avx512")):
        yield request.param


@pytest.fixture
def loops_on():
    with native_switch.mode(torch.ops.reclora.cpu_bf16_gemm, 1):
        yield


def test_mode_switch_round_trips_and_rejects_bad_modes():
    native_switch.check_round_trip(torch.ops.reclora.cpu_bf16_gemm)
    if not HAS_LOOPS:
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            torch.ops.reclora.cpu_bf16_gemm(1)


def test_default_mode_follows_the_cpu():
    """The loops by default exactly where the CPU has AVX512-BF16 (a probe that quietly says no
    would leave this machine on MKL's generic path); RECLORA_CPU_BF16=mkl turns them off."""
    native_switch.default_modes("cpu_bf16_gemm", "RECLORA_CPU_BF16",
                                {None: int(HAS_LOOPS), "mkl": 0})


def _strided(rows, cols, gen, pad, dtype):
    """A [rows, cols] view with row stride cols + pad, holding bf16-representable values."""
    base = torch.randn(rows, cols + pad, generator=gen, dtype=torch.float64)
    return base.bfloat16().to(dtype)[:, :cols]


# (m, n, k) for A B^T (the loops' dots form): k across the 32-wide steps (1, 31, 32, 33, 577),
# n across the 8-wide column tiles, m across the 3-row tiles; zero sizes.
DOTS_SHAPES = [
    (1, 1, 1), (3, 8, 32), (4, 9, 33), (5, 7, 31), (128, 8, 576), (2, 128, 100), (7, 17, 65),
    (6, 16, 1024), (11, 3, 577), (0, 8, 16), (5, 0, 16), (4, 5, 0),
]


@pytest.mark.parametrize("m,n,k", DOTS_SHAPES)
def test_dots_match_float64(bf16_mode, m, n, k):
    gen = torch.Generator().manual_seed(m * 10007 + n * 101 + k)
    a = _strided(m, k, gen, 3, torch.bfloat16)
    b = _strided(n, k, gen, 5, torch.bfloat16)
    want_ab = a.double() @ b.double().t()
    products = a.double().abs() @ b.double().abs().t()
    bound = 1e-5 * products.max().item() if products.numel() else 0.0
    for alpha, beta in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)]:
        c = _strided(m, n, gen, 2, torch.float32)
        if beta == 0.0:
            c.fill_(float("nan"))  # beta = 0 must never read C
        c_before = c.double().clone()
        torch.ops.reclora.cpu_gemm_bf16(c, a, b, False, True, alpha, beta)
        want = alpha * want_ab + (beta * c_before if beta != 0.0 else 0.0)
        if c.numel() == 0:
            continue
        err = (c.double() - want).abs().max().item()
        assert err <= abs(alpha) * bound + 1e-6 * want.abs().max().item(), (bf16_mode, err)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (True, True)])
def test_other_forms_still_take_the_library(bf16_mode, ta, tb):
    """A B, A^T B and A^T B^T (not the loops' form) give the product too, in both modes."""
    gen = torch.Generator().manual_seed(7 + ta + 2 * tb)
    m, n, k = 9, 13, 70
    a = _strided(*((k, m) if ta else (m, k)), gen, 3, torch.bfloat16)
    b = _strided(*((n, k) if tb else (k, n)), gen, 5, torch.bfloat16)
    want = (a.double().t() if ta else a.double()) @ (b.double().t() if tb else b.double())
    c = torch.full((m, n), float("nan"))
    torch.ops.reclora.cpu_gemm_bf16(c, a, b, ta, tb, 1.0, 0.0)
    assert (c.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item() * k**0.5


def test_dots_leave_the_padding_alone(bf16_mode):
    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 9, 15, 17):
        full = torch.full((7, n + 5), 7.0)
        c = full[:, :n]
        a = torch.randn(7, 40, generator=gen).bfloat16()
        b = torch.randn(n, 40, generator=gen).bfloat16()
        torch.ops.reclora.cpu_gemm_bf16(c, a, b, False, True, 1.0, 0.0)
        assert torch.equal(full[:, n:], torch.full((7, 5), 7.0)), (bf16_mode, n)
        assert torch.allclose(c, a.float() @ b.float().t(), atol=1e-4)


# (m, n, k) for C += P^T Q: m (the rank) across the 8-row tiles, n across the 32- and 16-wide
# column halves, k from 0.
OUTER_SHAPES = [
    (1, 1, 1), (8, 32, 5), (8, 576, 128), (3, 17, 9), (9, 33, 4), (16, 48, 7), (17, 15, 3),
    (5, 1000, 2), (4, 40, 0), (0, 8, 3), (7, 0, 3),
]


@needs_loops
@pytest.mark.parametrize("m,n,k", OUTER_SHAPES)
def test_outer_matches_float64(loops_on, m, n, k):
    gen = torch.Generator().manual_seed(m * 131 + n * 7 + k)
    p = torch.randn(k, m + 3, generator=gen)[:, :m]
    q = _strided(k, n, gen, 5, torch.bfloat16)
    full = torch.randn(m, n + 4, generator=gen)
    c = full[:, :n]
    pad_before, c_before = full[:, n:].clone(), c.double().clone()
    torch.ops.reclora.cpu_outer_bf16(c, p, q, -1.5)
    want = c_before - 1.5 * (p.double().t() @ q.double())
    assert torch.equal(full[:, n:], pad_before)  # the stores stop at the row's end
    if c.numel() == 0:
        return
    products = (p.double().abs().t() @ q.double().abs()).max().item() if k else 0.0
    err = (c.double() - want).abs().max().item()
    assert err <= 1e-5 * (1 + 1.5 * products) + 1e-6 * c_before.abs().max().item(), err


def test_outer_refuses_to_run_with_the_loops_off():
    with native_switch.mode(torch.ops.reclora.cpu_bf16_gemm, 0):
        with pytest.raises(RuntimeError, match="loops are off"):
            torch.ops.reclora.cpu_outer_bf16(torch.zeros(2, 3), torch.zeros(4, 2),
                                             torch.zeros(4, 3).bfloat16(), 1.0)


# Op shapes for the bf16 path: the op suite's own cases plus the tails of the loops' tiles and
# a row long enough to take several 32-wide steps per run.
OP_CASES = {**CASES,
            "rank8-d577": Case(rank=8, d_in=577, d_out=65, tokens_per_row=40, rows=3),
            "rank9-output": Case(mix="output", rank=9, slots=3, d_in=70, d_out=33),
            "rank16-dense": Case(rank=16, dense=True, adapters=3, d_in=64, d_out=96,
                                 tokens_per_row=37)}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_matches_reference_in_both_modes(bf16_mode, name):
    check_against_reference(OP_CASES[name], "cpu", "cpu", torch.bfloat16)


@needs_loops
def test_the_loops_agree_with_mkl_on_the_op(loops_on):
    """Both paths accumulate in fp32 on the same bf16 values: their outputs and gradients agree
    to fp32 summation order (far tighter than the bf16 bound of the float64 comparison)."""
    from op_cases import make_inputs, run

    case = Case(rank=8, d_in=200, d_out=150, tokens_per_row=50, rows=3)
    inputs = make_inputs(case, dtype=torch.bfloat16, seed=11)
    grad_out = torch.randn(3, 50, 150).bfloat16()
    y_loops, g_loops = run(inputs, case, "cpu", grad_out)
    with native_switch.mode(torch.ops.reclora.cpu_bf16_gemm, 0):
        y_mkl, g_mkl = run(inputs, case, "cpu", grad_out)
    # one bf16 rounding step apart at most (the loops keep v and s in fp32 for the gradients)
    for name, got, want in [("y", y_loops, y_mkl)] + [(k, g_loops[k], g_mkl[k]) for k in g_mkl]:
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 2 ** -7 * want.double().abs().max().item(), (name, err)


# (m, n, k) for A B through the pairs layout: k odd and even (the last pair half empty), n
# across the 16- and 64-wide column blocks, m across the 4-row tiles.
PAIRS_SHAPES = [(1, 1, 1), (4, 16, 2), (5, 17, 3), (9, 64, 128), (7, 65, 27), (3, 130, 8),
                (13, 8, 577), (0, 5, 4), (3, 0, 4)]


@needs_loops
@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("m,n,k", PAIRS_SHAPES)
def test_pairs_gemm_matches_float64(loops_on, m, n, k, b_t):
    """A's rows and B's rows are padded with inf past their end: an odd k's empty half-pair must
    be neither read from A nor filled from B's last row (0 * inf would be NaN)."""
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k + b_t)
    a_full = torch.full((m, k + 3), float("inf")).bfloat16()
    a_full[:, :k] = torch.randn(m, k, generator=gen).bfloat16()
    b_shape = (n, k) if b_t else (k, n)
    b_full = torch.full((b_shape[0], b_shape[1] + 5), float("inf")).bfloat16()
    b_full[:, :b_shape[1]] = torch.randn(*b_shape, generator=gen).bfloat16()
    a, b = a_full[:, :k], b_full[:, :b_shape[1]]
    want_ab = a.double() @ (b.double().t() if b_t else b.double())
    for alpha, beta in [(1.0, 0.0), (-0.5, 1.0)]:
        c = torch.full((m, n + 2), 9.0)[:, :n]
        if beta == 0.0:
            c.fill_(float("nan"))
        c_before = c.double().clone()
        torch.ops.reclora.cpu_pairs_gemm_bf16(c, a, b, b_t, alpha, beta)
        if c.numel() == 0:
            continue
        want = alpha * want_ab + (beta * c_before if beta != 0.0 else 0.0)
        err = (c.double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()) * max(k, 1) ** 0.5, (err, b_t)
