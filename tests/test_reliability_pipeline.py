"""`reclora run` reliability (pipeline audit, findings 1-3 and 5-8): the LLM stages are
fingerprinted by the model's files and by what "auto" resolved to on the device; h_u's
standardisation has a floor; bad --n, --n-test, --n-valid, --seed are one line before any
training; a refused run leaves an earlier run's run_config.json and subsets.json alone;
--quick keeps an explicit --output.

Fast: a Run without its data (the few fields a fingerprint reads are set by hand), model
"folders" of a few bytes (model_digest hashes files, it loads nothing), and a synthetic
dataset of 30 users for the runs that must stop in load_data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from datagen import make_synthetic, write_ml100k_recbole
from test_cli_errors import assert_one_line, call

import reclora.data.embeddings as embeddings
import reclora.llm as llm
from reclora.few2many import Stage2Config
from reclora.llm import model_digest, scoped_threads
from reclora.pipeline import (
    CRM_OPTIONS,
    LLM_OPTIONS,
    RESULT_NEUTRAL,
    SEED_MAX,
    STD_FLOOR,
    TRAIN_OPTIONS,
    Run,
    RunConfig,
    config_from_args,
    llm_spec,
    main,
    standardize_reps,
)


@pytest.fixture(autouse=True)
def _threads():
    """Run() installs a thread policy: give the caller's back."""
    with scoped_threads():
        yield


def _model_folder(path, weights: bytes = b"\x01" * 64):
    """A "transformers folder" as model_files sees it: config, tokenizer, weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def _rewrite(path, data: bytes) -> None:
    """Rewrite a file to other bytes of the same size, a second later (the digest's cache is
    keyed by size and mtime, as a real rewrite changes at least the mtime)."""
    mtime = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def _bare_run(tmp_path, model, **over) -> Run:
    """A Run whose data are four fixed digests/subsets (enough for fingerprint and done)."""
    cfg = replace(RunConfig(), output=str(tmp_path / "run"), model=str(model), device="cpu",
                  threads="1", progress=False, **over)
    run = Run(cfg)
    run.data_digest = "d" * 16
    run.train_pool, run.valid, run.test = np.arange(8), np.arange(8, 12), np.arange(12, 16)
    run.crm_sha = {"din": "c" * 64}
    return run


def _save_stage(run: Run, name: str) -> None:
    run.stage_path(name).parent.mkdir(parents=True, exist_ok=True)
    run.stage_path(name).write_text(json.dumps({
        "auc": 0.5, "logloss": 0.7, "n_train": 8, "n_test": 4, "train_s": 0.0,
        "probs": [0.5] * 4, "fingerprint": run.fingerprint(name)}))


# ------------------------------------------------------- finding 1: the model's files
def test_a_resume_over_other_weights_redoes_the_llm_stages(tmp_path, capsys) -> None:
    """Audit repro: the weights behind the same --model folder were replaced and --resume
    reused zero-shot and tallrec (made with the old ones) beside rella and reclora (new)."""
    model = _model_folder(tmp_path / "llm")
    run = _bare_run(tmp_path, model)
    run.check_model()
    assert run.cfg.model_digest == model_digest(model)
    for name in ("crm_din", "zero-shot", "tallrec"):
        _save_stage(run, name)
    crm_before = run.fingerprint("crm_din")

    _rewrite(model / "model.safetensors", b"\x02" * 64)  # same size, other weights
    again = _bare_run(tmp_path, model, resume=True)
    again.check_model()
    assert again.fingerprint("crm_din") == crm_before  # the CRMs do not read the LLM
    capsys.readouterr()
    for name in ("zero-shot", "tallrec"):
        assert again.done(name, again.fingerprint(name)) is None, name
    assert capsys.readouterr().out.count("model_digest changed") == 2


def test_the_digest_names_the_bytes_not_the_path(tmp_path) -> None:
    """A copy elsewhere is the same model (a run folder served on another machine); a changed
    tokenizer or config is another one."""
    model = _model_folder(tmp_path / "a")
    copy = shutil.copytree(model, tmp_path / "b")
    assert model_digest(model) == model_digest(copy)
    _rewrite(copy / "tokenizer.json", b'{"version": "2.0"}')
    assert model_digest(copy) != model_digest(model)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert model_digest(gguf) != model_digest(model)


def test_each_file_is_hashed_once_per_process(tmp_path, monkeypatch) -> None:
    """A resume (or serving) asks for the digest more than once: 253 MB are read once."""
    model = _model_folder(tmp_path / "llm", weights=b"\x03" * 64)
    opened = []
    real_open = open

    def spy(path, *args, **kw):
        opened.append(os.path.basename(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(embeddings, "open", spy, raising=False)
    first = model_digest(model)
    assert sorted(opened) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert model_digest(model) == first and len(opened) == 3


def test_a_hub_name_is_digested_from_the_snapshot_it_loaded(tmp_path, monkeypatch) -> None:
    """A hub name: the files of the snapshot the local cache resolves it to (after the load,
    which fetched it); a newer snapshot with other weights is another model."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"

    def snapshot(commit: str, weights: bytes) -> None:
        _model_folder(repo / "snapshots" / commit, weights)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local "org/tiny" folder
    snapshot("a" * 40, b"\x04" * 64)
    assert llm.is_hub_name("org/tiny")
    assert model_digest("org/tiny") == model_digest(_model_folder(tmp_path / "same",
                                                                  b"\x04" * 64))
    old = model_digest("org/tiny")
    snapshot("b" * 40, b"\x05" * 64)
    assert model_digest("org/tiny") != old

    loads = []
    monkeypatch.setattr(Run, "ctr", property(lambda self: loads.append(1) or "ctr"))
    run = _bare_run(tmp_path, "org/tiny")
    run.check_model()
    assert loads == [1] and run.cfg.model_digest == model_digest("org/tiny")


# ------------------------------------------------------- finding 2: "auto" resolved
def _machine(monkeypatch, bf16: bool) -> None:
    """A CPU with (or without) native bf16, for the LLM's autocast and the item embeddings."""
    monkeypatch.setattr(llm, "bf16_supported", lambda device: bf16)
    monkeypatch.setattr(embeddings, "use_bf16", lambda precision, device="cpu":
                        bf16 if precision == "auto" else precision == "bf16")


def test_auto_settings_enter_the_fingerprint_resolved(tmp_path, monkeypatch) -> None:
    """Audit repro: a run resumed on a machine where "auto" means other numerics had equal
    fingerprints, so its LLM stages mixed two numerics. The resolved values are in the
    config (hence run_config.json and the fingerprints); the device itself is not."""
    model = _model_folder(tmp_path / "llm")
    fps, cfgs = {}, {}
    for bf16 in (True, False):
        _machine(monkeypatch, bf16)
        run = _bare_run(tmp_path, model)
        cfgs[bf16] = (run.cfg.amp, run.cfg.llm_dtype, run.cfg.item_precision)
        fps[bf16] = run.fingerprint("tallrec")
    assert cfgs == {True: ("bf16", "fp32", "bf16"), False: ("off", "fp32", "fp32")}
    assert fps[True] != fps[False]
    # Explicit values stay as given; the GPU's "auto" weights are bf16.
    from reclora.pipeline import resolve_auto

    explicit = replace(RunConfig(), amp="bf16", llm_dtype="fp32", item_precision="fp32")
    assert resolve_auto(explicit, torch.device("cpu")) == explicit
    assert resolve_auto(RunConfig(), torch.device("cuda")).llm_dtype == "bf16"


# ------------------------------------------------------- finding 3: standardisation
def test_a_unit_constant_on_the_pool_is_not_blown_up() -> None:
    """Audit repro: a ReLU unit 0 on every stage-2 sample but not at test was divided by
    1e-6 (z of 3e4 at --quick's N = 48, and the gate's LayerNorm saw that unit alone)."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(48, 5, generator=gen).abs()
    ref[:, 0] = 0.0  # dead on the pool
    ref[:, 1] = 0.3 + 1e-7 * torch.arange(48)  # near-constant
    test = torch.randn(6, 5, generator=gen).abs()
    z = standardize_reps(test, ref)
    sd = ref.std(0)
    floor = STD_FLOOR * sd.pow(2).mean().sqrt()
    assert torch.isfinite(z).all()
    for unit in (0, 1):
        assert z[:, unit].abs().max() <= (test[:, unit] - ref[:, unit].mean()).abs().max() \
            / floor * (1 + 1e-6)
    # Units that vary on the pool are plain z-scores (the floor does not bind).
    torch.testing.assert_close(z[:, 2:], (test[:, 2:] - ref[:, 2:].mean(0)) / sd[2:])


def test_a_gate_input_that_is_not_finite_is_refused_naming_n(tmp_path, monkeypatch) -> None:
    """h_u constant in every unit on the pool leaves nothing to scale by: one line naming
    --n, not the "scores holds NaN or inf" error the audit got after training."""
    run = _bare_run(tmp_path, _model_folder(tmp_path / "llm"))
    run.crms = {"din": None}
    monkeypatch.setattr(run, "user_reps", lambda crm, samples, k: torch.ones(samples.size, 4))
    with pytest.raises(ValueError, match="^--n: the gates' input"):
        run.gate_reps(llm_spec("reclora", run.cfg))
    monkeypatch.setattr(run, "user_reps", lambda crm, samples, k: torch.arange(
        4.0 * samples.size).reshape(-1, 4) % 3)
    assert all(torch.isfinite(r).all() for r in run.gate_reps(llm_spec("reclora",
                                                                         run.cfg)).values())


# ------------------------------------------------------- refused in load_data
@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A 30-user ML-100K-format folder; item embeddings stubbed (no encoder load)."""
    monkeypatch.setattr(embeddings, "item_embeddings", lambda ds, **kw: torch.nn.functional
                        .normalize(torch.randn(ds.n_items, 8), dim=1))
    syn = make_synthetic(0, n_users=30, n_items=30, per_user=(12, 25))
    return write_ml100k_recbole(tmp_path / "ml-100k", syn)


def _argv(synthetic, out, *more: str) -> list[str]:
    return ["--dataset", str(synthetic), "--output", str(out), "--crms", "din", "--n", "8",
            "--n-valid", "16", "--n-test", "16", "--no-progress", *more]


@pytest.mark.parametrize("argv, option", [
    (["--n", "1"], "--n"),  # too few to standardise (torch's std of 1 sample is NaN)
    (["--n-test", "1"], "--n-test"),  # one class: no AUC
    (["--n-valid", "1"], "--n-valid"),
])
def test_bad_sizes_are_one_line_before_anything_trains(synthetic, tmp_path, capsys, argv,
                                                       option) -> None:
    """Audit repros: --n 1 failed after two LLM models trained, --n-test 1 after the CRM,
    --n-valid 1 after the CRM and zero-shot, each with an error that named no option."""
    out = tmp_path / "out"
    code, err = call(main, _argv(synthetic, out, *argv), capsys)
    assert_one_line(code, err, f"reclora run: error: {option}:")
    assert [p.name for p in out.iterdir()] == [".reclora-run.lock"]  # nothing written


@pytest.mark.parametrize("bad", ["dataset", "model"])
def test_a_refused_run_leaves_the_folder_config_alone(synthetic, tmp_path, capsys,
                                                      bad) -> None:
    """Audit repro: `--resume --dataset ml-100kk` rewrote run_config.json before it failed,
    and the finished folder could not be served any more. Same for a model refused after
    the data loaded (a folder without config.json)."""
    out = tmp_path / "out"
    out.mkdir()
    kept = {"run_config.json": '{"from": "the finished run"}', "subsets.json": '{"a": 1}'}
    for name, text in kept.items():
        (out / name).write_text(text)
    (tmp_path / "empty_model").mkdir()
    argv = _argv(synthetic, out, "--resume", "--model", str(tmp_path / "empty_model"))
    if bad == "dataset":
        argv[1] = str(tmp_path / "no-such-dataset")
    code, err = call(main, argv, capsys)
    assert_one_line(code, err, "reclora run: error:",
                    "no-such-dataset" if bad == "dataset" else "empty_model")
    assert {n: (out / n).read_text() for n in kept} == kept


# ------------------------------------------------------- findings 7, 8: options
def test_quick_keeps_an_explicit_output() -> None:
    """Audit repro: `--quick --output runs/default` wrote to runs/quick."""
    for flag in ("--output", "-o"):
        assert config_from_args(["--quick", flag, "runs/default"]).output == "runs/default"
    assert config_from_args(["--quick"]).output == "runs/quick"
    assert config_from_args([]).output == "runs/default"


def test_seed_range(capsys, tmp_path) -> None:
    assert config_from_args(["--seed", str(SEED_MAX)]).seed == SEED_MAX == 2**32 - 1
    for bad in (str(2**32), "18446744073709551616"):
        code, err = call(main, ["--seed", bad, "--output", str(tmp_path / "o")], capsys)
        assert_one_line(code, err, "--seed", str(SEED_MAX))
    assert not (tmp_path / "o").exists()


def test_result_neutral_fields_are_stage2_fields_outside_every_fingerprint() -> None:
    """The list serving must ignore when it compares a stage's stage2_config.json."""
    assert set(RESULT_NEUTRAL) <= {f.name for f in fields(Stage2Config)}
    assert not set(RESULT_NEUTRAL) & set(CRM_OPTIONS + LLM_OPTIONS + TRAIN_OPTIONS)


def test_the_run_reads_item_embeddings_under_its_data_dir(tmp_path, monkeypatch) -> None:
    """`reclora data embed --data-dir D` caches under D; the run over --data-dir D looked in
    the default data folder instead, recomputed and wrote a second copy there."""
    seen = {}

    def stub(ds, **kw):
        seen.update(kw)
        return torch.nn.functional.normalize(torch.randn(ds.n_items, 8), dim=1)

    monkeypatch.setattr(embeddings, "item_embeddings", stub)
    syn = make_synthetic(0, n_users=30, n_items=30, per_user=(12, 25))
    write_ml100k_recbole(tmp_path / "data" / "ml-100k", syn)
    cfg = config_from_args(["--dataset", "ml-100k", "--data-dir", str(tmp_path / "data"),
                            "--output", str(tmp_path / "out"), "--crms", "din", "--n", "8",
                            "--n-valid", "16", "--n-test", "16", "--no-progress"])
    Run(cfg).load_data()
    assert seen["cache_dir"] == str(tmp_path / "data")


def test_a_pool_smaller_than_the_world_is_one_line_before_anything_trains(
        synthetic, tmp_path, capsys, monkeypatch) -> None:
    """Under torchrun a stage-2 pool with fewer samples than processes was refused by the
    first LLM stage, after every CRM had trained."""
    import reclora.pipeline as pipeline

    monkeypatch.setattr(pipeline, "dist_info", lambda: (0, 16))
    out = tmp_path / "out"
    code, err = call(main, _argv(synthetic, out), capsys)  # --n 8
    assert_one_line(code, err, "reclora run: error: --n:", "fewer than the 16 processes")
    assert [p.name for p in out.iterdir()] == [".reclora-run.lock"]  # nothing written


# Options no stage fingerprint holds, each with why a stage made under another value may be
# reused. Any other RunConfig field must change some stage's fingerprint: an option added
# without one (a resume silently mixing stages made under its two values) fails below.
NOT_FINGERPRINTED = {
    "output": "where the run is written",
    "data_dir": "the data digest holds what the data are",
    "device": "what it resolves amp, llm_dtype and item_precision to is fingerprinted",
    "seeds": "each extra seed is a stage of its own, with its train_seed",
    "grad_ckpt": "memory, not results (RESULT_NEUTRAL)",
    "fsdp": "memory, not results (RESULT_NEUTRAL)",
    "threads": "speed, not results",
    "crms": "which CRM stages run, each with its own fingerprint",
    "ablations": "which LLM stages run",
    "quick": "sets other options, which are fingerprinted",
    "resume": "whether stages are reused",
    "n_bootstrap": "the report's intervals, recomputed every run",
    "progress": "progress bars",
}
OTHER_VALUE = {
    "dataset": "ml-1m", "model": "smollm2-135m", "model_digest": "f" * 16, "n_train": 999,
    "n_valid": 99, "n_test": 99, "k_text": 7, "k_id": 30, "id_history": "semantic", "k": 8,
    "r": 4, "alpha": 8.0, "temperature": 2.0, "lr": 2e-3, "plain_lr": 1e-4, "gate_lr": 1e-4,
    "batch_size": 4, "grad_accum": 2, "epochs": 2, "eval_points": 3, "eval_batch_size": 8,
    "max_length": 256, "prompt_variant": "default", "target_modules": ("q_proj",),
    "amp": "off", "llm_dtype": "bf16", "item_precision": "fp32", "item_encoder": "llm",
    "standardize_reps": False, "loss": "vocab", "crm_epochs": 3, "crm_max_train": 1000,
    "seed": 1, "mix": "output", "gate_top_k": 4, "gate_sqrt": True,
}


def stage_fingerprints(cfg: RunConfig, out, names: tuple[str, ...]) -> dict[str, dict]:
    """The fingerprints of stages `names` under `cfg`, for a Run with fixed data digests and
    subsets (nothing loaded)."""
    run = Run(replace(cfg, output=str(out)))
    run.data_digest = "d" * 16
    run.train_pool, run.valid, run.test = np.arange(8), np.arange(8, 12), np.arange(12, 16)
    run.crm_sha = {"din": "c" * 64}
    return {n: run.fingerprint(n) for n in names}


def test_every_option_is_fingerprinted_or_says_why_not(tmp_path) -> None:
    stages = ("zero-shot", "tallrec", "rella", "reclora", "reclora-no-f2m", "crm_din")
    base = RunConfig()
    names = {f.name for f in fields(RunConfig)}
    assert set(NOT_FINGERPRINTED) | set(OTHER_VALUE) == names, "classify the new option"
    assert not set(NOT_FINGERPRINTED) & set(OTHER_VALUE)
    want = stage_fingerprints(base, tmp_path, stages)
    unchanged = [name for name, value in OTHER_VALUE.items()
                 if stage_fingerprints(replace(base, **{name: value}), tmp_path, stages) == want]
    assert unchanged == []
