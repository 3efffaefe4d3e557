"""Tiny transformers models of five families, built from configs (no downloads), for the
model-layer tests. float64 by default so equivalence checks can be tight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 61


@dataclass(frozen=True)
class Family:
    name: str
    targets: tuple[str, ...]  # what inject adapts (the paper's q/v, or the family's names)
    per_layer: int  # adapted modules per transformer block
    layers: int = 2


FAMILIES = {
    "llama": Family("llama", ("q_proj", "v_proj"), 2),
    "qwen2": Family("qwen2", ("q_proj", "v_proj"), 2),  # q/v carry a bias in Qwen2
    "mistral": Family("mistral", ("q_proj", "v_proj"), 2),
    "gpt2": Family("gpt2", ("c_attn",), 1),  # transformers' Conv1D, fused qkv
    "bert": Family("bert", ("query", "value"), 2),  # encoder
}


def build(name: str, *, dtype: torch.dtype = torch.float64, seed: int = 0,
          hidden: int = 32, layers: int = 2) -> nn.Module:
    """A freshly initialised tiny model of the family, in eval mode (no dropout)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "attn_implementation": "eager"}
    decoder = {"hidden_size": hidden, "intermediate_size": 2 * hidden,
               "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 64}
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, **common))
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder, **common))
    elif name == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**decoder, sliding_window=None, **common))
    elif name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_positions=64, bos_token_id=0, eos_token_id=0,
                                                 **common))
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                           num_attention_heads=4, intermediate_size=2 * hidden,
                                           max_position_embeddings=64, **common),
                             add_pooling_layer=False)
    else:
        raise ValueError(f"unknown family {name!r}")
    return model.to(dtype).eval()


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's main output tensor (logits, or the encoder's last hidden state)."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomise_adapters(layers, *, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero B (the paper's init has B = 0, which hides every LoRA path), fresh A and gate
    weights, so equivalence checks compare something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.lora_a, layer.lora_b):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
            if layer.gate is not None:
                for p in layer.gate.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std + (
                        1.0 if p.dim() == 1 and p is layer.gate.net[0].weight else 0.0))
