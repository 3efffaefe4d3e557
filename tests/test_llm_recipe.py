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


# ------------------------------------------------------------------ prompt variants
@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    from datagen import make_synthetic, write_ml100k_recbole

    from reclora.data import load_dataset

    root = tmp_path_factory.mktemp("variants")
    syn = make_synthetic(n_users=10, n_items=20, per_user=(12, 20))
    return load_dataset(write_ml100k_recbole(root / "ml-100k", syn), min_history=5, core=1)


def _sample(ds) -> tuple[int, np.ndarray, np.ndarray]:
    i = int(ds.samples[-1])
    items, ratings, _ = ds.history(i)
    return i, items[-5:], ratings[-5:]


def test_default_variant_is_todays_prompt(ml100k) -> None:
    from reclora.data.prompts import PromptBuilder, build_prompt, prompt_parts

    i, items, ratings = _sample(ml100k)
    assert prompt_parts(ml100k, i, items, ratings, variant="default").text() == \
        prompt_parts(ml100k, i, items, ratings).text()
    assert PromptBuilder(variant="default").build(ml100k, i, items, ratings) == \
        build_prompt(ml100k, i, items, ratings)


def test_summary_variant_counts_the_shown_ratings(ml100k) -> None:
    from reclora.data.prompts import prompt_parts

    i, items, ratings = _sample(ml100k)
    parts = prompt_parts(ml100k, i, items, ratings, variant="summary")
    text = parts.text()
    default = prompt_parts(ml100k, i, items, ratings).text().split("\n")
    lines = text.split("\n")
    n_hist = len(items)
    k = 1 + (ml100k.user_profile is not None)  # profile + header lines before the list
    assert lines[:k + n_hist] == default[:k + n_hist]
    hi = int(np.sum(ratings >= 4))
    assert lines[k + n_hist].endswith(f"rated {hi} of these {n_hist} movies 4 stars or more "
                                      f"(average {np.mean(ratings):.1f} stars).")
    assert lines[k + n_hist + 1:] == default[k + n_hist:]
    # Truncation keeps the summary true to the lines kept.
    two = parts.text(keep=2).split("\n")
    hi2 = int(np.sum(ratings[-2:] >= 4))
    assert two[k + 2].endswith(f"rated {hi2} of these 2 movies 4 stars or more "
                               f"(average {np.mean(ratings[-2:]):.1f} stars).")


def test_genres_and_target_first_variants(ml100k) -> None:
    from reclora.data.prompts import PromptBuilder, prompt_parts

    i, items, ratings = _sample(ml100k)
    target = int(ml100k.item[i])
    g = prompt_parts(ml100k, i, items, ratings, variant="genres").text()
    if ml100k.item_genres[target]:
        assert f"***{ml100k.item_title[target]} [{ml100k.item_genres[target]}]***" in g
    for it in items:
        if ml100k.item_genres[int(it)]:
            assert f"{ml100k.item_title[int(it)]} [{ml100k.item_genres[int(it)]}]" in g
    t = prompt_parts(ml100k, i, items, ratings, variant="target-first").text()
    assert t.split("\n")[0].startswith("Will ") and f"***{ml100k.item_title[target]}***?" in t
    assert t.split("\n", 1)[1] == prompt_parts(ml100k, i, items, ratings).text()
    with pytest.raises(ValueError, match="variant"):
        PromptBuilder(variant="nope")
    with pytest.raises(ValueError, match="variant"):
        prompt_parts(ml100k, i, items, ratings, variant="nope")


def test_compact_variant_and_flag_combinations(ml100k) -> None:
    from reclora.data.prompts import prompt_parts, variant_flags

    i, items, ratings = _sample(ml100k)
    target = int(ml100k.item[i])
    c = prompt_parts(ml100k, i, items, ratings, variant="compact").text().split("\n")
    assert c[0].startswith("Movies ") and c[0].endswith(" rated (1-5 stars):")
    for j, (it, r) in enumerate(zip(items, ratings)):
        assert c[1 + j] == f"{j + 1}. {ml100k.item_title[int(it)]}: {float(r):g} star" + (
            "" if r == 1 else "s")
    assert c[-1].endswith(f"***{ml100k.item_title[target]}***? Answer yes or no.")
    cs = prompt_parts(ml100k, i, items, ratings, variant="compact+summary").text().split("\n")
    assert cs[:1 + len(items)] == c[:1 + len(items)] and "4 stars or more" in cs[1 + len(items)]
    assert variant_flags("summary+compact") == variant_flags("compact+summary")
    assert variant_flags("default") == frozenset()
