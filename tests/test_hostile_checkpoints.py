"""Checkpoints whose metadata lies about their tensors (audit of the files the tools write,
findings 1 to 3):

- an adapter file whose JSON declares other sizes than its tensors is refused, naming the
  file, the key and both shapes, before any bank or gate is allocated (1);
- a CRM checkpoint whose schema or config declares other table sizes is refused the same
  way, with the load_state_dict line that says which tensor differs (2);
- a CRM checkpoint holding NaN or inf is refused, naming the file and the key (3).

Every declared size below would need far more than 100 GiB: the loads must fail fast with
the message, never reach the allocator (the builders are patched to fail if they run).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import reclora
import reclora.checkpoint as ckpt
import reclora.crm.train as crm_train
from reclora.crm import CRM_CLASSES, CRMBatch, CRMSchema, build_crm, load_crm, save_crm

HUGE = 10**12  # banks or tables of this many rows: terabytes


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ 1: load_adapters
def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


@pytest.fixture
def adapter_file(tmp_path):
    """(path of a gated save_adapters file, its tensors, its metadata as a dict)."""
    model = plain()
    reclora.inject(model, ["0", "2"], num_adapters=2, rank=2, gate_dim=4, gate_hidden=3)
    path = tmp_path / "good.safetensors"
    reclora.save_adapters(model, path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        return path, tensors, json.loads(handle.metadata()["reclora"])


def _rewritten(tmp_path, tensors, meta, name="bomb.safetensors"):
    path = tmp_path / name
    save_file(tensors, path, metadata={"reclora": json.dumps(meta)})
    return path


@pytest.fixture
def no_wrap(monkeypatch):
    """load_adapters must not build a layer (allocate its banks and gate) for these files."""
    def refuse(*args, **kwargs):
        raise AssertionError("wrap_module ran: the declared sizes were not checked first")
    monkeypatch.setattr(ckpt, "wrap_module", refuse)


@pytest.mark.parametrize("edit,key,declared,held", [
    (lambda c: c.update(num_adapters=HUGE), "0.lora_a", [HUGE, 2, 8], [2, 2, 8]),
    (lambda c: c.update(rank=HUGE), "0.lora_a", [2, HUGE, 8], [2, 2, 8]),
    (lambda c: c["gate"].update(hidden=HUGE), "0.gate.net.1.weight", [HUGE, 4], [3, 4]),
    (lambda c: c["gate"].update(in_features=HUGE), "0.gate.net.0.weight", [HUGE], [4]),
])
def test_adapter_metadata_declaring_huge_sizes_is_refused_before_allocating(
        adapter_file, tmp_path, no_wrap, edit, key, declared, held) -> None:
    """A 1 KB file declaring num_adapters 4e6 allocated 0.5 GiB of banks before its shapes
    were compared (1e12: an allocator error naming no file)."""
    _, tensors, meta = adapter_file
    edit(meta["layers"]["0"])  # the first layer: no layer may be built
    bomb = _rewritten(tmp_path, tensors, meta)
    model = plain()
    with pytest.raises(ValueError) as err:
        reclora.load_adapters(model, bomb)
    msg = str(err.value)
    assert "bomb.safetensors does not fit the model: mis-shaped keys: " in msg
    assert f"{key} (file {held}, model {declared})" in msg
    assert "layer '0' as the file's metadata declares it" in msg
    assert not reclora.reclora_layers(model)


def test_empty_tensors_cannot_vouch_for_a_huge_bank(adapter_file, tmp_path, no_wrap) -> None:
    """Banks [M, r, 0] cost no bytes in the file: the model's widths are compared too, not
    only the sizes the metadata names."""
    _, tensors, meta = adapter_file
    for name in ("0", "2"):
        meta["layers"][name]["num_adapters"] = 10**6
        meta["layers"][name]["gate"] = None
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.gate.")}
        tensors[f"{name}.lora_a"] = torch.zeros(10**6, 2, 0)
        tensors[f"{name}.lora_b"] = torch.zeros(10**6, 0, 2)
    bomb = _rewritten(tmp_path, tensors, meta)
    with pytest.raises(ValueError, match=r"bomb.safetensors does not fit the model: "
                                         r"mis-shaped keys: 0.lora_a \(file \[1000000, 2, 0\], "
                                         r"model \[1000000, 2, 8\]\)"):
        reclora.load_adapters(plain(), bomb)


def test_a_declared_layer_whose_tensors_are_absent_is_refused_even_non_strict(
        adapter_file, tmp_path, no_wrap) -> None:
    """strict=False lets a model layer go without the file's tensors, not a file layer: its
    banks were built at the declared size, randomly, bounded by nothing."""
    _, tensors, meta = adapter_file
    meta["layers"]["0"]["num_adapters"] = HUGE
    kept = {k: v for k, v in tensors.items() if not k.startswith("0.")}
    bomb = _rewritten(tmp_path, kept, meta)
    with pytest.raises(ValueError, match=r"bomb.safetensors does not fit the model: missing "
                                         r"keys: 0.lora_a, 0.lora_b, 0.gate.net.0.weight"):
        reclora.load_adapters(plain(), bomb, strict=False)


def test_a_good_adapter_file_still_loads(adapter_file) -> None:
    path, tensors, _ = adapter_file
    layers = reclora.load_adapters(plain(), path)
    assert torch.equal(layers["2"].lora_a.detach(), tensors["2.lora_a"])
    assert torch.equal(layers["2"].gate.net[1].weight.detach(), tensors["2.gate.net.1.weight"])


# ------------------------------------------------------------------ 2 and 3: load_crm
def _schema() -> CRMSchema:
    return CRMSchema(n_users=5, n_items=7, user_features=np.array([[0], [1], [2], [0], [1]]),
                     user_cardinalities=(3,), user_feature_names=("age",),
                     item_features=np.zeros((7, 0), np.int64), item_cardinalities=(),
                     item_feature_names=(), item_genre_ids=np.ones((7, 1), np.int64),
                     n_genres=2, user_known=np.ones(5, bool), item_known=np.ones(7, bool))


def _saved_crm(tmp_path, name="din") -> tuple:
    torch.manual_seed(0)
    small = {"dim": 8, "mlp_layers": 1}
    if name != "deepfm":  # DeepFM has no attention
        small.update(attention_hidden=(4,), **({"n_layers": 1} if name == "sim" else {}))
    model = build_crm(name, _schema(), **small)
    path = tmp_path / f"{name}.pt"
    save_crm(model, path, meta={"epoch": 1})
    return model, path, torch.load(path, weights_only=True)


def _batch() -> CRMBatch:
    hist = torch.tensor([[1, 2, 0], [3, 4, 2], [6, 5, 1]])
    return CRMBatch(user=torch.tensor([0, 2, 4]), item=torch.tensor([5, 1, 3]),
                    hist_items=hist, hist_ratings=torch.full(hist.shape, 4.0),
                    hist_mask=torch.ones(hist.shape, dtype=torch.bool),
                    time=torch.full((3,), 10**9), hist_times=torch.full(hist.shape, 10**9 - 60))


@pytest.fixture
def meta_builds_only(monkeypatch):
    """load_crm may build the declared model on the meta device only (no memory)."""
    real = crm_train.build_crm

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        devices = {t.device.type for t in model.state_dict().values()}
        assert devices == {"meta"}, "a CRM was built for real before its shapes were checked"
        return model
    monkeypatch.setattr(crm_train, "build_crm", build)


@pytest.mark.parametrize("name", sorted(CRM_CLASSES))
@pytest.mark.parametrize("part,edit,mismatch", [
    ("schema", {"rating_levels": HUGE}, r"size mismatch for embed.rating.weight: copying a "
     r"param with shape torch.Size\(\[6, 8\]\) from checkpoint, the shape in current model "
     rf"is torch.Size\(\[{HUGE}, 8\]\)"),
    ("schema", {"user_cardinalities": (HUGE,)}, r"size mismatch for embed.user_fields.0.weight"),
    ("schema", {"n_genres": HUGE}, r"size mismatch for embed.genre.weight"),
    ("config", {"dim": 10**6}, r"size mismatch for embed.user_id.weight"),
])
def test_a_crm_checkpoint_declaring_huge_tables_is_refused_before_allocating(
        tmp_path, meta_builds_only, name, part, edit, mismatch) -> None:
    """rating_levels 4e6 grew memory by 1 GiB, and the error said only "Error(s) in loading
    state_dict for DIN:" (its first line)."""
    _, _, payload = _saved_crm(tmp_path, name)
    payload[part].update(edit)
    bomb = tmp_path / "bomb.pt"
    torch.save(payload, bomb)
    with pytest.raises(ValueError, match=mismatch) as err:
        load_crm(bomb)
    assert "bomb.pt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit", [{"mlp_layers": 1000}, {"attention_hidden": (4,) * 1000}])
def test_a_crm_config_counting_more_layers_than_the_file_holds_is_refused(
        tmp_path, meta_builds_only, edit) -> None:
    """Even on the meta device, layers are built one module at a time: 10**4 took 5 s, and
    mlp_layers 10**12 would never end. 1000 keeps the test fast without the check too."""
    _, _, payload = _saved_crm(tmp_path)
    payload["config"].update(edit)
    bomb = tmp_path / "bomb.pt"
    torch.save(payload, bomb)
    key = next(iter(edit))
    with pytest.raises(ValueError, match=rf"bomb.pt.*config {key} .* more layers than the "
                                         r"file's \d+ tensors"):
        load_crm(bomb)


def test_a_crm_checkpoint_missing_a_tensor_names_it(tmp_path) -> None:
    _, _, payload = _saved_crm(tmp_path)
    del payload["state_dict"]["out.bias"]
    path = tmp_path / "short.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"short.pt.*Missing key\(s\) in state_dict: "
                                         r"\"out.bias\""):
        load_crm(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_crm_checkpoint_holding_nan_or_inf_is_refused(tmp_path, value) -> None:
    """One NaN in an item's id row loaded, and only the rows reading that item scored NaN."""
    _, _, payload = _saved_crm(tmp_path)
    payload["state_dict"]["embed.item_id.weight"][4, 0] = value
    path = tmp_path / "nan.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"nan.pt'?: non-finite values \(NaN or inf\) in "
                                         r"embed.item_id.weight"):
        load_crm(path)


def test_a_crm_state_dict_that_is_not_a_dict_is_refused(tmp_path) -> None:
    _, _, payload = _saved_crm(tmp_path)
    payload["state_dict"] = list(payload["state_dict"].values())
    path = tmp_path / "list.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"list.pt' is not a CRM checkpoint \(its "
                                         r"'state_dict' holds list"):
        load_crm(path)


@pytest.mark.parametrize("name", sorted(CRM_CLASSES))
def test_a_good_crm_checkpoint_loads_the_same_model(tmp_path, name) -> None:
    model, path, _ = _saved_crm(tmp_path, name)
    loaded, meta = load_crm(path)
    assert meta == {"epoch": 1} and not loaded.training
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert torch.equal(loaded.predict_proba(_batch()), model.predict_proba(_batch()))


# ------------------------------------------------------------------ 2026-12-08 audit
def test_save_adapters_refuses_nan_and_keeps_the_last_good_file(tmp_path) -> None:
    """load_adapters refuses NaN and inf, so a save of a diverged model replaced the last
    loadable file with one nothing could load."""
    model = plain()
    reclora.inject(model, ["0"], num_adapters=2, rank=2)
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(model, path)
    good = path.read_bytes()
    with torch.no_grad():
        model[0].lora_b[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"save_adapters: nothing written to .*0\.lora_b"):
        reclora.save_adapters(model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_load_adapters_reads_config_and_tensors_from_one_open(adapter_file, monkeypatch
                                                              ) -> None:
    """The metadata and the tensors come through one safe_open: read from two, a save
    between them mixed one file's config with another's banks."""
    opened = []
    real = ckpt.safe_open

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "safe_open", counting)
    reclora.load_adapters(plain(), adapter_file[0])
    assert len(opened) == 1
