"""inject / personalize on five transformers families built from tiny configs: what gets
replaced and trained, PEFT equivalence at M = 1, per-row personalization through the whole
model, gradients, and torch.compile."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, build, output, randomise_adapters
from torch import nn

import reclora
from reclora import RecLoRALinear

F64 = torch.float64
GATE_DIM = 12


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inject_replaces_and_freezes(family):
    spec = FAMILIES[family]
    model = build(family)
    ids = torch.randint(0, VOCAB, (3, 6))
    before = output(model, ids)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = reclora.inject(model, spec.targets, num_adapters=4, rank=2, alpha=8,
                            gate_dim=GATE_DIM)
    assert len(layers) == spec.per_layer * spec.layers
    assert all(isinstance(m, RecLoRALinear) for m in layers.values())
    assert reclora.reclora_layers(model) == layers
    assert not any(m.training for m in model.modules())  # new layers follow the eval model
    # Only banks and gates train; the base weights are the same tensors, untouched.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a" in n or ".lora_b" in n or ".gate." in n for n in trainable)
    per_layer = [4 * 2 * (m.in_features + m.out_features) + sum(
        p.numel() for p in m.gate.parameters()) for m in layers.values()]
    assert reclora.num_trainable(model) == sum(per_layer)
    for name, p in model.named_parameters():
        if name in base_params:
            assert torch.equal(p, base_params[name]), name
    # B = 0 at init: the injected model computes exactly what the base did, for any user.
    with reclora.personalize(model, torch.randn(3, GATE_DIM, dtype=F64)):
        after = output(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_m1_matches_peft_lora(family):
    """M = 1, weight 1 (the no-mixture default) equals a PEFT LoRA model with the same A, B."""
    from peft import LoraConfig, get_peft_model

    spec = FAMILIES[family]
    base = build(family)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=list(
        spec.targets), fan_in_fan_out=family == "gpt2", lora_dropout=0.0)).eval()
    layers = reclora.inject(ours, spec.targets, num_adapters=1, rank=3, alpha=6)
    gen = torch.Generator().manual_seed(11)
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    assert set(peft_modules) == set(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            a = torch.randn(3, layer.in_features, generator=gen, dtype=F64)
            b = torch.randn(layer.out_features, 3, generator=gen, dtype=F64)
            peft_modules[name].lora_A["default"].weight.copy_(a)
            peft_modules[name].lora_B["default"].weight.copy_(b)
            layer.lora_a[0].copy_(a)
            layer.lora_b[0].copy_(b)
    ids = torch.randint(0, VOCAB, (2, 7))
    expected = output(peft_model, ids)
    got = output(ours, ids)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"\n{family}: M=1 vs PEFT LoRA, max relative error {err:.2e}")
    assert err < 1e-12
    # The same with weight 1 set explicitly, per row.
    for layer in layers.values():
        layer.set_mixture(torch.ones(2, 1, dtype=F64))
    torch.testing.assert_close(output(ours, ids), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_personalize_rows_and_gradients(family):
    """Row b of a batch gets user b's adapters: the batch equals each row run alone; then a
    backward pass reaches every bank and gate parameter and nothing else."""
    spec = FAMILIES[family]
    model = build(family)
    layers = reclora.inject(model, spec.targets, num_adapters=5, rank=2, alpha=4,
                            gate_dim=GATE_DIM, temperature=2.0, gate_dropout=0.0)
    randomise_adapters(layers)
    ids = torch.randint(0, VOCAB, (3, 5))
    users = torch.randn(3, GATE_DIM, dtype=F64)
    with reclora.personalize(model, users):
        batch = output(model, ids)
    alone = []
    for b in range(3):
        with reclora.personalize(model, users[b]):
            alone.append(output(model, ids[b:b + 1]))
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-12, atol=1e-12)
    with reclora.personalize(model, users.flip(0)):  # users matter
        assert not torch.allclose(output(model, ids), batch)

    model.train()
    with reclora.personalize(model, users):
        output(model, ids).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_generate_per_user():
    """Greedy decoding with the KV cache (decode steps are [R, 1, d]) keeps each row's user."""
    model = build("llama")
    layers = reclora.inject(model, num_adapters=4, rank=2, alpha=8, gate_dim=GATE_DIM)
    randomise_adapters(layers, std=1.0)
    ids = torch.randint(1, VOCAB, (2, 4))
    users = torch.randn(2, GATE_DIM, dtype=F64)
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with reclora.personalize(model, users):
        both = model.generate(ids, **options)
    for b in range(2):
        with reclora.personalize(model, users[b]):
            assert torch.equal(model.generate(ids[b:b + 1], **options), both[b:b + 1])


def test_personalize_nests_and_restores():
    model = build("llama")
    layers = reclora.inject(model, num_adapters=3, rank=2, gate_dim=GATE_DIM)
    first = next(iter(layers.values()))
    u1, u2 = torch.randn(2, GATE_DIM, dtype=F64), torch.randn(2, GATE_DIM, dtype=F64)
    from reclora.layers import ACTIVE_PERSONALIZATION

    def active_reps():
        state = (ACTIVE_PERSONALIZATION.get() or {}).get(first)
        return None if state is None else state.user_reps

    with reclora.personalize(model, u1):
        with reclora.personalize(model, u2):
            assert active_reps() is u2
        assert active_reps() is u1
    assert active_reps() is None
    with pytest.raises(ValueError, match="`user_reps`"):
        with reclora.personalize(model, torch.randn(2, GATE_DIM + 1, dtype=F64)):
            pass
    with pytest.raises(RuntimeError, match="personalize"):
        output(model, torch.randint(0, VOCAB, (2, 3)))


def test_inject_options_and_errors():
    model = build("llama")
    # A regex must match the whole name: only layer 1's q_proj.
    layers = reclora.inject(model, r"model\.layers\.1\.self_attn\.q_proj", num_adapters=2,
                            rank=1, mix="output", top_k=None)
    assert list(layers) == ["model.layers.1.self_attn.q_proj"]
    assert layers["model.layers.1.self_attn.q_proj"].mix == "output"
    with pytest.raises(ValueError, match="already a RecLoRALinear"):
        reclora.inject(model, ("q_proj",), num_adapters=2, rank=1)
    with pytest.raises(ValueError, match="no module matches.*q_proj"):
        reclora.inject(build("llama"), ("query",), num_adapters=2, rank=1)
    with pytest.raises(TypeError, match="only nn.Linear and Conv1D"):
        reclora.inject(build("llama"), ("self_attn",), num_adapters=2, rank=1)
    with pytest.raises(ValueError, match="`gate_dim`"):
        reclora.inject(build("llama"), num_adapters=2, rank=1, gate_dim=0)
    # Any torch model, not only transformers: a plain Sequential works as well.
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=F64)
    before = net(x)
    assert list(reclora.inject(net, ("0", "2"), num_adapters=3, rank=2)) == ["0", "2"]
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-15)  # B = 0, uniform mixture
    # Hard top-k gates route k of M adapters per row through the op's index path.
    topk = build("llama")
    layers = reclora.inject(topk, num_adapters=6, rank=2, gate_dim=GATE_DIM, top_k=2,
                            sqrt=True)
    randomise_adapters(layers)
    with reclora.personalize(topk, torch.randn(2, GATE_DIM, dtype=F64)):
        assert torch.isfinite(output(topk, torch.randint(0, VOCAB, (2, 4)))).all()


def test_modules_whose_weights_are_read_directly_are_refused():
    """nn.MultiheadAttention reads out_proj's weight without calling it, and the Transformer
    layers' eval fast path reads linear1 / linear2's: adapters there would never run."""
    attention = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 4))
    with pytest.raises(TypeError, match="inside a MultiheadAttention"):
        reclora.inject(attention, ("out_proj",), num_adapters=2, rank=1)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=1,
                                    enable_nested_tensor=False)
    with pytest.raises(TypeError, match="inside a TransformerEncoderLayer"):
        reclora.inject(encoder, r".*linear1", num_adapters=2, rank=1)
    assert list(reclora.inject(attention, ("1",), num_adapters=2, rank=1)) == ["1"]


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        not (torch.cuda.is_available() or os.environ.get("RECLORA_TEST_INDUCTOR") == "1"),
        reason="inductor on CPU takes minutes here; set RECLORA_TEST_INDUCTOR=1")]),
])
def test_torch_compile_matches_eager(backend):
    """A tiny Llama (hidden 64, 2 layers) with injected gated layers under torch.compile:
    forward and backward match eager, and new users do not recompile."""
    torch._dynamo.reset()
    model = build("llama", dtype=torch.float32, hidden=64)
    layers = reclora.inject(model, num_adapters=4, rank=4, alpha=8, gate_dim=GATE_DIM,
                            gate_dropout=0.0)
    randomise_adapters(layers, std=0.1)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    params = reclora.trainable_parameters(model)

    def step(fn, ids, users):
        with reclora.personalize(model, users):
            logits = fn(input_ids=ids).logits
        grads = torch.autograd.grad(logits.square().mean(), params)
        return logits.detach(), grads

    frames = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (3, 8))
        users = torch.randn(3, GATE_DIM)
        eager_out, eager_grads = step(model, ids, users)
        comp_out, comp_grads = step(compiled, ids, users)
        torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-5)
        for g_c, g_e in zip(comp_grads, eager_grads):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
        frames.append(counter.frame_count)
        worst_grad = max((c - e).abs().max().item() for c, e in zip(comp_grads, eager_grads))
        print(f"\ncompile[{backend}] vs eager: logits max abs diff "
              f"{(comp_out - eager_out).abs().max().item():.2e}, grads {worst_grad:.2e}")
    assert frames[0] > 0 and frames[1] == frames[0]  # new users and ids: no recompile
