"""Checks made once must not be trusted after the checked tensors change (audit: caches).

set_mixture checks idx and snapshots row_ids once; a refill in place afterwards is refused at
the next forward (no host read: Tensor._version). A hand-built RowPlan, a gate swapped in
after construction, and written-into cached tensors never reach a kernel. Every error here is
raised before any kernel runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import reclora
from reclora import RecLoRALinear
from reclora.export import merged_factors
from reclora.gates import PersonalizedGate
from reclora.layers import uniform_mixture
from reclora_kernels import RowPlan, lora_mix_linear, row_plan
from reclora_kernels.plan import implicit_plan

BACKENDS = ["cpu", "reference"]
M = 4


def _layer(backend, gate=None):
    layer = RecLoRALinear(8, 8, num_adapters=M, rank=2, backend=backend, gate=gate)
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer


def _mixture():
    return torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[0, 1], [2, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [-1, M])
def test_idx_refilled_after_set_mixture_is_refused(backend, value):
    layer, x = _layer(backend), torch.randn(2, 3, 8)
    w, idx = _mixture()
    layer.set_mixture(w, idx)
    layer(x)
    idx[0, 0] = value
    with pytest.raises(RuntimeError, match="`idx` given to set_mixture was modified in place"):
        layer(x)
    idx[0, 0] = 3  # in range again: a new set_mixture checks it and the layer runs
    layer.set_mixture(w, idx)
    layer(x)
    layer.clear_mixture()
    layer(x)  # uniform: nothing left to watch


def test_row_ids_refilled_after_set_mixture_is_refused():
    layer, x = _layer("reference"), torch.randn(5, 8)
    w, idx = _mixture()
    ids = torch.tensor([0, 1, 1, 0, 1])
    layer.set_mixture(w, idx, row_ids=ids)
    layer(x)
    ids.copy_(torch.tensor([1, 1, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="`row_ids` given to set_mixture.*call set_mixture"):
        layer(x)


def test_weights_refill_and_copies_still_run():
    """Weights are not range-checked (refilling them is harmless); a deep copy of a layer whose
    idx was written in place before set_mixture is not taken for a refill."""
    layer, x = _layer("reference"), torch.randn(2, 3, 8)
    w, idx = _mixture()
    idx.add_(0)  # version 1 before set_mixture
    layer.set_mixture(w, idx)
    w.fill_(0.25)
    layer(x)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), layer(x))


def test_merged_factors_refuses_an_out_of_range_idx():
    layer = _layer("reference")
    for bad in (-1, M):
        with pytest.raises(IndexError, match=r"merged_factors: `idx` values must lie in \[0, 4\)"):
            merged_factors(layer, torch.tensor([0.5, 0.5]), torch.tensor([1, bad]))
    merged_factors(layer, torch.tensor([0.5, 0.5]), torch.tensor([1, 3]))


def test_a_hand_built_packed_plan_is_refused():
    ids = torch.tensor([0, 1, 1, 1])
    with pytest.raises(ValueError, match="must come from reclora_kernels.row_plan"):
        RowPlan(rows=2, tokens=4, row_ids=ids)
    good = row_plan(ids, 2)
    with pytest.raises(ValueError, match="row_start must be int32 \\[4\\]"):
        dataclasses.replace(good, rows=3)
    with pytest.raises(ValueError, match="row_ids must be int64"):
        dataclasses.replace(good, row_ids=ids.int())
    with pytest.raises(ValueError, match="tokens = rows \\* row_len"):
        RowPlan(rows=2, tokens=6, row_len=1)
    with pytest.raises(ValueError, match="holds no tensors"):
        RowPlan(rows=2, tokens=4, row_len=2, row_ids=ids)
    assert implicit_plan(2, 3).tokens == 6 and RowPlan(rows=2, tokens=6, row_len=3).implicit
    assert row_plan(torch.zeros(0, dtype=torch.long), 2).tokens == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_from_row_plan_run(backend):
    torch.manual_seed(0)
    x, weight = torch.randn(4, 8), torch.randn(8, 8)
    a, b = torch.randn(M, 2, 8), torch.randn(M, 8, 2)
    w, idx = _mixture()
    plan = row_plan(torch.tensor([1, 0, 1, 0]), 2)
    y = lora_mix_linear(x, weight, None, a, b, w, idx, plan=plan, backend=backend)
    ref = lora_mix_linear(x, weight, None, a, b, w, idx, row_ids=torch.tensor([1, 0, 1, 0]),
                          backend="reference")
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gate_swapped_in_for_another_bank_is_refused(backend):
    layer = _layer(backend, gate=PersonalizedGate(6, M, top_k=2))
    user, x = torch.randn(2, 6), torch.randn(2, 3, 8)
    with reclora.personalize(layer, user):
        layer(x)
    layer.gate = PersonalizedGate(6, 64, top_k=2)
    with reclora.personalize(layer, user), pytest.raises(RuntimeError, match="`gate` must be"):
        layer(x)
    layer.gate = PersonalizedGate(6, M, top_k=3)  # the same bank: fine
    with reclora.personalize(layer, user):
        layer(x)


def test_cached_implicit_row_ids_are_rebuilt_after_a_write():
    plan = RowPlan(rows=2, tokens=6, row_len=3)
    plan.token_rows(torch.device("cpu")).zero_()
    assert plan.token_rows(torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1]


def test_row_ids_made_under_a_func_transform_are_not_cached():
    """The reference op under torch.func.grad made the cached implicit row ids inside the
    transform: the cache kept the transform's wrapper, which did not count a later write (the
    rebuild test above failed when it ran after such a call)."""
    from reclora_kernels import plan as plans

    cpu = torch.device("cpu")
    plans._implicit_rows.cache_clear()  # else an entry made outside a transform is reused
    plan = RowPlan(rows=2, tokens=6, row_len=3)
    torch.func.grad(lambda s: (plan.token_rows(cpu).double() * s).sum())(
        torch.tensor(1.0, dtype=torch.float64))
    plan.token_rows(cpu).zero_()
    assert plan.token_rows(cpu).tolist() == [0, 0, 0, 1, 1, 1]


def test_cached_uniform_mixture_is_rebuilt_after_a_write():
    args = (2, M, torch.float32, torch.float32, torch.device("cpu"))
    uniform_mixture(*args).zero_()
    assert torch.equal(uniform_mixture(*args), torch.full((2, M), 1.0 / M))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_graph_keeps_the_adapter_idx_check(backend):
    """A torch.compile graph is traced once and runs on later indices no eager check saw."""
    torch._dynamo.reset()
    x, weight = torch.randn(2, 2, 8), torch.randn(8, 8)
    a, b = torch.randn(M, 2, 8), torch.randn(M, 8, 2)
    w, good = _mixture()

    def f(x, idx):
        return lora_mix_linear(x, weight, None, a, b, w, idx, backend=backend)

    g = torch.compile(f, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(g(x, good), f(x, good))
    for value in (-1, M):
        bad = good.clone()
        bad[0, 0] = value
        with pytest.raises(RuntimeError, match="`adapter_idx` values must lie in"):
            g(x, bad)
