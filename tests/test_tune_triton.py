"""benchmarks/tune_triton.py's time budget and its card file, without a GPU: the timings are
made up (fake `timed`, a fake clock), the sweeps and the writes are the real ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import tune_triton as tt  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_timings(monkeypatch, table, key, clock, ms_of, seconds_each):
    """`timed` gives ms_of(table[key]) and advances the clock by `seconds_each`."""
    seen = []

    def timed(fn):
        seen.append(dict(table[key]))
        clock.now += seconds_each
        return ms_of(table[key])

    monkeypatch.setattr(tt, "timed", timed)
    return seen


def test_sweep_keeps_the_best_it_timed_and_stops_when_out_of_time(monkeypatch):
    clock = Clock()
    budget = tt.Budget(25.0, clock=clock)
    table = {"k": {"B": 0}}
    cands = [{"B": b} for b in (5, 3, 4, 1, 2)]  # 1 would win, but comes too late
    seen = fake_timings(monkeypatch, table, "k", clock, lambda e: float(e["B"]), 10.0)
    best = tt.sweep(table, "k", cands, fn=None, budget=budget)
    assert seen == cands[:3]  # timed at 0, 10, 20 s; at 30 s past the 25 s budget
    assert best == {"B": 3} and table["k"] == {"B": 3}
    assert budget.cut == ["k"]
    # No limit: every candidate timed, the best kept, nothing cut.
    seen.clear()
    free = tt.Budget(None, clock=clock)
    assert tt.sweep(table, "k", cands, fn=None, budget=free) == {"B": 1}
    assert seen == cands and free.cut == []


def test_a_sweep_keeps_the_switches_its_grid_does_not_sweep(monkeypatch):
    """outer.ONE_PASS and fused.SHRINK are design switches, not in the tile grids: a sweep
    once wrote each candidate as the whole entry, so the card file turned both off."""
    clock = Clock()
    table = {"outer": {"BLOCK_T": 64, "ONE_PASS": True}}
    seen = fake_timings(monkeypatch, table, "outer", clock, lambda e: float(e["BLOCK_T"]), 1.0)
    best = tt.sweep(table, "outer", tt.grid(BLOCK_T=[128, 32]), fn=None)
    assert seen == [{"BLOCK_T": 128, "ONE_PASS": True}, {"BLOCK_T": 32, "ONE_PASS": True}]
    assert best == table["outer"] == {"BLOCK_T": 32, "ONE_PASS": True}


def test_a_sweep_out_of_time_before_it_starts_keeps_the_entry(monkeypatch):
    clock = Clock()
    budget = tt.Budget(1.0, clock=clock)
    clock.now = 2.0
    table = {"k": {"B": 7}}
    seen = fake_timings(monkeypatch, table, "k", clock, lambda e: 1.0, 1.0)
    assert tt.sweep(table, "k", [{"B": 1}], fn=None, budget=budget) == {"B": 7}
    assert not seen and budget.cut == ["k"]


def test_choose_fused_out_of_time_leaves_the_fused_gemm_off(monkeypatch):
    clock = Clock()
    budget = tt.Budget(1.0, clock=clock)
    clock.now = 5.0
    table = {"expand": {"BLOCK_T": 64, "fused": True}, "fused": {"BLOCK_T": 128}}
    seen = fake_timings(monkeypatch, table, "fused", clock, lambda e: 1.0, 1.0)
    tt.choose_fused(table, "expand", "fused", [{"BLOCK_T": 64}], fn=None, budget=budget)
    assert table["expand"] == {"BLOCK_T": 64, "fused": False}
    assert not seen and budget.cut == ["fused"]


def test_choose_fused_keeps_it_on_only_where_it_measured_faster(monkeypatch):
    for fused_ms, on in ((0.5, True), (2.0, False)):
        table = {"expand": {"BLOCK_T": 64, "fused": False}, "fused": {"BLOCK_T": 128}}
        monkeypatch.setattr(
            tt, "timed", lambda fn, t=table, f=fused_ms: f if t["expand"]["fused"] else 1.0)
        tt.choose_fused(table, "expand", "fused", [{"BLOCK_T": 64}], fn=None)
        assert table["expand"]["fused"] is on


def test_save_winners_merges_over_the_held_entries_atomically(tmp_path):
    path = tmp_path / "card.json"
    path.write_text("an earlier partial write")
    held = {"shrink": {"BLOCK_T": 128}, "outer": {"BLOCK_O": 64}, "_about": "old"}
    tt.save_winners(path, {"shrink": {"BLOCK_T": 64}, "auto": {"prefill": "triton"}}, "new",
                    held)
    got = json.loads(path.read_text())
    assert got == {"shrink": {"BLOCK_T": 64}, "outer": {"BLOCK_O": 64},
                   "auto": {"prefill": "triton"}, "_about": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]  # no temporary left
    assert held["shrink"] == {"BLOCK_T": 128}  # the held entries are not changed


def test_held_entries_are_the_repo_card_files(tmp_path, monkeypatch):
    """--out elsewhere (the GPU machine's $OUT) still starts from the repo's card file."""
    monkeypatch.setattr(tt.configs, "CONFIG_DIR", tmp_path)
    (tmp_path / "nvidia_h100_80gb_hbm3.json").write_text(json.dumps({"outer": {"BLOCK_O": 64}}))
    assert tt.held_entries("NVIDIA H100 80GB HBM3") == {"outer": {"BLOCK_O": 64}}
    assert tt.held_entries("NVIDIA H200") == {}


def test_about_names_what_was_cut_and_what_is_left():
    budget = tt.Budget(None)
    assert "Cut short" not in tt._about("H100", budget, [])
    budget.cut.append("expand")
    text = tt._about("H100", budget, ["mix", "auto"])
    assert "Cut short by --budget-s in: expand." in text
    assert "Not tuned yet: mix, auto" in text


def test_a_budget_within_the_auto_reserve_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        tt.main(["--budget-s", str(tt.AUTO_RESERVE_S)])
    assert err.value.code == 2
    assert "--budget-s must exceed" in capsys.readouterr().err



def test_each_workload_runs_on_its_own_inputs(monkeypatch):
    """The mixing's sweep times a prefill and a decode forward together (once a rebound
    local made it two decodes); the backward takes the prefill's gradients."""
    import torch

    real = tt.problem
    monkeypatch.setattr(tt, "D", 8)  # the sizes' rows and lengths, tiny rows
    monkeypatch.setattr(tt, "problem", lambda tokens, rows: real(tokens, rows, torch.float32,
                                                                 "cpu"))
    shapes = []

    def fake_op(x, weight, bias, a, b, w, scale, backend):
        shapes.append(tuple(x.shape[:2]))
        return x * (a.sum() + b.sum() + w.sum())

    monkeypatch.setattr(tt, "lora_mix_linear", fake_op)
    calls = tt.workloads()
    for name, want in (("prefill", [(64, 128)]), ("decode", [(64, 1)]),
                       ("mixed", [(64, 128), (8, 8)]), ("prefill_fwd_bwd", [(64, 128)])):
        shapes.clear()
        calls[name]()
        assert shapes == want, name


# --- the `auto` choice against plain torch ----------------------------------------------------


def fake_auto(monkeypatch, ms: dict) -> list[str]:
    """pick_auto's problems, forwards and plain-torch calls made up: each call is
    (name, tokens) and takes ms[(name, tokens)] (absent: the call failed). Returns what was
    timed."""
    import reclora_kernels

    timed = []
    monkeypatch.setattr(reclora_kernels, "available_backends",
                        lambda: ["reference", "triton", "cuda"])
    monkeypatch.setattr(tt, "problem", lambda tokens, rows: tokens)
    monkeypatch.setattr(tt, "_forward", lambda tokens, backend: (backend, tokens))
    monkeypatch.setattr(tt, "_plain_torch", lambda tokens: {
        name: (name, tokens) for name in (tt.FLOOR, "F.linear")})

    def fake_timed(call):
        if not isinstance(call, tuple):  # a sweep's workload (main): every config alike
            return 1.0
        timed.append(call[0])
        return ms.get(call, float("inf"))

    monkeypatch.setattr(tt, "timed", fake_timed)
    return timed


# Both kernels slower than materialise+bmm at the prefill size (as the H100 measured the old
# design: 2.11x and 42x the base against 1.52x); at the decode size cuda is the fastest and
# beats it.
SLOW_PREFILL = {("triton", 8192): 0.60, ("cuda", 8192): 0.70, (tt.FLOOR, 8192): 0.50,
                ("F.linear", 8192): 0.33, ("triton", 64): 0.030, ("cuda", 64): 0.025,
                (tt.FLOOR, 64): 0.050, ("F.linear", 64): 0.020}


def test_auto_names_no_backend_slower_than_plain_torch(monkeypatch, capsys):
    timed = fake_auto(monkeypatch, SLOW_PREFILL)
    chosen, measured = tt.pick_auto(None)
    assert chosen == {"decode": "cuda"}  # no prefill entry: nothing beat materialise+bmm
    assert {tt.FLOOR, "F.linear"} <= set(timed) and "reference" not in timed
    assert measured["prefill"]["us"] == {"triton": 600.0, "cuda": 700.0, tt.FLOOR: 500.0,
                                         "F.linear": 330.0}
    assert "triton, takes 1.20x materialise+bmm's time; no entry" in measured["prefill"]["note"]
    assert measured["decode"]["note"] == "cuda: 0.50x materialise+bmm's time"
    assert "WARNING: auto[prefill]" in capsys.readouterr().out


def test_auto_skips_a_class_whose_backends_or_floor_failed(monkeypatch):
    fake_auto(monkeypatch, {})  # every call fails
    chosen, measured = tt.pick_auto(None)
    assert chosen == {}  # once "triton" (min of all-inf), written as measured fastest
    assert measured["prefill"]["us"]["triton"] is None  # JSON null, not Infinity
    assert measured["prefill"]["note"].startswith("every backend failed")
    # the floor failed: no backend is shown faster than plain torch
    fake_auto(monkeypatch, {k: v for k, v in SLOW_PREFILL.items() if k[0] != tt.FLOOR})
    chosen, measured = tt.pick_auto(None)
    assert chosen == {} and "failed to run" in measured["decode"]["note"]


def test_the_card_file_main_writes_reads_back_as_measured(monkeypatch, tmp_path):
    """main end to end (sweeps and timings made up): the card file's `auto` names cuda for
    decode and has no prefill entry, so configs falls back to triton there, even over the
    held file's earlier prefill choice; "_auto_measured" beside it is not read as a choice."""
    import torch

    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "default.json").write_text((tt.configs.CONFIG_DIR / "default.json").read_text())
    card = cfg / "fake_card.json"
    card.write_text(json.dumps({"auto": {"prefill": "cuda", "decode": "triton"}}))
    monkeypatch.setattr(tt.configs, "CONFIG_DIR", cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake Card")
    monkeypatch.setattr(tt.configs, "_device_name", lambda index: "Fake Card")
    monkeypatch.setattr(tt, "workloads", lambda: dict.fromkeys(
        ("prefill", "prefill_fwd_bwd", "decode", "mixed")))
    fake_auto(monkeypatch, SLOW_PREFILL)
    tt.configs._table.cache_clear()
    tt.configs._auto_choices.cache_clear()
    try:
        assert tt.main(["--out", str(card)]) == 0
        written = json.loads(card.read_text())
        assert written["auto"] == {"decode": "cuda"}
        assert written["_auto_measured"]["prefill"]["us"][tt.FLOOR] == 500.0
        tt.configs._table.cache_clear()
        dev = torch.device("cuda")
        assert tt.configs.auto_backend(dev, 8192, 64) == "triton"  # the default
        assert tt.configs.auto_backend(dev, 64, 8) == "cuda"
        assert tt.configs.auto_may_pick(dev, "cuda") and not tt.configs.auto_may_pick(dev,
                                                                                      "triton")
    finally:
        tt.configs._table.cache_clear()
        tt.configs._auto_choices.cache_clear()
