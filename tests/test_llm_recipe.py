"""Issue 14 item 2 (the plain-LoRA recipe): the answer head's precision under bf16 autocast,
and the prompt variants of reclora.data.prompts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_llm import tiny_llama, tiny_tokenizer

from reclora.llm import LLMCTR, amp_context

PROMPTS = [
    "USER: He watched Toy Story ( 5 stars ) and Heat ( 2 stars ) . Will he like Fargo ? "
    "ASSISTANT:",
    "USER: Will she like Heat ? ASSISTANT:",
    "USER: She watched Fargo ( 4 stars ) . Will she like Toy Story ? ASSISTANT:",
    "USER: She watched Heat ( 1 stars ) . Will she like Fargo ? ASSISTANT:",
]


@pytest.fixture(scope="module")
def big_logit_ctr() -> LLMCTR:
    """A tiny Llama whose Yes/No logits are large (about +-30, as SmolLM2's are) while their
    difference is small: the regime where a bf16 head output loses the ranking."""
    tok = tiny_tokenizer(PROMPTS)
    model = copy.deepcopy(tiny_llama(len(tok)))
    ctr = LLMCTR(model, tok, add_special_tokens=True)
    head = model.get_output_embeddings().weight
    no, yes = ctr.answer_ids
    with torch.no_grad():
        enc = ctr.collate(ctr.encode(PROMPTS))
        out = ctr.body(**enc, use_cache=False).last_hidden_state[:, -1]
        mean_h = out.mean(0)
        # A shared direction that puts both logits near 30, plus a small difference.
        shared = mean_h / mean_h.norm() ** 2 * 30.0
        head[no] = shared + 0.05 * head[no]
        head[yes] = shared + 0.05 * head[yes]
    return ctr


def test_answer_logits_are_float32_precise_under_bf16_autocast(big_logit_ctr: LLMCTR) -> None:
    """The two answer logits are computed in float32 from the hidden state even under bf16
    autocast. A bf16 head output rounds logits near 30 to steps of 0.125, so P(yes) took a
    handful of values (0.50, 0.53, 0.56, ...) and the ranking (AUC) was mostly ties."""
    ctr = big_logit_ctr
    enc = ctr.collate(ctr.encode(PROMPTS))
    with torch.no_grad(), amp_context(ctr.device, "bf16"):
        logits = ctr(**enc)
        hidden = ctr.body(**enc, use_cache=False).last_hidden_state[:, -1]
    head = ctr.model.get_output_embeddings().weight[list(ctr.answer_ids)]
    want = hidden.float() @ head.float().T
    assert logits.abs().min() > 10  # the regime under test
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-4)
    diff = (logits[:, 1] - logits[:, 0]).numpy()
    want_diff = (want[:, 1] - want[:, 0]).numpy()
    np.testing.assert_allclose(diff, want_diff, atol=1e-4)


def test_bf16_probabilities_rank_like_float32(big_logit_ctr: LLMCTR) -> None:
    ctr = big_logit_ctr
    enc = ctr.encode(PROMPTS)
    ref = ctr.predict(enc, amp="off")
    low = ctr.predict(enc, amp="bf16")
    assert len(np.unique(low)) == len(PROMPTS)  # no ties made by rounding
    assert low == pytest.approx(ref, abs=2e-2)
