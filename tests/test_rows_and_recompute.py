"""Layers whose inputs' rows are not the batch's prompts (MoE routed tokens and shared
experts, vision towers) are refused by inject; activation checkpointing recomputes a layer
with the mixture its forward used (an audit, /tmp/audit/gen: findings 1, 2, 3, 5, 6)."""

from __future__ import annotations

import pytest
import torch

import reclora
from reclora.llm import enable_grad_ckpt

F64 = torch.float64


# --- activation checkpointing: the mixture the forward used --------------------------------

def _llama(gated: bool):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = tf.LlamaForCausalLM(config).to(F64)
    reclora.inject(model, ("q_proj", "v_proj", "down_proj"), num_adapters=3, rank=2,
                   gate_dim=5 if gated else None, gate_dropout=0.0, backend="reference")
    with torch.no_grad():
        for layer in reclora.reclora_layers(model).values():
            layer.lora_b.normal_(std=0.5)
            if layer.gate is not None:
                for p in layer.gate.parameters():
                    p.normal_(std=0.5)
    return model.train()


def _two_forwards_one_loss(how: str, ckpt: bool):
    """Gradients of one loss over two forwards run under different mixtures."""
    model = _llama(how == "personalize")
    if ckpt:
        enable_grad_ckpt(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 5), generator=g)
    layers = reclora.reclora_layers(model).values()
    if how == "set_mixture":
        first, second = (torch.softmax(3 * torch.randn(2, 3, generator=g, dtype=F64), -1)
                         for _ in range(2))
        for layer in layers:
            layer.set_mixture(first)
        out_a = model(ids).logits
        for layer in layers:
            layer.set_mixture(second)
        out_b = model(ids).logits
        loss = (out_a - out_b).pow(2).sum()
        loss.backward()
    else:
        first, second = (3 * torch.randn(2, 5, generator=g, dtype=F64) for _ in range(2))
        with reclora.personalize(model, first):
            out_a = model(ids).logits
        with reclora.personalize(model, second):
            out_b = model(ids).logits
        loss = (out_a - out_b).pow(2).sum()
        loss.backward()  # outside both blocks: the context_fn restores each one's reps
    grads = torch.cat([p.grad.flatten() for p in reclora.trainable_parameters(model)])
    return loss.detach(), grads


@pytest.mark.parametrize("how", ["set_mixture", "personalize"])
def test_checkpointing_recomputes_with_the_forwards_mixture(how):
    """set_mixture under enable_grad_ckpt recomputed the first forward's layers with the
    second forward's mixture: the same loss, gradients off by more than their size."""
    loss, grads = _two_forwards_one_loss(how, ckpt=False)
    loss_ckpt, grads_ckpt = _two_forwards_one_loss(how, ckpt=True)
    assert grads.abs().max() > 0.1
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads_ckpt, grads, rtol=1e-10, atol=1e-10)


def test_checkpointing_refuses_a_mixture_refilled_in_place():
    """Without checkpointing torch raises its in-place version error; with it, the recompute
    read the new values silently."""
    model = _llama(False)
    enable_grad_ckpt(model)
    weights = torch.softmax(torch.randn(2, 3, dtype=F64), -1)
    for layer in reclora.reclora_layers(model).values():
        layer.set_mixture(weights)
    loss = model(torch.randint(0, 40, (2, 5))).logits.pow(2).sum()
    weights.copy_(torch.softmax(torch.randn(2, 3, dtype=F64), -1))
    with pytest.raises(RuntimeError, match="modified in place after the checkpointed forward"):
        loss.backward()


def test_recompute_outside_personalize_names_checkpointing():
    """HF's default checkpointing and backward() after the block: the error blamed the
    forward, which did run inside personalize."""
    model = _llama(True)
    model.activation_checkpointing_enable()
    with reclora.personalize(model, torch.randn(2, 5, dtype=F64)):
        loss = model(torch.randint(0, 40, (2, 5))).logits.pow(2).sum()
    with pytest.raises(RuntimeError, match="recomputed by activation checkpointing during "
                                           r"backward\(\).*personalization_context_fn"):
        loss.backward()


# --- MoE experts on routed tokens, shared experts on flattened tokens -----------------------

def test_moe_experts_on_routed_tokens_are_refused():
    """Switch Transformers / NLLB-MoE run each expert on the tokens routed to it, gathered
    from the whole batch: token j got row j's mixture (silently when counts matched)."""
    import transformers as tf

    switch = tf.SwitchTransformersEncoderModel(tf.SwitchTransformersConfig(
        vocab_size=40, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=2,
        num_heads=2, num_experts=2, encoder_sparse_step=1, decoder_sparse_step=1))
    with pytest.raises(TypeError, match=r"'encoder\.block\.0\.layer\.1\.mlp\.experts\.expert_0"
                                        r"\.wi' is inside a SwitchTransformersExperts, which "
                                        "runs it on the tokens routed to one expert"):
        reclora.inject(switch, ("wi", "wo"), num_adapters=2, rank=1)
    assert len(reclora.inject(switch, ("q", "v"), num_adapters=2, rank=1, gate_dim=4)) == 4

    nllb = tf.NllbMoeModel(tf.NllbMoeConfig(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
        num_experts=2, encoder_sparse_step=1, decoder_sparse_step=1,
        max_position_embeddings=32))
    with pytest.raises(TypeError, match="inside a NllbMoeExperts, which runs it on the tokens "
                                        "routed"):
        reclora.inject(nllb, ("fc1", "fc2"), num_adapters=2, rank=1)


def test_gated_shared_experts_on_flattened_tokens_are_refused():
    """Qwen2-MoE runs its shared expert on [B * T, d]: personalize's B rows never matched
    (a runtime error whose advice could not be followed)."""
    import transformers as tf

    config = tf.Qwen2MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                               moe_intermediate_size=8, shared_expert_intermediate_size=8,
                               num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, num_experts=2, num_experts_per_tok=1)
    model = tf.Qwen2MoeForCausalLM(config)
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp\.shared_expert\.down_proj' "
                                        "is inside a Qwen2MoeSparseMoeBlock, which runs it on "
                                        r"the batch flattened to \[batch \* seq"):
        reclora.inject(model, ("q_proj", "v_proj", "down_proj"), num_adapters=2, rank=1,
                       gate_dim=4)
    # Ungated: one mixture for every token, which rows do not change.
    assert "model.layers.0.mlp.shared_expert.down_proj" in reclora.inject(
        model, ("down_proj",), num_adapters=2, rank=1)


# --- vision towers of vision-language models ------------------------------------------------

def _llava():
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=8, patch_size=4)
    text = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=63,
        vision_feature_layer=-1))


def test_gated_layers_in_a_vision_tower_are_refused():
    """Llava's CLIP tower runs on images, not prompts: a prompt's second image got the next
    prompt's mixture, silently."""
    model = _llava()
    with pytest.raises(TypeError, match=r"'model\.vision_tower\.encoder\.layers\.0\.self_attn\."
                                        r"[qv]_proj' is inside 'model\.vision_tower' "
                                        r"\(CLIPVisionModel\), which encodes images.*"
                                        r"language_model\.\*\\\.\(q_proj\|v_proj\)"):
        reclora.inject(model, ("q_proj", "v_proj"), num_adapters=2, rank=1, gate_dim=4)
    with pytest.raises(TypeError, match="inside 'model.multi_modal_projector'"):
        reclora.inject(model, r".*linear_1", num_adapters=2, rank=1, gate_dim=4)
    assert list(reclora.inject(model, r".*language_model.*\.(q_proj|v_proj)", num_adapters=2,
                               rank=1, gate_dim=4)) == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.v_proj"]


def test_ungated_vision_layers_and_vision_models_are_accepted():
    """Without gates (one mixture for all images) the tower may be wrapped; a vision model on
    its own has images for rows, so gates there are fine."""
    import transformers as tf

    assert len(reclora.inject(_llava(), ("q_proj", "v_proj"), num_adapters=2, rank=1)) == 4
    clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4))
    assert len(reclora.inject(clip, ("q_proj", "v_proj"), num_adapters=2, rank=1,
                              gate_dim=4)) == 2
    vit = tf.ViTForImageClassification(tf.ViTConfig(  # its `vit` is a sub-model on pixels
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4))
    assert len(reclora.inject(vit, ("q_proj", "v_proj"), num_adapters=2, rank=1,
                              gate_dim=4)) == 2
