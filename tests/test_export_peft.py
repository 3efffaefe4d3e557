"""export_peft: one row's mixture written as a standard PEFT LoRA adapter; loaded with
peft.PeftModel.from_pretrained on the un-injected base, it gives that row's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_checkpoint import _Shared
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


class _Blocks(torch.nn.Module):
    """Three residual blocks: one block object repeated (ModuleList([block] * 3)), or three
    blocks holding one projection (blocks.i.proj the same Linear)."""

    def __init__(self, shared_block: bool):
        super().__init__()
        proj = torch.nn.Linear(6, 6, dtype=F64)
        if shared_block:
            self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": proj})] * 3)
        else:
            self.blocks = torch.nn.ModuleList(
                [torch.nn.ModuleDict({"proj": proj}) for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block["proj"](x))
        return x


def test_a_layer_under_several_names_is_refused(tmp_path):
    """PEFT adapts a module once, at its first name: the export's adapter ran under `enc` and
    not `dec` (21% off the RecLoRA model), silently."""
    torch.manual_seed(0)
    for model, names in ((_Shared(), "enc, dec"),
                         (_Blocks(shared_block=False), "blocks.0.proj, blocks.1.proj, "
                                                       "blocks.2.proj")):
        targets = ("enc",) if isinstance(model, _Shared) else ("proj",)
        reclora.inject(model, targets, num_adapters=2, rank=2)
        with pytest.raises(ValueError, match=rf"export_peft: layer '\w+(.0.proj)?' is one "
                                             rf"module under the names {names}; a PEFT adapter "
                                             r"cannot adapt a module under several parents"):
            reclora.export_peft(model, tmp_path / "u")
        assert not (tmp_path / "u").exists()


def test_a_repeated_block_exports(tmp_path):
    """ModuleList([block] * n): the shared object is the parent, and PEFT's setattr on it
    reaches every path, so the adapter is exact there."""
    torch.manual_seed(0)
    base = _Blocks(shared_block=True)
    model = copy.deepcopy(base)
    randomise_adapters(reclora.inject(model, ("proj",), num_adapters=3, rank=2), seed=1)
    x = torch.randn(1, 6, dtype=F64)
    expected = model(x)
    reclora.export_peft(model, tmp_path / "u")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "u").eval()
    torch.testing.assert_close(served(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(base(x), expected)  # the adapter does something


def test_a_bare_layer_is_refused(tmp_path):
    """Its name is "": PEFT refused the export at load time (no module matched)."""
    layer = reclora.RecLoRALinear.from_linear(torch.nn.Linear(6, 5, dtype=F64), num_adapters=2,
                                              rank=2)
    with pytest.raises(ValueError, match="export_peft: `model` is a bare RecLoRALinear"):
        reclora.export_peft(layer, tmp_path / "u")
    assert not (tmp_path / "u").exists()
