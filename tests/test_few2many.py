"""Few2Many stage 2 on a tiny random Llama: config checks, learning through the gate, model
selection on validation, checkpoints, and DDP (2 gloo processes) against one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_llm import tiny_llama, tiny_tokenizer

from reclora.few2many import (
    CTRData,
    Stage2Config,
    _eval_steps,
    inject_adapters,
    run_stage2,
    sample_subset,
    train_stage2,
)
from reclora.llm import LLMCTR

WORDS = "USER : Will he like the movie ? He watched Heat Fargo Alien Brazil Twister ASSISTANT"


def make_ctr(seed: int = 0) -> LLMCTR:
    tok = tiny_tokenizer([WORDS])
    return LLMCTR(tiny_llama(len(tok), seed=seed), tok, add_special_tokens=True)


def make_data(ctr: LLMCTR, n: int, seed: int, dim: int = 16) -> CTRData:
    """Prompts that say nothing about the label; the user representation says it all, so
    only a model whose gate reads it can beat chance."""
    rng = np.random.default_rng(seed)
    titles = ["Heat", "Fargo", "Alien", "Brazil", "Twister"]
    labels = rng.integers(0, 2, n)
    reps = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    reps[:, 0] = torch.from_numpy(labels * 4.0 - 2.0).float()
    texts = [f"USER : He watched {' '.join(rng.choice(titles, rng.integers(1, 5)))} . Will he "
             f"like {rng.choice(titles)} ? ASSISTANT :" for _ in range(n)]
    return CTRData(ctr.encode(texts), labels, reps, np.arange(n))


def test_config_checks_and_counts() -> None:
    assert Stage2Config(n_train=100).count(1000) == 100
    assert Stage2Config(n_train=0.25).count(1000) == 250
    assert Stage2Config(n_train=5000).count(1000) == 1000
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="n_train"):
            Stage2Config(n_train=bad)
    with pytest.raises(ValueError, match="mix"):
        Stage2Config(mix="sum")
    with pytest.raises(ValueError, match="batch_size"):
        Stage2Config(batch_size=0)
    assert _eval_steps(10, 2) == [5, 10] and _eval_steps(3, 5) == [1, 2, 3]
    s = sample_subset(np.arange(100, 200), 10, seed=1)
    assert s.size == 10 and np.all(np.diff(s) > 0)
    assert np.array_equal(s, sample_subset(np.arange(100, 200), 10, seed=1))


def test_gated_bank_learns_from_user_reps_and_selects_on_valid(tmp_path) -> None:
    ctr = make_ctr()
    cfg = Stage2Config(n_train=192, num_adapters=4, rank=4, gate_dim=16, gate_dropout=0.0,
                       lr=2e-2, batch_size=16, epochs=3, eval_points=3, amp="off",
                       progress=False)
    inject_adapters(ctr, cfg)
    train, valid, test = (make_data(ctr, n, s) for n, s in ((256, 0), (96, 1), (96, 2)))
    res = run_stage2(ctr, train, valid, test, cfg, out_dir=tmp_path, name="t")
    assert res.n_train == 192 and res.steps == 3 * 12
    assert res.test is not None and res.test["auc"] > 0.8  # the gate carries the signal
    evals = [h for h in res.history if "valid_auc" in h]
    assert len(evals) == 3
    assert res.valid["auc"] == max(h["valid_auc"] for h in evals)
    assert res.best_step == max(evals, key=lambda h: h["valid_auc"])["step"]
    assert (tmp_path / "best.safetensors").is_file()
    saved = json.loads((tmp_path / "stage2_config.json").read_text())
    assert saved["num_adapters"] == 4 and saved["n_train"] == 192
    # The loaded adapters are the selected ones: scoring valid again reproduces its AUC.
    from reclora.few2many import evaluate

    again, _ = evaluate(ctr, valid, amp="off")
    assert again["auc"] == pytest.approx(res.valid["auc"], abs=1e-9)


def test_plain_lora_cannot_read_user_reps() -> None:
    ctr = make_ctr()
    cfg = Stage2Config(n_train=64, num_adapters=1, gated=False, rank=4, lr=1e-2,
                       batch_size=16, eval_points=1, amp="off", progress=False)
    inject_adapters(ctr, cfg)
    names = [n for n, p in ctr.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    train = make_data(ctr, 64, 0)
    res = train_stage2(ctr, train.with_user_reps(None), make_data(ctr, 64, 1), cfg)
    assert res.steps == 4


def test_gated_needs_user_reps() -> None:
    ctr = make_ctr()
    cfg = Stage2Config(n_train=16, num_adapters=2, gate_dim=16, amp="off", progress=False)
    inject_adapters(ctr, cfg)
    data = make_data(ctr, 16, 0).with_user_reps(None)
    with pytest.raises(ValueError, match="user_reps"):
        train_stage2(ctr, data, data, cfg)


def test_bad_splits_are_refused_before_any_step() -> None:
    """A one-class valid (no step can be selected) and a NaN h_u row (its gradients would
    reach every adapter) are refused up front, naming the split and the row; soft labels are
    refused, not floored to 0."""
    ctr = make_ctr()
    cfg = Stage2Config(n_train=16, num_adapters=2, gate_dim=16, batch_size=8, eval_points=1,
                       amp="off", progress=False)
    inject_adapters(ctr, cfg)
    before = {n: p.detach().clone() for n, p in ctr.named_parameters() if p.requires_grad}
    train, valid = make_data(ctr, 16, 0), make_data(ctr, 16, 1)
    one_class = CTRData(valid.tokens, np.ones(len(valid), dtype=np.int64), valid.user_reps)
    with pytest.raises(ValueError, match="valid needs both positive and negative"):
        train_stage2(ctr, train, one_class, cfg)
    reps = train.user_reps.clone()
    reps[5, 3] = float("nan")
    with pytest.raises(ValueError, match="train.user_reps row 5 holds NaN"):
        train_stage2(ctr, train.with_user_reps(reps), valid, cfg)
    with pytest.raises(ValueError, match="valid.user_reps row 5 holds NaN"):
        train_stage2(ctr, train, valid.with_user_reps(reps), cfg)
    with pytest.raises(ValueError, match="test.user_reps row 5 holds NaN"):
        run_stage2(ctr, train, valid, train.with_user_reps(reps), cfg)
    for n, p in ctr.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), f"{n} changed by a refused call"
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        CTRData(train.tokens, np.full(len(train), 0.9), None)


def test_the_best_step_on_valid_is_kept_not_the_last(monkeypatch) -> None:
    """Validation scripted to peak at the first of three evaluations: the adapters left
    loaded are those of that step (snapshotted when it was scored), not the last step's."""
    import reclora.few2many as f2m

    ctr = make_ctr()
    cfg = Stage2Config(n_train=48, num_adapters=2, rank=4, gate_dim=16, gate_dropout=0.0,
                       lr=5e-2, batch_size=8, eval_points=3, amp="off", progress=False)
    inject_adapters(ctr, cfg)
    scripted = iter([0.9, 0.6, 0.7])
    snapshots = []

    def fake_evaluate(model, data, **kw):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad})
        return {"auc": next(scripted), "logloss": 0.6, "accuracy": 0.5, "n": len(data)}, \
            np.full(len(data), 0.5)

    monkeypatch.setattr(f2m, "evaluate", fake_evaluate)
    res = train_stage2(ctr, make_data(ctr, 48, 0), make_data(ctr, 16, 1), cfg)
    assert len(snapshots) == 3 and res.best_step == 2 and res.valid["auc"] == 0.9
    final = {n: p.detach() for n, p in ctr.named_parameters() if p.requires_grad}
    for n, p in final.items():
        assert torch.equal(p, snapshots[0][n]), n
    assert any(not torch.equal(p, snapshots[-1][n]) for n, p in final.items())


def test_each_steps_logged_lr_is_the_rate_it_trained_with(monkeypatch) -> None:
    """The lr of a history row is the one its optimizer step used (it was read after the
    scheduler had moved on: the first warm-up step showed the peak, the last step 0)."""
    used = []

    class Spy(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            used.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    ctr = make_ctr()
    cfg = Stage2Config(n_train=12, num_adapters=2, rank=2, gate_dim=16, lr=1.0, batch_size=2,
                       grad_accum=2, epochs=2, warmup_ratio=0.2, eval_points=1, amp="off",
                       progress=False)
    inject_adapters(ctr, cfg)
    res = train_stage2(ctr, make_data(ctr, 12, 0), make_data(ctr, 8, 1), cfg)
    assert res.steps == 6 and len(used) == 6
    assert [h["lr"] for h in res.history] == used
    assert used[0] == 0.5 and used[-1] > 0  # warm-up (k+1)/(warm+1); the last step trains


# ----------------------------------------------------------------------------- DDP
DDP_CFG = {"n_train": 64, "num_adapters": 4, "rank": 4, "gate_dim": 16, "gate_dropout": 0.0,
           "lr": 1e-2, "eval_points": 2, "amp": "off", "progress": False}
# One SGD step on 13 samples (uneven: 7 on rank 0, 6 on rank 1): no warmup, no clipping, so
# the step is exactly -lr x the gradient of the mean loss over the 13 samples.
SGD_CFG = {**DDP_CFG, "n_train": 13, "lr": 0.5, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
           "eval_points": 1, "batch_size": 16}


def _losses(cfg: Stage2Config, keep: list | None = None) -> list[float]:
    ctr = make_ctr()
    if keep is not None:
        keep.append(ctr)
    inject_adapters(ctr, cfg)
    res = train_stage2(ctr, make_data(ctr, 64, 0), make_data(ctr, 32, 1), cfg)
    return [h["loss"] for h in res.history] + [res.valid["auc"]]


def _sgd(groups, lr, weight_decay):  # stands in for AdamW: the step is the raw gradient
    return torch.optim.SGD(groups, lr=lr)


def _one_sgd_step(cfg: Stage2Config) -> tuple[dict[str, torch.Tensor], float]:
    """The trainable parameters after one step (train_stage2 keeps the evaluated last step)
    and that step's logged loss."""
    ctr = make_ctr()
    inject_adapters(ctr, cfg)
    res = train_stage2(ctr, make_data(ctr, 13, 3), make_data(ctr, 16, 1), cfg)
    assert res.steps == 1
    params = {n: p.detach().clone() for n, p in ctr.named_parameters() if p.requires_grad}
    return params, res.history[0]["loss"]


def _two_rank_worker(rank: int, world: int, folder: str) -> None:
    """Every two-process check in one spawn (each spawn costs two interpreters importing
    torch and transformers, ~10 s on the 2-core CI machine): main_first, one DDP SGD step,
    DDP AdamW losses, then FSDP2 with gradient checkpointing. Results go to files: a pipe
    (SimpleQueue) fills up and blocks the worker until the parent reads, and the parent reads
    only after join."""
    import datetime
    import time

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from reclora.few2many import WAIT_TIMEOUT, main_first, wait_for_main

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        # main_first: rank 0 runs the block (slowly) before any other rank enters it.
        with main_first():
            if rank == 0:
                time.sleep(1.0)
                (Path(folder) / "cache").write_text("filled")
            seen = (Path(folder) / "cache").read_text()
        wait_for_main()
        from reclora.few2many import _WAIT_GROUP, is_sharded

        backends = [dist.get_backend(g) for g in _WAIT_GROUP.values()]

        torch.optim.AdamW = _sgd  # this process only (spawned)
        params, loss = _one_sgd_step(Stage2Config(**SGD_CFG))
        torch.save((params, loss), f"{folder}/step_rank{rank}.pt")
        torch.optim.AdamW = _ADAMW
        losses = _losses(Stage2Config(batch_size=8, grad_accum=1, **DDP_CFG))
        torch.save(losses, f"{folder}/losses_rank{rank}.pt")

        keep: list = []
        losses = _losses(Stage2Config(batch_size=8, grad_accum=1, fsdp=True, grad_ckpt=True,
                                      **DDP_CFG), keep)
        ctr = keep[0]
        ctr.reshard()  # the root unit stays gathered after a forward until asked
        # The frozen weights are sharded (DTensors), the adapters whole on every rank.
        layout = {"sharded": is_sharded(ctr), "frozen_dtensor": all(
            isinstance(p, DTensor) for p in ctr.parameters() if not p.requires_grad),
            "trainable_plain": all(not isinstance(p, DTensor) for p in ctr.parameters()
                                   if p.requires_grad)}
        torch.save({"seen": seen, "losses": losses, "groups": backends, "layout": layout,
                    "wait_s": WAIT_TIMEOUT.total_seconds()}, f"{folder}/fsdp_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


_ADAMW = torch.optim.AdamW


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The folder of _two_rank_worker's result files (2 gloo processes, spawned once)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_two_rank_worker, args=(2, str(folder)), nprocs=2, join=True,
                       start_method="spawn")
    return folder


@pytest.fixture(scope="module")
def one_process_losses() -> list[float]:
    """1 process x batch 8 x grad_accum 2: the reference of both 2 x batch 8 runs."""
    return _losses(Stage2Config(batch_size=8, grad_accum=2, **DDP_CFG))


@pytest.mark.timeout(280)
def test_ddp_two_processes_match_one_process(two_ranks, one_process_losses,
                                             monkeypatch) -> None:
    """(1) One SGD step on 13 samples split 7/6 over 2 ranks leaves EVERY rank with the
    parameters of one process stepping on all 13 (the gradient of the mean loss: each rank's
    loss weighs by its share times the world, since DDP averages over ranks).
    (2) 2 ranks x batch 8 == 1 process x batch 8 x grad_accum 2 over several AdamW steps:
    same samples per step, same averaged gradients, so the same losses step by step and the
    same selected model."""
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "AdamW", _sgd)
        single_params, single_loss = _one_sgd_step(Stage2Config(**SGD_CFG))
    fresh = make_ctr()
    inject_adapters(fresh, Stage2Config(**SGD_CFG))
    before = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    moved = max(float((single_params[n] - before[n]).abs().max()) for n in before)
    assert moved > 1e-4, "the step must move the parameters"
    single = one_process_losses
    for rank in (0, 1):
        params, loss = torch.load(two_ranks / f"step_rank{rank}.pt")
        assert set(params) == set(single_params)
        assert loss == pytest.approx(single_loss, rel=1e-5), rank
        for n, p in params.items():
            step, ref = p - before[n], single_params[n] - before[n]
            err = float((step - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
            assert err < 1e-4, f"rank {rank}: {n} step off by {err:.2e} (relative)"
    ddp = torch.load(two_ranks / "losses_rank0.pt")
    assert torch.load(two_ranks / "losses_rank1.pt") == ddp  # every rank logs the same
    assert len(ddp) == len(single) == 5
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert single[0] != pytest.approx(single[3], abs=1e-4)  # it did train


# -------------------------------------------------------------- gradient checkpointing
def _grads(ckpt: bool, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a gated bank (gate dropout on) over 6 users' prompts, backward() run
    after the personalize block has exited (as train_stage2 does); and how many times the
    first gated layer ran forward."""
    from reclora.injection import reclora_layers
    from reclora.llm import enable_grad_ckpt

    ctr = make_ctr()
    cfg = Stage2Config(n_train=8, num_adapters=4, rank=4, gate_dim=16, gate_dropout=0.3,
                       amp="off", progress=False)
    inject_adapters(ctr, cfg)
    with torch.no_grad():  # B = 0 at init: give the banks values so every factor has a grad
        for n, p in ctr.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    if ckpt:
        enable_grad_ckpt(ctr.model)
    layer = next(iter(reclora_layers(ctr.model).values()))
    calls = [0]
    layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    data = make_data(ctr, 6, 5)
    ctr.train()
    torch.manual_seed(seed)
    with ctr.personalized(data.user_reps):
        loss = ctr.loss(ctr(**ctr.collate(data.tokens)), torch.as_tensor(data.labels))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ctr.named_parameters() if p.requires_grad}
    return grads, calls[0]


def test_grad_ckpt_recomputes_the_same_per_row_mixture() -> None:
    """Checkpointed decoder layers recompute their forward during backward(), outside the
    personalize block: the gradients of every bank and gate match the plain run's, so the
    recomputation saw the same h_u per row and the same gate dropout mask."""
    plain, n_plain = _grads(ckpt=False)
    ckpt, n_ckpt = _grads(ckpt=True)
    assert n_plain == 1 and n_ckpt == 2  # the layer did run again, in backward
    assert set(plain) == set(ckpt) and any(".gate." in n for n in plain)
    for n, g in plain.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_grad_ckpt_trains_like_no_ckpt() -> None:
    """train_stage2 with grad_ckpt gives the same losses step by step, and leaves
    checkpointing off afterwards."""
    # Gate dropout on: a recomputed layer must draw the same mask. (This failed after a
    # `reclora run` in the same process while ThreadPolicy's probe drew from the global RNG.)
    base = {**DDP_CFG, "n_train": 32, "gate_dropout": 0.1, "batch_size": 8}
    plain = _losses(Stage2Config(**base))
    ckpt = _losses(Stage2Config(**base, grad_ckpt=True))
    assert ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ FSDP2 and waits
@pytest.mark.timeout(280)
def test_fsdp_two_processes_match_one_process(two_ranks, one_process_losses) -> None:
    """FSDP2 (fully_shard over gloo on the CPU; the LLM's layers sharded, the adapters whole)
    with gradient checkpointing, 2 ranks x batch 8 == 1 process x batch 8 x grad_accum 2,
    losses step by step and the selected model's validation AUC (the evaluation pads the
    shorter rank's share, since every FSDP forward is collective). And main_first: rank 1
    enters the block only after rank 0 has left it."""
    for rank in (0, 1):
        got = torch.load(two_ranks / f"fsdp_rank{rank}.pt")
        assert got["seen"] == "filled", rank
        assert got["groups"] == ["gloo"] and got["wait_s"] >= 86400
        assert got["layout"] == {"sharded": True, "frozen_dtensor": True,
                                 "trainable_plain": True}
        assert got["losses"] == pytest.approx(one_process_losses, rel=1e-4, abs=1e-5), rank


@pytest.mark.parametrize("broken", ["no_user_reps", "one_class"])
def test_a_test_split_that_cannot_be_scored_is_refused_before_training(broken, tmp_path,
                                                                       monkeypatch):
    """A gated model's test data without h_u, or a test split of one class, failed only after
    the whole stage had trained (leaving best.safetensors without stage2_config.json)."""
    import reclora.few2many as f2m

    ctr = make_ctr()
    cfg = Stage2Config(n_train=32, num_adapters=2, rank=2, gate_dim=16, batch_size=16,
                       eval_points=1, amp="off", progress=False)
    inject_adapters(ctr, cfg)
    train, valid, test = make_data(ctr, 32, 0), make_data(ctr, 40, 1), make_data(ctr, 40, 2)
    if broken == "no_user_reps":
        test, message = test.with_user_reps(None), "user_reps .* on the test data"
    else:
        test, message = test.subset(np.flatnonzero(test.labels == 1)), "test needs both"
    monkeypatch.setattr(f2m, "train_stage2", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        run_stage2(ctr, train, valid, test, cfg, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
