"""Operands whose offsets would wrap Triton's int32 index products. Triton passes an int
argument that fits as int32 and the kernels multiply int32 column indices by the strides, so a
column-major x with T * d_in >= 2**31 (or a transposed bank, or a fused GEMM's weight of
>= 2**31 elements) would read the wrong memory, silently. Such operands reach 2**31 only at
many GB, so the tests lower the limit (launch.INT32_OFFSETS) and check what the launches
receive, with the results against the float64 reference, and that nothing is copied below it."""

from __future__ import annotations

import pytest
import torch
from op_cases import count_calls, rel_err

import reclora_kernels as rk
from reclora_kernels.triton import configs, launch
from reclora_kernels.triton.card_plan import force_fused

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, D_IN, D_OUT, M, R, ROWS = 24, 40, 36, 5, 4, 3


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims' strides swapped (a transposed copy's view)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(
        x=_column_major(rand(T, D_IN)),
        weight=rand(D_OUT, D_IN) / D_IN**0.5, bias=rand(D_OUT),
        # the bank stored as [d_in, r, M] and viewed as [M, r, d_in]: its d_in stride is r*M
        lora_a=(rand(D_IN, R, M) / D_IN**0.5).permute(2, 1, 0),
        lora_b=rand(M, D_OUT, R) / R**0.5,
        adapter_w=rand(ROWS, 2),
        adapter_idx=torch.randint(0, M, (ROWS, 2), generator=gen),
        row_ids=torch.randint(0, ROWS, (T,), generator=gen),
        grad_y=_column_major(rand(T, D_OUT)),
    ), dtype


def _run(inputs, dtype, backend, mix):
    diff = ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w")
    leaves = {k: (inputs[k].to(dtype).detach().requires_grad_(True)
                  if backend != "reference" else inputs[k].detach().requires_grad_(True))
              for k in diff}
    y = rk.lora_mix_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                           leaves["lora_b"], leaves["adapter_w"], inputs["adapter_idx"],
                           scale=0.5, mix=mix, row_ids=inputs["row_ids"], backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), inputs["grad_y"].to(y.dtype))
    return [y, *grads]


def _to_device(inputs):
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@pytest.fixture
def launched(monkeypatch):
    """(shape, strides) of every tensor of two or more dims that a Triton launch received
    during the test, with the plan caches cleared before and after."""
    seen = []
    real = launch.run_kernel

    def run_kernel(meta, grid, *args):
        seen.extend((tuple(a.shape), a.stride()) for a in args
                    if isinstance(a, torch.Tensor) and a.dim() >= 2)
        return real(meta, grid, *args)

    launch.clear_plans()
    monkeypatch.setattr(launch, "run_kernel", run_kernel)
    yield seen
    launch.clear_plans()


def _column_offsets(shape: tuple, strides: tuple) -> int:
    """The largest offset past the leading dim (the one the kernels index in int64)."""
    return sum((n - 1) * s for n, s in zip(shape[1:], strides[1:]) if n > 0)


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_operands_past_int32_offsets_are_launched_contiguous(monkeypatch, launched, mix):
    inputs, dtype = _inputs()
    # x, grad_y and bank A each span more than 256 elements past their leading dim.
    monkeypatch.setattr(launch, "INT32_OFFSETS", 256)
    got = _run(_to_device(inputs), dtype, "triton", mix)
    assert launched
    assert all(_column_offsets(*t) < 256 for t in launched), launched
    want = _run(inputs, torch.float64, "reference", mix)
    errors = [rel_err(g.cpu().double(), w) for g, w in zip(got, want)]
    assert max(errors) < 2e-5, errors


def test_operands_within_int32_offsets_are_not_copied(launched):
    inputs, dtype = _inputs()
    _run(_to_device(inputs), dtype, "triton", "output")
    strides = {t[1] for t in launched}
    assert (1, T) in strides  # x and grad_y, column-major as given
    assert (1, M, R * M) in strides  # bank A as stored


@pytest.fixture
def fused_on():
    table = configs.table_key(torch.device(DEVICE))
    force_fused(True, table)
    yield
    force_fused(None, table)


def test_fused_gemm_steps_aside_for_a_weight_past_int32(monkeypatch, launched, fused_on):
    inputs, dtype = _inputs()
    fused = count_calls(monkeypatch, launch, "_run_fused")
    expand = count_calls(monkeypatch, launch, "_run_expand")
    _run(_to_device(inputs), dtype, "triton", "factor")
    assert len(fused) == 2 and not expand  # forward and dx: the fused GEMM, as forced
    launch.clear_plans()
    monkeypatch.setattr(launch, "INT32_OFFSETS", D_OUT * D_IN - 1)  # W's last offset is this
    got = _run(_to_device(inputs), dtype, "triton", "factor")
    assert len(fused) == 2 and len(expand) == 2  # cuBLAS + the expand took both
    want = _run(inputs, torch.float64, "reference", "factor")
    errors = [rel_err(g.cpu().double(), w) for g, w in zip(got, want)]
    assert max(errors) < 2e-5, errors
