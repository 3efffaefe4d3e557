"""Prompt building at scale (the scale audit's findings 1 and 3): text_history retrieves in
chunks of similar history length, and a subset's prompts are built in bounded chunks and kept
as one flat int32 TokenStore, with the same tokens per sample as the one-shot path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datagen import one_heavy_user
from tiny_llm import tiny_llama, tiny_tokenizer

import reclora.pipeline as pl
from reclora.data.prompts import PromptBuilder
from reclora.few2many import CTRData, TokenStore
from reclora.llm import LLMCTR
from reclora.retriever import LongShortRetriever

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("items", "ratings", "times", "mask")


@pytest.fixture(scope="module")
def ds():
    """Long-tailed histories: one user with 400 ratings among 110 with 14 each (about 1,900
    samples, so text_history makes two retrieval chunks)."""
    return one_heavy_user("tail", 110, 400, 14, 450, "Heat", 7)


@pytest.fixture(scope="module")
def samples(ds):
    """Every sample in a random order (as sample_subset draws a subset)."""
    s = np.random.default_rng(1).permutation(ds.samples)
    assert s.size > 1024 and ds.hist_len[s].max() > 20 * np.median(ds.hist_len[s])
    return s


def _retriever(ds, table: bool) -> LongShortRetriever:
    emb = torch.randn(ds.n_items, 8, generator=torch.Generator().manual_seed(0))
    return LongShortRetriever(ds, emb, k_text=3, k_id=9, similarity="dot",
                              precompute_table=table)


@pytest.mark.parametrize("table", [True, False])
def test_text_history_buckets_by_length_with_the_same_rows(ds, samples, table,
                                                          monkeypatch) -> None:
    """Each retrieval chunk holds histories no longer than the next chunk's (so only the
    last pads to the heavy user's), and every row equals the old path's (chunks of 1,024
    in input order) for the sample at that row."""
    retr = _retriever(ds, table)
    old = [retr.batches(samples[a:a + 1024])[0] for a in range(0, samples.size, 1024)]
    want = {f: torch.cat([getattr(h, f) for h in old]) for f in FIELDS}
    chunks: list[np.ndarray] = []
    batches = retr.batches

    def spy(s):
        chunks.append(ds.hist_len[s])
        return batches(s)

    monkeypatch.setattr(retr, "batches", spy)
    got = pl.text_history(ds, retr, samples, "semantic", 3)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), want[f]), f
    assert len(chunks) == 2 and chunks[0].max() <= chunks[1].min()


@pytest.fixture(scope="module")
def llm(ds):
    tok = tiny_tokenizer(["Heat 0 1 2 3 4 5 6 Drama"])
    ctr = LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True)
    return ctr, PromptBuilder(tok, max_tokens=120, chat_template=False)


@pytest.mark.parametrize("mode", ["semantic", "recent"])
def test_chunked_store_equals_the_one_shot_build(ds, samples, llm, mode,
                                                 monkeypatch) -> None:
    """prompt_store builds PROMPT_CHUNK samples at a time (never the subset at once) and
    gives each sample the tokens of prompt_tokens over the whole subset."""
    ctr, builder = llm
    retr = _retriever(ds, True)
    s = samples[:300]
    want = pl.prompt_tokens(ds, builder, ctr, s, pl.text_history(ds, retr, s, mode, 3))
    sizes: list[int] = []
    prompt_tokens = pl.prompt_tokens

    def spy(ds_, builder_, ctr_, chunk, history):
        sizes.append(chunk.size)
        return prompt_tokens(ds_, builder_, ctr_, chunk, history)

    monkeypatch.setattr(pl, "PROMPT_CHUNK", 64)
    monkeypatch.setattr(pl, "prompt_tokens", spy)
    got = pl.prompt_store(ds, retr, builder, ctr, s, mode, 3)
    assert isinstance(got, TokenStore) and list(got) == want
    assert sizes == [64] * 4 + [44]
    # Compact: 4 B a token plus 8 B a prompt's offset, nothing else.
    ntok = sum(map(len, want))
    assert got.ids.dtype == np.int32 and got.ids.nbytes + got.offsets.nbytes == \
        4 * ntok + 8 * (s.size + 1)


def test_token_store_reads_back_its_lists() -> None:
    lists = [[5, 1, 2], [], [7], [2**31 - 1, 0]]
    st = TokenStore.from_lists(lists)
    assert len(st) == 4 and list(st) == lists and st[-1] == lists[-1]
    assert all(type(x) is int for x in st[0])  # Python ints, as the tokenizer's lists
    assert st.lengths.tolist() == [3, 0, 1, 2]
    idx = np.array([3, 0, 0, 1, 2])
    assert list(st.take(idx)) == [lists[i] for i in idx]
    assert list(TokenStore.concat([st, st.take([2])])) == lists + [[7]]
    assert list(TokenStore.concat([])) == [] and list(st.take([])) == []
    # As a list of lists: slices and negative indices (CTRData.tokens was one).
    assert list(st[1:3]) == lists[1:3] and list(st[::-2]) == lists[::-2]
    assert list(st.take([-1, -4])) == [lists[-1], lists[-4]]
    with pytest.raises(IndexError, match="out of range"):
        st[4]
    with pytest.raises(IndexError, match="take"):
        st.take([4])
    with pytest.raises(IndexError, match="take"):
        st.take([-5])
    with pytest.raises(ValueError, match="token ids"):
        TokenStore.from_lists([[2**31]])
    with pytest.raises(ValueError, match="offsets"):
        TokenStore(np.zeros(3, np.int32), np.array([0, 2], np.int64))


def test_ctr_data_keeps_a_store_and_subsets_it() -> None:
    lists = [[1, 2], [3], [4, 5, 6]]
    data = CTRData(lists, np.array([0, 1, 1]), torch.arange(3.0).reshape(3, 1))
    assert isinstance(data.tokens, TokenStore)
    sub = data.subset(np.array([2, 0]))
    assert list(sub.tokens) == [[4, 5, 6], [1, 2]] and sub.labels.tolist() == [1, 0]
    assert sub.user_reps.reshape(-1).tolist() == [2.0, 0.0]
    assert data.with_user_reps(None).tokens is data.tokens
