"""Every backend of lora_mix_linear against the float64 reference, forward and all gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_cases import TOLERANCE, Case, make_inputs, record, rel_err, run

import reclora_kernels as rk

FAST_BACKENDS = [b for b in rk.available_backends() if b != "reference"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_devices():
    """(backend, device) pairs this process can run."""
    pairs = []
    for backend in FAST_BACKENDS:
        for device in DEVICES:
            if backend == "cpu" and device != "cpu":
                continue
            if backend == "cuda" and device != "cuda":
                continue
            if backend == "triton" and device == "cpu" and torch.cuda.is_available():
                continue  # the interpreter only runs when no GPU is present
            pairs.append((backend, device))
    return pairs


PAIRS = backend_devices()
if not PAIRS:
    PAIRS = [pytest.param("none", "cpu", marks=pytest.mark.skip("no fast backend built"))]


def check_against_reference(case: Case, backend: str, device: str, dtype: torch.dtype,
                            seed=None) -> dict:
    """Run the backend in `dtype` and the reference in float64 on the same values."""
    inputs = make_inputs(case, dtype=dtype, device=device, seed=seed)
    ref_inputs = {k: (v.detach().double().cpu() if v is not None and v.is_floating_point()
                      else (v.cpu() if v is not None else None)) for k, v in inputs.items()}
    y_ref, _ = run(ref_inputs, case, "reference")
    grad_out = torch.randn_like(y_ref)
    y_ref, g_ref = run(ref_inputs, case, "reference", grad_out)
    y, grads = run(inputs, case, backend, grad_out.to(device))
    assert y.dtype == dtype and y.shape == y_ref.shape and y.device.type == device
    tol = TOLERANCE[dtype]
    errors = {"y": rel_err(y.cpu(), y_ref)}
    for name, ref in g_ref.items():
        assert grads[name].shape == ref.shape, name
        errors[name] = rel_err(grads[name].cpu(), ref)
    record(backend, dtype, errors)
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"{backend}/{dtype}: relative errors over {tol:g}: {bad}"
    return errors


CASES = {
    "factor-gather": Case(),
    "factor-dense": Case(dense=True),
    "output-gather": Case(mix="output"),
    "output-dense": Case(mix="output", dense=True),
    "packed-unsorted": Case(packed=True, rows=5, tokens_per_row=7),
    "packed-output": Case(packed=True, mix="output", rows=4),
    "rank1-k1": Case(rank=1, slots=1),
    "rank64": Case(rank=64, d_in=40, d_out=33, rows=2, tokens_per_row=9),
    # Over one 64-wide rank block (every card's MAX_BLOCK_R): Triton's one-pass backward and
    # in-loop shrink hold a single block, so they must step aside (r = 65 lost a rank).
    "rank65": Case(rank=65, d_in=24, d_out=21, rows=2, tokens_per_row=6),
    "rank128-dense": Case(rank=128, dense=True, adapters=3, d_in=20, d_out=18, rows=2,
                          tokens_per_row=5),
    "duplicates": Case(duplicate=True),
    "duplicates-output": Case(duplicate=True, mix="output"),
    "noncontiguous": Case(noncontiguous=True),
    "no-bias": Case(bias=False, mix="output"),
    "plain-lora": Case(adapters=1, dense=True),
    "long-rows": Case(rows=2, tokens_per_row=70, d_in=17, d_out=19),
    "one-token-rows": Case(rows=40, tokens_per_row=1, packed=True),
    "even-k": Case(d_in=128, d_out=50, rows=2, tokens_per_row=33),  # EVEN_K, not EVEN_N
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, device, dtype, name):
    check_against_reference(CASES[name], backend, device, dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_float64_matches_reference(backend, device):
    if device == "cuda":
        pytest.skip("float64 is not a GPU target (CPU backends and the reference cover it)")
    for case in (Case(), Case(mix="output", dense=True), Case(packed=True)):
        check_against_reference(case, backend, device, torch.float64)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_empty_batch(backend, device, mix):
    case = Case(packed=True, tokens_per_row=0, mix=mix)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    y, grads = run(inputs, case, backend, torch.zeros(0, case.d_out))
    assert y.shape == (0, case.d_out)
    assert float(grads["lora_a"].abs().sum()) == 0.0
    assert float(grads["weight"].abs().sum()) == 0.0


@pytest.mark.parametrize("backend,device", PAIRS + [("reference", "cpu")])
def test_k1_is_per_row_multi_lora(backend, device):
    """k = 1, w = 1: y = x W^T + b + scale * B[i] A[i] x, written out per token."""
    case = Case(slots=1, packed=True, rows=4, tokens_per_row=6)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    inputs["adapter_w"] = torch.ones_like(inputs["adapter_w"])
    y, _ = run(inputs, case, backend)
    x, rows = inputs["x"].cpu().double(), inputs["row_ids"].cpu()
    a, b = inputs["lora_a"].cpu().double(), inputs["lora_b"].cpu().double()
    adapter = inputs["adapter_idx"].cpu()[rows, 0]
    base = x @ inputs["weight"].cpu().double().T + inputs["bias"].cpu().double()
    lora = torch.stack([b[i] @ (a[i] @ xn) for xn, i in zip(x, adapter)])
    expected = base + case.scale * lora
    assert rel_err(y.cpu(), expected) < 2e-5


@pytest.mark.parametrize("backend,device", PAIRS + [("reference", "cpu")])
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_m1_is_plain_lora(backend, device, mix):
    """M = 1, w = 1: exactly one LoRA for everyone, y = x W^T + b + scale * B A x."""
    case = Case(adapters=1, dense=True, mix=mix)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    inputs["adapter_w"] = torch.ones_like(inputs["adapter_w"])
    y, _ = run(inputs, case, backend)
    x = inputs["x"].cpu().double()
    a, b = inputs["lora_a"].cpu().double()[0], inputs["lora_b"].cpu().double()[0]
    expected = (x @ inputs["weight"].cpu().double().T + inputs["bias"].cpu().double()
                + case.scale * (x @ a.T) @ b.T)
    assert rel_err(y.cpu(), expected) < 2e-5


def test_factor_and_output_differ():
    """The two mixes are different functions once k > 1 (guards against a silent alias)."""
    case = Case()
    inputs = make_inputs(case)
    y_factor, _ = run(inputs, case, "reference")
    y_output, _ = run(inputs, dataclasses.replace(case, mix="output"), "reference")
    assert rel_err(y_factor, y_output) > 1e-3


@pytest.mark.parametrize("backend,device", PAIRS + [("reference", "cpu")])
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck_float64(backend, device, mix, dense):
    if device == "cuda":
        pytest.skip("float64 is not a GPU target (CPU backends and the reference cover it)")
    case = Case(packed=True, rows=3, tokens_per_row=3, d_in=5, d_out=4, adapters=3, rank=2,
                slots=2, mix=mix, dense=dense)
    inputs = make_inputs(case, dtype=torch.float64, device=device)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "adapter_w"]

    def fn(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return rk.lora_mix_linear(
            args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
            args["adapter_w"], args["adapter_idx"], scale=case.scale, mix=mix,
            row_ids=args["row_ids"], backend=backend)

    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in names]
    # The full Jacobian is ~260 op calls: 20-40 s per case under the Triton interpreter,
    # 1-10 s on the native cpu kernel (OpenMP threads on a busy 2-core machine). Fast mode
    # checks random projections of it (a few calls). The reference gets the full check, and
    # every backend's gradients are compared entry by entry with it (test_matches_reference).
    fast = backend != "reference"
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_only_requested_grads(backend, device):
    """A frozen base gets no weight/bias gradient; x may be frozen too."""
    case = Case()
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    a = inputs["lora_a"].clone().requires_grad_(True)
    y = rk.lora_mix_linear(inputs["x"], inputs["weight"], inputs["bias"], a, inputs["lora_b"],
                           inputs["adapter_w"], inputs["adapter_idx"], backend=backend)
    (grad_a,) = torch.autograd.grad(y.square().sum(), [a])
    assert grad_a.shape == a.shape and torch.isfinite(grad_a).all()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=st.integers(1, 4), tokens=st.integers(1, 9), d_in=st.integers(1, 40),
    d_out=st.integers(1, 40), adapters=st.integers(1, 5), rank=st.integers(1, 9),
    slots=st.integers(1, 4), mix=st.sampled_from(["factor", "output"]),
    dense=st.booleans(), packed=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(rows, tokens, d_in, d_out, adapters, rank, slots, mix, dense, packed, seed):
    case = Case(rows=rows, tokens_per_row=tokens, d_in=d_in, d_out=d_out, adapters=adapters,
                rank=rank, slots=slots, mix=mix, dense=dense, packed=packed)
    for backend, device in PAIRS:
        if backend == "none":
            pytest.skip("no fast backend built")
        check_against_reference(case, backend, device, torch.float32, seed=seed)


@pytest.mark.parametrize("backend,device", PAIRS + [("reference", "cpu")])
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("only", ["adapter_w", "lora_a", "lora_b", "x"])
def test_one_requested_grad_matches_all(backend, device, mix, dense, only):
    """A single input requiring grad (a gate trained over a frozen bank: adapter_w only) gets
    the same gradient as when every input requires one (the Triton backward computes only
    the asked-for ones)."""
    case = Case(mix=mix, dense=dense)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    grad_out = torch.randn(case.rows, case.tokens_per_row, case.d_out, device=device)
    _, all_grads = run(inputs, case, backend, grad_out)
    leaf = inputs[only].clone().requires_grad_(True)
    args = dict(inputs, **{only: leaf})
    y = rk.lora_mix_linear(args["x"], args["weight"], args["bias"], args["lora_a"],
                           args["lora_b"], args["adapter_w"], args["adapter_idx"],
                           scale=case.scale, mix=mix, backend=backend)
    (got,) = torch.autograd.grad(y, [leaf], grad_out)
    assert rel_err(got.cpu(), all_grads[only].cpu()) < 1e-6
