"""export_peft: one row's mixture written as a standard PEFT LoRA adapter; loaded with
peft.PeftModel.from_pretrained on the un-injected base, it gives that row's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import VOCAB, build, output, randomise_adapters

import reclora

peft = pytest.importorskip("peft")
F64 = torch.float64
GATE_DIM = 9


def setup(family, **options):
    base = build(family)
    model = copy.deepcopy(base)
    targets = ("c_attn",) if family == "gpt2" else ("q_proj", "v_proj")
    layers = reclora.inject(model, targets, **{"num_adapters": 5, "rank": 3, "alpha": 12,
                                               "gate_dim": GATE_DIM, **options})
    randomise_adapters(layers, seed=3)
    return base, model


def peft_output(base, folder, ids):
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    return output(served, ids)


@pytest.mark.parametrize("family,options", [
    ("llama", {}),
    ("llama", {"mix": "output", "top_k": 2}),
    ("llama", {"top_k": 3, "sqrt": True, "temperature": 4.0}),
    ("gpt2", {}),
])
def test_export_round_trip(tmp_path, family, options):
    base, model = setup(family, **options)
    rows = 3
    ids = torch.randint(0, VOCAB, (rows, 6))
    users = torch.randn(rows, GATE_DIM, dtype=F64)
    with reclora.personalize(model, users):
        expected = output(model, ids)
    worst = 0.0
    for row in range(rows):
        folder = reclora.export_peft(model, tmp_path / f"user{row}", user_reps=users, row=row)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert config["r"] == (3 * 2 if options.get("mix") == "output" else 3)
        assert config["fan_in_fan_out"] == (family == "gpt2")
        got = peft_output(base, folder, ids[row:row + 1])
        worst = max(worst, ((got - expected[row:row + 1]).abs().max()
                            / expected[row:row + 1].abs().max()).item())
    print(f"\n{family} {options}: PEFT export round trip, max relative error {worst:.2e}")
    assert worst < 1e-12
    # Another user's adapter gives other outputs (the export is per user).
    other = peft_output(base, tmp_path / "user1", ids[:1])
    assert not torch.allclose(other, expected[:1])


def test_export_current_mixture_and_errors(tmp_path):
    base, model = setup("llama", gate_dim=None)
    layers = reclora.reclora_layers(model)
    ids = torch.randint(0, VOCAB, (2, 5))
    # No gates: the mixture each layer uses now (set_mixture rows, or uniform 1/M).
    w = torch.softmax(torch.randn(2, 5, dtype=F64), -1)
    first = next(iter(layers.values()))
    first.set_mixture(w)
    expected = output(model, ids)
    reclora.export_peft(model, tmp_path / "row1", row=1)
    got = peft_output(base, tmp_path / "row1", ids[1:])
    torch.testing.assert_close(got, expected[1:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`row`"):
        reclora.export_peft(model, tmp_path / "bad", row=2)
    with pytest.raises(ValueError, match="no RecLoRALinear"):
        reclora.export_peft(build("llama"), tmp_path / "none")


def test_export_leaves_gate_modes(tmp_path):
    _, model = setup("llama")
    model.train()
    reclora.export_peft(model, tmp_path / "u", user_reps=torch.randn(GATE_DIM, dtype=F64))
    assert all(layer.gate.training for layer in reclora.reclora_layers(model).values())
