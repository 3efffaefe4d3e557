"""eval_mode: every module's own train/eval mode is put back, also when blocks from several
threads overlap (a thread-safety audit: `predict` left an eval-mode LLM and its gates in
train mode, gate dropout on, and concurrent calls switched dropout on mid-forward)."""

from __future__ import annotations

import torch
from tiny_llm import tiny_llama, tiny_tokenizer

import reclora
from reclora.llm import LLMCTR
from reclora.modes import eval_mode


def _modes(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_each_modules_own_mode_comes_back() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model[1].eval()  # a root in train mode over a submodule in eval
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before


def test_overlapping_blocks_restore_when_the_last_leaves() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    first, second = eval_mode(model), eval_mode(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # another thread's block is still inside
    assert not any(_modes(model))
    second.__exit__(None, None, None)
    assert all(_modes(model))


def test_predict_leaves_an_eval_model_and_its_gates_in_eval() -> None:
    """A new LLMCTR is in train mode; `self.train(was_training)` put the eval LLM (and its
    gates, dropout on) into train mode after one predict."""
    tok = tiny_tokenizer(["Yes No a b c"])
    lm = tiny_llama(len(tok))
    reclora.inject(lm, ("q_proj",), num_adapters=4, rank=2, gate_dim=3)
    lm.eval()
    ctr = LLMCTR(lm, tok, add_special_tokens=True)
    assert ctr.training and not any(_modes(lm))
    ctr.predict(ctr.encode(["a b", "c"]), user_reps=torch.randn(2, 3), batch_size=1)
    assert not any(_modes(lm))
    assert ctr.training  # its own mode too
