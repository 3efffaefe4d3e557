"""Audit fixes of the model layer: what from_linear / inject refuse (quantized, overridden,
parametrized and hooked bases; sequence-first and weight-reading transformers modules,
some only under a setting), shared modules, the sqrt gate's gradients, meta forwards, plan
and idx checks, deepcopy with a live mixture."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import reclora
from reclora import PersonalizedGate, RecLoRALinear
from reclora_kernels import row_plan

F64 = torch.float64


def wrap(linear: nn.Module) -> RecLoRALinear:
    return RecLoRALinear.from_linear(linear, num_adapters=2, rank=1)


# --- 1. quantized bases -------------------------------------------------------------------

def test_float8_and_scaled_bases_are_refused():
    """float8 is floating point, so the old check passed and the codes were used unscaled."""
    fp8 = nn.Linear(6, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"`linear` \(Linear\) has a torch.float8_e4m3fn weight"):
        wrap(fp8)
    scaled = nn.Linear(6, 4)
    scaled.weight_scale_inv = nn.Parameter(torch.ones(()))
    with pytest.raises(TypeError, match=r"`linear`.*quantization state \(weight_scale_inv\)"):
        wrap(scaled)
    model = nn.Sequential(scaled)
    with pytest.raises(TypeError, match="quantization state"):
        reclora.inject(model, ["0"], num_adapters=2, rank=1)
    assert type(model[0]) is nn.Linear  # left as it was


def test_transformers_fp8_linear_is_refused():
    """What every FP8 checkpoint loads into: the scale lives in weight_scale_inv."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    with pytest.raises(TypeError, match=r"`linear` \(FP8Linear\).*quantized bases"):
        wrap(FP8Linear(16, 8, block_size=None))


# --- 2. subclasses with a forward of their own --------------------------------------------

class Decoupled(nn.Linear):
    """Like IdeficsDecoupledLinear: extra output features the plain linear does not have."""

    def __init__(self):
        super().__init__(6, 4)
        self.extra = nn.Linear(6, 2)

    def forward(self, x):
        return torch.cat([super().forward(x), self.extra(x)], -1)


class InitOnly(nn.Linear):
    """A subclass that keeps nn.Linear's forward (EsmFoldLinear-like): accepted."""


def test_linear_subclasses_with_their_own_forward_are_refused():
    with pytest.raises(TypeError, match=r"`linear` \(Decoupled\) has a forward of its own"):
        wrap(Decoupled())
    model = nn.Sequential(Decoupled())
    with pytest.raises(TypeError, match="Decoupled"):
        reclora.inject(model, ["0"], num_adapters=2, rank=1)
    assert type(model[0]) is Decoupled and model(torch.randn(3, 6)).shape == (3, 6)

    patched = nn.Linear(6, 4)
    patched.forward = lambda x: 2 * nn.Linear.forward(patched, x)  # e.g. an offload hook
    with pytest.raises(TypeError, match="forward of its own"):
        wrap(patched)
    assert isinstance(wrap(InitOnly(6, 4)), RecLoRALinear)


def test_known_equivalent_subclasses_and_conv1d_forwards():
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    falcon = FalconLinear(6, 4, dtype=F64)
    x = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(wrap(falcon)(x), falcon(x), rtol=1e-12, atol=1e-12)

    class ScaledConv1D(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    assert isinstance(wrap(Conv1D(4, 6)), RecLoRALinear)
    with pytest.raises(TypeError, match=r"\(ScaledConv1D\) has a forward of its own"):
        wrap(ScaledConv1D(4, 6))


# --- 3. parametrized and non-Parameter bases ----------------------------------------------

def test_parametrized_and_non_parameter_bases_are_refused():
    """A parametrized weight is computed: the layer froze a snapshot as a plain attribute,
    lost from the state dict (a strict load 'succeeded' into a different model)."""
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4))
    with pytest.raises(TypeError, match=r"`linear` \(ParametrizedLinear\) is parametrized"):
        wrap(normed)
    buffered = nn.Linear(6, 4)
    weight = buffered.weight.detach().clone()
    del buffered.weight
    buffered.register_buffer("weight", weight)
    with pytest.raises(TypeError, match="its weight is a Tensor, not an nn.Parameter"):
        wrap(buffered)


@pytest.mark.parametrize("register", ["register_forward_pre_hook", "register_forward_hook",
                                      "register_full_backward_pre_hook",
                                      "register_full_backward_hook"])
def test_linears_with_hooks_are_refused(register):
    """The wrapper is a new module: a hook on the old one (an activation probe, an output
    scaler) silently stopped running after inject."""
    hooked = nn.Linear(6, 4)
    handle = getattr(hooked, register)(lambda *args: None)
    kind = register.removeprefix("register_").removeprefix("full_").removesuffix("_hook")
    kind = kind.replace("_pre", "-pre")
    with pytest.raises(TypeError, match=rf"`linear` \(Linear\) has {kind} hooks, which would "
                                        "not run on the wrapped layer"):
        wrap(hooked)
    model = nn.Sequential(hooked)
    with pytest.raises(TypeError, match=f"has {kind} hooks"):
        reclora.inject(model, ["0"], num_adapters=2, rank=1)
    assert model[0] is hooked  # left as it was
    handle.remove()
    layer = wrap(hooked)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    layer(torch.randn(2, 6))
    assert calls == [1]


# --- 4. sqrt gate -------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 3])
def test_confident_sqrt_gate_has_finite_gradients(top_k):
    """A weight that underflows to 0 made sqrt's backward inf and the softmax's 0 * inf NaN,
    in every gate parameter."""
    gate = PersonalizedGate(8, 5, hidden=6, dropout=0.0, temperature=1e-5, top_k=top_k,
                            sqrt=True)
    reps = torch.randn(4, 8)
    weights, idx = gate(reps)
    assert (weights == 0).any()  # the case: confident rows
    reference = torch.softmax(
        gate.logits(reps) if top_k is None else torch.topk(gate.logits(reps), top_k)[0], -1)
    torch.testing.assert_close(weights, reference.sqrt(), rtol=1e-6, atol=1e-7)
    (weights * torch.randn_like(weights)).sum().backward()
    for name, p in gate.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# --- 5. sequence-first transformers modules -----------------------------------------------

def _fsmt():
    import transformers as tf

    config = tf.FSMTConfig(langs=["en", "de"], src_vocab_size=40, tgt_vocab_size=40,
                           d_model=16, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, max_position_embeddings=32,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           decoder_start_token_id=2)
    return tf.FSMTForConditionalGeneration(config).eval()


def test_sequence_first_modules_are_refused():
    """FSMT and Longformer's self-attention run their linears on [seq, batch, d]: each
    position got another user's mixture (silently when seq == batch)."""
    import transformers as tf

    fsmt = _fsmt()
    with pytest.raises(TypeError, match=r"'model.encoder.layers.0.self_attn.[qv]_proj' is inside "
                                        r"a EncoderLayer, which runs it on \[seq, batch"):
        reclora.inject(fsmt, ("q_proj", "v_proj"), num_adapters=2, rank=1)
    with pytest.raises(TypeError, match="inside a DecoderLayer"):
        reclora.inject(fsmt, r"model\.decoder\.layers\.0\.fc1", num_adapters=2, rank=1)
    # The output projection runs batch-first, after the model transposes back.
    assert list(reclora.inject(fsmt, ("output_projection",), num_adapters=2, rank=1)) == [
        "model.decoder.output_projection"]

    longformer = tf.LongformerModel(tf.LongformerConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, attention_window=[4], max_position_embeddings=40))
    with pytest.raises(TypeError, match="inside a LongformerSelfAttention"):
        reclora.inject(longformer, ("query", "value"), num_adapters=2, rank=1)


# --- 6. a module under two names ----------------------------------------------------------

class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6, dtype=F64)
        self.dec = self.enc  # tied: one module, two names

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("targets", [["enc"], ["enc", "dec"], ["dec"]])
def test_a_shared_module_is_wrapped_under_every_name(targets):
    net = Shared()
    layers = reclora.inject(net, targets, num_adapters=2, rank=1)
    assert list(layers) == ["enc"] == list(reclora.reclora_layers(net))
    assert net.dec is net.enc is layers["enc"]
    with torch.no_grad():
        layers["enc"].lora_b.normal_()
    x = torch.randn(3, 6, dtype=F64)
    layer = layers["enc"]
    torch.testing.assert_close(net(x), layer(torch.relu(layer(x))), rtol=0, atol=0)


def test_a_shared_module_inside_a_weight_reader_is_refused():
    attention = nn.MultiheadAttention(6, 2)
    net = nn.ModuleDict({"attn": attention, "head": attention.out_proj})
    with pytest.raises(TypeError, match="'attn.out_proj' is inside a MultiheadAttention"):
        reclora.inject(net, ("head",), num_adapters=2, rank=1)


# --- 7. MobileBERT's MLM head ---------------------------------------------------------------

def test_mobilebert_mlm_head_is_refused():
    """Its forward multiplies by cat([decoder.weight.t(), dense.weight]): dense never runs."""
    import transformers as tf

    config = tf.MobileBertConfig(vocab_size=40, hidden_size=16, embedding_size=8,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, intra_bottleneck_size=8,
                                 true_hidden_size=8, num_feedforward_networks=1,
                                 max_position_embeddings=16)
    model = tf.MobileBertForMaskedLM(config).eval()
    with pytest.raises(TypeError, match="'cls.predictions.dense' is inside a "
                                        "MobileBertLMPredictionHead"):
        reclora.inject(model, ["dense"], num_adapters=2, rank=1)
    # The head's transform.dense is called as usual: accepted.
    layers = reclora.inject(model, r".*transform\.dense", num_adapters=2, rank=1)
    assert list(layers) == ["cls.predictions.transform.dense"]


def _bloom(**settings):
    import transformers as tf

    return tf.BloomModel(tf.BloomConfig(vocab_size=40, hidden_size=16, n_layer=1, n_head=2,
                                        **settings)).eval()


def test_weight_readers_by_setting_are_refused_only_under_it():
    """Bloom with pretraining_tp > 1 and slow_but_exact slices dense's weight into F.linear:
    adapters there did nothing. Without that setting its forward is called: accepted."""
    sliced = _bloom(pretraining_tp=2, slow_but_exact=True)
    for target, owner in (("dense", "BloomAttention"), ("dense_4h_to_h", "BloomMLP")):
        with pytest.raises(TypeError, match=rf"'h.0.\w+.{target}' is inside a {owner} with "
                                            "pretraining_tp > 1 with slow_but_exact"):
            reclora.inject(sliced, [target], num_adapters=2, rank=1)
    assert list(reclora.inject(sliced, ["dense_h_to_4h"], num_adapters=2, rank=1)) == [
        "h.0.mlp.dense_h_to_4h"]
    for settings in ({"pretraining_tp": 2}, {"slow_but_exact": True}):
        layers = reclora.inject(_bloom(**settings), ["dense", "dense_4h_to_h"],
                                num_adapters=2, rank=1)
        assert list(layers) == ["h.0.self_attention.dense", "h.0.mlp.dense_4h_to_h"]


def test_reformer_lsh_attention_is_refused():
    """Its cached (generation) path multiplies by query_key.weight and value.weight."""
    import transformers as tf

    model = tf.ReformerModel(tf.ReformerConfig(
        vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8,
        attn_layers=["lsh", "local"], feed_forward_size=16, axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[8, 8], max_position_embeddings=32, num_buckets=2))
    with pytest.raises(TypeError, match="inside a LSHSelfAttention"):
        reclora.inject(model, ["value"], num_adapters=2, rank=1)
    # The local attention calls its projections: accepted.
    assert list(reclora.inject(model, r".*\.1\..*\.value", num_adapters=2, rank=1)) == [
        "encoder.layers.1.attention.self_attention.value"]


# --- 8. meta device -----------------------------------------------------------------------

def test_meta_forward_gives_the_shape_as_nn_linear():
    layer = RecLoRALinear(5, 6, num_adapters=3, rank=2, device="meta")
    x = torch.empty(2, 4, 5, device="meta")
    y = layer(x)
    assert y.device.type == "meta" and y.shape == nn.Linear(5, 6, device="meta")(x).shape


# --- 9. plans -----------------------------------------------------------------------------

def test_a_plan_is_checked_where_it_is_given():
    layer = RecLoRALinear(5, 4, num_adapters=3, rank=1, dtype=F64)
    weights = torch.rand(3, 3, dtype=F64)
    stale = row_plan(torch.tensor([0, 0, 1, 1, 1, 0]), 2)
    with pytest.raises(TypeError, match=r"set_mixture: `plan` must be a RowPlan.*got str"):
        layer.set_mixture(weights, plan="not a plan")
    with pytest.raises(ValueError, match="set_mixture: `plan` has 2 rows but the mixture has 3"):
        layer.set_mixture(weights, plan=stale)
    assert not layer.has_mixture
    layer.set_mixture(weights[:1], plan=stale)  # one mixture row serves every token

    net = nn.Sequential(nn.Linear(5, 4, dtype=F64))
    reclora.inject(net, ["0"], num_adapters=3, rank=1, gate_dim=4)
    with pytest.raises(ValueError, match="personalize: `plan` has 2 rows but the mixture has 3"):
        with reclora.personalize(net, torch.randn(3, 4, dtype=F64), plan=stale):
            pass


# --- 10. idx dtypes, deepcopy -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint64, torch.bool])
def test_unsupported_idx_dtypes_are_refused_at_set_mixture(dtype):
    layer = RecLoRALinear(5, 4, num_adapters=3, rank=1)
    with pytest.raises(TypeError, match=f"`idx` must be an integer tensor of .*got {dtype}"):
        layer.set_mixture(torch.rand(2, 2), torch.zeros(2, 2, dtype=dtype))


def test_deepcopy_and_pickle_with_a_mixture_in_a_graph():
    """A gate's softmax held by set_mixture is not a graph leaf: deepcopy refused it."""
    layer = RecLoRALinear(5, 4, num_adapters=3, rank=1, dtype=F64)
    with torch.no_grad():
        layer.lora_b.normal_()
    logits = torch.randn(2, 3, dtype=F64, requires_grad=True)
    layer.set_mixture(torch.softmax(logits, -1))
    x = torch.randn(2, 3, 5, dtype=F64)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.has_mixture and not twin._mixture[0].requires_grad
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    layer(x).sum().backward()  # the original keeps its graph
    assert logits.grad is not None


def test_a_refused_module_leaves_the_whole_model_as_it_was():
    """inject builds every layer before it replaces any: a refused module late in the model
    (here a hook on the last matching linear) names that module and leaves the earlier
    matches unwrapped and trainable as before, so a retry after removing the hook works."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4))
    handle = model[2].register_forward_hook(lambda *args: None)
    before = [m for m in model]
    with pytest.raises(TypeError, match=r"inject: module '2': .*has forward hooks"):
        reclora.inject(model, ["0", "1", "2"], num_adapters=2, rank=1)
    assert [m for m in model] == before
    assert all(p.requires_grad for p in model.parameters())
    handle.remove()
    layers = reclora.inject(model, ["0", "1", "2"], num_adapters=2, rank=1)
    assert sorted(layers) == ["0", "1", "2"]


# --- 2026-12-08 audit: a second inject, argument types, parametrized banks ----------------

def test_a_second_inject_leaves_the_first_ones_gates_alone(tmp_path):
    """The gate of a layer from an earlier inject holds nn.Linears: a second inject whose
    pattern matched them wrapped them (the gate's routing changed, and the saved file named
    a layer '0.gate.net.0' that no fresh model has, so it never loaded)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 4))

    model = build()
    reclora.inject(model, ["0"], num_adapters=3, rank=2, gate_dim=5)
    gate_modules = [type(m) for m in model[0].gate.modules()]
    second = reclora.inject(model, ["4"], num_adapters=3, rank=2)  # also 0.gate.net.4's name
    assert sorted(second) == ["4"]
    assert [type(m) for m in model[0].gate.modules()] == gate_modules
    reclora.save_adapters(model, tmp_path / "a.safetensors")
    fresh = build()
    assert sorted(reclora.load_adapters(fresh, tmp_path / "a.safetensors")) == ["0", "4"]


@pytest.mark.parametrize("arg, value", [("dtype", torch.int64), ("adapter_dtype", torch.int8),
                                        ("adapter_dtype", "float16")])
def test_a_non_float_dtype_is_named(arg, value):
    with pytest.raises(ValueError, match=f"`{arg}` must be None or a floating torch.dtype"):
        RecLoRALinear(8, 8, num_adapters=2, rank=2, **{arg: value})


def test_a_failed_inject_of_any_kind_restores_requires_grad(monkeypatch):
    """inject's rollback ran only for TypeError / ValueError: an integer adapter_dtype (a
    torch RuntimeError then) or any other error while building left the bases frozen."""
    import reclora.injection as injection

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="adapter_dtype"):
        reclora.inject(model, ["0", "1"], num_adapters=2, rank=2, adapter_dtype=torch.int8)
    assert all(p.requires_grad for p in model.parameters())
    real, built = injection.wrap_module, []

    def second_fails(module, **kwargs):
        if built:
            raise RuntimeError("out of memory")
        built.append(real(module, **kwargs))
        return built[-1]

    monkeypatch.setattr(injection, "wrap_module", second_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        reclora.inject(model, ["0", "1"], num_adapters=2, rank=2)
    assert built and all(p.requires_grad for p in model.parameters())
    assert all(type(m) is nn.Linear for m in model)


def test_numpy_integers_are_taken_and_bools_and_bad_backends_refused():
    layer = RecLoRALinear(np.int64(8), 6, num_adapters=np.int32(2), rank=np.int64(2),
                          alpha=np.float32(4.0))
    assert (layer.in_features, layer.rank, layer.scale) == (8, 2, 2.0)
    assert type(layer.in_features) is int
    with pytest.raises(ValueError, match="`alpha` must be a finite float"):
        RecLoRALinear(8, 6, num_adapters=2, rank=2, alpha=True)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        RecLoRALinear(8, 6, num_adapters=2, rank=2, backend="bogus")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        reclora.inject(nn.Sequential(nn.Linear(8, 8)), ["0"], num_adapters=2, rank=2,
                       backend="bogus")


@pytest.mark.parametrize("value", ["false", "False", 0, 1, None])
def test_sqrt_must_be_a_bool(value):
    """bool("false") is True: a config value read as a string turned sqrt on."""
    with pytest.raises(TypeError, match="`sqrt` must be True or False"):
        PersonalizedGate(4, 3, sqrt=value)


class _Double(nn.Module):
    def forward(self, b):
        return 2 * b


def test_a_parametrized_bank_stays_trainable_and_is_not_loaded_silently(tmp_path):
    """freeze_all_but_adapters set requires_grad on the computed bank (lost at the next
    forward) and froze the parameter it is computed from; load_adapters copied into the
    computed tensor and returned as if it had loaded."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4))
    reclora.inject(model, ["0"], num_adapters=2, rank=2)
    reclora.save_adapters(model, tmp_path / "a.safetensors")
    parametrize.register_parametrization(model[0], "lora_b", _Double())
    reclora.inject(model, ["1"], num_adapters=2, rank=2)  # freezes all but the adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "0.parametrizations.lora_b.original" in trainable
    with pytest.raises(ValueError, match=r"0\.lora_b is parametrized"):
        reclora.load_adapters(model, tmp_path / "a.safetensors", strict=False)
