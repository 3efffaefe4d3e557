"""Every CLI entry point (issue 17, item 8 and the CLI deliverable): a bad option or a bad
file is one clear line on stderr and a non-zero exit, never a traceback; --debug or
RECLORA_DEBUG=1 brings the traceback back. Entry points: the `reclora` console script
(reclora.cli:main, with `reclora run` and `reclora data ...`) and `python -m reclora.crm`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import reclora
from reclora.cli import SUBCOMMANDS
from reclora.cli import main as reclora_main
from reclora.crm.__main__ import main as crm_main
from reclora.data.base import DataError
from reclora.data.cli import main as data_main
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
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_reclora_run_bad_options(case, capsys, tmp_path) -> None:
    argv, word = RUN_CASES[case]
    code, err = call(run_main, [*argv, "--output", str(tmp_path / "out")], capsys)
    assert_one_line(code, err, word)
    assert not (tmp_path / "out").exists()  # refused before anything was written


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
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_reclora_data_bad_options(case, capsys) -> None:
    argv, word = DATA_CASES[case]
    code, err = call(data_main, argv, capsys)
    assert_one_line(code, err, word)


def test_reclora_data_corrupt_files(capsys, tmp_path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        (folder / name).write_bytes(b"\xff\xfe not utf-8 \x00\x01")
    code, err = call(data_main, ["stats", str(folder)], capsys)
    assert_one_line(code, err, "reclora data: error:", "ml-100k")


CRM_CASES = {
    "epochs-zero": (["--epochs", "0"], "--epochs"),
    "lr-negative": (["--lr", "-1"], "--lr"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "seed-too-large": (["--seed", str(2**64)], "--seed"),
    "k-id-zero": (["--k-id", "0"], "--k-id"),
    "crms": (["--crms", "gru"], "--crms"),
    "no-such-dataset": (["--dataset", "/no/such/folder"], "/no/such/folder"),
}


@pytest.mark.parametrize("case", sorted(CRM_CASES))
def test_python_m_reclora_crm_bad_options(case, capsys, tmp_path) -> None:
    argv, word = CRM_CASES[case]
    code, err = call(crm_main, [*argv, "--output", str(tmp_path / "o")], capsys)
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
