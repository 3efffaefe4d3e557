"""The benchmark's baselines (benchmarks/baselines.py) against the oracle, in float64.

A baseline that computes something other than lora_mix_linear would turn every speed ratio
in benchmarks/results/ into a comparison of different functions; these tests make that loud.
Forward and every gradient, both mixes, dense and gathered (with an adapter repeated within a
row), odd sizes, real-valued (negative) mixture weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import baselines  # noqa: E402
from reclora_kernels import lora_mix_linear  # noqa: E402

ROWS, LENGTH, D_IN, D_OUT, RANK, ADAPTERS, SLOTS = 3, 5, 24, 20, 4, 6, 3
SCALE = 1.7


def make_problem(gathered: bool, adapters: int = ADAPTERS, slots: int = SLOTS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    x = torch.randn(ROWS, LENGTH, D_IN, **f64)
    weight = torch.randn(D_OUT, D_IN, **f64) / D_IN**0.5
    bias = torch.randn(D_OUT, **f64)
    lora_a = torch.randn(adapters, RANK, D_IN, **f64)
    lora_b = torch.randn(adapters, D_OUT, RANK, **f64)
    if gathered:
        idx = torch.randint(0, adapters, (ROWS, slots), generator=g)
        if slots > 1:
            idx[0, 1] = idx[0, 0]  # the same adapter twice in one row must count twice
        w = torch.randn(ROWS, slots, **f64)
    else:
        idx = None
        w = torch.randn(ROWS, adapters, **f64)
    return x, weight, bias, lora_a, lora_b, w, idx


def oracle(x, weight, bias, lora_a, lora_b, w, idx, mix):
    return lora_mix_linear(
        x, weight, bias, lora_a, lora_b, w, idx, scale=SCALE, mix=mix, backend="reference"
    )


def forward_and_grads(fn, problem, mix, grad_y):
    leaves = [t.detach().clone().requires_grad_(True) for t in problem[:6]]
    y = fn(*leaves, problem[6], SCALE, mix)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), grads


NAMES = ["x", "weight", "bias", "lora_a", "lora_b", "adapter_w"]


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("name", sorted(baselines.TORCH_BASELINES))
def test_torch_baseline_matches_reference(name, mix, gathered):
    fn = baselines.TORCH_BASELINES[name]
    problem = make_problem(gathered)
    if name == "materialise+bmm" and mix == "output":
        with pytest.raises(ValueError, match="factor"):
            fn(*problem[:7], SCALE, mix)
        return
    grad_y = torch.randn(ROWS, LENGTH, D_OUT, dtype=torch.float64)
    want_y, want_g = forward_and_grads(lambda *a: oracle(*a[:7], a[8]), problem, mix, grad_y)
    got_y, got_g = forward_and_grads(fn, problem, mix, grad_y)
    torch.testing.assert_close(got_y, want_y, rtol=1e-10, atol=1e-10)
    for arg, got, want in zip(NAMES, got_g, want_g):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"d{arg}")


@pytest.mark.parametrize("name", sorted(baselines.TORCH_BASELINES))
def test_plain_lora_special_case(name):
    """M = 1, w = 1: plain LoRA, y = x W^T + b + scale * B A x, whichever mix."""
    x, weight, bias, lora_a, lora_b, _, _ = make_problem(False, adapters=1)
    w = torch.ones(ROWS, 1, dtype=torch.float64)
    want = torch.nn.functional.linear(x, weight, bias) + SCALE * (x @ lora_a[0].T) @ lora_b[0].T
    got = baselines.TORCH_BASELINES[name](x, weight, bias, lora_a, lora_b, w, None, SCALE, "factor")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _triton_or_skip():
    pytest.importorskip("triton")


@pytest.mark.parametrize("gathered", [True, False], ids=["k1-gathered", "M1-dense"])
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_vllm_stand_in_matches_reference(monkeypatch, mix, gathered):
    """The Triton stand-in, interpreted on the CPU (float64 dot in the interpreter)."""
    _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, bias, lora_a, lora_b, w, idx = make_problem(
        gathered, adapters=ADAPTERS if gathered else 1, slots=1
    )
    if gathered:
        idx[1, 0] = idx[0, 0]  # two rows share an adapter: one segment of 2 * LENGTH tokens
    args = [t.to(device) for t in (x, weight, bias, lora_a, lora_b, w)]
    idx_d = idx.to(device) if idx is not None else None
    got = baselines.vllm_style_shrink_expand(*args, idx_d, SCALE, mix)
    want = oracle(*args, idx_d, mix)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_vllm_stand_in_rejects_k_above_one():
    x, weight, bias, lora_a, lora_b, w, idx = make_problem(True)
    with pytest.raises(ValueError, match="k = 1"):
        baselines.vllm_style_shrink_expand(x, weight, bias, lora_a, lora_b, w, idx, SCALE, "factor")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_vllm_stand_in_bf16_on_gpu(mix):
    """The compiled (not interpreted) kernels, bf16 as benchmarked: odd sizes, decode-sized
    and prefill-sized segments, against the float64 oracle."""
    _triton_or_skip()
    g = torch.Generator().manual_seed(1)
    for rows, length, d_in, d_out, rank, adapters in (
        (7, 1, 200, 3424, 8, 5),
        (4, 70, 1000, 520, 16, 3),
    ):
        x = torch.randn(rows, length, d_in, generator=g)
        weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        lora_a = torch.randn(adapters, rank, d_in, generator=g) / d_in**0.5
        lora_b = torch.randn(adapters, d_out, rank, generator=g)
        idx = torch.randint(0, adapters, (rows, 1), generator=g)
        w = torch.rand(rows, 1, generator=g) + 0.5
        ins = [t.cuda().bfloat16() for t in (x, weight, lora_a, lora_b, w)]
        got = baselines.vllm_style_shrink_expand(
            ins[0], ins[1], None, ins[2], ins[3], ins[4], idx.cuda(), SCALE, mix
        )
        want = oracle(
            *[t.double() for t in ins[:2]], None, *[t.double() for t in ins[2:]], idx.cuda(), mix
        )
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)
