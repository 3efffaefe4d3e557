"""The row plan: implicit rows, sorted vs unsorted packed ids, one plan shared by many layers."""

from __future__ import annotations

import pytest
import torch
from op_cases import rel_err

import reclora
import reclora.injection
import reclora.layers
import reclora_kernels as rk
from reclora_kernels import row_plan
from reclora_kernels.plan import implicit_plan

BACKENDS = [b for b in rk.available_backends() if b != "reference"]
F64 = torch.float64


def problem(seed: int, rows=4, d_in=37, d_out=29, m=5, r=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    return {
        "weight": rand(d_out, d_in) / d_in**0.5, "bias": rand(d_out),
        "lora_a": rand(m, r, d_in) / d_in**0.5, "lora_b": rand(m, d_out, r),
        "adapter_w": rand(rows, m),
    }, gen


def call(p, x, backend, mix="factor", **kw):
    return rk.lora_mix_linear(x, p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                              p["adapter_w"], scale=0.5, mix=mix, backend=backend, **kw)


def test_row_plan_layouts():
    sorted_ids = torch.tensor([0, 0, 1, 3, 3, 3])
    plan = row_plan(sorted_ids, 4)
    assert plan.order is None and not plan.implicit  # sorted: no argsort
    assert plan.row_start.tolist() == [0, 2, 3, 3, 6]
    shuffled = torch.tensor([3, 0, 1, 3, 0, 3])
    plan = row_plan(shuffled, 4)
    assert plan.order is not None
    assert torch.equal(shuffled[plan.order.long()], plan.sorted_rows.long())
    assert plan.row_start.tolist() == [0, 2, 3, 3, 6]
    imp = implicit_plan(3, 5)
    assert imp.implicit and imp.row_ids is None and imp.order is None
    assert torch.equal(imp.token_rows(torch.device("cpu")), torch.arange(15) // 5)


def test_row_plan_errors():
    with pytest.raises(IndexError, match=r"`row_ids` values must lie in \[0, 3\)"):
        row_plan(torch.tensor([0, 3]), 3)
    with pytest.raises(IndexError, match="`row_ids`"):
        row_plan(torch.tensor([-1, 0]), 3)
    with pytest.raises(TypeError, match="integer"):
        row_plan(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="1-D"):
        row_plan(torch.zeros(2, 2, dtype=torch.long), 3)
    assert row_plan(torch.zeros(0, dtype=torch.long), 0).tokens == 0


@pytest.mark.parametrize("bad", [3, -1, 10**8])
def test_unchecked_plans_still_refuse_ids_out_of_range(bad):
    """check=False skips the host read, not the check: the Triton kernels read tables
    through a plan's ids, and an id of 1e8 in an unchecked plan segfaulted (3 or -1 gave
    finite values silently). On the CPU the plan checks them as check=True does."""
    with pytest.raises(IndexError, match=r"`row_ids` values must lie in \[0, 3\)"):
        row_plan(torch.tensor([0, 1, bad, 2, 0]), 3, check=False)
    assert row_plan(torch.tensor([2, 0, 1]), 3, check=False).rows == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unchecked_plans_assert_on_the_device():
    """On a GPU an unchecked plan makes no host read: an id out of range stops the work at a
    device-side assert. Run in a child process: the assert leaves its CUDA context unusable."""
    import subprocess
    import sys

    code = ("import torch, reclora_kernels as rk\n"
            "ids = torch.tensor([0, 1, 10**8, 2], device='cuda')\n"
            "rk.row_plan(ids, 3, check=False)\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "row_ids" in run.stderr or "device-side assert" in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_implicit_sorted_unsorted_agree(backend, mix):
    """x [R, L, d] (implicit rows), the same tokens packed with sorted ids, and shuffled with
    unsorted ids (raw row_ids or a plan) give the same outputs and gradients."""
    p, gen = problem(1)
    rows, length = 4, 9
    x = torch.randn(rows, length, 37, generator=gen)
    y_imp = call(p, x, backend, mix)
    ids = torch.arange(rows).repeat_interleave(length)
    y_sorted = call(p, x.reshape(-1, 37), backend, mix, plan=row_plan(ids, rows))
    perm = torch.randperm(ids.numel(), generator=gen)
    y_raw = call(p, x.reshape(-1, 37)[perm], backend, mix, row_ids=ids[perm])
    y_plan = call(p, x.reshape(-1, 37)[perm], backend, mix, plan=row_plan(ids[perm], rows))
    ref = call({k: v.double() for k, v in p.items()}, x.double(), "reference", mix)
    assert rel_err(y_imp, ref) < 2e-5
    assert rel_err(y_sorted.view(rows, length, -1), ref) < 2e-5
    assert rel_err(y_raw, ref.reshape(-1, ref.shape[-1])[perm]) < 2e-5
    assert torch.equal(y_raw, y_plan)

    # Gradients through a shared plan (the backward reuses it, no new sort).
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    xs = x.reshape(-1, 37)[perm].clone().requires_grad_(True)
    plan = row_plan(ids[perm], rows)
    out = call(leaves, xs, backend, mix, plan=plan)
    grads = torch.autograd.grad(out.square().sum(), [xs, leaves["lora_a"], leaves["adapter_w"]])
    ref_leaves = {k: v.double().requires_grad_(True) for k, v in p.items()}
    xr = x.double().reshape(-1, 37)[perm].clone().requires_grad_(True)
    out_r = call(ref_leaves, xr, "reference", mix, row_ids=ids[perm])
    ref_grads = torch.autograd.grad(out_r.square().sum(),
                                    [xr, ref_leaves["lora_a"], ref_leaves["adapter_w"]])
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 5e-5


def test_plan_must_fit_the_call():
    p, gen = problem(2)
    x = torch.randn(6, 37, generator=gen)
    with pytest.raises(ValueError, match="`plan`"):
        call(p, x, "reference", plan=row_plan(torch.tensor([0, 1, 2, 3, 0]), 4))
    with pytest.raises(ValueError, match="`row_ids`"):
        call(p, x, "reference", plan=row_plan(torch.tensor([0, 1, 2, 3, 0, 1]), 4),
             row_ids=torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(TypeError, match="RowPlan"):
        call(p, x, "reference", plan="sorted")


def test_personalize_makes_one_plan_shared_by_every_layer(monkeypatch):
    """personalize(row_ids=...) builds the plan once; every layer's op call gets that object."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(12, 12) for _ in range(4)))
    reclora.inject(model, r"\d+", num_adapters=3, rank=2, gate_dim=5)
    built, seen = [], []
    real_plan, real_op = reclora.injection.row_plan, reclora.layers.lora_mix_linear

    def spy_plan(*args, **kw):
        built.append(real_plan(*args, **kw))
        return built[-1]

    def spy_op(*args, **kw):
        seen.append(kw["plan"])
        return real_op(*args, **kw)

    monkeypatch.setattr(reclora.injection, "row_plan", spy_plan)
    monkeypatch.setattr(reclora.layers, "lora_mix_linear", spy_op)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    with reclora.personalize(model, torch.randn(3, 5), row_ids=ids):
        model(torch.randn(ids.numel(), 12))
    assert len(built) == 1 and len(seen) == 4
    assert all(plan is built[0] for plan in seen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_refilling_the_row_ids_buffer_before_backward(backend, mix):
    """A training loop may copy the next batch's row ids into its buffer before this batch's
    backward: the plan holds its own copy (Triton's output-mode dw read the new ids)."""
    p, gen = problem(3)
    tokens = 13
    ids = torch.randint(0, 4, (tokens,), generator=gen)
    first = ids.clone()
    x = torch.randn(tokens, 37, generator=gen)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    y = call(leaves, x, backend, mix, plan=row_plan(ids, 4))
    ids.copy_(torch.randint(0, 4, (tokens,), generator=gen))  # the next batch's ids
    assert not torch.equal(ids, first)
    grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
    ref = {k: v.detach().double().requires_grad_(True) for k, v in p.items()}
    y_ref = call(ref, x.double(), "reference", mix, row_ids=first)
    want = torch.autograd.grad(y_ref.square().sum(), list(ref.values()))
    for name, got, w in zip(leaves, grads, want):
        assert rel_err(got, w) < 1e-5, name
