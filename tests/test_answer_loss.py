"""Stage 2's loss option (Stage2Config.loss, `reclora run --loss`): "vocab" is the causal-LM
cross-entropy of the answer token over the whole vocabulary, the model's own (its head's
transform applied), reaching the banks and gates; "pair", the default, is today's two-way
cross-entropy, unchanged; a stage trained under one is never reused for the other."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_few2many import make_ctr, make_data
from test_llm_head import PROMPTS, tiny_model
from tiny_llm import tiny_tokenizer
from tiny_models import randomise_adapters

import reclora.llm as llm
from reclora.few2many import Stage2Config, inject_adapters, train_stage2
from reclora.injection import inject, personalize
from reclora.llm import LLMCTR
from reclora.pipeline import ABLATIONS, LLM_MODELS, Run, RunConfig, _changes, config_from_args


def answer_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V] at each row's last real token: [B, V]."""
    last = (mask.shape[1] - 1) - mask.flip(1).argmax(1)
    return logits[torch.arange(logits.shape[0]), last]


@pytest.mark.parametrize("chunk", [None, 5 * 64])  # 5 of the head's rows a chunk: a ragged end
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: a final logit soft cap
def test_vocab_loss_is_the_models_own_answer_token_loss(family, side, chunk,
                                                        monkeypatch) -> None:
    """Loss and gradients on every bank and gate equal those of F.cross_entropy over the
    model's own full logits (model(...).logits) at the answer position."""
    if chunk is not None:
        monkeypatch.setattr(llm, "VOCAB_CHUNK", chunk)
    tok = tiny_tokenizer(PROMPTS)
    ctr = LLMCTR(tiny_model(family, len(tok)), tok, add_special_tokens=True,
                 padding_side=side)
    layers = inject(ctr.model, ("q_proj", "v_proj"), num_adapters=3, rank=2, alpha=4.0,
                    gate_dim=8, temperature=2.0)
    randomise_adapters(layers)
    ctr.eval()  # no gate dropout: the two forwards must see the same mixture
    enc = ctr.collate(ctr.encode([*PROMPTS, "USER : Ran ? ASSISTANT :"]))  # padded rows
    labels = torch.tensor([1, 0, 1])
    reps = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    names, params = zip(*[(n, p) for n, p in ctr.named_parameters() if p.requires_grad])

    with personalize(ctr.model, reps):
        logits = ctr(**enc, vocab=True)
        mine = ctr.vocab_loss(logits, labels)
    got = torch.autograd.grad(mine, params)
    with personalize(ctr.model, reps):
        own = answer_rows(ctr.model(**enc).logits, enc["attention_mask"]).float()
    ref = F.cross_entropy(own, torch.tensor(ctr.answer_ids)[labels])
    want = torch.autograd.grad(ref, params)

    assert logits.shape == (3, len(tok)) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=name)
    reached = [n for n, g in zip(names, got) if g.abs().sum() > 0]
    for part in ("lora_a", "lora_b", ".gate."):  # the banks and the gates learn from it
        assert any(part in n for n in reached), part
    # The score is untouched: P(yes) still from the two answer logits.
    with torch.no_grad(), personalize(ctr.model, reps):
        pair = ctr(**enc)
    torch.testing.assert_close(pair, own[:, list(ctr.answer_ids)], atol=1e-5, rtol=1e-5)


def _one_step(loss: str) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step on 4 samples: the logged loss and the adapters after it."""
    ctr = make_ctr()
    cfg = Stage2Config(n_train=4, num_adapters=2, rank=2, gate_dim=16, gate_dropout=0.0,
                       batch_size=4, eval_points=1, amp="off", progress=False, loss=loss)
    inject_adapters(ctr, cfg)
    randomise_adapters({n: m for n, m in ctr.model.named_modules() if hasattr(m, "lora_a")})
    train, valid = make_data(ctr, 4, 0), make_data(ctr, 8, 1)
    res = train_stage2(ctr, train, valid, cfg)
    state = {n: p.detach().clone() for n, p in ctr.named_parameters() if p.requires_grad}
    return res.history[0]["loss"], state


def _references(loss: str) -> float:
    """What the first step's loss must be, from the untrained adapters, in batch order."""
    ctr = make_ctr()
    inject_adapters(ctr, Stage2Config(num_adapters=2, rank=2, gate_dim=16, gate_dropout=0.0))
    randomise_adapters({n: m for n, m in ctr.model.named_modules() if hasattr(m, "lora_a")})
    train = make_data(ctr, 4, 0)
    enc = ctr.collate([train.tokens[i] for i in range(4)])
    labels = torch.as_tensor(train.labels)
    with torch.no_grad(), ctr.personalized(train.user_reps):
        if loss == "pair":
            return float(F.cross_entropy(ctr(**enc), labels))
        own = answer_rows(ctr.model(**enc).logits, enc["attention_mask"]).float()
        return float(F.cross_entropy(own, torch.tensor(ctr.answer_ids)[labels]))


@pytest.mark.parametrize("loss", ["pair", "vocab"])
def test_training_minimises_the_configured_loss(loss) -> None:
    logged, _ = _one_step(loss)
    assert logged == pytest.approx(_references(loss), rel=1e-6)
    other = _references("vocab" if loss == "pair" else "pair")
    assert abs(logged - other) > 0.1  # the two losses differ: the test tells them apart


def test_pair_trains_bit_identically_to_the_two_logit_forward(monkeypatch) -> None:
    """"pair" (the default) runs the forward and loss the published results trained with:
    the adapters after a step are bit-identical to those of a trainer given that forward
    verbatim, and the vocabulary path is never entered."""
    _, state = _one_step("pair")

    def two_logits(self, input_ids, attention_mask, position_ids=None, *, vocab=False):
        assert not vocab
        return self._head_logits(self._last_hidden(input_ids, attention_mask, position_ids),
                                 self.answer_ids)

    def refuse(*_a, **_k):
        raise AssertionError("the pair loss entered the vocabulary path")

    monkeypatch.setattr(LLMCTR, "forward", two_logits)
    monkeypatch.setattr(LLMCTR, "_vocab_logits", refuse)
    monkeypatch.setattr(LLMCTR, "vocab_loss", refuse)
    _, today = _one_step("pair")
    assert state.keys() == today.keys()
    for name in state:
        assert torch.equal(state[name], today[name]), name
    assert Stage2Config().loss == "pair" and RunConfig().loss == "pair"


def _fake_run(cfg: RunConfig) -> SimpleNamespace:
    """What Run.fingerprint reads (as reclora.serving builds it)."""
    return SimpleNamespace(cfg=cfg, data_digest="d", test=np.arange(4), world=1,
                           train_pool=np.arange(8), valid=np.arange(3), crm_sha={"din": "x"})


def test_loss_option_reaches_every_trained_stage_and_its_fingerprint() -> None:
    """--loss goes to RunConfig (run_config.json), to each model's Stage2Config, and to the
    fingerprint of every stage that trains: a --resume never reuses a stage trained under
    the other loss. The fingerprints are built from RunConfig options, not from Stage2Config
    fields, so this is a separate entry; "pair" adds none, so stages made before the option
    existed still resume. zero-shot trains nothing and keeps its fingerprint."""
    pair = config_from_args([])
    vocab = config_from_args(["--loss", "vocab"])
    assert (pair.loss, vocab.loss) == ("pair", "vocab")
    assert asdict(vocab)["loss"] == "vocab"
    for name in LLM_MODELS + ABLATIONS:
        a = Run.fingerprint(_fake_run(pair), name)
        b = Run.fingerprint(_fake_run(vocab), name)
        assert "loss" not in a, name
        if name == "zero-shot":
            assert a == b
            continue
        assert vocab.model_stage2(name, 8).loss == "vocab", name
        assert pair.model_stage2(name, 8).loss == "pair", name
        assert b["loss"] == "vocab" and "loss None -> 'vocab'" in _changes(a, b), name
    with pytest.raises(SystemExit):
        config_from_args(["--loss", "lm"])


def test_a_bad_loss_is_refused() -> None:
    for bad in ("lm", "two_way", "", None):
        with pytest.raises(ValueError, match="loss must be one of"):
            Stage2Config(loss=bad)
    with pytest.raises(ValueError, match="loss"):
        RunConfig(loss="vocabulary").stage2()
