"""Issue 16 items 1 and 5: CRM data gathered per minibatch (bounded memory, same numbers as
the full-batch path), and reclora.data read from the bottom up (no import circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_synthetic, write_ml1m, write_ml25m

from reclora.crm import (
    CRMBatch,
    CRMSchema,
    CRMTrainConfig,
    SplitSamples,
    build_crm,
    dataset_batches,
    dataset_splits,
    predict,
    train_crm,
    train_crm_on_dataset,
)
from reclora.data.base import load_dataset

DATA = Path(__file__).resolve().parents[1] / "reclora" / "data"
# reclora.data bottom up: a module may import only modules before it.
ORDER = ["errors", "paths", "text", "dataset", "splits", "movielens", "goodreads", "fetch",
         "base", "embeddings", "prompts", "cli", "__init__"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """About 2,000 interactions, 1,500 samples: several minibatches per split."""
    s = make_synthetic(seed=7, n_users=90, n_items=40, per_user=(12, 30), time_span=4000)
    return load_dataset(write_ml1m(tmp_path_factory.mktemp("d"), s), min_history=1, core=1)


def _fresh(name: str, ds, seed: int = 0):
    torch.manual_seed(seed)
    return build_crm(name, CRMSchema.from_dataset(ds))


# ------------------------------------------------------------------ minibatches
def test_training_never_gathers_more_than_a_minibatch(ds, monkeypatch) -> None:
    """Every history gather of training and evaluation is one minibatch, never a split."""
    sizes: list[int] = []
    gather = ds.recent_history

    def spy(samples, k):
        sizes.append(len(samples))
        return gather(samples, k)

    monkeypatch.setattr(ds, "recent_history", spy)
    cfg = CRMTrainConfig(epochs=2, patience=2, batch_size=64, eval_batch_size=100,
                         history_len=8, progress=False)
    sp = dataset_splits(ds, cfg.history_len)
    assert min(len(sp["train"]), len(sp["valid"]) + len(sp["test"])) > 100
    res = train_crm(_fresh("din", ds), sp["train"], sp["valid"], sp["test"], cfg)
    assert sizes and max(sizes) <= max(cfg.batch_size, cfg.eval_batch_size)
    n_epochs = len(res.epochs)
    assert sum(sizes) == n_epochs * (len(sp["train"]) + len(sp["valid"])) + len(sp["test"])
    # Training draws are batch_size at most; every larger one is an evaluation chunk.
    assert sum(1 for s in sizes if s > cfg.batch_size) <= n_epochs * 2 + 2
    sizes.clear()
    predict(res.model, sp["test"], batch_size=37)
    assert max(sizes) <= 37 and sum(sizes) == len(sp["test"])


@pytest.mark.parametrize("name", ["din", "sim", "deepfm"])
def test_minibatch_path_equals_the_full_batch_path(ds, name) -> None:
    """Same seed: SplitSamples (gathered per minibatch) and whole-split CRMBatches give the
    same epochs, the same weights bit for bit and the same predictions."""
    cfg = CRMTrainConfig(epochs=2, patience=2, batch_size=64, eval_batch_size=128,
                         history_len=10, max_train_samples=700, progress=False)
    full = dataset_batches(ds, cfg.history_len)
    lazy = dataset_splits(ds, cfg.history_len)
    assert isinstance(full["train"], CRMBatch) and isinstance(lazy["train"], SplitSamples)
    a = train_crm(_fresh(name, ds), full["train"], full["valid"], full["test"], cfg)
    b = train_crm(_fresh(name, ds), lazy["train"], lazy["valid"], lazy["test"], cfg)
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in a.epochs] == \
        [{k: v for k, v in r.items() if k != "elapsed_s"} for r in b.epochs]
    assert a.valid == b.valid and a.test == b.test and a.n_train == b.n_train == 700
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    np.testing.assert_array_equal(predict(a.model, full["test"], 50),
                                  predict(b.model, lazy["test"], 50))


def test_split_samples_batch_equals_the_full_batch_rows(ds) -> None:
    full = dataset_batches(ds, 12, splits=("train",))["train"]
    lazy = dataset_splits(ds, 12, splits=("train",))["train"]
    idx = torch.randperm(len(lazy), generator=torch.Generator().manual_seed(1))[:77]
    for index in (idx, idx.numpy(), slice(5, 40)):
        x, y = full.select(index), lazy.batch(index)
        for f in ("user", "item", "hist_items", "hist_ratings", "hist_mask", "time",
                  "hist_times", "label"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
    sub = lazy.select(idx)
    assert len(sub) == 77 and torch.equal(sub.label, full.label[idx])
    with pytest.raises(ValueError, match="history_len"):
        SplitSamples(ds, ds.train, 0)


@pytest.mark.parametrize("k", [1, 3, 25, 200])
def test_recent_history_equals_the_generic_gather(ds, k) -> None:
    """recent_history's numpy path = gather_history(recent_positions), padding included."""
    s = np.concatenate([ds.samples, np.flatnonzero(ds.hist_len == 0)[:5]])
    a = ds.recent_history(s, k)
    b = ds.gather_history(s, *ds.recent_positions(s, k))
    for f in ("items", "ratings", "times", "mask"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    with pytest.raises(ValueError, match="k must be"):
        ds.recent_history(s, 0)
    with pytest.raises(IndexError):
        ds.recent_history([ds.n_interactions], 3)


def test_train_crm_on_dataset_default_is_the_minibatch_path(ds) -> None:
    cfg = CRMTrainConfig(epochs=1, batch_size=128, history_len=6, progress=False)
    a = train_crm_on_dataset("deepfm", ds, cfg)
    b = train_crm_on_dataset("deepfm", ds, cfg, batches=dataset_batches(ds, 6))
    assert a.valid == b.valid and a.test == b.test


def test_custom_history_fn_is_called_per_minibatch(ds) -> None:
    calls: list[tuple[int, int]] = []

    def fn(samples, k):
        calls.append((len(samples), k))
        return ds.recent_history(samples, k)

    sp = dataset_splits(ds, 5, history_fn=fn)
    predict(_fresh("din", ds), sp["valid"], batch_size=32)
    assert calls and all(n <= 32 and k == 5 for n, k in calls)


def test_semantic_prompt_history_in_chunks_equals_one_call(ds) -> None:
    """reclora.pipeline.text_history retrieves per 1,024 samples: same HistoryBatch."""
    from reclora.pipeline import text_history
    from reclora.retriever import LongShortRetriever

    emb = torch.randn(ds.n_items, 16, generator=torch.Generator().manual_seed(0))
    retr = LongShortRetriever(ds, emb, k_text=4, k_id=9)
    samples = ds.samples
    assert samples.size > 1024
    got = text_history(ds, retr, samples, "semantic", 4)
    want = retr.batches(samples)[0]
    for f in ("items", "ratings", "times", "mask"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_ml25m_reader_keeps_lean_dtypes(tmp_path) -> None:
    """The ML-25M reader returns typed columns (no float64 table, no Python objects)."""
    from reclora.data.movielens import read_ml25m

    raw = read_ml25m(write_ml25m(tmp_path / "m", make_synthetic(seed=3)))
    assert raw.user.dtype == np.int64 and raw.item.dtype == np.int64
    assert raw.time.dtype == np.int64 and raw.rating.dtype == np.float32
    ds = load_dataset(tmp_path / "m", min_history=1, core=1)
    assert ds.n_interactions == raw.user.size


# ------------------------------------------------------------------ import order
def _data_imports(path: Path) -> set[str]:
    """The reclora.data modules a file imports anywhere (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: from .x import y / from . import x
                out |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod.startswith("reclora.data."):
                out.add(mod.split(".")[2])
            elif mod == "reclora.data":
                out |= {a.name for a in node.names if (DATA / f"{a.name}.py").is_file()} or \
                    {"__init__"}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names
                    if a.name.startswith("reclora.data.")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("reclora.data.") and " " not in node.value:
            out.add(node.value.split(".")[2])  # importlib.import_module("reclora.data.x")
    return out


def test_every_data_module_has_a_place_in_the_order() -> None:
    assert sorted(p.stem for p in DATA.glob("*.py")) == sorted(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_no_data_module_imports_one_above_it(module) -> None:
    below = set(ORDER[:ORDER.index(module)])
    above = _data_imports(DATA / f"{module}.py") - below - {module}
    assert not above, f"reclora.data.{module} imports {sorted(above)}, which come after it " \
        f"in {ORDER}"


def test_leaf_modules_import_nothing_from_reclora() -> None:
    for module in ("errors", "text"):
        tree = ast.parse((DATA / f"{module}.py").read_text(encoding="utf-8"))
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in names if m.startswith("reclora")], module
    assert _data_imports(DATA / "paths.py") == {"errors"}


# Each module imported on its own, with reclora.data as a bare package (its __init__ not run,
# so nothing else is loaded for it): it must import, and load only modules below it. One
# child interpreter does them all (one torch import instead of one a module: 15 s in the
# 2-worker suite before, 1.5 s alone after, on the 2-core machine); before each module it
# forgets every reclora submodule it has loaded, so each import starts as in a fresh
# interpreter as far as reclora is concerned.
_CHILD = """
import importlib, json, sys, types
from pathlib import Path
data = Path(sys.argv[1])
import reclora
loaded = {}
for name in sys.argv[2:]:
    for m in [m for m in sys.modules if m.startswith("reclora.")]:
        del sys.modules[m]
    pkg = types.ModuleType("reclora.data")
    pkg.__path__ = [str(data)]
    sys.modules["reclora.data"] = pkg
    importlib.import_module("reclora.data." + name)
    loaded[name] = sorted(m.split(".")[2] for m in sys.modules if m.startswith("reclora.data."))
print(json.dumps(loaded))
"""


def test_each_data_module_imports_alone_in_a_fresh_interpreter() -> None:
    import json

    modules = [m for m in ORDER if m != "__init__"]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(DATA), *modules],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(loaded) == modules
    for module in modules:
        assert module in loaded[module]
        above = set(loaded[module]) - set(ORDER[:ORDER.index(module) + 1])
        assert not above, f"importing reclora.data.{module} loaded {sorted(above)}"


def test_the_package_imports_in_a_fresh_interpreter() -> None:
    code = ("import reclora.data as d, reclora.data.base as b; "
            "assert d.DataError is b.DataError; from reclora.data.errors import DataError; "
            "assert DataError is d.DataError; from reclora.data.base import HOW_TO_GET, "
            "RecDataset, HistoryBatch, default_data_dir")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
