"""Hard top-k gates (audit "paper", findings 2 and 3):

- top_k = 1 is refused, by the gate, by inject and in an adapter file: the softmax over one
  kept logit is 1 whatever the gate computes, so the gate got exactly zero gradient and
  routed every user by its random init for the whole of training, silently (2);
- equal logits at the cut keep the lower adapter index, on every device (torch.topk's order
  among ties is unspecified; on this CPU it kept the highest), and untied rows select exactly
  what torch.topk selects, with the same weights and gradients (3).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import reclora
from reclora.gates import PersonalizedGate

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ 2: top_k = 1
def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_top_k_1_is_refused_naming_the_reason() -> None:
    with pytest.raises(ValueError, match=r"`top_k` = 1 is refused: a gate with one kept "
                                         r"adapter has no gradient.*use top_k >= 2, or None"):
        PersonalizedGate(8, 4, top_k=1)
    for bad in (0, -1, 5, True, 2.0, "2"):
        with pytest.raises(ValueError, match=r"`top_k` must be None or an int in "
                                             r"\[2, num_adapters=4\], got "):
            PersonalizedGate(8, 4, top_k=bad)
    for good in (None, 2, 4):
        assert PersonalizedGate(8, 4, top_k=good).config.top_k == good


def test_inject_refuses_top_k_1_before_touching_the_model() -> None:
    model = plain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`top_k` = 1 is refused"):
        reclora.inject(model, ["0", "2"], num_adapters=4, rank=2, gate_dim=6, top_k=1)
    assert not reclora.reclora_layers(model)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_file_with_top_k_1_is_refused_naming_the_file(tmp_path) -> None:
    """A file saved before the refusal (or edited) may declare top_k = 1."""
    model = plain()
    reclora.inject(model, ["0", "2"], num_adapters=4, rank=2, gate_dim=6, gate_hidden=3,
                   top_k=2)
    good = tmp_path / "good.safetensors"
    reclora.save_adapters(model, good)
    with safe_open(str(good), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = json.loads(handle.metadata()["reclora"])
    meta["layers"]["2"]["gate"]["top_k"] = 1
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={"reclora": json.dumps(meta)})

    fresh = plain()
    with pytest.raises(ValueError, match=r"load_adapters: .*old.safetensors: cannot wrap module "
                                         r"'2': ValueError: .*`top_k` = 1 is refused"):
        reclora.load_adapters(fresh, old)
    assert not reclora.reclora_layers(fresh)
    # Into layers already injected with top_k = 2: refused as configured otherwise.
    with pytest.raises(ValueError, match=r"layer '2' is configured differently.*'top_k': 1"):
        reclora.load_adapters(model, old)
    assert reclora.load_adapters(plain(), good)["2"].gate.config.top_k == 2


# ------------------------------------------------------------------ 3: ties at the cut
def _gate_with_logits(bias: list[float], top_k: int) -> PersonalizedGate:
    """A gate whose logits are `bias` for every row (the last Linear's weight zeroed)."""
    gate = PersonalizedGate(4, len(bias), top_k=top_k, dtype=F64).eval()
    with torch.no_grad():
        gate.net[4].weight.zero_()
        gate.net[4].bias.copy_(torch.tensor(bias, dtype=F64))
    return gate


@pytest.mark.parametrize("top_k,kept", [(2, [1, 3]), (3, [1, 3, 5]), (4, [1, 3, 5, 2]),
                                        (6, [1, 3, 5, 2, 4, 0])])
def test_equal_logits_at_the_cut_keep_the_lower_index(top_k, kept) -> None:
    """Three logits tie for first, two for second, three for last; the cut falls inside a
    tie for k = 2, 4 and 6 (torch.topk kept adapters 5 and 3 at k = 2 on the CPU)."""
    bias = [0.0, 1.0, 0.5, 1.0, 0.5, 1.0, 0.0, 0.0]
    gate = _gate_with_logits(bias, top_k)
    for rows in (1, 7, 300):  # the choice does not depend on the batch
        weights, idx = gate(torch.randn(rows, 4, dtype=F64))
        assert idx.tolist() == [kept] * rows
        expected = torch.softmax(torch.tensor(bias, dtype=F64)[kept], -1)
        torch.testing.assert_close(weights, expected.expand(rows, -1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("num_adapters", [8, 40])  # past 16 the CPU's unstable sort reorders ties
def test_a_constant_user_row_ties_every_logit_at_init_and_keeps_the_first_k(num_adapters):
    """LayerNorm of a constant row is 0, and the biases start at 0: all M logits are 0."""
    torch.manual_seed(0)
    gate = PersonalizedGate(6, num_adapters, top_k=3).eval()
    reps = torch.randn(5, 6)
    reps[1] = 0.0
    reps[3] = 2.5
    weights, idx = gate(reps)
    for row in (1, 3):
        assert idx[row].tolist() == [0, 1, 2]
        torch.testing.assert_close(weights[row], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("top_k", [2, 3, 6])
@pytest.mark.parametrize("sqrt", [False, True])
def test_untied_rows_select_what_torch_topk_selects(top_k, sqrt) -> None:
    """Without ties the choice, its order, the weights and every gradient are torch.topk's."""
    torch.manual_seed(top_k)
    gate = PersonalizedGate(8, 6, top_k=top_k, sqrt=sqrt, dropout=0.0, dtype=F64)
    reps = torch.randn(64, 8, dtype=F64) * 3
    weights, idx = gate(reps)
    kept, want = torch.topk(gate.logits(reps), top_k, dim=-1)
    assert torch.equal(idx, want)
    probs = torch.softmax(kept, -1)
    torch.testing.assert_close(weights, probs.sqrt() if sqrt else probs, rtol=0, atol=1e-15)
    probe = torch.randn(64, top_k, dtype=F64)
    got = torch.autograd.grad((weights * probe).sum(), list(gate.parameters()))
    expected = torch.autograd.grad(((probs.sqrt() if sqrt else probs) * probe).sum(),
                                   list(gate.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
