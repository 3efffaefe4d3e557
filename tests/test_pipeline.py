"""`reclora run` end to end on ML-100K with a tiny random Llama: every stage, the report
files, and --resume skipping finished stages."""

from __future__ import annotations

import json

import pytest
from tiny_llm import tiny_llama, tiny_tokenizer

from reclora import metrics
from reclora.pipeline import ABLATIONS, LLM_MODELS, config_from_args, main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + word-level tokenizer saved as a transformers folder."""
    from reclora.data import load_dataset

    ds = load_dataset("ml-100k")
    words = ds.item_title + (ds.user_profile or []) + [
        "He She watched the following movies in order in the past , and rated them : stars "
        "star Based on he has deduce if will like movie *** Note that more user liked You "
        "should ONLY tell me yes or no . A chat between a curious user and an artificial "
        "intelligence assistant The assistant gives helpful detailed polite answers to "
        "questions USER ASSISTANT"]
    tok = tiny_tokenizer(words)
    path = tmp_path_factory.mktemp("tiny_llm")
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_then_resume(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["--quick", "--output", str(out), "--model", str(tiny_model_dir), "--crms", "din",
            "--n", "16", "--n-valid", "24", "--n-test", "48", "--k-text", "2",
            "--max-length", "160", "--ablations", "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    names = ["din", *LLM_MODELS, *ABLATIONS]
    assert list(res["models"]) == names
    for name in names:
        m = res["models"][name]
        assert {"auc", "logloss", "n_train", "n_test", "train_s"} <= set(m)
        assert m["n_test"] == 48 and 0.0 <= m["auc"] <= 1.0
        lo, hi = m["auc_ci95"]
        assert lo <= m["auc"] <= hi
    assert res["models"]["reclora"]["n_train"] == 16
    assert res["models"]["zero-shot"]["n_train"] == 0
    assert set(res["comparisons"]) == {f"reclora vs {n}" for n in names if n != "reclora"}
    corr = res["rank_corr_with_gate_crm"]
    assert corr["crm"] == "din" and set(corr["spearman"]) == set(names) - {"din"}
    stage = {n: json.loads((out / "stages" / f"{n}.json").read_text())["probs"]
             for n in ("crm_din", "reclora")}
    assert corr["spearman"]["reclora"] == pytest.approx(
        metrics.rank_correlation(stage["crm_din"], stage["reclora"]), nan_ok=True)
    assert "Spearman rank correlation" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    assert "| reclora |" in (out / "results.md").read_text()
    assert (out / "reclora" / "best.safetensors").is_file()
    assert json.loads((out / "reclora" / "stage2_config.json").read_text())["num_adapters"] == 16
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()}
    assert len(stamps) == len(names)

    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").iterdir()} == stamps
    for name in names:
        assert again["models"][name]["auc"] == res["models"][name]["auc"]


def test_fractional_n_is_applied_once(tiny_model_dir, tmp_path) -> None:
    """--n 0.0002 of ML-100K's 75,031 training samples is 15 samples for every LLM model."""
    out = tmp_path / "frac"
    assert main(["--quick", "--output", str(out), "--model", str(tiny_model_dir), "--crms",
                 "din", "--n", "0.0002", "--n-valid", "8", "--n-test", "24", "--k-text", "2",
                 "--max-length", "160", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert round(0.0002 * res["dataset"]["train"]) == 15
    for name in ("tallrec", "rella", "reclora"):
        assert res["models"][name]["n_train"] == 15, name


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
