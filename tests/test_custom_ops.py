"""The custom ops: opcheck (schema, fake kernel, autograd registration) and torch.compile."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, make_inputs, rel_err

import reclora_kernels as rk
from reclora_kernels import ops

FAST = [b for b in rk.available_backends() if b in ("triton", "cpu")]
if torch.cuda.is_available():
    FAST = [b for b in rk.available_backends() if b in ("triton", "cuda")]


def op_args(case: Case, device: str, dtype=torch.float32, requires_grad=True,
            triton_schema=False):
    from reclora_kernels import validate

    inp = make_inputs(case, dtype=dtype, device=device)
    p = validate.prepare(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                         inp["adapter_w"], inp["adapter_idx"], case.scale, case.mix,
                         inp["row_ids"])
    pl = p.plan
    if triton_schema:  # the Triton op takes the row plan's tensors and row_len
        rows = [pl.row_ids, pl.order, pl.sorted_rows, pl.row_start, pl.row_len]
    else:
        rows = [pl.token_rows(p.x2d.device)]
    tensors = [p.x2d.contiguous(), *rows, inp["weight"], inp["bias"], inp["lora_a"],
               inp["lora_b"], inp["adapter_w"], p.adapter_idx]
    if requires_grad:
        first = len(rows) + 1
        for i in (0, *range(first, first + 5)):
            if tensors[i] is not None:
                tensors[i] = tensors[i].detach().requires_grad_(True)
    return (*tensors, case.scale, p.mix)


def forward_op(backend: str):
    if backend == "triton":
        return ops.triton_lora_mix_forward
    return torch.ops.reclora.lora_mix_forward.default


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck(backend, mix, dense):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(packed=True, rows=3, tokens_per_row=4, mix=mix, dense=dense)
    torch.library.opcheck(forward_op(backend),
                          op_args(case, device, triton_schema=backend == "triton"))


class TinyAdapted(torch.nn.Module):
    """A module that calls the op, as a model layer would."""

    def __init__(self, inputs: dict, backend: str, mix: str):
        super().__init__()
        self.weight = torch.nn.Parameter(inputs["weight"].clone())
        self.bias = torch.nn.Parameter(inputs["bias"].clone())
        self.lora_a = torch.nn.Parameter(inputs["lora_a"].clone())
        self.lora_b = torch.nn.Parameter(inputs["lora_b"].clone())
        self.backend, self.mix = backend, mix

    def forward(self, x, adapter_w, adapter_idx):
        h = rk.lora_mix_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, adapter_w,
                               adapter_idx, scale=2.0, mix=self.mix, backend=self.backend)
        return torch.nn.functional.gelu(h)


@pytest.mark.parametrize("backend", FAST)
def test_compile_fullgraph_matches_eager(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(d_in=23, d_out=23)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    eager = TinyAdapted(inputs, backend, "factor")
    compiled_module = TinyAdapted(inputs, backend, "factor")
    compiled = torch.compile(compiled_module, fullgraph=True)  # inductor
    w = inputs["adapter_w"].clone().requires_grad_(True)
    w2 = inputs["adapter_w"].clone().requires_grad_(True)
    y_eager = eager(inputs["x"], w, inputs["adapter_idx"])
    y_comp = compiled(inputs["x"], w2, inputs["adapter_idx"])
    assert rel_err(y_comp, y_eager) < 1e-6
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for name in ("weight", "bias", "lora_a", "lora_b"):
        got = getattr(compiled_module, name).grad
        assert rel_err(got, getattr(eager, name).grad) < 1e-5, name
    assert rel_err(w2.grad, w.grad) < 1e-5


@pytest.mark.parametrize("backend", FAST)
def test_compile_fullgraph_under_no_grad(backend):
    """Inference skips the op's autograd layer with a guard dynamo cannot trace: every
    fullgraph compile of a no_grad call failed ("Unsupported method call")."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(Case(d_in=23, d_out=23), dtype=torch.float32, device=device)
    module = TinyAdapted(inputs, backend, "factor")
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    with torch.no_grad():
        args = (inputs["x"], inputs["adapter_w"], inputs["adapter_idx"])
        assert torch.equal(compiled(*args), module(*args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_cuda_graph_replay(backend, mix):
    """Capture forward+backward once, replay on new inputs copied into the same buffers."""
    case = Case(packed=True, rows=4, tokens_per_row=8, mix=mix)
    inputs = make_inputs(case, dtype=torch.float16, device="cuda")
    x = inputs["x"].clone().requires_grad_(True)
    w = inputs["adapter_w"].clone().requires_grad_(True)

    def step():
        y = rk.lora_mix_linear(x, inputs["weight"], inputs["bias"], inputs["lora_a"],
                               inputs["lora_b"], w, inputs["adapter_idx"], mix=mix,
                               row_ids=inputs["row_ids"], backend=backend)
        return (y, *torch.autograd.grad(y.float().square().sum(), [x, w]))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles kernels, fills the allocator
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        w.copy_(torch.randn_like(w))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for got, want in zip(outs, expected):
        assert rel_err(got, want) < 1e-3


def _step(backend: str, mix: str):
    def step(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx):
        return rk.lora_mix_linear(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                                  scale=0.7, mix=mix, backend=backend)
    return step


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_compile_backward_of_transposed_inputs(backend, mix):
    """Compiled forward+backward with x, weight and the banks in transposed layouts: the
    fake backward must give the strides the real one returns (inductor checks them; the
    fake once kept x's column-major strides for dx, which the kernels write contiguous)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(packed=True, rows=5, tokens_per_row=1, d_in=13, d_out=11, mix=mix)
    inputs = make_inputs(case, dtype=torch.float32, device=device)

    def transposed(t):  # the same values, column-major in its last two dimensions
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    names = ["x", "weight", "bias", "lora_a", "lora_b", "adapter_w"]
    leaves = {n: inputs[n].detach().clone() for n in names}
    for name in ("x", "weight", "lora_a", "lora_b"):
        leaves[name] = transposed(leaves[name])
        assert not leaves[name].is_contiguous()
    grads_of = {}
    for label, fn in (("compiled", torch.compile(_step(backend, mix), fullgraph=True)),
                      ("reference", _step("reference", mix))):
        args = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
        y = fn(*(args[n] for n in names), inputs["adapter_idx"])
        grads_of[label] = (y, *torch.autograd.grad(y.square().sum(), list(args.values())))
    for name, got, want in zip(["y", *names], grads_of["compiled"], grads_of["reference"]):
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("backend", [*FAST, "reference"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("check_finite", [False, True])
def test_training_after_inference_mode(backend, packed, check_finite):
    """A call under torch.inference_mode (serving) caches the rows' ids; a later training
    call of the same sizes must still save them for its backward. (The Triton path's cached
    tables and constants are only read by its kernels, never saved.)"""
    from reclora_kernels import plan

    plan._implicit_rows.cache_clear()  # else an earlier test's entry, made outside, is reused
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case(rows=4, tokens_per_row=1 if packed else 3, dense=True)
    inputs = make_inputs(case, dtype=torch.float32, device=device)
    x = inputs["x"].reshape(-1, case.d_in) if packed else inputs["x"]
    args = [inputs[n] for n in ("weight", "bias", "lora_a", "lora_b", "adapter_w")]

    def call(x, *tensors, backend=backend):
        return rk.lora_mix_linear(x, *tensors, scale=0.7, backend=backend,
                                  check_finite=check_finite)

    with torch.inference_mode():
        call(x, *args)
    grads = {}
    for name in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, *args)]
        y = call(*leaves, backend=name)
        grads[name] = torch.autograd.grad(y.square().sum(), leaves)
    for got, want in zip(grads[backend], grads["reference"]):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("how", ["forward_ad", "jvp"])
def test_forward_mode_ad_is_refused_not_dropped(backend, how):
    """The kernels have no forward-mode derivative: a dual input is refused with a clear
    error (the tangent lost its LoRA part, or came back zero); the reference computes it."""
    import torch.autograd.forward_ad as fwad

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(Case(), dtype=torch.float64 if device == "cpu" else torch.float32,
                         device=device)
    x, tangent = inputs["x"], torch.randn_like(inputs["x"])

    def f(x, backend):
        return rk.lora_mix_linear(x, inputs["weight"], inputs["bias"], inputs["lora_a"],
                                  inputs["lora_b"], inputs["adapter_w"], inputs["adapter_idx"],
                                  backend=backend)

    def tangent_of(backend):
        if how == "jvp":
            return torch.func.jvp(lambda x: f(x, backend), (x,), (tangent,))[1]
        with fwad.dual_level():
            return fwad.unpack_dual(f(fwad.make_dual(x, tangent), backend)).tangent

    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        tangent_of(backend)
    # y is affine in x: its directional derivative is f(x + t) - f(x), exactly.
    want = f(x + tangent, "reference") - f(x, "reference")
    assert rel_err(tangent_of("reference"), want) < 1e-3
