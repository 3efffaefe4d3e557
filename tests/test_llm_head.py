"""LLMCTR's two answer logits are the model's own: the families that soft-cap or scale their
logits after the head, the one-time check that refuses an unknown transform, and tokenizers
that add special tokens (a trailing EOS is left off, a leading BOS kept)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_llm import SPECIALS, tiny_llama, tiny_tokenizer, words_of

from reclora.llm import LLMCTR, head_transform, special_token_affixes

PROMPTS = ["USER : He watched Heat Fargo . Will he like Alien ? ASSISTANT :",
           "USER : He watched Heat Fargo Alien Brazil Twister Heat . Will he like Ran ? "
           "ASSISTANT :"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
# (config class, model class, extra config): each family's forward transforms its logits
# after the head (transformers' modeling code), except Llama's.
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    # a cap this low bends the logits of a tiny model as 30 bends a real model's
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
               {"head_dim": 16, "final_logit_softcapping": 2.0}),
    "cohere": (T.CohereConfig, T.CohereForCausalLM, {}),  # logit_scale 0.0625 by default
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {"logits_scaling": 8.0}),  # divides
    "hyperclovax": (T.HyperCLOVAXConfig, T.HyperCLOVAXForCausalLM,
                    {"logits_scaling": 8.0}),  # the same field, but it multiplies
}


def tiny_model(family: str, vocab_size: int) -> T.PreTrainedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=vocab_size, **TINY, **extra)).eval()
    with torch.no_grad():  # logits of a few units, as a real model's: the transforms show
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def own_logits(model: torch.nn.Module, encoded: list[list[int]],
               ids: tuple[int, int]) -> torch.Tensor:
    """The model's own last-position logits at `ids`, each prompt alone (no padding)."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([x])).logits[0, -1, list(ids)]
                            for x in encoded])


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_logits_are_the_models_own(family: str) -> None:
    tok = tiny_tokenizer(PROMPTS)
    model = tiny_model(family, len(tok))
    ctr = LLMCTR(model, tok, add_special_tokens=True)
    enc = ctr.encode(PROMPTS)
    batch = ctr.collate(enc)  # left-padded: the two prompts differ in length
    with torch.no_grad():
        mine = ctr(**batch)
    ref = own_logits(model, enc, ctr.answer_ids)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    if family != "llama":  # the bare head rows are far off: the test sees the transform
        steps, ctr.head_steps = ctr.head_steps, ()
        with torch.no_grad():
            assert float((ctr(**batch) - ref).abs().max()) > 0.1
        ctr.head_steps = steps


def test_head_transform_reads_the_text_config_of_a_multimodal_model() -> None:
    assert head_transform(T.AyaVisionConfig()) == (("logit_scale", "mul", 0.0625),)
    assert head_transform(T.LlamaConfig()) == ()
    assert head_transform(T.GraniteConfig(logits_scaling=1.0)) == ()  # identity left out


def test_a_bf16_model_passes_the_check() -> None:
    """The check's tolerance follows the weights' precision: a bf16 Gemma2 computes its
    logits and its cap in bf16, LLMCTR in float32."""
    tok = tiny_tokenizer(PROMPTS)
    model = tiny_model("gemma2", len(tok)).to(torch.bfloat16)
    ctr = LLMCTR(model, tok, add_special_tokens=True)
    enc = ctr.encode(PROMPTS)
    with torch.no_grad():
        mine = ctr(**ctr.collate(enc))
    ref = own_logits(model, enc, ctr.answer_ids).float()
    torch.testing.assert_close(mine, ref, atol=0.05, rtol=0.02)


class TemperedLlama(T.LlamaForCausalLM):
    """A family LLMCTR does not know: its forward scales the logits by a config field."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.logit_scale
        return out


def tempered(vocab_size: int) -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=vocab_size, **TINY, logit_scale=0.25)


def test_an_unknown_logit_transform_is_refused_naming_model_and_field() -> None:
    tok = tiny_tokenizer(PROMPTS)
    torch.manual_seed(0)
    model = TemperedLlama(tempered(len(tok))).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    with pytest.raises(ValueError, match=r"TemperedLlama.*logit_scale"):
        LLMCTR(model, tok, add_special_tokens=True)


def test_the_check_needs_materialised_weights() -> None:
    """On the meta device (a model built to be loaded or sharded later) there is no forward
    to compare with, and building the LLMCTR must still work."""
    tok = tiny_tokenizer(PROMPTS)
    with torch.device("meta"):
        model = TemperedLlama(tempered(len(tok)))
    ctr = LLMCTR(model, tok, add_special_tokens=True)
    assert ctr.answer_ids == tuple(tok.convert_tokens_to_ids(["No", "Yes"]))


# --------------------------------------------------------------- special tokens
def eos_tokenizer() -> T.PreTrainedTokenizerFast:
    """A word tokenizer whose add_special_tokens=True gives `<s> text </s>`, as a Llama
    tokenizer saved with add_eos_token=True or a T5-style one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words_of(PROMPTS + ["Yes No"]))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                     bos_token="<s>", eos_token="</s>")


def test_a_trailing_eos_is_left_off_so_the_answer_follows_the_prompt() -> None:
    tok = eos_tokenizer()
    model = tiny_llama(len(tok))
    ctr = LLMCTR(model, tok, add_special_tokens=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ctr.affixes == ([bos], [eos])
    bare = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    enc = ctr.encode(PROMPTS)
    assert enc == [[bos] + x for x in bare]
    with torch.no_grad():
        mine = ctr(**ctr.collate(enc))
    torch.testing.assert_close(mine, own_logits(model, enc, ctr.answer_ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_tok", [eos_tokenizer, lambda: tiny_tokenizer(PROMPTS)])
def test_a_cut_prompt_keeps_its_bos(make_tok) -> None:
    tok = make_tok()
    ctr = LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True, max_length=5)
    bare = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    assert ctr.encode(PROMPTS[1:]) == [[tok.bos_token_id] + bare[-4:]]


def test_special_tokens_that_are_not_around_the_text_are_refused() -> None:
    def mangling(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [5, 9] if add_special_tokens else [7]}  # text re-tokenized

    with pytest.raises(ValueError, match="add_special_tokens"):
        special_token_affixes(mangling)


def test_explicit_answer_ids_need_no_chat_template() -> None:
    """With answer_ids given, the head check runs on plain text: a chat template that
    refuses a lone user message (rendered only to find the answer ids) is never rendered."""
    tok = tiny_tokenizer(["USER : Hi ASSISTANT : Yes No"])
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a "
                         "system message must come first') }}{% endif %}")
    ids = tuple(tok.convert_tokens_to_ids(["No", "Yes"]))
    ctr = LLMCTR(tiny_llama(len(tok)), tok, answer_ids=ids)
    assert tuple(ctr.answer_ids) == ids


def test_a_prompt_that_breaks_the_probes_wrapping_is_refused() -> None:
    """A prompt the tokenizer does not wrap as it wrapped the probe's word is refused,
    naming the prompt, not scored from a wrong position."""
    tok = tiny_tokenizer(PROMPTS)
    ctr = LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True)
    ctr.affixes = ([tok.bos_token_id], [tok.eos_token_id])  # as if the probe had seen EOS
    with pytest.raises(ValueError, match="prompt 0: with add_special_tokens=True"):
        ctr.encode(PROMPTS[:1])
