"""A tiny random Llama and a word-level tokenizer, for the LLM tests (milliseconds a step).

The tokenizer is built from words, so prompts from any template tokenize without a download;
the model is a random LlamaConfig (hidden 64, 2 layers), as ENVIRONMENT.md suggests.
"""

from __future__ import annotations

import re

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
BASE_WORDS = ["Yes", "No", "USER", "ASSISTANT", ":", ".", ",", "(", ")", "*", "?", "!"]


def words_of(texts: list[str]) -> list[str]:
    found = set()
    for t in texts:
        found.update(re.findall(r"\w+|[^\w\s]", t))
    return sorted(found)


def tiny_tokenizer(texts: list[str] = ()):
    """A PreTrainedTokenizerFast over the words of `texts` plus a few fixed ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(BASE_WORDS + words_of(
        list(texts)))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random LlamaForCausalLM (untied head, so the head test sees a real projection)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# `reclora run` options for a run of a few seconds (one CRM, 8 training samples, 24 test ones).
TINY_RUN = ["--quick", "--crms", "din", "--n", "8", "--n-valid", "8", "--n-test", "24",
            "--k-text", "2", "--k-id", "5", "--max-length", "160", "--no-progress"]
# Every word of the run's prompt templates (and of serving's cold-start lines).
PROMPT_WORDS = (
    "He She watched the following movies in order in the past , and rated them : stars "
    "star Based on he has deduce if will like movie *** Note that more user liked You "
    "should ONLY tell me yes or no . A chat between a curious user and an artificial "
    "intelligence assistant The assistant gives helpful detailed polite answers to "
    "questions USER ASSISTANT has not any before "
    # the "compact+summary" template (the run's default prompt)
    "Movies rated ( 1 - 5 ) Will like ? Answer these 4 or more average 0 2 3 6 7 8 9")


def save_tiny_model(path) -> None:
    """A tiny random Llama with a tokenizer over ML-100K's titles, profiles and the prompt
    words, saved as a transformers folder at `path` (what `reclora run --model` takes)."""
    from reclora.data import load_dataset

    ds = load_dataset("ml-100k")
    tok = tiny_tokenizer(ds.item_title + (ds.user_profile or []) + [PROMPT_WORDS])
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
