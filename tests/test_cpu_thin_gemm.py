"""The CPU op's fp32 GEMMs, both paths: csrc/cpu/thin_gemm.h's AVX2 loops (the default on
non-Intel CPUs with AVX2) and BLAS (elsewhere), switched with reclora::cpu_thin_gemm.

The loops take every shape with a side of at most 16 (thin_gemm.h's kMaxThin), so they are
checked here directly (against float64 matmul, C poisoned with NaN where beta = 0, strided
operands, every tail of the 8- and 16-wide vectors) and through the op (forward and every
gradient against the float64 reference) on shapes that route through them.
"""

from __future__ import annotations

import native_switch
import pytest
import torch
from op_cases import Case
from test_bf16_probe import read_cpu_flags
from test_op import check_against_reference

from reclora_kernels import ops

pytestmark = pytest.mark.skipif(not ops.NATIVE_CPU, reason="native CPU kernels not built")


def _has_avx2() -> bool:
    return {"avx2", "fma"} <= read_cpu_flags()


MODES = ["blas"] + (["avx2"] if _has_avx2() else [])


@pytest.fixture(params=MODES)
def thin_mode(request):
    with native_switch.mode(torch.ops.reclora.cpu_thin_gemm, int(request.param == "avx2")):
        yield request.param


def test_mode_switch_round_trips_and_rejects_bad_modes():
    native_switch.check_round_trip(torch.ops.reclora.cpu_thin_gemm)


@pytest.mark.skipif(not _has_avx2(), reason="this CPU has no AVX2+FMA")
def test_default_mode_follows_the_cpu_vendor():
    """The loops by default where MKL takes its generic path (non-Intel CPUs), BLAS on Intel."""
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    native_switch.default_modes("cpu_thin_gemm", "RECLORA_CPU_THIN",
                                {None: 0 if intel else 1, "blas": 0, "avx2": 1})


def _strided(rows, cols, gen, pad):
    """A [rows, cols] float32 view with row stride cols + pad."""
    base = torch.randn(rows, cols + pad, generator=gen, dtype=torch.float64)
    return base.float()[:, :cols]


# (m, n, k): every side at most 16 somewhere, tails of 8 and 16 on each side, and 1s.
SHAPES = [
    (1, 1, 1), (1, 1, 37), (37, 1, 5), (5, 37, 1), (128, 8, 1024), (128, 1024, 8),
    (8, 1024, 128), (1024, 8, 128), (4, 40, 16), (13, 7, 29), (17, 23, 3), (3, 9, 17),
    (16, 16, 16), (5, 33, 100), (100, 15, 33), (7, 77, 19), (77, 7, 18), (3, 64, 17),
]


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_matches_float64(thin_mode, m, n, k, ta, tb):
    gen = torch.Generator().manual_seed(m * 10007 + n * 101 + k + 7 * ta + 3 * tb)
    a = _strided(*((k, m) if ta else (m, k)), gen, pad=3)
    b = _strided(*((n, k) if tb else (k, n)), gen, pad=5)
    want_ab = (a.double().t() if ta else a.double()) @ (b.double().t() if tb else b.double())
    for alpha, beta in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)]:
        c = _strided(m, n, gen, pad=2)
        if beta == 0.0:
            c.fill_(float("nan"))  # beta = 0 must never read C
        c_before = c.double().clone()
        torch.ops.reclora.cpu_gemm_f32(c, a, b, ta, tb, alpha, beta)
        want = alpha * want_ab + (beta * c_before if beta != 0.0 else 0.0)
        err = (c.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        assert err <= 2e-5 * scale * max(k, 1) ** 0.5, (thin_mode, err, scale)


def test_gemm_leaves_the_padding_alone(thin_mode):
    """The stores stop at the row's end: the columns past n (the stride's padding) keep their
    values, including after a masked tail."""
    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 9, 15, 17):
        full = torch.full((12, n + 5), 7.0)
        c = full[:, :n]
        a = torch.randn(12, 8, generator=gen)
        b = torch.randn(8, n, generator=gen)
        torch.ops.reclora.cpu_gemm_f32(c, a, b, False, False, 1.0, 0.0)
        assert torch.equal(full[:, n:], torch.full((12, 5), 7.0)), (thin_mode, n)
        assert torch.allclose(c, a @ b, atol=1e-5)


# Op shapes whose LoRA GEMMs take the loops: r from 1 to 16, output mode with k*r <= 16, and
# d not a multiple of 8; one (r = 17) that takes BLAS for the thin sides again.
OP_CASES = {
    "r1": Case(rank=1, d_in=37, d_out=21, tokens_per_row=9, rows=3),
    "r8-dense": Case(rank=8, d_in=64, d_out=72, dense=True, adapters=5, tokens_per_row=33),
    "r16-packed": Case(rank=16, d_in=45, d_out=31, packed=True, rows=4, tokens_per_row=20),
    "r17": Case(rank=17, d_in=40, d_out=24, tokens_per_row=11),
    "output-k2r3": Case(mix="output", slots=2, rank=3, d_in=50, d_out=19, tokens_per_row=17),
    "output-dense": Case(mix="output", dense=True, adapters=4, rank=4, d_in=24, d_out=40),
    "duplicates": Case(duplicate=True, rank=5, d_in=33, d_out=18, noncontiguous=True),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_matches_reference_in_both_modes(thin_mode, name):
    check_against_reference(OP_CASES[name], "cpu", "cpu", torch.float32)
