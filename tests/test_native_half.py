"""The native cpu op in bf16/fp16 without upcasting, output mode in one pass, and NaN placement
(issue 13; issue 17 item 8, cpu part).

- Half inputs at sizes where the kernels take their fused paths (packed rows long enough for
  runs, several threads' worth of tokens), forward and every gradient, against the float64
  reference, dense and gathered, both mixes.
- No full-size fp32 copy: the forward's peak allocation in bf16 stays below what an fp32 copy
  of W alone would take.
- A NaN (or inf) mixture weight gives NaN exactly where the reference has it, in fp32 output
  mode too (where the op returned finite values before), and never in another row.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import Case
from test_bf16_probe import read_cpu_flags
from test_native import TOL, check, make
from test_op import check_against_reference

from reclora_kernels import ops
from reclora_kernels.reference import lora_mix_reference

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["aten", "mkl"])
def half_base(request):
    """Both homes of the half base GEMM (reclora::cpu_half_base): ATen's, in the input dtype,
    and MKL's half GEMM into the fp32 tile the LoRA part joins (the default where torch has no
    oneDNN bf16)."""
    before = torch.ops.reclora.cpu_half_base(1 if request.param == "mkl" else 0)
    yield request.param
    torch.ops.reclora.cpu_half_base(before)


def test_half_gemm_probe_agrees_with_the_cpu():
    """ATen's bf16 GEMM is oneDNN's where the CPU has AVX512 core (or AVX-NE-CONVERT), scalar
    loops elsewhere; the probe that picks the op's half base must say which, on this machine."""
    flags = read_cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert ops.cpu_half_gemm_is_native()
    elif flags and not {"avx512f", "avx_ne_convert"} & flags:
        assert not ops.cpu_half_gemm_is_native()
    else:
        pytest.skip("no /proc/cpuinfo, or a CPU between the two cases")


def test_fp16_gemm_probe_agrees_with_the_cpu():
    """oneDNN's fp16 GEMM needs AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT: where the CPU has none
    (the Zen 5 EPYC: AVX512-BF16 only) the fp16 base goes to MKL, and the probe must say so."""
    flags = read_cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    if "avx512_fp16" in flags:
        assert ops.cpu_half_gemm_is_native(torch.float16)
    elif not {"avx512_fp16", "amx_fp16", "avx_ne_convert"} & flags:
        assert not ops.cpu_half_gemm_is_native(torch.float16)
    else:
        pytest.skip("a CPU between the two cases")


@pytest.fixture
def fp16_only_mode():
    before = torch.ops.reclora.cpu_half_base(2)
    yield
    torch.ops.reclora.cpu_half_base(before)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_fp16_only_mode_matches_the_reference(fp16_only_mode, dtype, mix):
    """Mode 2 (MKL's base for fp16, ATen's for bf16): each dtype's op against float64."""
    case = Case(mix=mix, rows=3, tokens_per_row=40, d_in=70, d_out=33, rank=8)
    check_against_reference(case, "cpu", "cpu", dtype)


def test_default_half_base_follows_the_probe(monkeypatch):
    monkeypatch.delenv("RECLORA_CPU_HALF_BASE", raising=False)
    before = torch.ops.reclora.cpu_half_base(-1)
    try:
        ops._choose_cpu_half_base()
        expected = (1 if not ops.cpu_half_gemm_is_native(torch.bfloat16)
                    else 2 if not ops.cpu_half_gemm_is_native(torch.float16) else 0)
        assert torch.ops.reclora.cpu_half_base(-1) == expected
        monkeypatch.setenv("RECLORA_CPU_HALF_BASE", "aten")
        ops._choose_cpu_half_base()
        assert torch.ops.reclora.cpu_half_base(-1) == 0
        monkeypatch.setenv("RECLORA_CPU_HALF_BASE", "mkl")
        ops._choose_cpu_half_base()
        assert torch.ops.reclora.cpu_half_base(-1) == 1
    finally:
        torch.ops.reclora.cpu_half_base(before)

CASES = {
    # long packed rows: each row is cut into several runs; both threads get work
    "packed-long": dict(tokens=700, d_in=96, d_out=80, adapters=6, rank=8, rows=3, slots=3,
                        order="packed"),
    "dense-packed": dict(tokens=512, d_in=64, d_out=72, adapters=4, rank=4, rows=4, slots=4,
                         dense=True, order="packed"),
    "odd-shuffled": dict(tokens=61, d_in=37, d_out=29, adapters=5, rank=3, rows=7, slots=2),
    "k1-r1": dict(tokens=90, d_in=33, d_out=17, adapters=3, rank=1, rows=3, slots=1,
                  order="packed"),
    "dup-reversed": dict(tokens=300, d_in=40, d_out=48, adapters=3, rank=5, rows=3, slots=4,
                         duplicate=True, order="reversed"),
    "one-token-rows": dict(tokens=9, d_in=24, d_out=20, adapters=5, rank=3, rows=9, slots=2,
                           order="packed"),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mix", [0, 1], ids=["factor", "output"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_against_reference(case, mix, dtype, half_base):
    check(make(**CASES[case], dtype=dtype), mix, dtype)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("mix", [0, 1])
def test_empty_and_noncontiguous(dtype, mix):
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = make(
        80, 20, 14, 4, 3, 5, 2, dtype=dtype, order="packed")
    y1 = torch.ops.reclora.lora_mix_forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w,
                                            idx, 0.5, mix)[0]
    y2 = torch.ops.reclora.lora_mix_forward(
        x.t().contiguous().t(), row_ids, weight.t().contiguous().t(), bias,
        lora_a.transpose(1, 2).contiguous().transpose(1, 2), lora_b, adapter_w, idx, 0.5, mix)[0]
    assert torch.equal(y1, y2)
    empty = make(0, 20, 14, 4, 3, 5, 2, dtype=dtype)
    y, shrink = torch.ops.reclora.lora_mix_forward(*empty, 0.5, mix)
    assert y.shape == (0, 14) and y.dtype == dtype and shrink.dtype == torch.float32
    grads = torch.ops.reclora.lora_mix_backward(
        y, empty[0], empty[1], empty[2], empty[4], empty[5], empty[6], empty[7], shrink, 0.5,
        mix, True, True, True, True)
    assert all(g.dtype == dtype for g in grads)
    assert all(bool((g == 0).all()) for g in grads[1:])


def _peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results
                            .events() if e.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("mix", [0, 1])
def test_bf16_forward_makes_no_fp32_copy_of_weight(mix):
    """d = 512, T = 64: W in fp32 would be 1 MiB; y (64 KiB), the shrink and the per-row
    factors / concatenated bank (tens of KiB) are all the op may allocate."""
    d = 512
    args = make(64, d, d, 8, 8, 2, 4, dtype=torch.bfloat16, order="packed")
    peak = _peak_bytes(lambda: torch.ops.reclora.lora_mix_forward(*args, 0.5, mix))
    assert 0 < peak < 4 * d * d // 2, peak


def _nan_inputs(dtype, mix_dense, bad_value, length):
    args = make(6 * length, 48, 40, 5, 4, 6, 3, dense=mix_dense, dtype=dtype, order="packed")
    args[6][2, 1] = bad_value  # row 2's second weight
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("mix", [0, 1], ids=["factor", "output"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("length", [1, 40])
def test_bad_weight_non_finite_exactly_where_reference(dtype, dense, mix, bad, length,
                                                       half_base):
    """Issue 17 item 8: fp32 output mode with a NaN weight returned finite values (the weight
    reached BLAS as alpha); rows of 40 tokens take the fused path, rows of 1 the other."""
    args = _nan_inputs(dtype, dense, bad, length)
    y, _ = torch.ops.reclora.lora_mix_forward(*args, 0.75, mix)
    ref = lora_mix_reference(*[t.double() if t is not None and t.is_floating_point() else t
                               for t in args], 0.75, mix)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN pattern differs"
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), "non-finite pattern differs"
    rows = args[1]
    assert bool((~torch.isfinite(ref[rows == 2])).all())  # the bad row, all of it
    assert torch.isfinite(y[rows != 2]).all(), "another row saw the bad weight"
    fin = torch.isfinite(ref)
    err = ((y.double()[fin] - ref[fin]).abs().max() / ref[fin].abs().max()).item()
    assert err <= TOL[dtype]


@pytest.mark.parametrize("mix", [0, 1], ids=["factor", "output"])
def test_nan_weight_backward_stays_in_its_row(mix):
    """dx: the bad row's own dx may be non-finite, no other row's; the gradient of another
    row's weights stays finite."""
    args = _nan_inputs(torch.float32, False, float("nan"), 40)
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args
    y, shrink = torch.ops.reclora.lora_mix_forward(*args, 0.75, mix)
    g = torch.ones_like(y)
    g[row_ids == 2] = 0
    dx, _, _, _, _, dw = torch.ops.reclora.lora_mix_backward(
        g, x, row_ids, weight, lora_a, lora_b, adapter_w, idx, shrink, 0.75, mix, True, False,
        False, True)
    assert torch.isfinite(dx[row_ids != 2]).all()
    assert torch.isfinite(dw[torch.arange(6) != 2]).all()


@pytest.mark.parametrize("dtype, same_as", [(torch.float16, 1), (torch.bfloat16, 0)])
def test_fp16_only_mode_routes_each_dtype(dtype, same_as):
    """Mode 2 runs fp16's base in MKL (bit for bit mode 1's result: one rounding of base + LoRA)
    and bf16's in ATen (mode 0's); the two homes round differently, so a swap shows."""
    from op_cases import make_inputs, run

    case = Case(rows=2, tokens_per_row=64, d_in=96, d_out=80, rank=8)
    inputs = make_inputs(case, dtype=dtype, seed=5)
    out = {}
    for mode in (0, 1, 2):
        before = torch.ops.reclora.cpu_half_base(mode)
        try:
            out[mode] = run(inputs, case, "cpu")[0]
        finally:
            torch.ops.reclora.cpu_half_base(before)
    assert not torch.equal(out[0], out[1])  # else this case could not tell them apart
    assert torch.equal(out[2], out[same_as])
