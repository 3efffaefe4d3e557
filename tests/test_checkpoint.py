"""save_adapters / load_adapters: exact round trip into a fresh model, clear errors on files
that do not fit, atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import VOCAB, build, output, randomise_adapters

import reclora
import reclora.checkpoint as ckpt
from reclora import RecLoRALinear

F64 = torch.float64
GATE_DIM = 10


def trained(family="llama", **kwargs):
    model = build(family, seed=0)
    options = {"num_adapters": 4, "rank": 2, "alpha": 8, "gate_dim": GATE_DIM,
               "temperature": 3.0, **kwargs}
    targets = ("c_attn",) if family == "gpt2" else ("q_proj", "v_proj")
    layers = reclora.inject(model, targets, **options)
    randomise_adapters(layers, seed=5)
    return model


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("family,options", [
    ("llama", {}),
    ("llama", {"top_k": 2, "sqrt": True, "mix": "output"}),
    ("gpt2", {}),
])
def test_round_trip_into_fresh_model(tmp_path, family, options):
    model = trained(family, **options)
    path = tmp_path / "adapters.safetensors"
    reclora.save_adapters(model, path)
    tensors, meta = read(path)
    assert all(".lora_" in k or ".gate." in k for k in tensors)  # no base weights
    config = json.loads(meta["reclora"])
    assert config["format"] == "reclora-adapters" and len(config["layers"]) == len(
        reclora.reclora_layers(model))

    fresh = build(family, seed=0)  # the same base, never injected
    layers = reclora.load_adapters(fresh, path)
    assert set(layers) == set(reclora.reclora_layers(model))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, VOCAB, (3, 6))
    users = torch.randn(3, GATE_DIM, dtype=F64)
    with reclora.personalize(model, users):
        expected = output(model, ids)
    with reclora.personalize(fresh, users):
        got = output(fresh, ids)
    assert torch.equal(got, expected)  # bit for bit
    # Loading again into the already-injected model works too (configs agree).
    reclora.load_adapters(fresh, path)


def test_float32_bank_round_trip(tmp_path):
    model = build("llama", dtype=torch.bfloat16)
    layers = reclora.inject(model, num_adapters=3, rank=2, gate_dim=GATE_DIM)
    randomise_adapters(layers)
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(model, path)
    assert read(path)[0]["model.layers.0.self_attn.q_proj.lora_a"].dtype == torch.float32
    fresh = build("llama", dtype=torch.bfloat16)
    reclora.load_adapters(fresh, path)
    for key, value in reclora.adapter_state_dict(model).items():
        assert torch.equal(reclora.adapter_state_dict(fresh)[key], value), key


def test_a_bank_comes_back_in_its_saved_dtype(tmp_path):
    """A bf16 bank (adapter_dtype) loaded into a freshly built model is bf16 again, so the
    gates mix exactly as the saved model's did (it came back float32: logits 3e-3 off)."""
    model = build("llama", dtype=torch.bfloat16)
    layers = reclora.inject(model, num_adapters=3, rank=2, gate_dim=GATE_DIM,
                            adapter_dtype=torch.bfloat16)
    randomise_adapters(layers)
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(model, path)
    fresh = build("llama", dtype=torch.bfloat16)
    for layer in reclora.load_adapters(fresh, path).values():
        assert layer.lora_a.dtype == layer.lora_b.dtype == torch.bfloat16
        assert all(p.dtype == torch.bfloat16 for p in layer.gate.parameters())
    ids = torch.randint(0, VOCAB, (3, 6))
    users = torch.randn(3, GATE_DIM)
    with reclora.personalize(model, users):
        want = output(model, ids)
    with reclora.personalize(fresh, users):
        assert torch.equal(output(fresh, ids), want)


def rewrite(path, out, edit):
    tensors, meta = read(path)
    edit(tensors)
    save_file(tensors, out, metadata=meta)
    return out


def test_files_that_do_not_fit(tmp_path):
    path = tmp_path / "good.safetensors"
    reclora.save_adapters(trained(), path)
    key = "model.layers.1.self_attn.v_proj.lora_b"
    cases = {
        "missing keys: model.layers.1.self_attn.v_proj.lora_b": lambda t: t.pop(key),
        "unexpected keys: model.layers.0.self_attn.q_proj.extra": lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.extra": torch.zeros(1)}),
        r"mis-shaped keys: model.layers.1.self_attn.v_proj.lora_b \(file \[4, 32, 3\]": (
            lambda t: t.update({key: torch.zeros(4, 32, 3, dtype=F64)})),
    }
    for i, (message, edit) in enumerate(cases.items()):
        bad = rewrite(path, tmp_path / f"bad{i}.safetensors", edit)
        fresh = build("llama")
        with pytest.raises(ValueError, match=message):
            reclora.load_adapters(fresh, bad)
        assert not reclora.reclora_layers(fresh)  # a failed load leaves the model untouched

    # A model injected differently from the file.
    other = build("llama")
    reclora.inject(other, num_adapters=4, rank=2, alpha=4, gate_dim=GATE_DIM, temperature=3.0)
    with pytest.raises(ValueError, match=r"configured differently.*alpha: model 4.0 vs file 8.0"
                       ) as err:
        reclora.load_adapters(other, path)
    assert str(path) in str(err.value)  # the file is named
    # A file naming a module the model lacks, and a file that is not ours.
    with pytest.raises(ValueError, match="which `model` lacks"):
        reclora.load_adapters(build("llama", layers=1), path)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a reclora adapter file"):
        reclora.load_adapters(build("llama"), plain)
    with pytest.raises(ValueError, match="no RecLoRALinear"):
        reclora.save_adapters(build("llama"), tmp_path / "none.safetensors")


def test_non_strict_allows_missing_layers(tmp_path):
    model = trained()
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(model, path)
    target = build("llama")
    reclora.inject(target, ("k_proj",), num_adapters=2, rank=1)  # extra layers, not in file
    with pytest.raises(ValueError, match="missing keys: model.layers.0.self_attn.k_proj"):
        reclora.load_adapters(target, path)
    layers = reclora.load_adapters(target, path, strict=False)
    assert sum(isinstance(m, RecLoRALinear) for m in layers.values()) == 6


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "adapters.safetensors"
    reclora.save_adapters(trained(), path)
    original = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        reclora.save_adapters(trained(), path)
    assert path.read_bytes() == original  # the old file is intact ...
    assert os.listdir(tmp_path) == ["adapters.safetensors"]  # ... and no temp file is left


class _Shared(torch.nn.Module):
    """One Linear registered under two names (enc and dec), run twice."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(6, 6, dtype=F64)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_load_wraps_a_shared_module_under_every_name(tmp_path):
    torch.manual_seed(0)
    net = _Shared()
    layers = reclora.inject(net, ("enc",), num_adapters=2, rank=1)
    randomise_adapters(layers, seed=1)
    reclora.save_adapters(net, tmp_path / "a.safetensors")
    fresh = _Shared()
    fresh.load_state_dict({k: v for k, v in net.state_dict().items()
                           if k in fresh.state_dict()}, strict=False)
    ckpt.load_adapters(fresh, tmp_path / "a.safetensors")
    assert isinstance(fresh.enc, RecLoRALinear) and fresh.dec is fresh.enc
    x = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_load_refuses_a_layer_whose_weight_is_read_directly(tmp_path):
    """As inject does: a file naming out_proj of a MultiheadAttention would load adapters that
    never run."""
    attention = torch.nn.MultiheadAttention(6, 2, dtype=F64)
    donor = torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 6, dtype=F64)})
    reclora.inject(donor, ("proj",), num_adapters=2, rank=1)
    tensors, meta = read_saved(donor, tmp_path / "d.safetensors")
    renamed = {k.replace("proj", "attn.out_proj", 1): v for k, v in tensors.items()}
    config = json.loads(meta["reclora"])
    config["layers"] = {"attn.out_proj": config["layers"]["proj"]}
    save_file(renamed, tmp_path / "m.safetensors", metadata={"reclora": json.dumps(config)})
    model = torch.nn.ModuleDict({"attn": attention})
    with pytest.raises(ValueError, match="m.safetensors.*inside a MultiheadAttention"):
        ckpt.load_adapters(model, tmp_path / "m.safetensors")
    assert type(model.attn.out_proj) is not RecLoRALinear  # untouched


def read_saved(model, path):
    reclora.save_adapters(model, path)
    return read(path)


def test_a_bare_layer_loads_into_a_layer_and_is_refused_by_a_plain_linear(tmp_path):
    """A bare RecLoRALinear is saved as layer "" (the model itself). Loaded into a plain
    nn.Linear, the root could not be replaced: the call returned {} and froze the linear."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8, dtype=F64)
    layer = RecLoRALinear.from_linear(base, num_adapters=2, rank=2)
    randomise_adapters({"": layer}, seed=1)
    path = tmp_path / "root.safetensors"
    reclora.save_adapters(layer, path)
    plain = torch.nn.Linear(8, 8, dtype=F64)
    plain.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match=r"root.safetensors holds a single layer saved as the "
                                         r"model itself, but `model` is a Linear"):
        reclora.load_adapters(plain, path)
    assert plain.weight.requires_grad  # untouched
    fresh = RecLoRALinear.from_linear(plain, num_adapters=2, rank=2)
    assert list(reclora.load_adapters(fresh, path)) == [""]
    x = torch.randn(3, 8, dtype=F64)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_paths_that_are_not_adapter_files_are_named(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    for name, message in (("empty.safetensors", "is not a readable safetensors file"),
                          ("corrupt.safetensors", "is not a readable safetensors file"),
                          ("missing.safetensors", "is not a file"), (".", "is not a file")):
        with pytest.raises(ValueError, match=rf"load_adapters: .*{message}"):
            reclora.load_adapters(build("llama"), tmp_path / name)


def test_a_bank_of_another_dtype_than_the_injected_layers_is_refused(tmp_path):
    """Into layers injected already, a file's banks and gates were cast to the layers' dtype
    silently: bf16 adapters loaded as float32 gave logits 3% off the saved model's."""
    path = tmp_path / "f32.safetensors"
    reclora.save_adapters(trained(adapter_dtype=torch.float32), path)
    model = build("llama")  # float64: inject's default bank dtype is float64 here
    reclora.inject(model, num_adapters=4, rank=2, alpha=8, gate_dim=GATE_DIM, temperature=3.0)
    before = {k: v.clone() for k, v in reclora.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"f32.safetensors does not fit the model: keys of "
                                         r"another dtype: model.layers.0.self_attn.q_proj.gate"
                                         r".* \(file F32, model float64\).*adapter_dtype"):
        reclora.load_adapters(model, path)
    after = reclora.adapter_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # untouched
    # Injected in the file's dtype, it loads.
    model = build("llama")
    reclora.inject(model, num_adapters=4, rank=2, alpha=8, gate_dim=GATE_DIM, temperature=3.0,
                   adapter_dtype=torch.float32)
    reclora.load_adapters(model, path)


def test_layers_sharing_a_gate_are_refused_by_save(tmp_path):
    """safetensors raised its own "Some tensors share memory" on the CPU (and on CUDA the
    file loaded back as two gates)."""
    from reclora.gates import PersonalizedGate

    gate = PersonalizedGate(4, 3, dtype=F64)
    net = torch.nn.Sequential(RecLoRALinear(6, 6, num_adapters=3, rank=2, gate=gate, dtype=F64),
                              RecLoRALinear(6, 6, num_adapters=3, rank=2, gate=gate, dtype=F64))
    with pytest.raises(ValueError, match=r"save_adapters: 0.gate.net.0.weight and "
                                         r"1.gate.net.0.weight are one tensor"):
        reclora.save_adapters(net, tmp_path / "a.safetensors")
    assert not os.listdir(tmp_path)
    net[1].gate = PersonalizedGate(4, 3, dtype=F64)  # its own gate: saved
    reclora.save_adapters(net, tmp_path / "a.safetensors")


def test_a_folder_file_written_during_the_replace_is_kept(tmp_path):
    """atomic_write_folder removed the old folder whole: a file another process wrote into it
    while the new one was being written was deleted."""
    folder = tmp_path / "user7"
    files = ("a.json", "b.bin")

    def write(version, intruder=False):
        def fill(tmp):
            for name in files:
                (tmp / name).write_text(version)
            if intruder:
                (folder / "notes.txt").write_text("keep me")
        return fill

    ckpt.atomic_write_folder(folder, write("1"), replaces=files)
    with pytest.warns(UserWarning, match=r"user7: written; the folder it replaced, .*\.old, is "
                                         r"kept: it holds notes.txt"):
        ckpt.atomic_write_folder(folder, write("2", intruder=True), replaces=files)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"a.json": "2", "b.bin": "2"}
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert [sorted(os.listdir(p)) for p in kept] == [["notes.txt"]]  # the old files gone
    assert (kept[0] / "notes.txt").read_text() == "keep me"


def test_a_rewrite_keeps_the_file_mode_and_writes_through_a_link(tmp_path):
    """atomic_write gave a 0600 file the umask's mode (0644: readable by all) and replaced a
    symbolic link by a regular file, leaving the file it pointed to as it was."""
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(trained(), path)
    os.chmod(path, 0o600)
    reclora.save_adapters(trained(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    reclora.save_adapters(trained(gate_dim=None), link)
    assert link.is_symlink() and os.readlink(link) == str(path)
    assert not json.loads(read(path)[1]["reclora"])["layers"][
        "model.layers.0.self_attn.q_proj"]["gate"]  # the target holds the new file
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "link.safetensors"]
