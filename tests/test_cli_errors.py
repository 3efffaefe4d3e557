"""Every CLI entry point (issue 17, item 8 and the CLI deliverable): a bad option or a bad
file is one clear line on stderr and a non-zero exit, never a traceback; --debug or
RECLORA_DEBUG=1 brings the traceback back. Entry points: the `reclora` console script
(reclora.cli:main, with `reclora run` and `reclora data ...`) and `python -m reclora.crm`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import reclora
from reclora.cli import K_ID_MAX, LR_RANGE, SUBCOMMANDS, threads_option
from reclora.cli import main as reclora_main
from reclora.crm.__main__ import main as crm_main
from reclora.data.base import DataError
from reclora.data.cli import main as data_main
from reclora.gates import TEMPERATURE_RANGE
from reclora.pipeline import config_from_args
from reclora.pipeline import main as run_main

NO_GPU = not torch.cuda.is_available()


def call(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of main(argv) as the shell would see them."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse, or SystemExit("message") (printed, status 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


RUN_CASES = {
    "temperature-0": (["--temperature", "0"], "--temperature"),
    "lr-negative": (["--lr", "-1"], "--lr"),
    "gate-lr-zero": (["--gate-lr", "0"], "--gate-lr"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-text": (["--seed", "x"], "--seed"),
    "seed-too-large": (["--seed", str(2**32)], "--seed"),  # torch overflowed past 2**64, late
    "n-test-negative": (["--n-test", "-1"], "--n-test"),
    "k-zero": (["--k", "0"], "--k"),
    "max-length-zero": (["--max-length", "0"], "--max-length"),
    "threads": (["--threads", "many"], "--threads"),
    "device-bogus": (["--device", "tpu9"], "--device"),
    "unknown-option": (["--bogus"], "--bogus"),
    "crms": (["--crms", "sim"], "--crms"),
    "model-path": (["--model", "/no/such/model"], "--model"),
    # 0 in float32: NaN gate weights, found when the run scored (issue: CLI audit item 3)
    "temperature-tiny": (["--temperature", "1e-300"], "--temperature"),
    "temperature-huge": (["--temperature", "1e300"], "--temperature"),
    "lr-huge": (["--lr", "1e300"], "--lr"),
    "plain-lr-huge": (["--plain-lr", "2"], "--plain-lr"),
    "gate-lr-huge": (["--gate-lr", "1e300"], "--gate-lr"),
    "k-id-huge": (["--k-id", "100000"], "--k-id"),  # item 4: OOM-killed
    # 2026-12-08 audit: --k 1e9 trained the other models, then failed allocating 240 GB
    "k-huge": (["--k", "1000000000"], "argument --k: must be in [1, 1024], got 1000000000"),
    "r-huge": (["--r", "2048"], "argument --r: must be in [1, 1024], got 2048"),
    "k-text-huge": (["--k-text", "100000000000"],
                    "argument --k-text: must be in [1, 1000], got 100000000000"),
    "threads-huge": (["--threads", "1000000000"], "--threads"),  # item 7: libgomp abort
    "threads-superscript": (["--threads", "\u00b2"], "--threads"),
    "threads-arabic-digit": (["--threads", "\u0661"], "--threads"),  # int() reads it as 1
    "crms-twice": (["--crms", "din,DIN"], "twice"),  # item 8
    "output-empty": (["--output", ""], "--output/-o: expected a path"),  # item 10: cwd
    "output-twice": (["--output", "elsewhere"], "--output/-o given twice"),
    "dataset-blank": (["--dataset", " "], "--dataset: expected a path"),
    "data-dir-empty": (["--data-dir", ""], "--data-dir: expected a path"),
    "model-empty": (["--model", ""], "--model: expected a path"),
    "data-dir-with-a-folder": (["--dataset", "/a/folder", "--data-dir", "/x"], "--data-dir"),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_reclora_run_bad_options(case, capsys, tmp_path) -> None:
    argv, word = RUN_CASES[case]
    # No data: an option let through fails at once, naming the dataset, not the option.
    code, err = call(run_main, ["--dataset", str(tmp_path / "no-data"), *argv, "--output",
                                str(tmp_path / "out")], capsys)
    assert_one_line(code, err, word)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_reclora_run_takes_the_ends_of_its_ranges() -> None:
    cfg = config_from_args(["--temperature", f"{TEMPERATURE_RANGE[0]:g}", "--lr", "1",
                            "--gate-lr", f"{LR_RANGE[0]:g}", "--k-id", str(K_ID_MAX),
                            "--threads", "1", "--crms", "DIN,sim", "--output", "o"])
    assert (cfg.temperature, cfg.lr, cfg.gate_lr, cfg.k_id) == (1e-6, 1.0, 1e-8, K_ID_MAX)
    assert cfg.threads == "1" and cfg.crms == ("din", "sim") and cfg.output == "o"
    assert config_from_args([]).threads == "auto"
    cfg = config_from_args(["--temperature", f"{TEMPERATURE_RANGE[1]:g}"])
    assert cfg.temperature == 1e6


def test_threads_option_is_bounded_by_the_cpus(monkeypatch) -> None:
    """The one --threads type (audit item 7): ASCII digits in [1, os.cpu_count()], "auto"
    where the command takes it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    parse = threads_option()
    assert parse("4") == 4 and parse("1") == 1 and parse("04") == 4
    for bad in ("5", "0", "-1", "auto", "\u00b2", "\u0661", "1_0", " 2", "+2", "", "2.0"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[1, 4\]"):
            parse(bad)
    assert threads_option(allow_auto=True)("auto") == "auto"
    assert config_from_args(["--threads", "4"]).threads == "4"


def test_a_stage2_pool_of_the_whole_training_split(capsys, tmp_path) -> None:
    """--n 1.0 left the CRMs, which train on the rest, nothing (a ZeroDivisionError)."""
    code, err = call(run_main, ["--n", "1.0", "--output", str(tmp_path / "out")], capsys)
    assert_one_line(code, err, "--n", "nothing to train on")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("main", [run_main, crm_main])
def test_device_cuda_without_a_gpu(main, capsys, tmp_path) -> None:
    code, err = call(main, ["--device", "cuda", "--output", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "--device", "no CUDA GPU")


def test_reclora_run_bad_files(capsys, tmp_path) -> None:
    code, err = call(run_main, ["--dataset", str(tmp_path / "nothing"), "--output",
                                str(tmp_path / "out"), "--no-progress"], capsys)
    assert_one_line(code, err, "reclora run: error:", "nothing")
    (tmp_path / "file").write_text("x")
    code, err = call(run_main, ["--output", str(tmp_path / "file"), "--no-progress"], capsys)
    assert_one_line(code, err, "reclora run: error:", "file")


DATA_CASES = {
    "min-history-negative": (["stats", "ml-100k", "--min-history", "-1"], "--min-history"),
    "no-such-dataset": (["stats", "/no/such/folder"], "/no/such/folder"),
    "no-subcommand": ([], "required"),
    "bad-subcommand": (["frobnicate"], "frobnicate"),
    "embed-batch-size": (["embed", "ml-100k", "--batch-size", "0"], "--batch-size"),
    "embed-device": (["embed", "ml-100k", "--device", "tpu9"], "--device"),
    "embed-threads": (["embed", "ml-100k", "--threads", "1000000000"], "--threads"),
    "embed-threads-digit": (["embed", "ml-100k", "--threads", "\u0661"], "--threads"),
    "fetch-data-dir-empty": (["fetch", "ml-100k", "--data-dir", ""], "--data-dir: expected"),
    "fetch-wheel-empty": (["fetch", "ml-100k", "--wheel", ""], "--wheel: expected a path"),
    "stats-dataset-empty": (["stats", ""], "dataset: expected a path"),
    "stats-data-dir-empty": (["stats", "ml-100k", "--data-dir", " "], "--data-dir: expected"),
    "stats-data-dir-with-a-folder": (["stats", "/a/folder", "--data-dir", "/x"], "--data-dir"),
    "embed-dataset-empty": (["embed", ""], "dataset: expected a path"),
    "embed-data-dir-empty": (["embed", "ml-100k", "--data-dir", ""], "--data-dir: expected"),
    "embed-encoder-empty": (["embed", "ml-100k", "--encoder", ""], "--encoder: expected"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_reclora_data_bad_options(case, capsys) -> None:
    argv, word = DATA_CASES[case]
    code, err = call(data_main, argv, capsys)
    assert_one_line(code, err, word)


def _has_minilm() -> bool:
    from reclora.data.embeddings import minilm_dir

    try:
        return (minilm_dir() / "model.safetensors").is_file()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _has_minilm(), reason="no MiniLM")
def test_embed_pca_dim_past_the_encoders_width(capsys, tmp_path) -> None:
    """--pca-dim 100000 cached MiniLM's 384-d embeddings unprojected as "-pca100000"."""
    from datagen import make_synthetic, write_ml1m

    folder = write_ml1m(tmp_path / "d", make_synthetic(n_users=30, n_items=400,
                                                       per_user=(300, 390)))
    code, err = call(data_main, ["embed", str(folder), "--pca-dim", "384", "--threads", "1",
                                 "--data-dir", str(tmp_path / "cache")], capsys)
    err = "\n".join(x for x in err.splitlines() if "Loading weights" not in x)  # transformers'
    assert_one_line(code, err, "reclora data: error:", "pca_dim 384", "width (384)")
    assert not (tmp_path / "cache").exists()


def test_reclora_data_corrupt_files(capsys, tmp_path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        (folder / name).write_bytes(b"\xff\xfe not utf-8 \x00\x01")
    code, err = call(data_main, ["stats", str(folder)], capsys)
    assert_one_line(code, err, "reclora data: error:", "ml-100k")


def test_a_min_history_that_filters_every_sample_is_named(capsys, tmp_path) -> None:
    """`stats --min-history 100000` said "only 0 samples after filtering", naming no option."""
    from datagen import make_synthetic, write_ml100k_recbole

    folder = write_ml100k_recbole(tmp_path / "ml-100k", make_synthetic(0, n_users=8))
    code, err = call(data_main, ["stats", str(folder), "--min-history", "100000"], capsys)
    assert_one_line(code, err, "reclora data: error:", "min_history = 100000")


CRM_CASES = {
    "epochs-zero": (["--epochs", "0"], "--epochs"),
    "lr-negative": (["--lr", "-1"], "--lr"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-too-large": (["--seed", str(2**64)], "--seed"),
    "k-id-zero": (["--k-id", "0"], "--k-id"),
    "crms": (["--crms", "gru"], "--crms"),
    "no-such-dataset": (["--dataset", "/no/such/folder"], "/no/such/folder"),
    "lr-huge": (["--lr", "1e300"], "--lr"),
    "k-id-huge": (["--k-id", "100000"], "--k-id"),
    "threads-huge": (["--threads", "1000000000"], "--threads"),
    "threads-arabic-digit": (["--threads", "\u0661"], "--threads"),
    "crms-twice": (["--crms", "din,sim,din"], "--crms lists din twice"),
    "output-empty": (["--output", ""], "--output: expected a path"),
    "output-twice": (["--output", "elsewhere"], "--output given twice"),
    "dataset-empty": (["--dataset", ""], "--dataset: expected a path"),
}


@pytest.mark.parametrize("case", sorted(CRM_CASES))
def test_python_m_reclora_crm_bad_options(case, capsys, tmp_path) -> None:
    argv, word = CRM_CASES[case]
    code, err = call(crm_main, ["--dataset", str(tmp_path / "no-data"), *argv, "--output",
                                str(tmp_path / "o")], capsys)
    assert_one_line(code, err, word)


def test_reclora_dispatcher(capsys) -> None:
    code, err = call(reclora_main, ["frobnicate"], capsys)
    assert_one_line(code, err, "frobnicate")
    code, err = call(reclora_main, ["data", "stats", "/no/such/folder"], capsys)
    assert_one_line(code, err, "/no/such/folder")


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_rejects_an_unknown_option_in_one_line(command, capsys) -> None:
    """Each `reclora <command>` (new ones included, as listed in SUBCOMMANDS)."""
    code, err = call(reclora_main, [command, "--no-such-option"], capsys)
    assert_one_line(code, err, f"reclora {command}")


def test_debug_brings_the_traceback_back(capsys, monkeypatch) -> None:
    with pytest.raises(DataError):
        reclora_main(["data", "stats", "/no/such/folder", "--debug"])
    with pytest.raises(DataError):
        data_main(["--debug", "stats", "/no/such/folder"])
    monkeypatch.setenv("RECLORA_DEBUG", "1")
    with pytest.raises(DataError):
        data_main(["stats", "/no/such/folder"])


def test_a_bug_is_one_line_naming_its_type(capsys) -> None:
    from reclora.cli import guarded

    def broken(argv):
        raise ZeroDivisionError("division by zero")

    code, err = call(lambda a: guarded("prog", broken, a), [], capsys)
    assert_one_line(code, err, "prog: error: ZeroDivisionError", "--debug")


@pytest.mark.parametrize("argv", [
    ["reclora.cli", "run", "--lr", "-1"],
    ["reclora.crm", "--dataset", "/no/such/folder"],
])
def test_real_entry_points(argv, tmp_path) -> None:
    """The console script's module and `python -m reclora.crm` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", *argv, "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert_one_line(proc.returncode, proc.stderr, argv[-1])
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ export_peft(row=True)
def test_export_peft_rejects_a_bool_row(tmp_path) -> None:
    model = nn.Module()
    model.q_proj = nn.Linear(4, 4)
    reclora.inject(model, ("q_proj",), num_adapters=2, rank=1, alpha=2)
    for bad in (True, False, 1.0, "1", None):
        with pytest.raises(TypeError, match="`row` must be an int"):
            reclora.export_peft(model, tmp_path / "out", row=bad)
    assert not (tmp_path / "out").exists()
    reclora.export_peft(model, tmp_path / "out", row=0)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
