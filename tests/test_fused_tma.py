"""The fused GEMM's TMA variant (fused.TMA: x, W and y through tensor descriptors, in a
persistent tile loop), turned on for these tests with the fused GEMM itself: the float64
oracle (NaN-poisoned outputs) on descriptor-ready sizes, that the variant is what ran (the
forward reading W as [N, K], dx as [K, N]) and, where a layout rules it out (rows gathered
through a sort order, strided or unaligned operands), that the pointer variant runs instead.
Under the interpreter the descriptors are emulated (out-of-range blocks read as zeros,
stores clipped) and the interpreter table's PROGRAMS_PER_SM 3 makes programs loop over
tiles."""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCE, Case, gradcheck_op, make_inputs, record, rel_err, run
from test_op_hostile import inputs as hostile_inputs
from test_op_hostile import same_as_reference

import reclora_kernels as rk
from reclora_kernels.triton import configs, launch
from reclora_kernels.triton.card_plan import force_fused, force_tma

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLE = configs.table_key(torch.device(DEVICE))
ON_GPU_WITH_TMA = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
# fp32 keeps pointer loads on a GPU (launch._fused_tma: its TMA tile overran shared memory).
PACKED_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def expects_tma(dtype: torch.dtype) -> bool:
    """Whether the fused GEMM should take its TMA variant for dtype here: under the
    interpreter any dtype, on a GPU with TMA the tensor-core half types only."""
    return DEVICE == "cpu" or (ON_GPU_WITH_TMA and dtype in (torch.float16, torch.bfloat16))


@pytest.fixture(autouse=True)
def tma_on():
    force_fused(True, TABLE)
    force_tma(True, TABLE)
    yield
    force_fused(None, TABLE)


@pytest.fixture
def fused_runs(monkeypatch):
    """(TMA, W_NK, programs, tiles) of each fused GEMM launch made during the test."""
    runs = []
    real = launch.run_kernel

    def recording(meta, grid, *args):
        if meta.kwargs.get("TMA") is not None:  # the fused GEMM's LaunchMeta
            tokens, n_out = args[12], args[13]
            tiles = (-(-tokens // meta.kwargs["BLOCK_T"])) * (-(-n_out // meta.kwargs["BLOCK_N"]))
            runs.append((meta.kwargs["TMA"], meta.kwargs["W_NK"], grid[0], tiles))
        return real(meta, grid, *args)

    monkeypatch.setattr(launch, "run_kernel", recording)
    return runs


def check(inputs: dict, case: Case, dtype: torch.dtype) -> None:
    """The triton backend against the float64 reference on these inputs, forward and every
    gradient."""
    ref_inputs = {k: (v.detach().double().cpu() if v is not None and v.is_floating_point()
                      else (v.cpu() if v is not None else None)) for k, v in inputs.items()}
    y_ref, _ = run(ref_inputs, case, "reference")
    grad_out = torch.randn_like(y_ref)
    y_ref, g_ref = run(ref_inputs, case, "reference", grad_out)
    y, grads = run(inputs, case, "triton", grad_out)
    errors = {"y": rel_err(y.cpu(), y_ref)}
    errors.update({name: rel_err(grads[name].cpu(), ref) for name, ref in g_ref.items()})
    record("triton", dtype, errors)
    bad = {k: e for k, e in errors.items() if not e <= TOLERANCE[dtype]}
    assert not bad, f"triton/{dtype} (TMA): relative errors over {TOLERANCE[dtype]:g}: {bad}"


# d_in and d_out multiples of 8: rows of 16-byte multiples in every dtype. Sizes off the
# interpreter's 64 x 64 x 32 tiles so the descriptors' zero fill and clipping are exercised.
TMA_CASES = {
    "factor-gather": Case(d_in=40, d_out=24),
    "factor-dense": Case(dense=True, d_in=40, d_out=24),
    "output-gather": Case(mix="output", d_in=40, d_out=24),
    "output-dense": Case(mix="output", dense=True, d_in=40, d_out=24),
    "rank1-k1": Case(rank=1, slots=1, d_in=16, d_out=8),
    "duplicates": Case(duplicate=True, d_in=24, d_out=16),
    "no-bias": Case(bias=False, mix="output", d_in=40, d_out=24),
    "many-tiles": Case(rows=3, tokens_per_row=50, d_in=72, d_out=136, dense=True),
    "even-k": Case(d_in=128, d_out=56, rows=2, tokens_per_row=33),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
if DEVICE == "cpu":
    DTYPES.append(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(TMA_CASES))
def test_matches_reference_through_descriptors(fused_runs, dtype, name):
    case = TMA_CASES[name]
    check(make_inputs(case, dtype=dtype, device=DEVICE), case, dtype)
    if expects_tma(dtype):
        # The forward reads weight [N, K] by rows (W_NK), dx reads it as [K, N].
        assert [(tma, w_nk) for tma, w_nk, _, _ in fused_runs] == [(True, True), (True, False)]


def test_programs_loop_over_tiles(fused_runs):
    """The interpreter table's persistent grid: 3 programs for the 3 x 3 tiles of the
    forward, each running three (the grouped order across column blocks included)."""
    if DEVICE == "cuda":
        pytest.skip("the interpreter table's grid")
    case = TMA_CASES["many-tiles"]
    check(make_inputs(case, dtype=torch.float32, device=DEVICE), case, torch.float32)
    forward = fused_runs[0]
    assert forward[2] == 3 and forward[3] == 9


def test_gathered_rows_take_the_pointer_variant(fused_runs):
    """Unsorted row ids: x's rows are gathered through the sort order, which TMA cannot do."""
    case = Case(packed=True, rows=5, tokens_per_row=7, d_in=40, d_out=24)
    check(make_inputs(case, dtype=torch.float32, device=DEVICE), case, torch.float32)
    assert [tma for tma, *_ in fused_runs] == [False, False]


def test_sorted_packed_rows_take_the_descriptors(fused_runs):
    """Sorted row ids need no gather: packed x is read through descriptors, as implicit
    rows are (rows of uneven lengths, one of them empty)."""
    case = Case(packed=True, rows=5, tokens_per_row=7, d_in=40, d_out=24, dense=True)
    inputs = make_inputs(case, dtype=PACKED_DTYPE, device=DEVICE)
    row_ids = torch.tensor([0] * 9 + [1] * 3 + [3] * 20 + [4] * 3, device=DEVICE)
    inputs["row_ids"] = row_ids
    check(inputs, case, PACKED_DTYPE)
    if expects_tma(PACKED_DTYPE):
        assert [tma for tma, *_ in fused_runs] == [True, True]


def _forward_only(inputs: dict, case: Case) -> None:
    """The triton forward on these exact tensors (op_cases.run would clone its leaves into
    fresh, aligned, contiguous ones) against the float64 reference."""
    y_ref, _ = run({k: (v.double().cpu() if v is not None and v.is_floating_point() else v)
                    for k, v in inputs.items()}, case, "reference")
    y = rk.lora_mix_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"],
                           inputs["lora_b"], inputs["adapter_w"], inputs["adapter_idx"],
                           scale=case.scale, mix=case.mix, backend="triton")
    assert rel_err(y.double().cpu(), y_ref) < TOLERANCE[torch.float32]


def test_strided_x_takes_pointers(fused_runs):
    """x strided along d_in (no unit last stride): the forward is planned with the pointer
    variant (dx reads the contiguous output gradient, through descriptors)."""
    case = Case(noncontiguous=True, d_in=40, d_out=24)
    check(make_inputs(case, dtype=torch.float32, device=DEVICE), case, torch.float32)
    assert not fused_runs[0][0]


def test_odd_row_bytes_take_pointers(fused_runs):
    """x's rows 42 fp32 values apart (168 bytes, a slice of a wider buffer) while W's rows
    are aligned: TMA's stride rule rules x out, so the pointer variant is planned."""
    case = Case(dense=True, d_in=40, d_out=24)
    inputs = make_inputs(case, dtype=torch.float32, device=DEVICE)
    wide = torch.zeros(*inputs["x"].shape[:-1], 42, device=DEVICE)
    wide[..., :40] = inputs["x"]
    inputs["x"] = wide[..., :40]
    _forward_only(inputs, case)
    assert [tma for tma, *_ in fused_runs] == [False]


def test_expanded_rows_take_pointers(fused_runs):
    """Every token the same row of x (expand(): stride 0 along the tokens, which passes the
    16-byte rule): the pointer variant is planned, as a descriptor takes positive strides."""
    case = Case(dense=True, d_in=40, d_out=24)
    inputs = make_inputs(case, dtype=torch.float32, device=DEVICE)
    inputs["x"] = inputs["x"][:1, :1].expand_as(inputs["x"])
    _forward_only(inputs, case)
    assert [tma for tma, *_ in fused_runs] == [False]


@pytest.mark.parametrize("operand", ["x", "weight"])
def test_an_unaligned_base_falls_back_per_call(fused_runs, operand):
    """Rows 16-byte aligned but the tensor starting 4 bytes past a boundary (a slice of a
    larger buffer): the plan is TMA's, the call takes its pointer fallback, the result is the
    oracle's."""
    case = Case(dense=True, d_in=40, d_out=24)
    inputs = make_inputs(case, dtype=torch.float32, device=DEVICE)
    t = inputs[operand]
    flat = torch.empty(t.numel() + 1, device=DEVICE, dtype=t.dtype)
    shifted = flat[1:].view(t.shape).copy_(t)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    inputs[operand] = shifted
    _forward_only(inputs, case)
    assert [tma for tma, *_ in fused_runs] == [False]


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_nan_stays_in_its_row(mix):
    """One-token rows (nine in a tile): a NaN in one row's activations gives NaN in that
    row's output only, through descriptor loads and a clipped store."""
    p = hostile_inputs(1, rows=9, length=1, d_in=24, d_out=16)
    p["x"][4, 0, 3] = float("nan")
    p = {k: (v.to(DEVICE) if v is not None else v) for k, v in p.items()}
    same_as_reference(p, mix, backends=["triton"])
    y = rk.lora_mix_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                           p["adapter_w"], p["adapter_idx"], scale=0.7, mix=mix,
                           backend="triton")
    assert torch.isnan(y).flatten(1).any(1).tolist() == [r == 4 for r in range(9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_in_the_main_loop(fused_runs, dtype):
    """Rows of 128 tokens (two 64-token tiles each): the TMA variant runs the shrink in its
    main loop from the x tiles it loads, with a ragged d_in for A's masks."""
    case = Case(rows=2, tokens_per_row=128, d_in=72, d_out=88, dense=True)
    check(make_inputs(case, dtype=dtype, device=DEVICE), case, dtype)
    if expects_tma(dtype):
        assert fused_runs[0][:2] == (True, True)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 is not a GPU target")
def test_gradcheck():
    case = Case(rows=3, tokens_per_row=3, d_in=6, d_out=4, adapters=3, rank=2, slots=2)
    assert gradcheck_op(make_inputs(case, dtype=torch.float64, device=DEVICE), case, "triton")


def test_scratch_allocator_is_set_only_where_none_was():
    """Device-side descriptors need Triton's global scratch: the launch gives Triton torch's
    allocator when none is set, and keeps one a user set."""
    import triton
    from triton.runtime import _allocation

    before = _allocation._allocator.get()
    try:
        triton.set_allocator(_allocation._NULL_ALLOCATOR)
        launch._ensure_scratch_allocator()
        assert _allocation._allocator.get() is launch._scratch

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(mine)
        launch._ensure_scratch_allocator()
        assert _allocation._allocator.get() is mine
    finally:
        triton.set_allocator(before)


@pytest.mark.skipif(not ON_GPU_WITH_TMA, reason="needs a GPU with TMA (sm_90 or later)")
def test_the_probe_says_yes_on_a_tma_card():
    """The capability probe is true on a card that has TMA, so its plans take the variant."""
    assert launch._tma_capable(torch.device("cuda"))
