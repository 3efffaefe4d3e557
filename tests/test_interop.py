"""RecLoRALinear / inject / personalize with torch's and transformers' tools (an interop
audit): deferred (meta-device) init, torch.export of per-request state, models that share
layers, torch.jit.trace, and a base weight replaced after inject."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from tiny_models import VOCAB, build
from torch import nn
from torch.export import export

import reclora
from reclora import PersonalizedGate, RecLoRALinear
from reclora.layers import ACTIVE_PERSONALIZATION

F64 = torch.float64
GATE_DIM = 6


def gated_layer(d_in: int = 8, d_out: int = 6, adapters: int = 3) -> RecLoRALinear:
    gate = PersonalizedGate(GATE_DIM, adapters, hidden=5, dropout=0.0, dtype=F64)
    layer = RecLoRALinear(d_in, d_out, num_adapters=adapters, rank=2, gate=gate, dtype=F64)
    with torch.no_grad():
        layer.lora_b.normal_()  # B = 0 at init would hide the LoRA part
    return layer.eval()


# --- 1. deferred (meta-device) init -------------------------------------------------------


def test_reset_parameters_redoes_the_constructors_init():
    layer = gated_layer()
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))  # what to_empty leaves: any bytes
    layer.reset_parameters()
    assert torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b))
    bound = 1.0 / math.sqrt(layer.in_features)  # kaiming-uniform, a = sqrt 5
    for p in (layer.weight, layer.bias, layer.lora_a):
        assert p.isfinite().all() and p.abs().max() <= bound
    gate = layer.gate.net
    assert torch.equal(gate[0].weight, torch.ones_like(gate[0].weight))  # LayerNorm identity
    assert all(torch.equal(lin.bias, torch.zeros_like(lin.bias)) for lin in (gate[1], gate[4]))
    assert all(p.isfinite().all() for p in layer.gate.parameters())


def test_meta_init_idiom_gives_the_base_model():
    """torchtitan / FSDP's deferred init: build and inject on the meta device, to_empty,
    reset_parameters() on every module that has one, load the base checkpoint (no adapters
    in it, strict=False). lora_b kept to_empty's bytes: NaN outputs, silently."""
    base = build("llama", hidden=16, layers=1)
    ids = torch.randint(0, VOCAB, (2, 4))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    with torch.device("meta"):
        model = build("llama", hidden=16, layers=1)
    reclora.inject(model, ("q_proj", "v_proj"), num_adapters=3, rank=2, gate_dim=GATE_DIM)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.fill_(float("nan"))
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k or ".gate." in k for k in missing)
    with torch.no_grad():
        for name, buffer in base.named_buffers():  # non-persistent (rotary), not in the file
            model.get_buffer(name).copy_(buffer)
        with reclora.personalize(model, torch.randn(2, GATE_DIM, dtype=F64)):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)


# --- 2. torch.export of per-request state -------------------------------------------------


class Personalized(nn.Module):
    """The export pattern that works: user_reps an input, personalize entered in forward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, reps):
        with reclora.personalize(self.layer, reps):
            return self.layer(x)


class Mixed(nn.Module):
    """The same for set_mixture: the mixture an input."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, weights):
        self.layer.set_mixture(weights)
        return self.layer(x)


class Plain(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_export_refuses_personalization_made_outside_the_call():
    """Exported inside `personalize(model, r1)`, the program held r1 as a constant and served
    it under any later personalize, silently."""
    layer = gated_layer()
    x = torch.randn(2, 3, 8, dtype=F64)
    r1, r2 = torch.randn(2, GATE_DIM, dtype=F64), torch.randn(2, GATE_DIM, dtype=F64)
    with reclora.personalize(layer, r1), pytest.raises(
            RuntimeError, match=r"torch.export .*personalize.* constants.*wrapper"):
        export(Plain(layer), (x,))
    program = export(Personalized(layer), (x, r1)).module()  # the pattern the error names
    with torch.no_grad(), reclora.personalize(layer, r2):
        assert torch.allclose(program(x, r2), layer(x), rtol=0, atol=1e-12)
    # torch.compile guards on the user_reps instead: not refused.
    compiled = torch.compile(Plain(layer), backend="eager", fullgraph=True)
    for reps in (r1, r2):
        with reclora.personalize(layer, reps):
            assert torch.equal(compiled(x), layer(x))


@pytest.mark.filterwarnings("ignore:The tensor attribute self.layer._mixture")  # restored
def test_export_refuses_a_mixture_set_outside_the_call():
    layer = gated_layer()
    x, w = torch.randn(2, 3, 8, dtype=F64), torch.softmax(torch.randn(2, 3, dtype=F64), -1)
    layer.set_mixture(w)
    with pytest.raises(RuntimeError, match=r"torch.export .*set_mixture.* constants"):
        export(Plain(layer), (x,))
    program = export(Mixed(layer), (x, w)).module()
    assert layer._mixture[0] is w and not layer._mixture_in_export  # export restored them
    w2 = torch.softmax(torch.randn(2, 3, dtype=F64), -1)
    layer.set_mixture(w2)
    with torch.no_grad():
        assert torch.allclose(program(x, w2), layer(x), rtol=0, atol=1e-12)


# --- 3. models that share layers ----------------------------------------------------------


def test_nested_personalize_of_models_sharing_layers_is_refused():
    """A value head over the policy's backbone: the inner block re-personalized the shared
    layers, so the policy ran on the critic's users, silently."""
    backbone = nn.Sequential(gated_layer(8, 8))
    policy, critic = nn.Sequential(backbone, nn.Linear(8, 4)), nn.Sequential(backbone)
    ra, rb = torch.randn(2, GATE_DIM, dtype=F64), torch.randn(2, GATE_DIM, dtype=F64)
    layer = backbone[0]
    with reclora.personalize(policy, ra):
        with pytest.raises(ValueError, match=r"personalize: 1 gated layer.*Sequential: "
                                             r"0\.0\).*shared.*separate blocks"):
            with reclora.personalize(critic, rb):
                pass
        assert ACTIVE_PERSONALIZATION.get()[layer].user_reps is ra  # left as it was
        with reclora.personalize(policy, rb):  # the same model nests, as documented
            assert ACTIVE_PERSONALIZATION.get()[layer].user_reps is rb
    with reclora.personalize(critic, rb):  # separate blocks work
        assert ACTIVE_PERSONALIZATION.get()[layer].user_reps is rb


def test_copy_run_inside_the_originals_block_names_copies():
    layer = gated_layer()
    with reclora.personalize(layer, torch.randn(GATE_DIM, dtype=F64)):
        with pytest.raises(RuntimeError, match=r"no user representation.*another model "
                                               r"object.*copy\.deepcopy"):
            copy.deepcopy(layer)(torch.randn(2, 8, dtype=F64))


# --- 5. torch.jit.trace ---------------------------------------------------------------------


def test_jit_trace_is_refused_clearly():
    """Traced sizes are tensors: the errors were "RowPlan: invalid plan (rows must be an int,
    got Tensor)" and "user_reps must end in ... [6], got shape [tensor(2), tensor(6)]"."""
    layer = gated_layer()
    x, reps = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, GATE_DIM, dtype=F64)
    w = torch.softmax(torch.randn(2, 3, dtype=F64), -1)
    ungated = RecLoRALinear(8, 6, num_adapters=3, rank=2, dtype=F64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        for module, args, where in ((Plain(ungated), (x,), "RecLoRALinear"),
                                    (Personalized(layer), (x, reps), "personalize"),
                                    (Mixed(layer), (x, w), "set_mixture")):
            with pytest.raises(RuntimeError, match=rf"{where}: torch.jit.trace .*not "
                                                   r"supported.*torch.export"):
                torch.jit.trace(module, args, check_trace=False)


# --- 6. a base weight replaced after inject -------------------------------------------------


def test_replaced_base_weight_is_named():
    layer = RecLoRALinear(8, 6, num_adapters=3, rank=2, dtype=F64)
    x = torch.randn(2, 8, dtype=F64)
    layer.weight = nn.Parameter(torch.randn(9, 8, dtype=F64), requires_grad=False)
    layer.out_features = 9  # as transformers' re-tying sets it
    with pytest.raises(ValueError, match=r"base `weight` has shape \[9, 8\] but .* made for "
                                         r"\[6, 8\].*resize_token_embeddings.*before inject"):
        layer(x)
    # Layers pickled before the check existed get its state from their sizes.
    fresh = RecLoRALinear(8, 6, num_adapters=3, rank=2, dtype=F64)
    del fresh.__dict__["_weight_shape"], fresh.__dict__["_mixture_in_export"]
    restored = copy.deepcopy(fresh)
    assert restored._weight_shape == (6, 8) and restored._mixture_in_export is False
    assert restored(x).shape == (2, 6)


def test_resize_token_embeddings_of_an_injected_tied_lm_head_is_named():
    model = build("gpt2", hidden=16, layers=1)
    reclora.inject(model, ("lm_head",), num_adapters=3, rank=2)
    model.resize_token_embeddings(VOCAB + 3, mean_resizing=False)
    with pytest.raises(ValueError, match=rf"`weight` has shape \[{VOCAB + 3}, 16\] but .* "
                                         rf"\[{VOCAB}, 16\].*resize the vocabulary before"):
        model(input_ids=torch.randint(0, VOCAB, (2, 4)))
