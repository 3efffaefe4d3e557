"""Half-precision paths that gave another answer than float32 (a precision audit, 2026-12-07):
the gates routed under autocast's bf16, fp16 gates overflowed logits / T, export_peft under
autocast wrote bf16 files, the reference rounded B s to fp16 before the scale, and the FSDP
gradient average rounded float64 gradients to float32."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import reclora
from reclora.export import export_peft
from reclora.gates import PersonalizedGate
from reclora_kernels import available_backends, lora_mix_linear


def _trained_looking_gate(in_features: int, num_adapters: int, **options) -> PersonalizedGate:
    """A gate whose logits are O(10), as a trained gate's are (init gives O(1))."""
    gate = PersonalizedGate(in_features, num_adapters, dropout=0.0, **options).eval()
    with torch.no_grad():
        gate.net[4].weight.mul_(20)
    return gate


@pytest.mark.parametrize("top_k", [2, None])
def test_the_gate_routes_the_same_under_autocast(top_k) -> None:
    """Under bf16 autocast 21-33 of 4,096 rows got another top-2 set than float32 (and than
    export_peft, which runs without autocast); now the gate runs in its own dtype."""
    gate = _trained_looking_gate(256, 16, temperature=5.0, top_k=top_k)
    reps = torch.randn(4096, 256)
    with torch.no_grad():
        w, idx = gate(reps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w_auto, idx_auto = gate(reps)
    assert w_auto.dtype == torch.float32
    assert torch.equal(w_auto, w)
    assert idx is None and idx_auto is None if top_k is None else torch.equal(idx_auto, idx)


@pytest.mark.parametrize("where", ["fp16 gate", "fp16 autocast"])
def test_an_fp16_gate_at_a_small_temperature_gives_finite_weights(where) -> None:
    """logits / T in fp16 overflowed past 65,504 x T (a logit of 10 at T = 1e-4): half the
    rows' weights were NaN. The division and softmax now run in float32."""
    gate = _trained_looking_gate(16, 4, temperature=1e-4)
    reps = torch.randn(256, 16)
    with torch.no_grad():
        w32, _ = gate(reps)
        if where == "fp16 gate":
            gate16 = PersonalizedGate(16, 4, temperature=1e-4, dropout=0.0,
                                      dtype=torch.float16).eval()
            gate16.load_state_dict({k: v.half() for k, v in gate.state_dict().items()})
            w16, _ = gate16(reps.half())
            assert w16.dtype == torch.float16
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                w16, _ = gate(reps)
    assert bool(w16.isfinite().all())
    # T = 1e-4 makes the gate nearly one-hot: the fp16 gate's rounded logits may only flip
    # rows whose two largest logits are within fp16 rounding of each other.
    agree = (w16.float() - w32).abs().amax(dim=1) < 1e-2
    assert agree.float().mean() > 0.95


def test_export_inside_autocast_writes_the_same_files(tmp_path) -> None:
    """A serving loop's autocast made export_peft merge and store bf16 factors (3e-3 off)."""
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 64)

    model = Model()
    reclora.inject(model, ("q_proj",), num_adapters=16, rank=8, alpha=16, gate_dim=32,
                   mix="factor")
    with torch.no_grad():
        model.q_proj.lora_b.normal_(0, 0.1)
    reps = torch.randn(4, 32)
    export_peft(model, tmp_path / "plain", user_reps=reps, row=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        export_peft(model, tmp_path / "autocast", user_reps=reps, row=1)
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    under = load_file(tmp_path / "autocast" / "adapter_model.safetensors")
    assert plain.keys() == under.keys()
    for key, value in plain.items():
        assert value.dtype == torch.float32 and torch.equal(under[key], value), key


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fp16_scales_the_lora_part_before_rounding_it(backend, mix) -> None:
    """scale = 1/64 (alpha < rank), A x = 100 and B (A x) = 128,000: the scaled part is
    2,000, which fp16 holds; the reference rounded B (A x) to fp16 first (inf)."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not built here")
    d, r = 8, 1
    x = torch.zeros(1, d, dtype=torch.float16)
    x[0, 0] = 1.0
    weight = torch.zeros(d, d, dtype=torch.float16)
    lora_a = torch.zeros(1, r, d, dtype=torch.float16)
    lora_a[0, 0, 0] = 100.0
    lora_b = torch.zeros(1, d, r, dtype=torch.float16)
    lora_b[0, 0, 0] = 1280.0
    w = torch.ones(1, 1, dtype=torch.float16)
    y = lora_mix_linear(x, weight, None, lora_a, lora_b, w, None, scale=1 / 64,
                        row_ids=torch.zeros(1, dtype=torch.long), mix=mix, backend=backend)
    assert y[0, 0].item() == 2000.0
    assert bool(y.isfinite().all())


def test_the_fsdp_gradient_average_keeps_float64(tmp_path) -> None:
    """The flat all-reduce buffer was float32: a float64 gradient averaged over one rank
    came back changed ([1 + 1e-12, 1e-300, 3] -> [1, 0, 3])."""
    from reclora.few2many import _average_grads

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        exact = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        half = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        grad = torch.tensor([1.0 + 1e-12, 1e-300, 3.0], dtype=torch.float64)
        exact.grad, half.grad = grad.clone(), torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
        _average_grads([exact, half], 1)
        assert exact.grad.dtype == torch.float64 and torch.equal(exact.grad, grad)
        assert half.grad.dtype == torch.bfloat16 and half.grad.tolist() == [1.5, -2.0]
    finally:
        dist.destroy_process_group()
