"""load_adapters and shared modules: a file loads only into a model that shares its modules as
the saved model did (save_adapters records every name of each layer). Otherwise one module
was wrapped once per file layer and the last layer's banks won under every name, or a layer
saved as shared left its other names without adapters; both silently."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import randomise_adapters
from torch import nn

import reclora
from reclora import RecLoRALinear

F64 = torch.float64


class Net(nn.Module):
    """enc and dec: one Linear under two names (shared=True), or two with equal weights."""

    def __init__(self, shared: bool):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 6, dtype=F64)
        self.dec = self.enc if shared else copy.deepcopy(self.enc)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


class Stack(nn.Module):
    """Three blocks, one block object repeated (shared=True, ALBERT-style) or three copies."""

    def __init__(self, shared: bool):
        super().__init__()
        torch.manual_seed(0)
        block = nn.ModuleDict({"q": nn.Linear(6, 6, dtype=F64)})
        self.layers = nn.ModuleList(
            [block] * 3 if shared else [copy.deepcopy(block) for _ in range(3)])

    def forward(self, x):
        for block in self.layers:
            x = x + torch.tanh(block.q(x))
        return x


def saved(model, targets, path):
    randomise_adapters(reclora.inject(model, targets, num_adapters=2, rank=2), seed=1)
    reclora.save_adapters(model, path)
    return model


def untouched(model) -> bool:
    return not reclora.reclora_layers(model)


def without_aliases(path, out):
    """The file as save_adapters wrote it before it recorded aliases."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = json.loads(handle.metadata()["reclora"])
    del meta["aliases"]
    save_file(tensors, out, metadata={"reclora": json.dumps(meta)})
    return out


def test_a_file_of_distinct_layers_is_refused_by_a_model_sharing_them(tmp_path):
    path = tmp_path / "a.safetensors"
    saved(Net(shared=False), ("enc", "dec"), path)
    model = Net(shared=True)
    with pytest.raises(ValueError, match=r"a.safetensors: layer 'enc' was saved as one module "
                                         r"named \['enc'\], but in `model` that module is "
                                         r"named \['dec', 'enc'\]"):
        reclora.load_adapters(model, path)
    assert untouched(model)
    stack = tmp_path / "stack.safetensors"
    saved(Stack(shared=False), ("q",), stack)
    model = Stack(shared=True)
    with pytest.raises(ValueError, match="'layers.0.q' was saved as one module"):
        reclora.load_adapters(model, stack)
    assert untouched(model)
    # Into a model injected already (dec is enc, one layer): refused too.
    model = Net(shared=True)
    reclora.inject(model, ("enc",), num_adapters=2, rank=2)
    with pytest.raises(ValueError, match="saved as one module"):
        reclora.load_adapters(model, path, strict=False)


def test_a_file_of_a_shared_layer_is_refused_by_a_model_not_sharing_it(tmp_path):
    """strict=True loaded it and left dec a plain Linear (outputs 10% off the saved model)."""
    path = tmp_path / "a.safetensors"
    saved(Net(shared=True), ("enc",), path)
    model = Net(shared=False)
    with pytest.raises(ValueError, match=r"layer 'enc' was saved as one module named "
                                         r"\['dec', 'enc'\], but in `model` that module is "
                                         r"named \['enc'\]"):
        reclora.load_adapters(model, path)
    assert untouched(model)
    stack = tmp_path / "stack.safetensors"
    saved(Stack(shared=True), ("q",), stack)
    model = Stack(shared=False)
    with pytest.raises(ValueError, match="'layers.0.q' was saved as one module"):
        reclora.load_adapters(model, stack)
    assert untouched(model)


def test_shared_modules_load_into_the_same_sharing(tmp_path):
    x = torch.randn(3, 6, dtype=F64)
    for make, targets in ((Net, ("enc",)), (Stack, ("q",))):
        path = tmp_path / f"{make.__name__}.safetensors"
        source = saved(make(shared=True), targets, path)
        model = make(shared=True)
        layers = reclora.load_adapters(model, path)
        assert len(layers) == 1
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_a_file_without_aliases_still_loads(tmp_path):
    """Files saved before the aliases were recorded load as before in the unshared case; two
    of their layers that are one module in `model` are refused all the same."""
    x = torch.randn(3, 6, dtype=F64)
    source = saved(Net(shared=False), ("enc", "dec"), tmp_path / "a.safetensors")
    old = without_aliases(tmp_path / "a.safetensors", tmp_path / "old.safetensors")
    model = Net(shared=False)
    assert list(reclora.load_adapters(model, old)) == ["enc", "dec"]
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    model = Net(shared=True)
    with pytest.raises(ValueError, match=r"old.safetensors has layers 'enc' and 'dec', which "
                                         r"are one module in `model`"):
        reclora.load_adapters(model, old)
    assert untouched(model)
    saved(Stack(shared=False), ("q",), tmp_path / "s.safetensors")
    old = without_aliases(tmp_path / "s.safetensors", tmp_path / "old_stack.safetensors")
    model = Stack(shared=True)
    with pytest.raises(ValueError, match="has layers 'layers.0.q' and 'layers.1.q', which"):
        reclora.load_adapters(model, old)
    assert untouched(model)


def test_malformed_aliases_are_named(tmp_path):
    path = tmp_path / "a.safetensors"
    saved(Net(shared=False), ("enc",), path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = json.loads(handle.metadata()["reclora"])
    meta["aliases"] = {"enc": "enc"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={"reclora": json.dumps(meta)})
    with pytest.raises(ValueError, match="bad.safetensors: its metadata's 'aliases' is not"):
        reclora.load_adapters(Net(shared=False), bad)


def test_a_bare_layer_records_its_root_name(tmp_path):
    layer = RecLoRALinear.from_linear(nn.Linear(4, 4, dtype=F64), num_adapters=2, rank=1)
    reclora.save_adapters(layer, tmp_path / "root.safetensors")
    with safe_open(str(tmp_path / "root.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["reclora"])["aliases"] == {"": [""]}
    fresh = RecLoRALinear.from_linear(nn.Linear(4, 4, dtype=F64), num_adapters=2, rank=1)
    assert list(reclora.load_adapters(fresh, tmp_path / "root.safetensors")) == [""]
