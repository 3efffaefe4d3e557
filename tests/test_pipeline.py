"""`reclora run` end to end on ML-100K with a tiny random Llama: every stage, the report
recomputed by brute force from the stage files and the test subset's labels, the subsets
drawn from their own splits, each baseline given its own history, --resume skipping the
finished stages (and only with --resume)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from test_metrics import _brute_auc, _interval, _loop_cluster_resamples, _p_value
from tiny_llm import save_tiny_model

from reclora import metrics
from reclora.pipeline import ABLATIONS, LLM_MODELS, Run, config_from_args, main

N_TEST, K_TEXT = 48, 2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + word-level tokenizer saved as a transformers folder."""
    path = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(path)
    return path


def _argv(out, model_dir) -> list[str]:
    return ["--quick", "--output", str(out), "--model", str(model_dir), "--crms", "din",
            "--n", "16", "--n-valid", "24", "--n-test", str(N_TEST), "--k-text", str(K_TEXT),
            "--max-length", "160", "--ablations", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    """One run with every stage; records, per LLM stage, the text histories its prompts were
    built from (PromptBuilder.build_batch is the one place a history becomes a prompt)."""
    from reclora.data.prompts import PromptBuilder

    out = tmp_path_factory.mktemp("quick") / "run"
    calls: list[tuple[str, np.ndarray, object]] = []
    stage = {"name": None}
    build_batch, llm_stage = PromptBuilder.build_batch, Run.llm_stage

    def spy_build(self, dataset, samples, history):
        calls.append((stage["name"], np.asarray(samples).copy(), history))
        return build_batch(self, dataset, samples, history)

    def spy_stage(self, name, train_seed=None):
        stage["name"] = name
        try:
            return llm_stage(self, name, train_seed)
        finally:
            stage["name"] = None

    crm_train: dict[str, np.ndarray] = {}

    def spy_crm(name, ds, config=None, history_fn=None, batches=None, **kw):
        crm_train[name] = batches["train"].samples.copy()
        return train_crm(name, ds, config, history_fn, batches, **kw)

    import reclora.crm as crm

    train_crm = crm.train_crm_on_dataset
    import reclora.llm as llm

    threads, policy = torch.get_num_threads(), llm._THREADS
    # A count the run's "auto" policy never picks (it chooses 1 or all cores), so that the
    # test after the fixture sees whether the run gave the caller's count back.
    torch.set_num_threads((os.cpu_count() or 1) + 1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PromptBuilder, "build_batch", spy_build)
            mp.setattr(Run, "llm_stage", spy_stage)
            mp.setattr(crm, "train_crm_on_dataset", spy_crm)
            assert main(_argv(out, tiny_model_dir)) == 0
        quick_run_threads.update(count=torch.get_num_threads(),
                                 same_policy=llm._THREADS is policy)
    finally:
        torch.set_num_threads(threads)
    quick_run_crm_train.update(crm_train)
    return out, calls


quick_run_crm_train: dict[str, np.ndarray] = {}  # the CRMs' training samples, by name
quick_run_threads: dict[str, object] = {}  # torch's thread count and policy after the run


def test_a_run_gives_the_caller_back_its_threads(quick_run) -> None:
    """The run's thread policy re-picks the count by timing; left installed, it went on doing
    so in the caller's later scoring, whose float32 scores then moved in their last bits."""
    assert quick_run_threads == {"count": (os.cpu_count() or 1) + 1, "same_policy": True}


def _stage(out, name) -> dict:
    return json.loads((out / "stages" / f"{name}.json").read_text())


def _brute_logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(np.mean([-np.log(q) if t else -np.log(1 - q) for t, q in zip(y, p)]))


def test_report_files(quick_run) -> None:
    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    names = ["din", *LLM_MODELS, *ABLATIONS]
    assert list(res["models"]) == names
    for name in names:
        m = res["models"][name]
        assert {"auc", "logloss", "n_train", "n_test", "train_s"} <= set(m)
        assert m["n_test"] == N_TEST
    assert res["models"]["reclora"]["n_train"] == 16
    assert res["models"]["zero-shot"]["n_train"] == 0
    assert set(res["comparisons"]) == {f"reclora vs {n}" for n in names if n != "reclora"}
    md = (out / "results.md").read_text()
    assert "Spearman rank correlation" in md and "| reclora |" in md
    assert (out / "results.png").stat().st_size > 0
    assert (out / "reclora" / "best.safetensors").is_file()
    assert len(list((out / "stages").iterdir())) == len(names)


def test_report_recomputed_from_stage_files(quick_run) -> None:
    """Every number of results.json from the stage files' probabilities and the test
    subset's labels, by brute force: pairwise AUC, LogLoss, the bootstrap percentiles over
    the same resamples of whole users, the paired differences and their p-values."""
    from reclora.data import load_dataset

    out, _ = quick_run
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    ds = load_dataset("ml-100k")
    test = np.asarray(json.loads((out / "subsets.json").read_text())["test"])
    y, users = ds.label[test], ds.user[test]
    assert 0 < y.sum() < y.size
    assert res["n_test_users"] == np.unique(users).size < y.size
    probs = {}
    for name, m in res["models"].items():
        p = np.asarray(_stage(out, "crm_din" if name == "din" else name)["probs"])
        assert p.shape == (N_TEST,)
        probs[name] = p
        assert m["auc"] == pytest.approx(_brute_auc(y, p), abs=1e-9), name
        assert m["logloss"] == pytest.approx(_brute_logloss(y, p), rel=1e-6), name
        boot = _loop_cluster_resamples(y, [p], users, cfg["n_bootstrap"], cfg["seed"])[0]
        lo, hi = _interval(boot, 0.95)
        assert m["auc_ci95"] == pytest.approx([lo, hi], abs=1e-9), name
    for name, d in res["comparisons"].items():
        other = name.removeprefix("reclora vs ")
        boot = _loop_cluster_resamples(y, [probs["reclora"], probs[other]], users,
                                       cfg["n_bootstrap"], cfg["seed"])
        diffs = boot[0] - boot[1]
        diffs = diffs[np.isfinite(diffs)]
        lo, hi = _interval(diffs, 0.95)
        p_value = _p_value(diffs)
        want = _brute_auc(y, probs["reclora"]) - _brute_auc(y, probs[other])
        assert d["diff"] == pytest.approx(want, abs=1e-9), name
        assert [d["low"], d["high"]] == pytest.approx([lo, hi], abs=1e-9), name
        assert d["p_value"] == pytest.approx(p_value, abs=1e-9), name
    corr = res["rank_corr_with_gate_crm"]
    assert corr["crm"] == "din"
    want = metrics.rank_correlation(probs["din"], probs["reclora"])
    # Undefined (a constant model) is stored as null: a bare NaN is not JSON.
    assert corr["spearman"]["reclora"] == (None if np.isnan(want) else pytest.approx(want))


def test_subsets_come_from_their_own_splits(quick_run) -> None:
    """Test subset from the test split (never valid or train), valid from valid, the stage-2
    pool from train; sizes as asked, no repeats."""
    from reclora.data import load_dataset

    out, _ = quick_run
    ds = load_dataset("ml-100k")
    sub = json.loads((out / "subsets.json").read_text())
    for key, split, size in (("test", ds.test, N_TEST), ("valid", ds.valid, 24),
                             ("train", ds.train, 16)):
        s = np.asarray(sub[key])
        assert s.size == size and np.unique(s).size == size, key
        assert np.isin(s, split).all(), f"the {key} subset holds samples of another split"


def test_each_model_gets_its_own_history_and_adapters(quick_run) -> None:
    """TALLRec-style and no-LSMR: the K_text most recent items; ReLLa-style, RecLoRA and the
    zero-shot LLM: K_text items by semantic retrieval (the two differ on these samples).
    Plain LoRA (one adapter, no gate) for TALLRec/ReLLa; a gated bank of k for RecLoRA."""
    from reclora.data import item_embeddings, load_dataset
    from reclora.retriever import LongShortRetriever

    out, calls = quick_run
    ds = load_dataset("ml-100k")
    cfg = json.loads((out / "run_config.json").read_text())
    semantic = LongShortRetriever(ds, item_embeddings(ds, progress=False), k_text=K_TEXT,
                                  k_id=cfg["k_id"])
    recent_stages = {"tallrec", "reclora-recent-text"}
    seen, differ = set(), 0
    for name, samples, hist in calls:
        assert name is not None, "a prompt built outside an LLM stage"
        seen.add(name)
        want = (ds.recent_history(samples, K_TEXT) if name in recent_stages
                else semantic.batches(samples)[0])
        other = (semantic.batches(samples)[0] if name in recent_stages
                 else ds.recent_history(samples, K_TEXT))
        assert torch.equal(hist.mask, want.mask), name
        assert torch.equal(hist.items[hist.mask], want.items[want.mask]), name
        differ += int(not torch.equal(hist.items[hist.mask], other.items[other.mask]))
    assert {"zero-shot", "tallrec", "rella"} <= seen
    assert differ == len(calls), "recent and semantic histories must differ to tell them apart"
    for name, adapters, gated in (("tallrec", 1, False), ("rella", 1, False),
                                  ("reclora", cfg["k"], True),
                                  ("reclora-uniform", cfg["k"], False),
                                  ("reclora-recent-text", cfg["k"], True),
                                  ("reclora-short-id", cfg["k"], True),
                                  ("reclora-no-f2m", cfg["k"], True)):
        s2 = json.loads((out / name / "stage2_config.json").read_text())
        assert (s2["num_adapters"], s2["gated"]) == (adapters, gated), name
        # The plain-LoRA baselines train at their own lr (the recipe search's), the rest at lr.
        assert s2["lr"] == (cfg["plain_lr"] if adapters == 1 else cfg["lr"]), name
        assert s2["target_modules"] == list(cfg["target_modules"]), name
    assert cfg["plain_lr"] != cfg["lr"]


def test_crms_never_train_on_the_stage2_pool(quick_run) -> None:
    """The gate's h_u on the stage-2 pool is out-of-sample: every CRM trains on the training
    split less the pool (and on nothing else)."""
    from reclora.data import load_dataset

    out, _ = quick_run
    ds = load_dataset("ml-100k")
    pool = np.asarray(json.loads((out / "subsets.json").read_text())["train"])
    assert set(quick_run_crm_train) == {"din"}
    for name, samples in quick_run_crm_train.items():
        assert not np.isin(pool, samples).any(), name
        assert np.array_equal(np.sort(samples), np.setdiff1d(ds.train, pool)), name


def test_resume_reads_stage_files_and_redoes_missing_ones(quick_run, tiny_model_dir) -> None:
    """--resume: a stage whose file exists is not rerun, and the report takes its numbers
    from that file (tampered here: its probabilities reversed); a deleted stage file is
    recomputed, to the same result."""
    from reclora.data import load_dataset

    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    rella = _stage(out, "rella")
    (out / "stages" / "rella.json").unlink()
    tampered = _stage(out, "tallrec")
    tampered["probs"] = [1.0 - p for p in tampered["probs"]]
    test = np.asarray(json.loads((out / "subsets.json").read_text())["test"])
    y = load_dataset("ml-100k").label[test]
    tampered["auc"] = metrics.auc(y, tampered["probs"])
    tampered["logloss"] = metrics.logloss(y, tampered["probs"])
    (out / "stages" / "tallrec.json").write_text(json.dumps(tampered))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}

    assert main(_argv(out, tiny_model_dir) + ["--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    now = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    assert {k: v for k, v in now.items() if k != "rella.json"} == stamps
    assert after["models"]["tallrec"]["auc"] == pytest.approx(tampered["auc"])
    assert after["models"]["tallrec"]["auc"] == pytest.approx(
        1 - before["models"]["tallrec"]["auc"], abs=1e-9)
    assert _stage(out, "rella")["probs"] == pytest.approx(rella["probs"], rel=1e-5)
    for name in before["models"]:
        if name != "tallrec":
            assert after["models"][name]["auc"] == pytest.approx(
                before["models"][name]["auc"], abs=1e-6), name


def test_stage_files_are_reused_only_with_resume(quick_run, tiny_model_dir) -> None:
    """The finished run's stage files, same options: without --resume every stage is redone
    (done() gives nothing), with --resume the stored result comes back."""
    out, _ = quick_run
    for resume in (False, True):
        cfg = config_from_args(_argv(out, tiny_model_dir) + (["--resume"] if resume else []))
        run = Run(cfg)
        run.load_data()
        run.check_model()  # the model's digest, in every LLM stage's fingerprint
        for name in ("zero-shot", "tallrec", "rella"):
            got = run.done(name, run.fingerprint(name))
            if resume:
                assert got is not None and got["probs"] == _stage(out, name)["probs"], name
            else:
                assert got is None, f"{name}: stage file reused without --resume"


def test_resume_redoes_trained_stages_under_another_world_size(quick_run,
                                                               tiny_model_dir) -> None:
    """A step takes batch_size x grad_accum x world samples, so a stage trained under
    torchrun with 2 processes is not reused by a resume in one (nor the reverse); the
    zero-shot stage, which trains nothing, is."""
    out, _ = quick_run
    cfg = config_from_args(_argv(out, tiny_model_dir) + ["--resume"])
    run = Run(cfg)
    run.load_data()
    run.check_model()
    for name in ("zero-shot", "tallrec", "rella"):
        assert run.done(name, run.fingerprint(name)) is not None, name
    run.world = 2  # as dist_info() reports it under torchrun --nproc_per_node=2
    assert run.done("zero-shot", run.fingerprint("zero-shot")) is not None
    for name in ("tallrec", "rella"):
        assert run.done(name, run.fingerprint(name)) is None, name


def test_a_crm_checkpoint_changed_after_its_check_is_refused(quick_run, tiny_model_dir,
                                                              tmp_path, monkeypatch) -> None:
    """The gate CRM is hashed and loaded from one read: a checkpoint another process
    rewrites after the stage's check is never loaded under the recorded sha256 that every
    later stage is fingerprinted with."""
    import shutil

    import reclora.pipeline as pipeline
    from reclora.cli import CLIError
    from reclora.crm import load_crm

    out = tmp_path / "run"
    shutil.copytree(quick_run[0], out)
    ckpt = out / "crm" / "din.pt"
    checked = ckpt.read_bytes()
    other = checked[:-1] + bytes([checked[-1] ^ 1])  # another file that still loads
    monkeypatch.setattr(pipeline, "wait_for_main", lambda: ckpt.write_bytes(other))
    # A process that reads the file after rank 0's check (another rank): refused.
    run = Run(config_from_args(_argv(out, tiny_model_dir) + ["--resume"]))
    run.load_data()
    run.main = False
    with pytest.raises(CLIError, match="changed after its stage file"):
        run.crm_stage("din")
    # Rank 0 reuses the model it checked: the bytes it hashed, never the rewritten file.
    ckpt.write_bytes(checked)
    run = Run(config_from_args(_argv(out, tiny_model_dir) + ["--resume"]))
    run.load_data()
    run.crm_stage("din")
    want = load_crm(ckpt, data=checked)[0].state_dict()
    assert ckpt.read_bytes() == other
    got = run.crms["din"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert run.crm_sha["din"] == hashlib.sha256(checked).hexdigest()


def test_fractional_n_and_seeds(tiny_model_dir, tmp_path) -> None:
    """--n 0.0002 of ML-100K's 75,031 training samples is 15 samples for every LLM model
    (applied once). --seeds 2 (one run for both checks, to keep the suite short): every
    trained LLM model is trained again with seed + 1 as its own stage and folder, and the
    table gives the mean and sample standard deviation of the two test AUCs."""
    out = tmp_path / "frac"
    assert main(["--quick", "--output", str(out), "--model", str(tiny_model_dir), "--crms",
                 "din", "--n", "0.0002", "--n-valid", "8", "--n-test", "24", "--k-text", "2",
                 "--max-length", "160", "--no-progress", "--seeds", "2", "--seed", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert round(0.0002 * res["dataset"]["train"]) == 15
    for name in ("tallrec", "rella", "reclora"):
        assert res["models"][name]["n_train"] == 15, name
        first, second = _stage(out, name), _stage(out, f"{name}@seed4")
        assert second["fingerprint"]["train_seed"] == 4
        s2 = json.loads((out / f"{name}@seed4" / "stage2_config.json").read_text())
        assert s2["seed"] == 4
        assert first["probs"] != second["probs"], name  # another initialisation and order
        seeds = res["models"][name]["seeds"]
        aucs = [first["auc"], second["auc"]]
        assert seeds["seeds"] == [3, 4] and seeds["auc"] == aucs
        assert seeds["auc_mean"] == pytest.approx(sum(aucs) / 2)
        assert seeds["auc_sd"] == pytest.approx(abs(aucs[0] - aucs[1]) / 2 ** 0.5)
    assert "seeds" not in res["models"]["zero-shot"] and "seeds" not in res["models"]["din"]
    assert not (out / "stages" / "zero-shot@seed4.json").exists()
    assert "AUC over seeds (mean ± sd, n)" in (out / "results.md").read_text()


def test_arguments_are_checked() -> None:
    cfg = config_from_args(["--n", "0.01", "--k-text", "7"])
    assert cfg.n_train == 0.01 and cfg.k_text == 7 and cfg.output == "runs/default"
    assert config_from_args(["--quick"]).output == "runs/quick"
    assert config_from_args(["--n", "300"]).n_train == 300
    with pytest.raises(SystemExit):
        config_from_args(["--n", "2.5"])
    with pytest.raises(SystemExit):
        config_from_args(["--crms", "sim"])  # RecLoRA's gate needs the DIN
    with pytest.raises(SystemExit):
        config_from_args(["--k-text", "0"])
    assert config_from_args(["--target-modules", "all"]).target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert config_from_args(["--target-modules", "q_proj, o_proj"]).target_modules == (
        "q_proj", "o_proj")
    assert config_from_args(["--prompt-variant", "genres+summary"]).prompt_variant == \
        "genres+summary"
    for bad in (["--target-modules", ","], ["--target-modules", "q_proj;rm"],
                ["--prompt-variant", "shouting"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            config_from_args(bad)
