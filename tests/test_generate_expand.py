"""personalize(..., expand_size=n) under HF generate with num_beams / num_return_sequences:
generate repeats each of the R rows n times in a row, so user b owns rows b*n .. b*n+n-1 of
the decoder's batch, while an encoder-decoder's encoder still sees the R rows."""

from __future__ import annotations

import pytest
import torch

import reclora
from tests.tiny_models import VOCAB, build, output, randomise_adapters

GATE_DIM = 6
F64 = torch.float64


def _t5():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                         num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                         pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(config).to(F64).eval()


def _gated(model, targets, top_k=None):
    layers = reclora.inject(model, targets, num_adapters=4, rank=2, alpha=8, gate_dim=GATE_DIM,
                            gate_dropout=0.0, top_k=top_k)
    randomise_adapters(layers, std=1.0)  # large enough that users decode differently
    return layers


def _per_user_matches_batch(model, ids, options, n):
    users = torch.randn(ids.shape[0], GATE_DIM, dtype=F64)
    with reclora.personalize(model, users, expand_size=n):
        batch = model.generate(ids, **options)
    alone = []
    for b in range(ids.shape[0]):
        with reclora.personalize(model, users[b:b + 1], expand_size=n):
            alone.append(model.generate(ids[b:b + 1], **options))
    width = max(a.shape[1] for a in alone)
    assert batch.shape[1] == width
    assert torch.equal(batch, torch.cat(alone))
    # The users decode differently, so a mixture given to the wrong rows would show.
    assert len({tuple(a[0].tolist()) for a in alone}) > 1
    return users, batch


@pytest.mark.parametrize("returned, top_k", [(1, None), (3, None), (3, 2)])
def test_decoder_only_beam_search(returned, top_k):
    model = build("llama")
    _gated(model, ("q_proj", "v_proj"), top_k)
    ids = torch.randint(1, VOCAB, (3, 4))
    _per_user_matches_batch(model, ids, {"max_new_tokens": 5, "pad_token_id": 0,
                                         "do_sample": False, "num_beams": 3,
                                         "num_return_sequences": returned}, 3)


def test_encoder_decoder_beam_search():
    """The encoder runs on R rows and the decoder (self- and cross-attention) on R * n."""
    model = _t5()
    _gated(model, ("q", "v"))
    ids = torch.randint(2, VOCAB, (3, 5))
    _per_user_matches_batch(model, ids, {"max_new_tokens": 5, "num_beams": 2,
                                         "num_return_sequences": 2, "do_sample": False}, 2)


def test_without_expand_size_the_error_says_what_to_pass():
    model = build("llama")
    _gated(model, ("q_proj", "v_proj"))
    ids = torch.randint(1, VOCAB, (2, 4))
    with reclora.personalize(model, torch.randn(2, GATE_DIM, dtype=F64)):
        with pytest.raises(ValueError, match=r"expand_size=n"):
            model.generate(ids, max_new_tokens=2, num_beams=2, pad_token_id=0, do_sample=False)


@pytest.mark.parametrize("top_k", [None, 2])
def test_expanded_rows_equal_each_row_alone(top_k):
    """At the layer: R * n rows under expand_size = n equal each row run with its user alone;
    R rows take user_reps as they are; other row counts are refused. top_k: gathered mode."""
    model = build("llama")
    layers = _gated(model, ("q_proj", "v_proj"), top_k)
    layer = next(iter(layers.values()))
    users = torch.randn(2, GATE_DIM, dtype=F64)
    x = torch.randn(6, 3, layer.in_features, dtype=F64)
    with reclora.personalize(model, users, expand_size=3):
        y = layer(x)
        # 2 rows: one per user
        torch.testing.assert_close(layer(x[::3]), y[::3], rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match=r"expand_size=3"):
            layer(x[:4])
    for row in range(6):
        with reclora.personalize(model, users[row // 3]):
            torch.testing.assert_close(layer(x[row:row + 1]), y[row:row + 1], rtol=1e-12,
                                       atol=1e-12)
    # The same x row under the two users: rows 0-2 are user 0's, 3-5 user 1's.
    same_x = x[:1].expand(6, -1, -1)
    with reclora.personalize(model, users, expand_size=3):
        z = layer(same_x)
    torch.testing.assert_close(z[0], z[2], rtol=1e-12, atol=1e-12)
    assert (z[2] - z[3]).abs().max() > 1e-6  # far above float64's rounding


def test_expand_size_is_checked():
    model = build("llama")
    _gated(model, ("q_proj", "v_proj"))
    users = torch.randn(2, GATE_DIM, dtype=F64)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="`expand_size` must be an int >= 1"):
            with reclora.personalize(model, users, expand_size=bad):
                pass
    with pytest.raises(ValueError, match="`expand_size`.*packed"):
        with reclora.personalize(model, users, row_ids=torch.tensor([0, 1]), expand_size=2):
            pass


def test_gradients_reach_the_gate_through_the_expansion():
    model = build("llama")
    layers = _gated(model, ("q_proj", "v_proj"))
    model.train()
    users = torch.randn(2, GATE_DIM, dtype=F64)
    ids = torch.randint(1, VOCAB, (2, 4)).repeat_interleave(2, 0)
    with reclora.personalize(model, users, expand_size=2):
        output(model, ids).square().mean().backward()
    for layer in layers.values():
        assert layer.gate.net[-1].weight.grad.abs().sum() > 0
