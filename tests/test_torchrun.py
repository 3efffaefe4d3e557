"""`reclora run` under torchrun (2 gloo processes on the CPU) against the same run in one
process, and the embedding cache filled once under torch.distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from tiny_llm import TINY_RUN, save_tiny_model

from reclora.pipeline import main

ROOT = Path(__file__).resolve().parents[1]
# --amp off: fp32 throughout, so that the two runs differ only by float rounding (the 2-process
# run pads its batches differently); --threads 1: the same CPU kernels in both.
OPTIONS = [*TINY_RUN, "--amp", "off", "--threads", "1"]
MODELS = ("din", "zero-shot", "tallrec", "rella", "reclora")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny run in this process (the reference of both torchrun variants: --fsdp and
    --grad-ckpt change neither results nor files in one process)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main([*OPTIONS, "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("extra", [
    pytest.param([], id="ddp"),
    # FSDP2 over gloo, sharding the LLM once and reusing the shards for the later stages
    # (the adapters of each stage replicated), with gradient checkpointing: the same run.
    pytest.param(["--fsdp", "--grad-ckpt"], id="fsdp", marks=pytest.mark.slow),
])
def test_torchrun_two_processes_match_one_process(tiny_model_dir, single_process_run, tmp_path,
                                                  extra) -> None:
    """torchrun --nproc_per_node=2: the CRM trains on rank 0 while rank 1 waits, the LLM
    stages run data-parallel, rank 0 writes; every model's test AUC matches the one-process
    run within 1e-3, and the run folder holds no temporary file left by either rank."""
    multi = tmp_path / "torchrun"
    argv = [*OPTIONS, "--model", str(tiny_model_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    # --standalone: a rendezvous on a free local port (no fixed port to collide on).
    # "--n" spelled out: torchrun's own parser reads every --option, even past the script,
    # and --n is ambiguous there (--nnodes, --nproc-per-node...).
    script = ["--n-train" if a == "--n" else a for a in argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "reclora.pipeline", *script, "--output", str(multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res_multi = json.loads((multi / "results.json").read_text())
    res_single = single_process_run
    assert res_multi["world_size"] == 2 and res_single["world_size"] == 1
    assert list(res_multi["models"]) == list(res_single["models"]) == list(MODELS)
    for name in MODELS:
        a, b = res_multi["models"][name]["auc"], res_single["models"][name]["auc"]
        assert a == pytest.approx(b, abs=1e-3), (name, a, b)
    # The CRM is rank 0's alone: the very same model as the one-process run's.
    assert res_multi["models"]["din"]["auc"] == res_single["models"]["din"]["auc"]
    left = [p for p in multi.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]
    assert not left, left


# ------------------------------------------------------------ the embedding cache
def _cache_worker(rank: int, world: int, folder: str) -> None:
    """item_embeddings under main_first, as Run.load_data calls it, with a fake encoder that
    records who computed (the real one takes seconds)."""
    import datetime
    import time

    import torch.distributed as dist

    import reclora.data.embeddings as E
    from reclora.few2many import close_distributed, main_first

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))

    def fake_pooled(texts, *args, **kwargs):
        (Path(folder) / f"computed_by_{rank}").write_text("")
        time.sleep(0.5)  # long enough for a waiting rank to look too early, were it not waiting
        return torch.arange(len(texts) * 4, dtype=torch.float32).reshape(len(texts), 4) + 1

    E.mean_pooled = fake_pooled
    E._sentence_encoder = lambda folder, device: (None, None)
    ds = SimpleNamespace(name="fake", n_items=5,
                         item_description=[f"item {i}" for i in range(5)])
    try:
        with main_first():
            emb = E.item_embeddings(ds, str(folder), cache_dir=f"{folder}/cache",
                                    progress=False)
        torch.save(emb, f"{folder}/emb_rank{rank}.pt")
    finally:
        close_distributed()


@pytest.mark.timeout(120)
def test_embedding_cache_written_once_and_read_by_all(tmp_path) -> None:
    """On a cold cache, rank 0 alone computes the embeddings and writes the file; rank 1
    reads it (no second computation, no two writers of one file)."""
    mp.start_processes(_cache_worker, args=(2, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert sorted(p.name for p in tmp_path.glob("computed_by_*")) == ["computed_by_0"]
    e0, e1 = torch.load(tmp_path / "emb_rank0.pt"), torch.load(tmp_path / "emb_rank1.pt")
    assert torch.equal(e0, e1)
    files = list((tmp_path / "cache").rglob("*"))
    assert [p.suffix for p in files if p.is_file()] == [".safetensors"]
