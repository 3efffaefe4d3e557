"""The Triton backend's eager path (reclora_kernels/triton/eager.py) against its custom op.

An eager call of plain tensors skips torch's custom-op machinery and runs the launch plan
itself (with a gradient to record, through an autograd.Function); anything traced, under a
mode, or of a tensor subclass goes through the custom op. Both must give the same outputs
and gradients, and each must be taken where it should be.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, count_calls, make_inputs
from torch.overrides import TorchFunctionMode

import reclora_kernels as rk
from reclora_kernels import ops

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends(),
                                reason="needs triton (a GPU, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64
# The two paths launch the same kernels, but on a GPU the bank gradients of output mode and
# packed dW are sums by atomics / index_add_ in an order that changes from run to run: float32
# gradients then differ by ~1e-6 relative (9.5e-7 measured under shuffled program orders).
# The interpreter runs programs in one order, so float64 there stays exact to 1e-12.
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6} if DEVICE == "cuda" else {"rtol": 1e-12, "atol": 1e-12}
GRAD_SETS = {
    "all": ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w"),
    "x only": ("x",),
    "banks only": ("lora_a", "lora_b"),
    "mixture only": ("adapter_w",),
    "base only": ("weight", "bias"),
}


class _PassThrough(TorchFunctionMode):
    """A mode that changes nothing but is a mode: the call must take the custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _count_custom_op_calls(monkeypatch) -> list[int]:
    return count_calls(monkeypatch, ops, "triton_lora_mix_forward")


def _inputs(case: Case, needs: tuple[str, ...]):
    inp = make_inputs(case, dtype=DTYPE, device=DEVICE)
    for name in needs:
        if inp[name] is not None:
            inp[name] = inp[name].detach().requires_grad_(True)
    return inp


def _run(inp, case: Case, needs: tuple[str, ...], grad_y=None):
    """y, then the gradients of the tensors in `needs` under grad_y."""
    y = rk.lora_mix_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"],
                           inp["adapter_w"], inp["adapter_idx"], scale=case.scale,
                           mix=case.mix, row_ids=inp["row_ids"], backend="triton")
    if not needs:
        return y, ()
    wrt = [inp[n] for n in needs if inp[n] is not None]
    return y, torch.autograd.grad(y, wrt, grad_y)


@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
@pytest.mark.parametrize("packed", [False, True], ids=["implicit", "packed"])
@pytest.mark.parametrize("needs", list(GRAD_SETS), ids=list(GRAD_SETS))
def test_eager_path_equals_custom_op(monkeypatch, mix, dense, packed, needs):
    case = Case(mix=mix, dense=dense, packed=packed, tokens_per_row=3, d_in=19, d_out=17)
    wanted = GRAD_SETS[needs]
    inp = _inputs(case, wanted)
    calls = _count_custom_op_calls(monkeypatch)
    lead = inp["x"].shape[:-1]
    grad_y = torch.randn(*lead, case.d_out, dtype=DTYPE, device=DEVICE)
    y, grads = _run(inp, case, wanted, grad_y)
    assert calls == [], "an eager call of plain tensors must skip the custom op"
    with _PassThrough():
        y_op, grads_op = _run(inp, case, wanted, grad_y)
    assert len(calls) == 1, "under a torch function mode the call must take the custom op"
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    assert len(grads) == len(grads_op)
    for got, want in zip(grads, grads_op):
        torch.testing.assert_close(got, want, **GRAD_TOL)


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_eager_no_grad_equals_custom_op(monkeypatch, mix):
    case = Case(mix=mix, dense=False, tokens_per_row=4)
    inp = _inputs(case, ())
    calls = _count_custom_op_calls(monkeypatch)
    with torch.no_grad():
        y, _ = _run(inp, case, ())
        assert calls == []
        with _PassThrough():
            y_op, _ = _run(inp, case, ())
    assert len(calls) == 1
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)


def test_eager_gradcheck():
    """The eager autograd Function on its own, in float64 where the dtype allows."""
    if DTYPE != torch.float64:
        pytest.skip("float64 runs on the interpreter only")
    case = Case(mix="factor", dense=False, rows=2, tokens_per_row=2, d_in=5, d_out=4,
                adapters=3, rank=2, slots=2)
    inp = _inputs(case, GRAD_SETS["all"])
    names = GRAD_SETS["all"]

    def fn(*tensors):
        args = dict(inp, **dict(zip(names, tensors)))
        return rk.lora_mix_linear(args["x"], args["weight"], args["bias"], args["lora_a"],
                                  args["lora_b"], args["adapter_w"], args["adapter_idx"],
                                  scale=case.scale, backend="triton")

    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


def test_profiler_still_names_the_op():
    case = Case()
    inp = _inputs(case, ())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run(inp, case, ())
    assert any(e.name == "reclora::triton_lora_mix_forward" for e in prof.events())


def test_tensor_subclass_takes_the_custom_op(monkeypatch):
    """A subclass may override __torch_function__: the eager path leaves it to the op."""

    class Tagged(torch.Tensor):
        pass

    case = Case(dense=True)
    inp = _inputs(case, ())
    inp["x"] = inp["x"].as_subclass(Tagged)
    calls = _count_custom_op_calls(monkeypatch)
    with torch.no_grad():
        y, _ = _run(inp, case, ())
    assert len(calls) == 1
    plain = dict(inp, x=inp["x"].as_subclass(torch.Tensor))
    with torch.no_grad():
        want, _ = _run(plain, case, ())
    torch.testing.assert_close(y.as_subclass(torch.Tensor), want, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_launches_run_with_the_tensors_device_current(monkeypatch, path):
    """Triton launches on the current CUDA device and its stream: a call on tensors of another
    device (a model split over GPUs) makes theirs current for its forward and its backward.
    Checked on any machine with a stand-in for torch.cuda.device that records the device and
    makes it "current"."""
    from reclora_kernels.triton import launch

    entered = []

    class Current:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)
            monkeypatch.setattr(launch, "off_current_device", lambda t: False)

        def __exit__(self, *exc):
            monkeypatch.setattr(launch, "off_current_device", lambda t: True)

    monkeypatch.setattr(launch, "off_current_device", lambda t: True)
    monkeypatch.setattr(torch.cuda, "device", Current)
    case = Case(mix="factor", dense=False, tokens_per_row=3)
    inp = _inputs(case, GRAD_SETS["all"])
    grad_y = torch.randn(*inp["x"].shape[:-1], case.d_out, dtype=DTYPE, device=DEVICE)
    if path == "eager":
        y, grads = _run(inp, case, GRAD_SETS["all"], grad_y)
    else:
        with _PassThrough():
            y, grads = _run(inp, case, GRAD_SETS["all"], grad_y)
    assert entered == [inp["x"].device] * 2, "the forward and the backward, each once"
    monkeypatch.undo()
    want, want_grads = _run(inp, case, GRAD_SETS["all"], grad_y)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.cuda
def test_a_call_on_a_second_gpu():
    """On a machine with two GPUs: the op on cuda:1 while cuda:0 is current gives what it
    gives with cuda:1 current (its kernels on cuda:1's stream)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    case = Case(mix="output", dense=False, tokens_per_row=3)
    inp = make_inputs(case, dtype=torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        y, _ = _run(inp, case, ())
    with torch.cuda.device(1):
        want, _ = _run(inp, case, ())
    torch.testing.assert_close(y, want, rtol=0, atol=0)
