"""`reclora run --mix {factor,output} --gate-top-k N --gate-sqrt`: RecLoRA's mixture and its
gates' options (RECLORA.md section 1, the reference code's options), off by default and in
the fingerprints of the stages they shape only when set; the run trains with them and
serving builds the same banks and gates."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_reliability_pipeline import stage_fingerprints
from tiny_llm import TINY_RUN, save_tiny_model, tiny_llama, tiny_tokenizer

import reclora.pipeline as pl
from reclora.few2many import Stage2Config, inject_adapters
from reclora.gates import PersonalizedGate
from reclora.llm import LLMCTR
from reclora.serving import Recommender, RunFolderError

OPTIONS = {"mix": "output", "gate_top_k": 4, "gate_sqrt": True}
STAGES = (*pl.LLM_MODELS, *pl.ABLATIONS, "crm_din")


def test_only_recloras_stages_train_with_them() -> None:
    cfg = replace(pl.RunConfig(), **OPTIONS)
    trained = [n for n in pl.LLM_MODELS + pl.ABLATIONS if n != "zero-shot"]
    made = {n: cfg.model_stage2(n, 8) for n in trained}
    for name, s2 in made.items():
        mix = "output" if name.startswith("reclora") else "factor"
        gated = name.startswith("reclora") and name != "reclora-uniform"
        assert (s2.mix, s2.gate_top_k, s2.gate_sqrt) == ((mix, 4, True) if gated else
                                                         (mix, None, False)), name


def test_they_are_in_the_fingerprints_of_the_stages_they_shape(tmp_path) -> None:
    base = stage_fingerprints(pl.RunConfig(), tmp_path, STAGES)
    assert not any(set(OPTIONS) & set(fp) for fp in base.values())
    changed = {}
    for name, value in OPTIONS.items():
        other = stage_fingerprints(replace(pl.RunConfig(), **{name: value}), tmp_path, STAGES)
        changed[name] = sorted(n for n in STAGES if other[n] != base[n])
        assert all(other[n][name] == value for n in changed[name])
    gated = ["reclora", "reclora-no-f2m", "reclora-recent-text", "reclora-short-id"]
    assert changed == {"mix": sorted(gated + ["reclora-uniform"]), "gate_top_k": gated,
                       "gate_sqrt": gated}


def test_the_banks_and_gates_are_built_with_them() -> None:
    tok = tiny_tokenizer(["a b"])
    ctr = LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True)
    layers = inject_adapters(ctr, Stage2Config(num_adapters=6, **OPTIONS))
    assert layers and all(layer.mix == "output" for layer in layers.values())
    gates = [m for m in ctr.model.modules() if isinstance(m, PersonalizedGate)]
    assert len(gates) == len(layers)
    assert all(g.config.top_k == 4 and g.config.sqrt for g in gates)
    w, idx = gates[0](torch.randn(5, 256))
    assert w.shape == idx.shape == (5, 4)  # hard top-4 of 6: the weights and their adapters
    assert torch.allclose(w.pow(2).sum(1), torch.ones(5), atol=1e-5)  # sqrt of a softmax


@pytest.mark.parametrize("argv, match", [
    (["--gate-top-k", "1"], "--gate-top-k must be from 2 to --k (16), got 1"),
    (["--gate-top-k", "9", "--k", "8"], "--gate-top-k must be from 2 to --k (8), got 9"),
    (["--mix", "sum"], "invalid choice: 'sum'"),
])
def test_bad_values_are_one_line(capsys, argv, match) -> None:
    from test_cli_errors import assert_one_line, call

    code, err = call(pl.main, argv, capsys)
    assert_one_line(code, err, match)


@pytest.fixture(scope="module")
def option_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llm")
    save_tiny_model(model_dir)
    out = tmp_path_factory.mktemp("mix") / "run"
    assert pl.main([*TINY_RUN, "--model", str(model_dir), "--output", str(out), "--mix",
                    "output", "--gate-top-k", "4", "--gate-sqrt"]) == 0
    return out


def test_the_run_records_and_serving_reproduces_them(option_run) -> None:
    saved = json.loads((option_run / "reclora" / "stage2_config.json").read_text())
    assert {k: saved[k] for k in OPTIONS} == OPTIONS
    plain = json.loads((option_run / "tallrec" / "stage2_config.json").read_text())
    assert (plain["mix"], plain["gate_top_k"], plain["gate_sqrt"]) == ("factor", None, False)
    with open(option_run / "predictions.csv", newline="") as fh:
        want = np.asarray([float(r["reclora"]) for r in csv.DictReader(fh)])
    rec = Recommender.load(option_run)
    gates = [m for m in rec.ctr.model.modules() if isinstance(m, PersonalizedGate)]
    assert gates and all(g.config.top_k == 4 and g.config.sqrt for g in gates)
    assert np.abs(rec.score(rec.test_requests()) - want).max() <= 1e-5


def test_a_folder_read_without_them_is_refused(option_run, tmp_path) -> None:
    """Without the keys, the folder reads as made before the options (their defaults):
    RecLoRA's stage, made with them, no longer matches and is refused, not served with
    soft gates."""
    out = tmp_path / "run"
    shutil.copytree(option_run, out)
    for rel in ("run_config.json", "reclora/stage2_config.json"):
        cfg = json.loads((out / rel).read_text())
        for k in OPTIONS:
            del cfg[k]
        (out / rel).write_text(json.dumps(cfg))
    with pytest.raises(RunFolderError, match=r"reclora\.json: made with other inputs"):
        Recommender.load(out)
    Recommender.load(out, model="tallrec")
