"""The GPU cards' launch plans, run by the interpreter: the op's other tests run the
interpreter's own tile table (small tiles, no split-K), so the tiles a GPU takes (the
H100's and H200's tables: 64 x 128 expand tiles at 8 warps, a split-K shrink at decode
sizes, the fused GEMM's 128 x 256 tiles where a table turns it on) were only compiled here
(scripts/triton_aot_check.py), never computed. Here card_plan.use_card_tables plans every
launch as on the card and the interpreter runs those launches, forward and backward, against
the float64 reference.

One change from the card's plan: DOT_FP32 (half tiles multiplied in fp32). The interpreter's
dot of bf16/fp16 tiles is wrong (relative errors of 1e9 to 1e22 without it), a GPU's is not;
everything else (tiles, split-K, orders, the fused GEMM) is the card's."""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCE, Case, make_inputs, rel_err, run

from reclora_kernels import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="needs triton")

# The H100 has a table of its own; the H200 takes default.json's cuda table.
CARDS = ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
# Long rows and widths past one tile (d_in 200: a ragged last K block of 64; d_out 300: a
# ragged 128-wide N block), a rank below the 16-wide R block.
SIZES = dict(tokens_per_row=50, rows=3, d_in=200, d_out=300, adapters=5, rank=8, slots=2)


@pytest.fixture
def card_plans(monkeypatch):
    """use_card_tables(card) for the test, undone after it."""
    from reclora_kernels.triton import card_plan, configs, eager, launch

    for name in ("config", "interpreting", "_smem_optin", "_num_sms", "_flags"):
        monkeypatch.setattr(launch, name, getattr(launch, name))
    real_flags = launch._flags

    def use(card: str, fused: bool) -> None:
        card_plan.use_card_tables(card)
        launch._flags = lambda dtype: dict(
            real_flags(dtype), DOT_FP32=dtype in (torch.float16, torch.bfloat16))
        card_plan.force_fused(True if fused else None, card)

    yield use
    configs._table.cache_clear()  # force_fused's switches undone
    launch.clear_plans()
    eager._CALLS.clear()


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("fused", [False, True], ids=["cublas+expand", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix, dense, packed", [("factor", True, False), ("factor", False, True),
                                                ("output", False, False),
                                                ("output", True, True)])
def test_card_plans_compute_what_the_reference_does(card_plans, card, fused, dtype, mix,
                                                    dense, packed):
    card_plans(card, fused)
    case = Case(**SIZES, mix=mix, dense=dense, packed=packed)
    inputs = make_inputs(case)
    grad_out = torch.randn(case.rows * case.tokens_per_row if packed else case.rows,
                           *(() if packed else (case.tokens_per_row,)), case.d_out,
                           dtype=torch.float64)
    want, want_grads = run(inputs, case, "reference", grad_out)
    got, got_grads = run({k: v.to(dtype) if v is not None and v.is_floating_point() else v
                          for k, v in inputs.items()}, case, "triton", grad_out)
    assert rel_err(got, want) <= TOLERANCE[dtype]
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) <= TOLERANCE[dtype], name
