"""RecLoRALinear and PersonalizedGate: init, routing, row mapping, the reference code's
formula re-derived, gradients, dtypes. All math runs through lora_mix_linear (backend auto)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reclora
import reclora_kernels as rk
from reclora import PersonalizedGate, ReclLoRALinear, RecLoRALinear

F64 = torch.float64


def make_layer(d_in=13, d_out=11, m=5, r=3, *, alpha=6.0, mix="factor", bias=True, gate=None,
               dtype=F64, backend="auto", seed=0) -> RecLoRALinear:
    """A layer with a random bank (B != 0) so the LoRA path is visible."""
    torch.manual_seed(seed)
    layer = RecLoRALinear(d_in, d_out, bias, num_adapters=m, rank=r, alpha=alpha, mix=mix,
                          gate=gate, dtype=dtype, backend=backend)
    with torch.no_grad():
        layer.lora_a.normal_()
        layer.lora_b.normal_()
    return layer


def manual(layer: RecLoRALinear, x: torch.Tensor, w: torch.Tensor, idx=None) -> torch.Tensor:
    """The op's semantics written out per row, for [R, L, d] x and w [R, k]."""
    base = F.linear(x, layer.weight, layer.bias)
    out = []
    for b in range(x.shape[0]):
        bank_a = layer.lora_a if idx is None else layer.lora_a[idx[b]]
        bank_b = layer.lora_b if idx is None else layer.lora_b[idx[b]]
        if layer.mix == "factor":
            a = torch.einsum("j,jrd->rd", w[b], bank_a)
            bb = torch.einsum("j,jor->or", w[b], bank_b)
            out.append(x[b] @ a.T @ bb.T)
        else:
            out.append(sum(w[b, j] * (x[b] @ bank_a[j].T @ bank_b[j].T)
                           for j in range(w.shape[1])))
    return base + layer.scale * torch.stack(out)


def test_alias_and_init():
    assert ReclLoRALinear is RecLoRALinear
    torch.manual_seed(0)
    d_in = 37
    layer = RecLoRALinear(d_in, 9, num_adapters=4, rank=5, alpha=10)
    bound = 1 / math.sqrt(d_in)  # kaiming-uniform a = sqrt 5, fan-in d_in
    assert layer.lora_a.shape == (4, 5, d_in) and layer.lora_b.shape == (4, 9, 5)
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_b) == 0
    assert layer.scale == 2.0 and layer.mix == "factor"
    assert not layer.weight.requires_grad and layer.lora_a.requires_grad
    x = torch.randn(3, 4, d_in)
    # B = 0: a new layer is its base, whatever the mixture.
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)


def test_from_linear_shares_and_freezes():
    lin = nn.Linear(7, 5).double()
    layer = RecLoRALinear.from_linear(lin, num_adapters=3, rank=2, alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert layer.lora_a.dtype == F64  # follows a float base
    unfrozen = RecLoRALinear.from_linear(nn.Linear(7, 5), num_adapters=3, rank=2,
                                         freeze_base=False)
    assert unfrozen.weight.requires_grad and unfrozen.scale == 1.0
    half = RecLoRALinear.from_linear(nn.Linear(7, 5).bfloat16(), num_adapters=3, rank=2)
    assert half.lora_a.dtype == torch.float32  # banks train in float32 under a half base
    with pytest.raises(TypeError, match="`linear`"):
        RecLoRALinear.from_linear(nn.Conv2d(1, 1, 1), num_adapters=2, rank=1)
    with pytest.raises(TypeError, match="already"):
        RecLoRALinear.from_linear(layer, num_adapters=2, rank=1)


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("sparse", [False, True])
def test_set_mixture_matches_semantics(mix, sparse):
    layer = make_layer(mix=mix)
    rows, length, k = 4, 3, 3
    x = torch.randn(rows, length, layer.in_features, dtype=F64)
    if sparse:
        idx = torch.randint(0, layer.num_adapters, (rows, k))
        w = torch.randn(rows, k, dtype=F64)
    else:
        idx, w = None, torch.randn(rows, layer.num_adapters, dtype=F64)
    layer.set_mixture(w, idx)
    torch.testing.assert_close(layer(x), manual(layer, x, w, idx), rtol=1e-12, atol=1e-12)


def test_no_mixture_is_uniform_and_plain_lora_for_one_adapter():
    layer = make_layer(m=4)
    x = torch.randn(3, 5, layer.in_features, dtype=F64)
    uniform = torch.full((3, 4), 0.25, dtype=F64)
    torch.testing.assert_close(layer(x), manual(layer, x, uniform), rtol=1e-12, atol=1e-12)
    # M = 1 without any mixture call: exactly plain LoRA, W x + b + scale * B A x.
    one = make_layer(m=1, alpha=5.0, r=2)
    lora = F.linear(x, one.weight, one.bias) + one.scale * (x @ one.lora_a[0].T @ one.lora_b[0].T)
    torch.testing.assert_close(one(x), lora, rtol=1e-12, atol=1e-12)
    # A mixture set and then cleared goes back to uniform.
    layer.set_mixture(torch.randn(3, 4, dtype=F64))
    assert not torch.allclose(layer(x), manual(layer, x, uniform))
    layer.clear_mixture()
    torch.testing.assert_close(layer(x), manual(layer, x, uniform), rtol=1e-12, atol=1e-12)


def test_the_uniform_mixture_is_made_once_per_size(monkeypatch):
    """Without a gate or a mixture the layer passes 1/M for each input row; the tensor is made
    once per (rows, M, dtypes, device), not per forward, and no call writes it."""
    import reclora.layers as layers

    seen = []
    real = layers.lora_mix_linear

    def recording(*args, **kwargs):
        seen.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "lora_mix_linear", recording)
    layer = make_layer(m=4)
    layer.lora_a.requires_grad_(True)
    for rows in (3, 3, 2, 3):
        x = torch.randn(rows, 5, layer.in_features, dtype=F64, requires_grad=True)
        layer(x).sum().backward()
    assert [tuple(w.shape) for w in seen] == [(3, 4), (3, 4), (2, 4), (3, 4)]
    assert seen[0] is seen[1] is seen[3] and seen[2] is not seen[0]
    for w in seen:
        assert not w.requires_grad
        torch.testing.assert_close(w, torch.full_like(w, 0.25), rtol=0, atol=0)
    # Half compute dtypes get 1/M as the float32 bank holds it, rounded once.
    half = RecLoRALinear(8, 8, num_adapters=3, rank=2, dtype=torch.bfloat16)
    half(torch.randn(2, 1, 8, dtype=torch.bfloat16))
    want = torch.full((2, 3), 1 / 3, dtype=torch.float32).to(torch.bfloat16)
    assert seen[-1].dtype == torch.bfloat16
    torch.testing.assert_close(seen[-1], want, rtol=0, atol=0)


def test_reference_code_factor_formula():
    """RECLORA.md section 1, the way the reference code computes it: the bank is two Linear
    maps from the M gate outputs to flattened factors, the gate is LayerNorm -> Linear(h,60)
    -> ReLU -> Dropout -> Linear(60, M), /tau, softmax; delta = scale * (x A_p^T) B_p^T by
    two bmm. Re-derived here from that description and compared with the gated layer."""
    torch.manual_seed(3)
    h, d_in, d_out, m, r, tau, alpha = 16, 12, 10, 6, 4, 5.0, 16.0
    rows, length = 3, 7
    # Reference-code parameters: lora_A_adapter [d_in*r, M], lora_B_adapter [r*d_out, M].
    adapter_a = torch.randn(d_in * r, m, dtype=F64)
    adapter_b = torch.randn(r * d_out, m, dtype=F64)
    gate = PersonalizedGate(h, m, temperature=tau, dtype=F64)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    gate.eval()
    layer = RecLoRALinear(d_in, d_out, num_adapters=m, rank=r, alpha=alpha, gate=gate, dtype=F64)
    with torch.no_grad():  # the same bank, in (A_i [r, d_in], B_i [d_out, r]) form
        layer.lora_a.copy_(adapter_a.T.reshape(m, r, d_in))
        layer.lora_b.copy_(adapter_b.T.reshape(m, r, d_out).transpose(1, 2))
    x = torch.randn(rows, length, d_in, dtype=F64)
    user = torch.randn(rows, h, dtype=F64)

    ln, fc1, fc2 = gate.net[0], gate.net[1], gate.net[4]
    hidden = torch.relu(F.linear(F.layer_norm(user, (h,), ln.weight, ln.bias), fc1.weight,
                                 fc1.bias))
    w = torch.softmax(F.linear(hidden, fc2.weight, fc2.bias) / tau, dim=-1)
    a_w = F.linear(w, adapter_a).reshape(-1, r, d_in).permute(0, 2, 1)  # [R, d_in, r]
    b_w = F.linear(w, adapter_b).reshape(-1, r, d_out)  # [R, r, d_out]
    expected = (F.linear(x, layer.weight, layer.bias)
                + torch.bmm(torch.bmm(x, a_w), b_w) * (alpha / r))
    with reclora.personalize(layer, user):
        got = layer(x)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"\nreference-code factor formula vs gated layer: max relative error {err:.2e}")
    assert err < 1e-13, err


def test_gate_reads_a_huge_row_as_its_direction():
    """A finite float32 row of magnitude 1e19-1e30 overflowed the LayerNorm's variance (the
    row got uniform or NaN weights); it is read as the same row scaled down, and rows of a
    usual size are unchanged bit for bit, in the same batch."""
    torch.manual_seed(0)
    gate = PersonalizedGate(16, 4).eval()
    user = torch.randn(5, 16)
    usual = gate(user)[0]
    big = user.clone()
    big[2] *= 1e19
    big[3] *= 1e30
    w = gate(big)[0]
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[2:4], usual[2:4], rtol=1e-4, atol=1e-5)
    assert torch.equal(w[[0, 1, 4]], usual[[0, 1, 4]])
    assert not torch.allclose(w[2], torch.full((4,), 0.25), atol=1e-3)


def test_gate_options():
    torch.manual_seed(0)
    gate = PersonalizedGate(8, 6, temperature=2.0, dtype=F64).eval()
    user = torch.randn(5, 8, dtype=F64)
    logits = gate.logits(user)
    w, idx = gate(user)
    assert idx is None and w.shape == (5, 6)
    torch.testing.assert_close(w, torch.softmax(logits, -1), rtol=0, atol=0)
    torch.testing.assert_close(logits * 2.0, gate.net(user), rtol=1e-15, atol=1e-15)
    topk = PersonalizedGate(8, 6, temperature=2.0, top_k=2, sqrt=True, dtype=F64).eval()
    topk.load_state_dict(gate.state_dict())
    wk, ik = topk(user)
    assert wk.shape == ik.shape == (5, 2) and ik.dtype == torch.int64
    masked = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).scatter(1, ik, False),
                                float("-inf"))
    torch.testing.assert_close(wk, torch.softmax(masked, -1).gather(1, ik).sqrt(),
                               rtol=1e-15, atol=1e-15)
    assert set(ik[0].tolist()) == set(torch.topk(logits[0], 2).indices.tolist())
    for bad in ({"top_k": 7}, {"temperature": 0.0}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            PersonalizedGate(8, 6, **bad)
    with pytest.raises(ValueError, match="`user_reps`"):
        gate(torch.randn(5, 9, dtype=F64))


def test_gate_temperature_range():
    """A temperature that is 0 in float32 (1e-300) gave inf/inf = NaN weights and a run that
    failed only when it scored (CLI audit item 3): refused outside TEMPERATURE_RANGE, by the
    gate and by Stage2Config; at both ends, logits of 1e3 still give finite weights."""
    from reclora.few2many import Stage2Config
    from reclora.gates import TEMPERATURE_RANGE

    low, high = TEMPERATURE_RANGE
    for bad in (1e-300, 1e-40, low / 2, high * 2, math.inf, math.nan, 0.0, -5.0, "5"):
        with pytest.raises(ValueError, match=r"`temperature` must be a number in "
                           r"\[1e-06, 1e\+06\]"):
            PersonalizedGate(8, 4, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            Stage2Config(temperature=bad)
    torch.manual_seed(0)
    for t in (low, high, 5):
        gate = PersonalizedGate(8, 4, temperature=t).eval()
        with torch.no_grad():
            gate.net[4].weight.mul_(1e3)
        w, _ = gate(torch.randn(6, 8) * 1e3)
        assert torch.isfinite(w).all() and torch.allclose(w.sum(-1), torch.ones(6))
        assert Stage2Config(temperature=t).temperature == t


def test_top_k_gate_passes_indices_to_the_op():
    """Hard top-k: the layer must equal the dense mixture that is zero outside the top k."""
    torch.manual_seed(1)
    gate = PersonalizedGate(8, 6, top_k=3, dtype=F64).eval()
    layer = make_layer(m=6, gate=gate)
    x = torch.randn(4, 5, layer.in_features, dtype=F64)
    user = torch.randn(4, 8, dtype=F64)
    with reclora.personalize(layer, user):
        got = layer(x)
    w, idx = gate(user)
    dense = torch.zeros(4, 6, dtype=F64).scatter(1, idx, w)
    torch.testing.assert_close(got, manual(layer, x, dense), rtol=1e-12, atol=1e-12)


def test_row_mapping_shapes():
    layer = make_layer()
    d = layer.in_features
    w = torch.randn(4, layer.num_adapters, dtype=F64)
    layer.set_mixture(w)
    x3 = torch.randn(4, 6, d, dtype=F64)
    y3 = layer(x3)
    # 4-D: the first dim is the row, the rest are its tokens.
    torch.testing.assert_close(layer(x3.reshape(4, 2, 3, d)), y3.reshape(4, 2, 3, -1),
                               rtol=1e-12, atol=1e-12)
    # 2-D: one token per row (nn.Linear on a batch of vectors).
    torch.testing.assert_close(layer(x3[:, 0]), y3[:, 0], rtol=1e-12, atol=1e-12)
    # A one-row mixture (or a [M] vector) applies to every row; 1-D x is one row.
    layer.set_mixture(w[2])
    torch.testing.assert_close(layer(x3[2:3].expand(4, -1, -1)),
                               y3[2:3].expand(4, -1, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x3[2, 0]), y3[2, 0], rtol=1e-12, atol=1e-12)
    layer.set_mixture(w[:3])
    with pytest.raises(ValueError, match="mixture has 3 rows but the input has 4"):
        layer(x3)
    with pytest.raises(ValueError, match="`x`"):
        layer(torch.randn(4, 6, d + 1, dtype=F64))


def test_parametrized_weight_and_bank_are_used():
    """The forward reads registered parameters straight from _parameters (host cost); a
    parametrized one (torch.nn.utils.parametrize makes it a property) must still be read
    through its parametrization, for the base and for the bank alike."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, t):
            return 2.0 * t

    layer = make_layer()
    w = torch.randn(4, layer.num_adapters, dtype=F64)
    layer.set_mixture(w)
    x = torch.randn(4, 3, layer.in_features, dtype=F64)
    plain = layer(x)
    parametrize.register_parametrization(layer, "weight", Doubled())
    parametrize.register_parametrization(layer, "lora_b", Doubled())
    assert "weight" not in layer._parameters  # the case the fallback exists for
    torch.testing.assert_close(layer(x), manual(layer, x, w), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(x), plain)


def test_scalar_input_is_rejected():
    layer = make_layer()
    with pytest.raises(ValueError, match="`x` must end in in_features=13"):
        layer(torch.tensor(1.0, dtype=F64))


def test_packed_rows():
    """Varlen rows packed HF-style into [1, T, d] with shuffled row_ids equal each row run on
    its own."""
    layer = make_layer()
    d = layer.in_features
    lengths = [3, 1, 5, 2]
    w = torch.randn(len(lengths), layer.num_adapters, dtype=F64)
    row_ids = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
    perm = torch.randperm(row_ids.numel())
    row_ids = row_ids[perm]
    x = torch.randn(1, row_ids.numel(), d, dtype=F64)
    layer.set_mixture(w, row_ids=row_ids)
    packed = layer(x)
    assert packed.shape == (1, row_ids.numel(), layer.out_features)
    for b in range(len(lengths)):
        layer.set_mixture(w[b])
        own = layer(x[:, row_ids == b])
        torch.testing.assert_close(packed[:, row_ids == b], own, rtol=1e-12, atol=1e-12)
    # One mixture row with row_ids: it applies to every token.
    layer.set_mixture(w[1], row_ids=row_ids)
    layer_all = layer(x)
    layer.set_mixture(w[1])
    torch.testing.assert_close(layer_all, layer(x), rtol=1e-12, atol=1e-12)
    layer.set_mixture(w, row_ids=row_ids[:-1])
    with pytest.raises(ValueError, match="`row_ids`"):
        layer(x)


def test_set_mixture_errors():
    layer = make_layer(m=5)
    with pytest.raises(ValueError, match=r"\[R, M=5\]"):
        layer.set_mixture(torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="`idx`"):
        layer.set_mixture(torch.randn(2, 3, dtype=F64), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="`weights`"):
        layer.set_mixture(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`num_adapters`"):
        RecLoRALinear(4, 4, num_adapters=0, rank=2)
    with pytest.raises(ValueError, match="`mix`"):
        RecLoRALinear(4, 4, num_adapters=2, rank=2, mix="sum")
    # The range is checked once, when the mixture is set (not at every forward).
    with pytest.raises(IndexError, match=r"`idx` values must lie in \[0, 5\)"):
        layer.set_mixture(torch.randn(2, 2, dtype=F64), torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(IndexError, match="`idx`"):
        layer.set_mixture(torch.randn(2, 2, dtype=F64), torch.tensor([[0, -1], [1, 2]]))


def test_gated_layer_needs_user_reps():
    layer = make_layer(gate=PersonalizedGate(4, 5, dtype=F64))
    x = torch.randn(2, 3, layer.in_features, dtype=F64)
    with pytest.raises(RuntimeError, match="personalize"):
        layer(x)
    layer.set_mixture(torch.randn(2, 5, dtype=F64))  # an explicit mixture is allowed
    layer(x)
    with pytest.raises(ValueError, match="no RecLoRALinear with a gate"):
        with reclora.personalize(make_layer(), torch.randn(2, 4, dtype=F64)):
            pass


def test_gradients_reach_bank_and_gate():
    torch.manual_seed(2)
    gate = PersonalizedGate(6, 5, dtype=F64)
    layer = make_layer(gate=gate)
    x = torch.randn(3, 4, layer.in_features, dtype=F64)
    with reclora.personalize(layer, torch.randn(3, 6, dtype=F64)):
        layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        if name in ("weight", "bias"):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_through_gate_and_bank():
    torch.manual_seed(4)
    gate = PersonalizedGate(5, 4, top_k=2, dropout=0.0, dtype=F64)
    layer = make_layer(d_in=6, d_out=5, m=4, r=2, gate=gate)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    user = torch.randn(2, 5, dtype=F64, requires_grad=True)

    def g(x, user, a, b):
        # parameters swapped in functionally so gradcheck perturbs them
        params = {"lora_a": a, "lora_b": b}
        with reclora.personalize(layer, user):
            return torch.func.functional_call(layer, params, (x,))

    a = layer.lora_a.detach().clone().requires_grad_()
    b = layer.lora_b.detach().clone().requires_grad_()
    # fast_mode: a random projection of the Jacobian (the full one is the op suite's job).
    assert torch.autograd.gradcheck(g, (x, user, a, b), fast_mode=True)


def test_half_base_float32_bank_and_autocast():
    torch.manual_seed(5)
    lin = nn.Linear(16, 12).bfloat16()
    layer = RecLoRALinear.from_linear(lin, num_adapters=3, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_()
    w = torch.softmax(torch.randn(2, 3), -1)
    layer.set_mixture(w)
    x = torch.randn(2, 5, 16).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # Against the float64 formula on the same (rounded) operands: bf16 output rounding.
    ref = manual(_as_f64(layer), x.double(), w.double())
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_a.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = make_layer(dtype=torch.float32)(torch.randn(2, 3, 13))
    assert y32.dtype == torch.bfloat16


def test_autocast_leaves_float64_alone_as_nn_linear_does():
    layer = make_layer()  # float64
    plain = nn.Linear(layer.in_features, layer.out_features, dtype=F64)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    x = torch.randn(2, 3, layer.in_features, dtype=F64)
    w = torch.softmax(torch.randn(2, layer.num_adapters, dtype=F64), -1)
    layer.set_mixture(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = layer(x), plain(x)
    assert y.dtype == y_plain.dtype == F64
    torch.testing.assert_close(y, manual(layer, x, w), rtol=1e-12, atol=1e-12)


def test_training_after_an_inference_mode_forward():
    """The uniform mixture is cached by size; one first made under torch.inference_mode (a
    served batch) must still be saved by a later training forward of the same size."""
    import reclora.layers as layers

    layers._cached_uniform.cache_clear()  # else an earlier test's entry is reused
    layer = make_layer(m=3)
    x = torch.randn(2, 3, layer.in_features, dtype=F64)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_a.grad.abs().sum() > 0


def _as_f64(layer: RecLoRALinear) -> RecLoRALinear:
    copy = RecLoRALinear(layer.in_features, layer.out_features, layer.bias is not None,
                         num_adapters=layer.num_adapters, rank=layer.rank, alpha=layer.alpha,
                         mix=layer.mix, dtype=F64)
    with torch.no_grad():
        for name, p in copy.named_parameters():
            p.copy_(getattr(layer, name).to(torch.bfloat16).double())
    return copy


def test_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(6)
    conv = Conv1D(9, 7).double()  # nf=9 outputs, nx=7 inputs; weight [7, 9]
    with torch.no_grad():
        conv.bias.normal_()
    layer = RecLoRALinear.from_linear(conv, num_adapters=2, rank=3, alpha=3)
    assert layer.fan_in_fan_out and layer.weight is conv.weight
    assert (layer.in_features, layer.out_features) == (7, 9)
    x = torch.randn(2, 4, 7, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.lora_b.normal_()
    w = torch.randn(2, 2, dtype=F64)
    layer.set_mixture(w)
    expected = conv(x) + manual(layer_linear_view(layer), x, w) - F.linear(x, conv.weight.T,
                                                                           conv.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def layer_linear_view(layer: RecLoRALinear) -> RecLoRALinear:
    view = RecLoRALinear(layer.in_features, layer.out_features, num_adapters=layer.num_adapters,
                         rank=layer.rank, alpha=layer.alpha, dtype=F64)
    with torch.no_grad():
        view.weight.copy_(layer.weight.T)
        view.bias.copy_(layer.bias)
        view.lora_a.copy_(layer.lora_a)
        view.lora_b.copy_(layer.lora_b)
    return view


@pytest.mark.parametrize("backend", rk.available_backends())
def test_backends_agree(backend):
    """The layer on each usable backend against the float64 formula (float32 compute)."""
    layer = make_layer(d_in=24, d_out=20, m=6, r=4, dtype=torch.float32, backend=backend)
    torch.manual_seed(7)
    idx = torch.randint(0, 6, (3, 2))
    w = torch.randn(3, 2)
    layer.set_mixture(w, idx)
    x = torch.randn(3, 5, 24)
    ref = manual(layer_to(layer, F64), x.double(), w.double(), idx)
    got = layer(x)
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 2e-5


def layer_to(layer: RecLoRALinear, dtype: torch.dtype) -> RecLoRALinear:
    copy = RecLoRALinear(layer.in_features, layer.out_features, layer.bias is not None,
                         num_adapters=layer.num_adapters, rank=layer.rank, alpha=layer.alpha,
                         mix=layer.mix, dtype=dtype)
    copy.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
    return copy
