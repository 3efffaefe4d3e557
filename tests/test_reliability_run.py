"""`reclora run` reliability (issue 17, items 1, 2, 6, 9): --resume redoes a stage whose
options changed or whose files are corrupt, the report never mixes settings, CRM
checkpoints load without running code, run folders are locked, files get the umask's mode.

One tiny run (random Llama, DIN on K_id = 5) is made once per module and copied into each
test's folder; every later run is a --resume of that copy.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_errors import assert_one_line
from tiny_llm import TINY_RUN, save_tiny_model

from reclora import metrics
from reclora.checkpoint import atomic_write
from reclora.crm import load_crm
from reclora.pipeline import LOCK_NAME, folder_lock, main

TINY = TINY_RUN


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + word-level tokenizer saved as a transformers folder."""
    path = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main([*TINY, "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(base_run, tiny_model_dir, tmp_path):
    """(folder, argv) of a fresh copy of the base run and the argv that made it."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out, [*TINY, "--model", str(tiny_model_dir), "--output", str(out)]


def _stage(out, name: str) -> dict:
    return json.loads((out / "stages" / f"{name}.json").read_text())


def _mtimes(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _test_labels(out) -> np.ndarray:
    from reclora.data import load_dataset

    test = np.asarray(json.loads((out / "subsets.json").read_text())["test"])
    return load_dataset("ml-100k").label[test]


# ------------------------------------------------------------------ item 1: fingerprints
def test_resume_with_another_seed_redoes_every_stage(run_copy) -> None:
    """Repro 1: `--resume --seed 1` kept DIN's old AUC while its stored scores belonged to
    the seed-0 test subset."""
    out, argv = run_copy
    before = _mtimes(out)
    assert main(argv + ["--resume", "--seed", "1"]) == 0
    after = _mtimes(out)
    assert all(after[n] != before[n] for n in before)  # every stage depends on the seed
    res, y = _results(out), _test_labels(out)
    for name in ("din", "zero-shot", "reclora"):
        probs = _stage(out, "crm_din" if name == "din" else name)["probs"]
        # The reported AUC is the AUC of the stored scores on the subset the report uses.
        assert res["models"][name]["auc"] == pytest.approx(metrics.evaluate(y, probs)["auc"])
    assert _stage(out, "crm_din")["fingerprint"]["seed"] == 1
    assert res["config"]["seed"] == 1


def test_resume_with_another_bank_redoes_only_the_adapter_stages(run_copy) -> None:
    """Repro 2: `--resume --k 4 --r 2` reported k = 4, r = 2 for 16 x rank-8 adapters."""
    out, argv = run_copy
    before = _mtimes(out)
    assert main(argv + ["--resume", "--k", "4", "--r", "2"]) == 0
    after = _mtimes(out)
    redone = {n for n in before if after[n] != before[n]}
    # r shapes every trained adapter; k only the bank; the CRM and zero-shot are reused.
    assert redone == {"tallrec.json", "rella.json", "reclora.json"}
    s2 = json.loads((out / "reclora" / "stage2_config.json").read_text())
    assert (s2["num_adapters"], s2["rank"]) == (4, 2)
    assert json.loads((out / "tallrec" / "stage2_config.json").read_text())["rank"] == 2
    md = (out / "results.md").read_text()
    assert "k = 4, r = 2" in md


def test_resume_with_another_test_subset(run_copy) -> None:
    """Repro 3: `--resume --n-test 32` crashed (`scores must have shape (32,)`)."""
    out, argv = run_copy
    assert main(argv + ["--resume", "--n-test", "32"]) == 0
    res = _results(out)
    assert {m["n_test"] for m in res["models"].values()} == {32}
    assert (out / "results.md").read_text().count("Test subset: 32 samples") == 1
    y = _test_labels(out)
    assert y.size == 32
    assert res["models"]["din"]["auc"] == pytest.approx(
        metrics.evaluate(y, _stage(out, "crm_din")["probs"])["auc"])


def test_resume_with_the_same_options_reuses_every_stage(run_copy) -> None:
    out, argv = run_copy
    before = _mtimes(out)
    assert main(argv + ["--resume"]) == 0
    assert _mtimes(out) == before


def test_a_reused_crm_checkpoint_is_read_once(run_copy, monkeypatch) -> None:
    """--resume hashed crm/din.pt, loaded it to check it, then read, hashed and loaded it
    again: three reads (41 MB and more on ML-25M). Now one read serves the check and the
    stages after, and the file is not opened any other way."""
    import reclora.pipeline as pl

    out, argv = run_copy
    ckpt = out / "crm" / "din.pt"
    reads: list[str] = []
    read_bytes, file_sha256 = Path.read_bytes, pl._file_sha256

    def counted(self):
        reads.append(str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    monkeypatch.setattr(pl, "_file_sha256",
                        lambda p: reads.append(str(p)) or file_sha256(p))
    before = _mtimes(out)
    assert main(argv + ["--resume"]) == 0
    assert _mtimes(out) == before
    assert reads.count(str(ckpt)) == 1


def test_resume_redoes_a_stage_whose_adapters_were_rewritten(run_copy, capsys) -> None:
    """A run cut off inside a stage under other options rewrites <stage>/best.safetensors
    before its stage file: --resume with the first options must not report the old result
    over those adapters (it did, and `reclora score` served them), but redo the stage."""
    out, argv = run_copy
    weights = out / "reclora" / "best.safetensors"
    shutil.copyfile(out / "tallrec" / "best.safetensors", weights)  # not reclora's
    before = _mtimes(out)
    assert main(argv + ["--resume"]) == 0
    after = _mtimes(out)
    assert {n for n in before if after[n] != before[n]} == {"reclora.json"}
    assert "not the adapters of" in capsys.readouterr().err
    import hashlib

    assert _stage(out, "reclora")["adapters_sha256"] == hashlib.sha256(
        weights.read_bytes()).hexdigest()


# ------------------------------------------------------------------ item 6: corrupt files
CORRUPTIONS = {
    "non-utf8": ("stages/zero-shot.json", b"\xff\xfe\x00garbage"),
    "empty-object": ("stages/zero-shot.json", b"{}"),
    "wrong-length": ("stages/zero-shot.json", b'{"auc": 0.5, "logloss": 0.7, "n_train": 0, '
                     b'"n_test": 3, "train_s": 0, "probs": [0.1, 0.2, 0.3]}'),
    "ckpt-truncated": ("crm/din.pt", None),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_resume_redoes_a_stage_whose_file_is_corrupt(run_copy, case, capsys) -> None:
    out, argv = run_copy
    rel, data = CORRUPTIONS[case]
    path = out / rel
    if data is None:  # truncated: the first half of the real checkpoint
        data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    stage = "zero-shot" if rel.startswith("stages") else "crm_din"
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and stage in warnings[0] and "redoing" in warnings[0], err
    assert "Traceback" not in err
    assert len(_stage(out, stage)["probs"]) == 24
    load_crm(out / "crm" / "din.pt")  # a good checkpoint again


# ------------------------------------------------------------------ item 2: safe loading
class _Payload:
    """Unpickling this creates the marker file (a stand-in for any code a file could run)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_load_crm_does_not_run_code_in_a_crafted_file(tmp_path, fmt) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "din.pt"
    payload = {"name": "din", "config": {}, "schema": _Payload(str(marker)), "state_dict": {}}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="not a CRM checkpoint that loads safely"):
        load_crm(path)
    assert not marker.exists()


RANDOM = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))


@pytest.mark.parametrize("data", [b"", b"\x80\x04", RANDOM, b"PK\x03\x04" + RANDOM,
                                  "truncated", pickle.dumps([1, 2, 3]),
                                  pickle.dumps({"name": "din"})])
def test_load_crm_rejects_files_that_are_not_checkpoints(base_run, tmp_path, data) -> None:
    """Empty, random, truncated or foreign files: a ValueError naming the file (resume
    catches it and redoes the stage), never a raw unpickling or zip traceback."""
    path = tmp_path / "din.pt"
    if data == "truncated":
        good = (base_run / "crm" / "din.pt").read_bytes()
        data = good[: len(good) // 2]
    path.write_bytes(data)
    with pytest.raises(ValueError, match="din.pt"):
        load_crm(path)


def test_resume_never_loads_a_crafted_checkpoint(run_copy, capsys) -> None:
    """Even with a stage file vouching for it (its sha256), a crafted crm/din.pt is refused,
    its payload does not run, and the stage is redone."""
    import hashlib

    out, argv = run_copy
    marker = out / "pwned"
    ckpt = out / "crm" / "din.pt"
    torch.save({"name": "din", "config": {}, "schema": _Payload(str(marker)),
                "state_dict": {}}, ckpt)
    stage = _stage(out, "crm_din")
    stage["checkpoint_sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (out / "stages" / "crm_din.json").write_text(json.dumps(stage))
    assert main(argv + ["--resume"]) == 0
    assert not marker.exists()
    assert "loads safely" in capsys.readouterr().err
    load_crm(ckpt)


# ------------------------------------------------------------------ item 9: output hygiene
def test_atomic_writes_get_the_umask_mode(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("x"))
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o666 & ~old


def test_run_files_get_the_umask_mode(base_run) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for rel in ("results.json", "results.md", "results.png", "run_config.json",
                "stages/reclora.json", "crm/din.pt", "reclora/best.safetensors"):
        assert stat.S_IMODE((base_run / rel).stat().st_mode) == 0o666 & ~umask, rel
    # results.md is written through a temporary file too: none is left behind.
    assert not [p for p in base_run.iterdir() if p.name.endswith(".tmp")]


def test_report_files_are_written_atomically(run_copy, monkeypatch) -> None:
    """results.md went through a plain write_text: a crash mid-write left half a file."""
    import reclora.pipeline as pipeline

    out, argv = run_copy
    seen = []
    real = pipeline.atomic_write

    def spy(path, write):
        seen.append(Path(path).name)
        real(path, write)

    monkeypatch.setattr(pipeline, "atomic_write", spy)
    assert main(argv + ["--resume"]) == 0
    assert {"results.md", "results.png"} <= set(seen)


def test_results_md_states_the_test_subset_used(base_run) -> None:
    """The header gives the number of test samples scored, not the one asked for (--n-test
    beyond the test split, or 0, takes the whole split)."""
    from reclora.pipeline import markdown

    res = _results(base_run)
    assert res["n_test_used"] == 24
    assert "Test subset: 24 samples" in (base_run / "results.md").read_text()
    res["config"]["n_test"] = 100000
    assert "Test subset: 24 samples" in markdown(res)


def test_a_second_run_into_a_locked_folder_stops(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    with folder_lock(out):
        capsys.readouterr()
        assert main([*TINY, "--output", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "another run" in err[0], err
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the second run wrote nothing
    with folder_lock(out):  # released: the folder can be locked again
        pass


def test_the_data_digest_covers_texts_ratings_and_features() -> None:
    """Each stage's fingerprint holds the data's digest: a --data-dir with the same ids but
    other titles, descriptions, genres, ratings or profiles must not match (it once hashed
    the ids alone, and --resume reused every stage over changed prompts)."""
    import copy

    from reclora.data import load_dataset
    from reclora.pipeline import data_digest

    ds = load_dataset("ml-100k")
    base = data_digest(ds)
    assert data_digest(copy.copy(ds)) == base

    def text_edit(texts):
        return [texts[0] + "!", *texts[1:]]

    edits = {"item_title": text_edit, "item_description": text_edit,
             "item_genres": text_edit, "user_profile": text_edit,
             "rating": lambda a: np.where(np.arange(a.size) == 0, a + 1, a),
             "item_genre_ids": lambda a: np.roll(a, 1, axis=0),
             "user_features": lambda a: np.roll(a, 1, axis=0)}
    for field, edit in edits.items():
        changed = copy.copy(ds)
        setattr(changed, field, edit(getattr(ds, field)))
        assert data_digest(changed) != base, field


def test_a_max_length_too_small_for_the_question_stops_before_the_crms(
        tiny_model_dir, tmp_path, capsys, monkeypatch) -> None:
    """--max-length below a sample's prompt without history is one line before any CRM
    trains (it was an error at the first LLM stage, after every CRM), naming the least
    length that fits: with that length the run passes the check and reaches the CRMs. One
    line: --no-progress hides transformers' "Loading weights" bar too."""
    from reclora.pipeline import Run

    def stop_at_the_crms(self, name):
        raise RuntimeError("reached the CRM stage")

    monkeypatch.setattr(Run, "crm_stage", stop_at_the_crms)
    argv = [a for a in TINY if a not in ("--max-length", "160")]
    argv += ["--model", str(tiny_model_dir), "--output", str(tmp_path / "run")]
    capsys.readouterr()
    code = main([*argv, "--max-length", "8"])
    err = capsys.readouterr().err
    assert_one_line(code, err, "--max-length 8 is too small", "without any history")
    assert not (tmp_path / "run" / "run_config.json").exists()  # the folder is untouched
    need = int(err.split("use --max-length ")[1].split()[0])
    for length, words in ((need - 1, f"--max-length {need - 1} is too small"),
                          (need, "reached the CRM stage")):
        code = main([*argv, "--max-length", str(length)])
        assert_one_line(code, capsys.readouterr().err, words)



def test_a_resume_stopped_before_training_leaves_the_stage_config(run_copy, monkeypatch,
                                                                  capsys) -> None:
    """A --resume under other options stopped as training starts left its own
    stage2_config.json beside the finished stage's adapters; the next --resume with the first
    options reused the stage and serving refused the folder. The file is now written with
    the final adapters, so the finished stage's stays."""
    import reclora.few2many as few2many

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # a Ctrl-C or a kill as the first LLM stage trains

    out, argv = run_copy
    config = out / "tallrec" / "stage2_config.json"
    before = config.read_bytes()
    monkeypatch.setattr(few2many, "train_stage2", stopped)
    assert main([*argv, "--resume", "--batch-size", "4"]) == 130
    assert config.read_bytes() == before


def test_the_lock_is_not_written_through_a_link(tmp_path, capsys) -> None:
    """A run folder whose lock file links elsewhere (a folder someone sent): the lock's
    truncate and pid went into the link's target; now one line, and the target is kept."""
    out, outside = tmp_path / "run", tmp_path / "notes.txt"
    out.mkdir()
    outside.write_text("my notes\n")
    (out / LOCK_NAME).symlink_to(outside)
    capsys.readouterr()
    code = main([*TINY, "--output", str(out)])
    assert_one_line(code, capsys.readouterr().err, "run lock", "not a link")
    assert outside.read_text() == "my notes\n"
