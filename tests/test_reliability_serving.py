"""Serving-side reliability (audit of serving / export / checkpoint): export_peft writes its
two files as a pair and refuses NaN adapters and rows a batch lacks; load_adapters refuses
NaN, integer tensors and malformed metadata naming the file; read_table refuses a header
without the columns (no data rows too), a repeated column and missing (NaN) ids; request ids
are normalised as the dataset's reader does (MovieLens "007" is "7", GoodReads verbatim);
`reclora rank --candidates` refuses an empty, missing or unreadable file.

Everything here is built in the test (an nn.Sequential of two Linears, a few CSV lines); the
cases that need a served run live in tests/test_serving.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import reclora
import reclora.checkpoint as ckpt
from reclora.export import export_peft
from reclora.serving import ServingError, read_table

GATE_DIM = 6
REPS = torch.linspace(-1, 1, GATE_DIM)  # one user


def tiny(alpha: float = 8.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    layers = reclora.inject(model, ["0", "2"], num_adapters=4, rank=2, alpha=alpha,
                            gate_dim=GATE_DIM, top_k=2, temperature=1.0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_b.normal_()
    return model.eval()


def snapshot(folder) -> dict[str, bytes]:
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


# -------------------------------------------------------------- export_peft: a pair
@pytest.fixture
def exported(tmp_path):
    """(folder holding an export of a model with alpha 2, its bytes)."""
    folder = tmp_path / "adapter"
    export_peft(tiny(alpha=2.0), folder, user_reps=REPS)
    return folder, snapshot(folder)


def test_a_bad_argument_fails_before_the_folder_is_touched(exported) -> None:
    folder, before = exported
    with pytest.raises(TypeError, match="`task_type` must be a str"):
        export_peft(tiny(alpha=16.0, seed=1), folder, user_reps=REPS, task_type=3)
    with pytest.raises(TypeError, match="`base_model_name_or_path` must be a str"):
        export_peft(tiny(alpha=16.0, seed=1), folder, user_reps=REPS, base_model_name_or_path=1.5)
    assert snapshot(folder) == before
    assert sorted(os.listdir(folder.parent)) == ["adapter"]  # nothing left beside it
    # A path is a natural base name: written as its string.
    export_peft(tiny(alpha=16.0, seed=1), folder, user_reps=REPS,
                base_model_name_or_path=folder.parent / "base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.parent / "base")
    assert config["lora_alpha"] == 16.0


def test_a_failed_write_leaves_the_earlier_export_whole(exported, monkeypatch) -> None:
    """The weights are written, then the config fails (a full disk): the folder still holds
    the earlier pair, never the new weights (other banks: seed 1) under the old config."""
    folder, before = exported

    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(folder), "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_peft(tiny(alpha=16.0, seed=1), folder, user_reps=REPS)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert sorted(os.listdir(folder.parent)) == ["adapter"]


def test_a_failed_swap_puts_the_earlier_export_back(exported, monkeypatch) -> None:
    folder, before = exported
    rename = os.rename

    def fail_second(src, dst):  # the old folder goes aside; the new one fails to move in
        if str(src).endswith(".tmp"):
            raise OSError("interrupted")
        rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", fail_second)
    with pytest.raises(OSError, match="interrupted"):
        export_peft(tiny(alpha=16.0, seed=1), folder, user_reps=REPS)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert sorted(os.listdir(folder.parent)) == ["adapter"]


def test_a_re_export_replaces_both_files(exported) -> None:
    folder, before = exported
    model = tiny(alpha=16.0, seed=1)
    reps = torch.randn(GATE_DIM)
    export_peft(model, folder, user_reps=reps)
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 16.0
    got = load_file(folder / "adapter_model.safetensors")
    with reclora.personalize(model, reps):
        weights, idx, _ = model[0]._resolve_mixture()
    want = weights[0] @ model[0].lora_b[idx[0]].reshape(idx.shape[1], -1)
    assert torch.allclose(got["base_model.model.0.lora_B.weight"].reshape(-1), want)
    assert sorted(os.listdir(folder.parent)) == ["adapter"]


def test_a_folder_holding_other_files_is_refused(tmp_path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_peft(tiny(), folder, user_reps=REPS)
    assert snapshot(folder) == {"notes.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_peft(tiny(), tmp_path / "file", user_reps=REPS)


# ------------------------------------------------------- export_peft: NaN and rows
def test_export_refuses_nan_adapters(tmp_path) -> None:
    model = tiny()
    reps = torch.randn(2, GATE_DIM)
    reps[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`user_reps` row 0 holds NaN"):
        export_peft(model, tmp_path / "a", user_reps=reps, row=0)
    export_peft(model, tmp_path / "b", user_reps=reps, row=1)  # the other row is fine
    with torch.no_grad():
        model[2].lora_a[:, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"not finite .* in 2: their banks"):
        export_peft(model, tmp_path / "c", user_reps=reps, row=1)
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_export_refuses_a_row_the_batch_lacks(tmp_path) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"`row` must lie in \[0, 1\).*got 7"):
        export_peft(model, tmp_path / "a", user_reps=torch.randn(1, GATE_DIM), row=7)
    with pytest.raises(ValueError, match=r"`row` must lie in \[0, 1\).*got 1"):
        export_peft(model, tmp_path / "a", user_reps=torch.randn(GATE_DIM), row=1)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ load_adapters
@pytest.fixture
def saved(tmp_path):
    """(path of a save_adapters file, its tensors, its metadata)."""
    path = tmp_path / "a.safetensors"
    reclora.save_adapters(tiny(), path)
    with safe_open(str(path), framework="pt") as handle:
        return path, {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _untouched(model: nn.Module) -> bool:
    return not reclora.reclora_layers(model)


def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_load_refuses_nan_and_integer_tensors(saved, tmp_path) -> None:
    path, tensors, meta = saved
    bad = dict(tensors, **{"0.lora_a": tensors["0.lora_a"].clone()})
    bad["0.lora_a"][1, 0, 0] = float("nan")  # one adapter of a top-1 bank
    nan_file = tmp_path / "nan.safetensors"
    save_file(bad, nan_file, metadata=meta)
    model = plain()
    with pytest.raises(ValueError, match=r"nan.safetensors: non-finite values .* in 0.lora_a"):
        reclora.load_adapters(model, nan_file)
    assert _untouched(model)

    ints = {k: (v * 100).round().to(torch.int32) for k, v in tensors.items()}
    int_file = tmp_path / "int.safetensors"
    save_file(ints, int_file, metadata=meta)
    model = plain()
    with pytest.raises(ValueError, match=r"int.safetensors does not fit.*not of a floating "
                                         r"dtype: 0.gate.*\(file I32\)"):
        reclora.load_adapters(model, int_file)
    assert _untouched(model)


def _with_meta(path, tensors, meta, edit, out):
    raw = json.loads(meta["reclora"])
    raw = edit(raw) or raw
    save_file(tensors, out, metadata={"reclora": raw if isinstance(raw, str) else
                                      json.dumps(raw)})
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(layers=[]), "'layers' is not a dict of layer configs"),
    (lambda m: m["layers"].update({"0": 3}), "'layers' is not a dict of layer configs"),
    (lambda m: m["layers"]["0"].pop("rank") and None, "layer '0''s config lacks rank"),
    (lambda m: m["layers"]["0"]["gate"].pop("in_features") and None,
     r"cannot wrap module '0': KeyError"),
    (lambda m: [m], "metadata holds list, not a dict"),
    (lambda m: "{not json", "metadata is not JSON"),
])
def test_load_names_the_file_on_malformed_metadata(saved, tmp_path, edit, match) -> None:
    path, tensors, meta = saved
    bad = _with_meta(path, tensors, meta, edit, tmp_path / "meta.safetensors")
    model = plain()
    with pytest.raises(ValueError, match=match) as err:
        reclora.load_adapters(model, bad)
    assert "meta.safetensors" in str(err.value)
    assert _untouched(model)


# --------------------------------------------------------------------- read_table
def test_a_header_without_the_columns_is_refused_with_no_rows_too(tmp_path) -> None:
    csv = tmp_path / "req.csv"
    csv.write_text("uid,iid,ts\n")
    with pytest.raises(ServingError, match=r"req.csv: no column user_id, item_id, timestamp"):
        read_table(csv)
    with pytest.raises(ServingError, match=r"requests: no column timestamp"):
        read_table({"user_id": [], "item_id": []})
    csv.write_text("user_id,item_id,timestamp,note\n")  # the columns, no rows: 0 requests
    assert read_table(csv)["user_id"].size == 0


def test_a_repeated_column_is_refused(tmp_path) -> None:
    csv = tmp_path / "req.csv"
    csv.write_text("user_id,item_id,timestamp,user_id\n196,242,881250949,7\n")
    with pytest.raises(ServingError, match=r"req.csv: column user_id appears more than once"):
        read_table(csv)
    csv.write_text("user_id,item_id,timestamp,rating,rating\n")  # no rows: refused too
    with pytest.raises(ServingError, match="column rating appears more than once"):
        read_table(csv, ("user_id", "item_id", "timestamp", "rating"))
    # A column that is not read may repeat (other columns are ignored).
    csv.write_text("user_id,item_id,timestamp,note,note\n196,242,881250949,a,b\n")
    assert read_table(csv)["user_id"].tolist() == ["196"]


@pytest.mark.parametrize("table,match", [
    ({"user_id": [np.nan, 196.0], "item_id": ["1", "1"], "timestamp": [5, 5]},
     r"requests row 0: user_id is missing \(nan\)"),
    ({"user_id": np.asarray([196.0, np.inf]), "item_id": ["1", "1"], "timestamp": [5, 5]},
     r"requests row 1: user_id is missing \(inf\)"),
    ([{"user_id": "196", "item_id": np.float32("nan"), "timestamp": 5}],
     r"requests row 0: item_id is missing \(nan\)"),
])
def test_a_missing_id_names_the_row(table, match) -> None:
    with pytest.raises(ServingError, match=match):
        read_table(table)
    # A whole float id is the dataset's integer id.
    assert read_table({"user_id": [196.0], "item_id": ["1"], "timestamp": [5]}
                      )["user_id"].tolist() == ["196"]


# ------------------------------------------------------------ ids and --candidates
@pytest.mark.parametrize("fmt", ["ml-100k", "ml-1m", "ml-25m"])
def test_movielens_ids_are_normalised_as_the_reader_does(fmt) -> None:
    """One rule for the reader's user and item files and for serving's requests."""
    from reclora.data.base import id_normaliser
    from reclora.data.movielens import _id_table

    normalise = id_normaliser(fmt)
    assert [normalise(v) for v in ("7", "007", " 7 ", "+7", 7)] == ["7"] * 5
    assert list(_id_table([(1, "007", {})], "u.item")) == [normalise("007")]
    for bad in ("u7", "7.5", "1e3", "", 7.5):
        with pytest.raises(ValueError, match="is not a whole number"):
            normalise(bad)


def test_goodreads_ids_are_taken_verbatim() -> None:
    from reclora.data.base import id_normaliser

    normalise = id_normaliser("goodreads")
    assert [normalise(v) for v in ("007", "7", "8f2a1c", "u-1")] == ["007", "7", "8f2a1c", "u-1"]
    with pytest.raises(ValueError, match="unknown dataset format 'nosuch'"):
        id_normaliser("nosuch")


def test_candidates_from_a_list_or_a_file(tmp_path, monkeypatch) -> None:
    from reclora.serving import _candidates

    assert _candidates("242, 302,,377") == ["242", "302", "377"]
    lines = tmp_path / "c.txt"
    lines.write_text("\ufeff242\n\n302\n")  # a BOM and a blank line
    assert _candidates(str(lines)) == ["242", "302"]
    table = tmp_path / "c.csv"
    table.write_text("user_id,item_id\n1,242\n1,302\n")
    assert _candidates(str(table)) == ["242", "302"]
    # The text decides, not what exists: a bare name is an item id, ./name the file.
    (tmp_path / "cands").write_text("242\n")
    monkeypatch.chdir(tmp_path)
    assert _candidates("cands") == ["cands"]
    assert _candidates("./cands") == ["242"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", "", "no item ids in the file"),
    ("blank.txt", "\n  \n", "no item ids in the file"),
    ("header.csv", "item_id\n", "no item ids in the file"),
    ("header2.csv", "user_id,item_id\n\n", "no item ids in the file"),
    ("missing.txt", None, "no such file"),
    ("sub/missing", None, "no such file"),
    ("folder.csv", "DIR", "a folder, not a file"),
    ("latin1.txt", b"caf\xe9\n", "not a UTF-8 text file"),
])
def test_a_candidates_file_that_is_empty_or_missing_is_refused(tmp_path, name, content,
                                                               match) -> None:
    """An empty or header-only file ranked nothing with exit 0; a missing one became the
    item id '<path>'."""
    from reclora.serving import _candidates

    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ServingError, match=match):
        _candidates(str(path))


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_an_empty_candidates_list_is_refused(text) -> None:
    from reclora.serving import _candidates

    with pytest.raises(ServingError, match="no item ids"):
        _candidates(text)
