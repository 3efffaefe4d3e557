"""The native backends (csrc/): registration, and the kernels called directly against the
float64 reference, forward and backward, on every device this process has.

The shared backend suite (test_op.py) runs the same backends through lora_mix_linear; this
file checks what is particular to the C++/CUDA ops: that they are built and registered, their
schemas, the saved `shrink`, empty gradients, and shapes that exercise their index plans
(unsorted rows, long rows split into runs, duplicate adapters, T = 0).
"""

from __future__ import annotations

import os

import pytest
import torch

import reclora_kernels as rk
from reclora_kernels import ops
from reclora_kernels.reference import lora_mix_reference

CUDA_BUILD = torch.version.cuda is not None and os.environ.get("RECLORA_NO_CUDA") != "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.NATIVE_CUDA else [])
# Relative error (max |diff| / max |ref|) against the float64 reference. fp16/bf16 bounds
# leave room for the CUDA kernels rounding scale * w * shrink to the input dtype before the
# tensor-core expand (measured on the CPU: fp32 1.5e-7, fp16 4e-4, bf16 3.4e-3).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

FORWARD_SCHEMA = (
    "reclora::lora_mix_forward(Tensor x, Tensor row_ids, Tensor weight, Tensor? bias, "
    "Tensor lora_a, Tensor lora_b, Tensor adapter_w, Tensor? adapter_idx, float scale, "
    "int mix) -> (Tensor, Tensor)"
)


def test_extension_built_and_cpu_backend_available():
    assert ops.NATIVE_LOADED, (
        "reclora_kernels._C is not built (pip install --no-build-isolation -e .)")
    assert ops.NATIVE_CPU
    assert "cpu" in rk.available_backends()


@pytest.mark.skipif(not CUDA_BUILD, reason="CPU-only torch (or RECLORA_NO_CUDA=1)")
def test_cuda_kernels_registered():
    """With a CUDA build of torch, setup.py compiles csrc/cuda: the op has a CUDA kernel."""
    assert ops.NATIVE_LOADED
    for op in (ops.NATIVE_FORWARD, ops.NATIVE_BACKWARD):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert ops.NATIVE_CUDA


def test_schemas():
    assert str(torch.ops.reclora.lora_mix_forward.default._schema) == FORWARD_SCHEMA
    schema = str(torch.ops.reclora.lora_mix_backward.default._schema)
    assert schema.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def make(tokens, d_in, d_out, adapters, rank, rows, slots, *, dense=False, dtype=torch.float32,
         device="cpu", bias=True, order="shuffled", duplicate=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = rnd(tokens, d_in)
    weight = rnd(d_out, d_in, scale=d_in**-0.5)
    b = rnd(d_out) if bias else None
    lora_a = rnd(adapters, rank, d_in, scale=d_in**-0.5)
    lora_b = rnd(adapters, d_out, rank, scale=rank**-0.5)
    adapter_w = rnd(rows, adapters if dense else slots)
    idx = None
    if not dense:
        idx = torch.randint(0, adapters, (rows, slots), generator=gen)
        if duplicate:
            idx[:, -1] = idx[:, 0]
    if order == "shuffled":
        row_ids = torch.randint(0, rows, (tokens,), generator=gen)
    else:  # packed rows, consecutive tokens (in row order, or rows in reverse order)
        row_ids = torch.arange(tokens) * rows // max(tokens, 1)
        if order == "reversed":
            row_ids = rows - 1 - row_ids
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (x, row_ids, weight, b, lora_a, lora_b, adapter_w, idx)]


def rel_err(got, ref):
    if ref.numel() == 0:
        return 0.0
    return ((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(args, mix, dtype, scale=0.75):
    """Forward and backward ops against the reference's autograd in float64."""
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args
    y, shrink = torch.ops.reclora.lora_mix_forward(*args, scale, mix)
    assert y.dtype == dtype and y.device == x.device and y.shape == (x.shape[0], weight.shape[0])
    slots = adapter_w.shape[1] if mix == 1 else 1
    assert shrink.shape == (x.shape[0], slots, lora_a.shape[1])
    assert shrink.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    ref = [None if t is None else (t.detach().cpu().double() if t.is_floating_point()
                                   else t.cpu()) for t in args]
    leaves = [0, 2, 3, 4, 5, 6]
    for i in leaves:
        if ref[i] is not None:
            ref[i].requires_grad_()
    y_ref = lora_mix_reference(*ref, scale, mix)
    assert rel_err(y, y_ref) <= TOL[dtype], ("y", rel_err(y, y_ref))

    gen = torch.Generator().manual_seed(7)
    g_ref = torch.randn(y_ref.shape, dtype=torch.float64, generator=gen)
    y_ref.backward(g_ref)
    grads = torch.ops.reclora.lora_mix_backward(
        g_ref.to(dtype).to(x.device), x, row_ids, weight, lora_a, lora_b, adapter_w, idx, shrink,
        scale, mix, True, True, bias is not None, True)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "adapter_w"]
    for name, got, i in zip(names, grads, leaves):
        if ref[i] is None:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype and got.shape == ref[i].shape, name
        err = rel_err(got, ref[i].grad)
        assert err <= TOL[dtype], (name, err)


CASES = {
    "odd-sizes": dict(tokens=37, d_in=19, d_out=23, adapters=5, rank=3, rows=4, slots=2),
    "dense": dict(tokens=40, d_in=16, d_out=8, adapters=3, rank=2, rows=5, slots=3, dense=True),
    "rank1-k1": dict(tokens=21, d_in=12, d_out=9, adapters=4, rank=1, rows=3, slots=1),
    "duplicates": dict(tokens=30, d_in=24, d_out=20, adapters=3, rank=4, rows=4, slots=3,
                       duplicate=True),
    "one-long-row": dict(tokens=600, d_in=33, d_out=17, adapters=2, rank=4, rows=1, slots=2,
                         order="packed"),
    "packed-rows": dict(tokens=130, d_in=70, d_out=66, adapters=6, rank=8, rows=3, slots=2,
                        order="packed"),
    "packed-reversed": dict(tokens=200, d_in=24, d_out=31, adapters=4, rank=4, rows=5, slots=2,
                            order="reversed"),
    "no-bias": dict(tokens=25, d_in=18, d_out=35, adapters=3, rank=5, rows=6, slots=2,
                    bias=False),
    "big-rank": dict(tokens=20, d_in=40, d_out=33, adapters=2, rank=64, rows=2, slots=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mix", [0, 1], ids=["factor", "output"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_reference(case, mix, dtype, device):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take fp32/fp16/bf16")
    check(make(**CASES[case], dtype=dtype, device=device), mix, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [0, 1])
def test_empty_batch(device, mix):
    args = make(0, 8, 6, 3, 2, 2, 2, device=device)
    y, shrink = torch.ops.reclora.lora_mix_forward(*args, 1.0, mix)
    assert y.shape == (0, 6) and shrink.shape[0] == 0
    grads = torch.ops.reclora.lora_mix_backward(
        y, args[0], args[1], args[2], args[4], args[5], args[6], args[7], shrink, 1.0, mix,
        True, True, True, True)
    assert [tuple(g.shape) for g in grads] == [(0, 8), (6, 8), (6,), (3, 2, 8), (3, 6, 2), (2, 2)]
    assert all(bool((g == 0).all()) for g in grads[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_in,d_out", [(0, 6), (8, 0)], ids=["d_in=0", "d_out=0"])
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_zero_width_layer_trains(device, d_in, d_out, mix):
    """d_in = 0 or d_out = 0 is a valid layer (y = bias, or nothing): its backward gave the
    CUDA kernels a zero grid dimension, which CUDA refuses. Against the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"x": (2, 5, d_in), "weight": (d_out, d_in), "bias": (d_out,),
              "lora_a": (3, 2, d_in), "lora_b": (3, d_out, 2), "adapter_w": (2, 3)}
    leaves = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in shapes.items()}
    grad_y = torch.randn(2, 5, d_out, generator=gen, dtype=torch.float64)
    results = []
    for backend, dtype, dev in (("reference", torch.float64, "cpu"),
                                (device, torch.float32, device)):
        args = {k: v.to(dev, dtype).requires_grad_() for k, v in leaves.items()}
        y = rk.lora_mix_linear(**args, mix=mix, backend=backend)
        results.append([y, *torch.autograd.grad(y, list(args.values()),
                                                grad_y.to(dev, dtype))])
    for want, got in zip(*results):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_not_asked_for_are_empty_and_distinct(device):
    args = make(10, 8, 6, 3, 2, 2, 2, device=device)
    y, shrink = torch.ops.reclora.lora_mix_forward(*args, 1.0, 0)
    grads = torch.ops.reclora.lora_mix_backward(
        torch.ones_like(y), args[0], args[1], args[2], args[4], args[5], args[6], args[7],
        shrink, 1.0, 0, False, False, False, False)
    assert all(g.numel() == 0 for g in grads)
    assert len({g.data_ptr() for g in grads if g.data_ptr() != 0}) == len(
        [g for g in grads if g.data_ptr() != 0])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = make(
        33, 20, 14, 4, 3, 5, 2, dtype=torch.float32, device=device)
    x_t = x.t().contiguous().t()  # column-major view of the same values
    w_t = weight.t().contiguous().t()
    idx_t = idx.t().contiguous().t()
    for mix in (0, 1):
        y1 = torch.ops.reclora.lora_mix_forward(x, row_ids, weight, bias, lora_a, lora_b,
                                                adapter_w, idx, 0.5, mix)[0]
        y2 = torch.ops.reclora.lora_mix_forward(x_t, row_ids, w_t, bias, lora_a, lora_b,
                                                adapter_w, idx_t, 0.5, mix)[0]
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_takes_grad_y_in_another_dtype(device):
    """A direct backward call with an fp32 grad_y for bf16 inputs: cast to x's dtype, never
    read as bf16 bits (the CUDA kernel once read it so)."""
    args = make(17, 12, 10, 4, 3, 3, 2, dtype=torch.bfloat16, device=device)
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args

    def grads(grad_y, shrink, mix):
        return torch.ops.reclora.lora_mix_backward(
            grad_y, x, row_ids, weight, lora_a, lora_b, adapter_w, idx, shrink, 0.5, mix,
            True, True, True, True)

    for mix in (0, 1):
        y, shrink = torch.ops.reclora.lora_mix_forward(*args, 0.5, mix)
        g = torch.randn(y.shape, device=device)
        pairs = zip(grads(g, shrink, mix), grads(g.to(torch.bfloat16), shrink, mix))
        for i, (got, want) in enumerate(pairs):
            # dA, dB, dw: the CUDA kernels sum them with atomicAdd in a varying order, so
            # they agree to rounding there (the bug read fp32 bits as bf16: garbage).
            summed = device == "cuda" and i >= 3
            torch.testing.assert_close(
                got.float(), want.float(), rtol=2e-2 if summed else 0,
                atol=2e-2 * float(want.abs().max()) if summed else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    """The backward op is not differentiable: a second derivative through it raises (it was
    treated as a constant, silently wrong, torch only warning)."""
    args = make(9, 6, 5, 4, 2, 3, 2, dtype=torch.float32, device=device)
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args
    x = x.requires_grad_()
    lora_a = lora_a.requires_grad_()
    y = rk.lora_mix_linear(x, weight, bias, lora_a, lora_b, adapter_w, idx, row_ids=row_ids,
                           backend=device)
    gx, = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(gx.sum(), [x, lora_a])


@pytest.mark.parametrize("device", DEVICES)
def test_ops_run_in_their_inputs_dtype_under_autocast(device):
    """A direct call inside torch.autocast: the kernels' own GEMMs stay in the inputs' dtype
    (they were recast to bf16 and read as float: an error on every call)."""
    args = make(9, 6, 5, 4, 2, 3, 2, dtype=torch.float32, device=device)
    want = torch.ops.reclora.lora_mix_forward(*args, 0.5, 0)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = torch.ops.reclora.lora_mix_forward(*args, 0.5, 0)
        grads = torch.ops.reclora.lora_mix_backward(
            torch.ones_like(got[0]), args[0], args[1], args[2], args[4], args[5], args[6],
            args[7], got[1], 0.5, 0, True, True, True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g.dtype == torch.float32 for g in grads)


def test_direct_backward_rejects_bad_arguments():
    args = make(5, 8, 6, 3, 2, 2, 2)
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args
    y, shrink = torch.ops.reclora.lora_mix_forward(*args, 1.0, 0)

    def backward(grad_y, shrink):
        return torch.ops.reclora.lora_mix_backward(
            grad_y, x, row_ids, weight, lora_a, lora_b, adapter_w, idx, shrink, 1.0, 0,
            True, True, True, True)

    with pytest.raises(RuntimeError, match="grad_y must be"):
        backward(y[:, :-1], shrink)
    with pytest.raises(RuntimeError, match="grad_y must be floating"):
        backward(torch.ones_like(y, dtype=torch.int32), shrink)
    with pytest.raises(RuntimeError, match="shrink must be"):
        backward(y, shrink[:, :, :-1])
    with pytest.raises(RuntimeError, match="shrink must be floating"):
        backward(y, shrink.long())


def test_direct_call_rejects_bad_arguments():
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = make(5, 8, 6, 3, 2, 2, 2)
    with pytest.raises(RuntimeError, match="mix"):
        torch.ops.reclora.lora_mix_forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w,
                                           idx, 1.0, 2)
    with pytest.raises(RuntimeError, match="adapter_idx"):
        torch.ops.reclora.lora_mix_forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w,
                                           idx + 3, 1.0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.reclora.lora_mix_forward(x, row_ids, weight.double(), bias, lora_a, lora_b,
                                           adapter_w, idx, 1.0, 0)


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck_cpu(mix, dense):
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = make(
        13, 7, 5, 4, 2, 3, 3, dense=dense, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, weight, bias, lora_a, lora_b, adapter_w)]

    def f(x, weight, bias, lora_a, lora_b, adapter_w):
        return rk.lora_mix_linear(x, weight, bias, lora_a, lora_b, adapter_w, idx, scale=0.6,
                                  mix=mix, row_ids=row_ids, backend="cpu")

    assert torch.autograd.gradcheck(f, leaves)


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("RECLORA_BACKEND", raising=False)
    assert rk.resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("order", ["packed", "shuffled", "one-row"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("mix", [0, 1], ids=["factor", "output"])
def test_cpu_kernels_agree_across_thread_counts(mix, dense, order):
    """The CPU loops are OpenMP-parallel (built with -fopenmp): splitting rows, runs and
    adapters over threads must give the same values, forward and backward, up to the
    summation order of the whole-tensor BLAS calls (the base GEMMs for short runs, the
    weight gradient), which is a few ulps in float64; a race would be far larger. Shuffled
    tokens: a row's runs fall to several threads, which race to mix (or gather) its factors
    first (OnceFlags); one row: its runs start on every thread at once. Before each call the
    same shapes run on other values, so that a thread reading a row's scratch (the op's
    internal buffers, reused by the allocator) before it is filled sees wrong values, not
    the right ones a previous identical call left there."""
    tokens, rows = (600, 1) if order == "one-row" else (300, 7)
    shape = dict(dense=dense, dtype=torch.float64, duplicate=not dense,
                 order="packed" if order == "one-row" else order)
    # Banks big enough that mixing one row takes longer than the other threads take to start.
    sizes = (tokens, 160, 150, 24, 8, rows, 3)
    args, decoy = make(*sizes, **shape), make(*sizes, seed=1, **shape)
    x, row_ids, weight, bias, lora_a, lora_b, adapter_w, idx = args

    def run(a):
        y, shrink = torch.ops.reclora.lora_mix_forward(*a, 0.5, mix)
        grads = torch.ops.reclora.lora_mix_backward(
            torch.cos(y), a[0], a[1], a[2], *a[4:], shrink, 0.5, mix, True, True, True, True)
        return [y, shrink, *grads]

    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            run(decoy)
            outs.append(run(args))
    finally:
        torch.set_num_threads(before)
    names = ["y", "shrink", "grad_x", "grad_weight", "grad_bias", "grad_a", "grad_b", "grad_w"]
    for name, a, b in zip(names, *outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    check(args, mix, torch.float64)
