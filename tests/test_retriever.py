"""LongShortRetriever against a per-sample reference, the leakage proof, and embeddings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_synthetic, write_ml1m

from reclora.data import load_dataset
from reclora.data.embeddings import item_embeddings, minilm_dir, pca, texts_hash
from reclora.data.fetch import installed_ml100k_dir
from reclora.retriever import LongShortRetriever


def reference(ds, emb: torch.Tensor, i: int, k: int, similarity: str) -> list[int]:
    """Positions (into sample i's history) the retriever must return: a plain loop."""
    items, _, times = ds.history(i)
    e = emb.double()
    if similarity == "cosine":
        e = torch.nn.functional.normalize(e, dim=1)
    scored = []
    for j, it in enumerate(items):
        assert times[j] < ds.time[i]
        scored.append((float(e[it] @ e[ds.item[i]]), j))  # ties: the more recent wins
    scored.sort(key=lambda t: (-t[0], -t[1]))
    return sorted(j for _, j in scored[:k])


@pytest.fixture
def small(tmp_path: Path):
    syn = make_synthetic(n_users=16, n_items=20, per_user=(6, 18), time_span=25)
    return load_dataset(write_ml1m(tmp_path / "m", syn), min_history=1, core=1), syn


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("table", [True, False])
def test_semantic_matches_reference(small, similarity: str, table: bool, _seeded_rngs) -> None:
    ds, syn = small
    seed = _seeded_rngs
    g = torch.Generator().manual_seed(seed)
    # Exact ties, so that their order is tested: small integers for dot; for cosine,
    # items share one of a few random rows (float rounding cannot split those ties).
    if similarity == "dot":
        emb = torch.randint(-2, 3, (ds.n_items, 6), generator=g).float()
    else:
        protos = torch.randn(4, 6, generator=g)
        emb = protos[torch.randint(0, 4, (ds.n_items,), generator=g)]
    r = LongShortRetriever(ds, emb, k_text=3, k_id=7, similarity=similarity,
                           precompute_table=table)
    got = r.retrieve(ds.samples)
    for b, i in enumerate(ds.samples):
        for k, pos, mask in ((3, got.text_positions, got.text_mask),
                             (7, got.id_positions, got.id_mask)):
            want = reference(ds, emb, int(i), k, similarity)
            assert pos[b][mask[b]].tolist() == want, (syn, seed, int(i), k)
            assert mask[b].tolist() == [True] * len(want) + [False] * (k - len(want))


def test_no_leakage_even_when_the_future_is_most_similar(small) -> None:
    """Poison: every item the user rated at or after the sample's time gets the target's
    own embedding (the highest possible similarity); none may ever be retrieved."""
    ds, syn = small
    ties = 0
    # Samples whose user rated something else in the same second first, then others: 60.
    tied = np.array([((ds.user == ds.user[i]) & (ds.time == ds.time[i])).sum() > 1
                     for i in ds.samples])
    chosen = np.concatenate([ds.samples[tied], ds.samples[~tied]])[:60]
    for i in chosen:
        i = int(i)
        u, t = ds.user[i], ds.time[i]
        emb = torch.randn(ds.n_items, 8)
        row = ds.hist_index[ds.hist_ptr[u]:ds.hist_ptr[u + 1]]
        future = row[ds.time[row] >= t]
        past = row[ds.time[row] < t]
        ties += int((ds.time[row] == t).sum() > 1)
        future_items = np.setdiff1d(ds.item[future], ds.item[past])
        emb[torch.from_numpy(future_items)] = emb[int(ds.item[i])] * 5
        r = LongShortRetriever(ds, emb, k_text=2, k_id=50, similarity="dot")
        text, ids = r.batches([i])
        for hb in (text, ids):
            got_t = hb.times[hb.mask]
            assert (got_t < t).all(), (syn, i)
            assert not np.isin(hb.items[hb.mask].numpy(), future_items).any(), (syn, i)
        # k_id >= history: the long history is exactly the strictly-earlier interactions.
        assert sorted(ids.items[ids.mask].tolist()) == sorted(ds.item[past].tolist())
    assert ties > 0, "the fixture must contain same-second ratings"


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("table", [False, True])
def test_no_leakage_in_batches_of_mixed_lengths(small, similarity: str, table: bool) -> None:
    """Several samples per batch whose histories differ in length (1 to the longest), so
    the shorter rows are padded up to the longest: padded slots must never be retrieved.
    Every row equals the same sample retrieved alone, holds only strictly earlier items, and
    with k_id >= its history returns exactly the strictly earlier interactions."""
    ds, syn = small
    emb = torch.randn(ds.n_items, 8)
    # The padding slots read history position 0 of the flat table: make it the best match.
    emb[int(ds.hist_item[0])] = 50.0
    order = np.argsort(ds.hist_len[ds.samples], kind="stable")
    by_len = ds.samples[order]
    r = LongShortRetriever(ds, emb, k_text=2, k_id=50, similarity=similarity,
                           precompute_table=table)
    lens_seen = set()
    n_batches = -(-by_len.size // 7)
    for j in range(n_batches):  # batch j: every n_batches-th by length, short to long
        batch = by_len[j::n_batches]
        lens = ds.hist_len[batch]
        lens_seen.add(int(lens.max() - lens.min()))
        text, ids = r.batches(batch)
        t = torch.from_numpy(ds.time[batch]).unsqueeze(1)
        for hb in (text, ids):
            assert (hb.times[hb.mask] < t.expand_as(hb.times)[hb.mask]).all(), (syn, batch)
        assert torch.equal(ids.lengths, torch.from_numpy(lens)), (syn, batch)
        for b, i in enumerate(batch):
            i = int(i)
            past = sorted(ds.history(i)[0].tolist())
            assert sorted(ids.items[b][ids.mask[b]].tolist()) == past, (syn, i)
            alone_t, alone_i = r.batches([i])
            n_t = int(text.mask[b].sum())
            assert text.items[b][:n_t].tolist() == alone_t.items[0][:n_t].tolist(), (syn, i)
            assert n_t == int(alone_t.mask[0].sum()) == min(2, len(past))
            assert set(text.items[b][:n_t].tolist()) <= set(past), (syn, i)
    assert max(lens_seen) >= 3, "batches must mix history lengths (padding)"


def test_recent_mode_and_equal_embeddings(small) -> None:
    ds, _ = small
    rec = LongShortRetriever(ds, None, k_text=4, k_id=9, mode="recent")
    text, ids = rec.batches(ds.samples)
    ref_t, ref_i = ds.recent_history(ds.samples, 4), ds.recent_history(ds.samples, 9)
    assert torch.equal(text.items, ref_t.items) and torch.equal(ids.mask, ref_i.mask)
    # All similarities equal: ties go to the more recent, so semantic == recent.
    sem = LongShortRetriever(ds, torch.ones(ds.n_items, 3), k_text=4, k_id=9)
    t2, i2 = sem.batches(ds.samples)
    assert torch.equal(t2.items, text.items) and torch.equal(i2.items, ids.items)


def test_retrieve_all_table_matches_batches(small) -> None:
    ds, _ = small
    emb = torch.randn(ds.n_items, 5)
    r = LongShortRetriever(ds, emb, k_text=3, k_id=6)
    table = r.retrieve_all(batch_size=7, progress=False)
    s = ds.samples[::-1].copy()
    for a, b in zip(table.batches(s), r.batches(s)):
        assert torch.equal(a.items, b.items) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.ratings, b.ratings)
        # time order inside the mask
        t = a.times.masked_fill(~a.mask, 2**62)
        assert (t[:, 1:] >= t[:, :-1]).all()
    partial = r.retrieve_all(ds.train, progress=False)
    with pytest.raises(KeyError):
        partial.batches(ds.test[:1])


def test_argument_errors(small) -> None:
    ds, _ = small
    with pytest.raises(ValueError, match="item_embeddings"):
        LongShortRetriever(ds, torch.randn(ds.n_items + 1, 4))
    with pytest.raises(ValueError, match="item_embeddings is required"):
        LongShortRetriever(ds, None)
    with pytest.raises(ValueError, match="similarity"):
        LongShortRetriever(ds, torch.randn(ds.n_items, 4), similarity="l2")
    with pytest.raises(ValueError, match="k_text"):
        LongShortRetriever(ds, torch.randn(ds.n_items, 4), k_text=0)
    bad = torch.randn(ds.n_items, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        LongShortRetriever(ds, bad)
    # Finite, but their dot products overflow to -inf, which would tie with the padding.
    with pytest.raises(ValueError, match="item_embeddings are too large"):
        LongShortRetriever(ds, torch.full((ds.n_items, 4), 1e19), similarity="dot")
    LongShortRetriever(ds, torch.full((ds.n_items, 4), 1e19))  # cosine normalises them


def test_a_sample_retrieves_the_same_alone_as_in_a_batch(tmp_path: Path) -> None:
    """Without the table (the path above 8192 items), near-duplicate embeddings put history
    items within rounding of each other: a request served alone must rank them as the run's
    batches did (einsum rounded differently for one sample than for many)."""
    syn = make_synthetic(seed=1, n_users=30, n_items=40, per_user=(10, 40), time_span=400)
    ds = load_dataset(write_ml1m(tmp_path / "m", syn), min_history=1, core=1)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 256, generator=g)
    emb = protos[torch.arange(ds.n_items) % 4] + 1e-3 * torch.randn(ds.n_items, 256,
                                                                     generator=g)
    r = LongShortRetriever(ds, emb, k_text=3, k_id=10, precompute_table=False)
    batched = r.retrieve(ds.samples)
    for b, i in enumerate(ds.samples):
        alone = r.retrieve([int(i)])
        assert torch.equal(alone.text_positions[0], batched.text_positions[b]), int(i)
        assert torch.equal(alone.id_positions[0], batched.id_positions[b]), int(i)


@pytest.mark.skipif(installed_ml100k_dir() is None, reason="recbole wheel not installed")
def test_no_leakage_on_real_ml100k(tmp_path: Path) -> None:
    """Every ML-100K sample (many same-second ratings): all retrieved items are strictly
    earlier, and with k >= the longest history exactly the strictly-earlier set comes back."""
    shutil.copytree(installed_ml100k_dir(), tmp_path / "ml-100k",
                    ignore=shutil.ignore_patterns("*.kg", "*.link"))
    ds = load_dataset("ml-100k", data_dir=tmp_path)
    emb = torch.randn(ds.n_items, 16)
    kmax = int(ds.hist_len.max())
    r = LongShortRetriever(ds, emb, k_text=10, k_id=kmax)
    s = ds.samples[np.random.default_rng(0).choice(ds.samples.size, 3000,
                                                                      replace=False)]
    text, ids = r.batches(s)
    t = torch.from_numpy(ds.time[s]).unsqueeze(1)
    assert (text.times[text.mask] < t.expand_as(text.times)[text.mask]).all()
    assert (ids.times[ids.mask] < t.expand_as(ids.times)[ids.mask]).all()
    assert torch.equal(ids.lengths, torch.from_numpy(ds.hist_len[s]))
    assert torch.equal(text.lengths, torch.clamp(torch.from_numpy(ds.hist_len[s]), max=10))


# ------------------------------------------------------------------- embeddings
def test_pca_matches_svd() -> None:
    x = torch.randn(50, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    y = pca(x, 4).double()
    xc = x - x.mean(0)
    _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:4].T
    assert torch.allclose(y.abs(), ref.abs(), atol=1e-4)  # same up to component sign
    assert torch.allclose(y.std(0), sv[:4] / (49 ** 0.5), rtol=1e-4)
    assert pca(x, 20).shape == (50, 12)


@pytest.fixture
def one_thread():
    """Encoder tests run one torch thread: on the shared 2-core box two threads spin against
    other jobs and took 13.9 s instead of 6.6 s (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(
    not (lambda: (minilm_dir() / "model.safetensors").is_file())(), reason="no MiniLM")
def test_minilm_embeddings_cached(tmp_path: Path, small, one_thread) -> None:
    ds, _ = small
    emb = item_embeddings(ds, cache_dir=tmp_path, progress=False)
    assert emb.shape == (ds.n_items, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(ds.n_items), atol=1e-5)
    files = list((tmp_path / "embeddings").rglob("*.safetensors"))
    assert len(files) == 1 and texts_hash(ds.item_description) in files[0].name
    again = item_embeddings(ds, cache_dir=tmp_path, progress=False)
    assert torch.equal(emb, again)
    # Same title, different genre text: closer than two unrelated titles.
    titles = {t: j for j, t in enumerate(ds.item_title)}
    a = [j for t, j in titles.items() if t.startswith("Toy Story")]
    if a:
        sims = emb @ emb[a[0]]
        assert int(sims.argmax()) == a[0]
    # A corrupt cache file is recomputed, not trusted.
    files[0].write_bytes(b"garbage")
    assert torch.allclose(item_embeddings(ds, cache_dir=tmp_path, progress=False), emb,
                          atol=1e-5)
    # fp32 and bf16 autocast agree closely and are cached apart.
    e32 = item_embeddings(ds, cache_dir=tmp_path, precision="fp32", progress=False)
    e16 = item_embeddings(ds, cache_dir=tmp_path, precision="bf16", progress=False)
    assert float((e32 * e16).sum(1).min()) > 0.999
    names = {p.name for p in (tmp_path / "embeddings").rglob("*.safetensors")}
    assert any("-bf16-" in n for n in names) and any("-bf16-" not in n for n in names)
    with pytest.raises(ValueError, match="precision"):
        item_embeddings(ds, cache_dir=tmp_path, precision="int8")


def test_llm_mean_pooled_embeddings_with_pca(tmp_path: Path, small, one_thread) -> None:
    """ReLLa-style: a (tiny, random) Llama's mean-pooled last hidden state, PCA, cached;
    padding in a batch does not change an item's embedding."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from reclora.data.embeddings import mean_pooled

    ds, _ = small
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    texts = ["a", "a much longer text that pads the first one in its batch"]
    together = mean_pooled(texts, model, tok, batch_size=2, progress=False)
    alone = mean_pooled(texts[:1], model, tok, batch_size=1, progress=False)
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    emb = item_embeddings(ds, "llm", model=model, tokenizer=tok, pca_dim=8, cache_dir=tmp_path,
                          progress=False)
    assert emb.shape == (ds.n_items, 8)
    assert abs(float(emb.mean())) < 1e-4  # PCA output is centred
    # A random model has no name for its weights: never cached (a cache hit would be wrong).
    assert not (tmp_path / "embeddings").exists()
    model.config._name_or_path = "tiny-llama"
    item_embeddings(ds, "llm", model=model, tokenizer=tok, pca_dim=8, cache_dir=tmp_path,
                    progress=False)
    assert list((tmp_path / "embeddings").rglob("llm-tiny-llama-pca8-*.safetensors"))
    with pytest.raises(ValueError, match="model= and tokenizer="):
        item_embeddings(ds, "llm", cache_dir=tmp_path / "other")
