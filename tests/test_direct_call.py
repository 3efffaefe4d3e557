"""The shortcut on CPU tensors (csrc/direct_call.cpp, reclora_kernels._C.lora_mix_direct) and
the op's C++ autograd (csrc/autograd.cpp): the shortcut gives the checked path's answer
wherever it answers, forward and gradients, declines (NotImplemented) whatever the checked
path would reject or must see (subclasses, torch function and dispatch modes, vmap), and still
goes through the dispatcher (the profiler)."""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCE, Case, make_inputs, rel_err
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import reclora_kernels as rk
from reclora_kernels import ops, row_plan

pytestmark = pytest.mark.skipif(not ops.NATIVE_CPU, reason="the native extension is not built")


def test_a_built_extension_has_the_shortcut_and_the_cpp_autograd():
    """Not a silent skip: an extension built from this tree has both."""
    assert ops._DIRECT_CALL is not None
    args = make_inputs(Case())
    args.pop("row_ids")
    y = rk.lora_mix_linear(**dict(args, x=args["x"].requires_grad_()), backend="cpu")
    node = y.grad_fn.next_functions[0][0]  # below the view back to [R, L, d_out]
    assert "CppNode<reclora::" in node.name() and "LoraMix" in node.name()


def shortcut(args, *, scale=0.7, mix=0, plan=None, indices_checked=False):
    ids, rows, tokens = (None, -1, -1) if plan is None else (plan.row_ids, plan.rows,
                                                            plan.tokens)
    return ops._DIRECT_CALL(args["x"], args["weight"], args["bias"], args["lora_a"],
                            args["lora_b"], args["adapter_w"], args["adapter_idx"], scale,
                            mix, ids, rows, tokens, indices_checked, False)


class Spy:
    """Counts the shortcut's calls and the calls it answered."""

    def __init__(self, inner):
        self.inner, self.calls, self.answered = inner, 0, 0

    def __call__(self, *args):
        self.calls += 1
        out = self.inner(*args)
        self.answered += out is not NotImplemented
        return out


@pytest.fixture
def spy(monkeypatch):
    s = Spy(ops._DIRECT_CALL)
    monkeypatch.setattr(ops, "_DIRECT_CALL", s)
    return s


LAYOUTS = ["rows", "one-token-rows", "sorted-plan", "shuffled-plan"]


def layout_inputs(layout, case, dtype):
    if layout == "rows":
        return make_inputs(case, dtype=dtype), None
    packed = Case(**{**case.__dict__, "packed": True})
    args = make_inputs(packed, dtype=dtype)
    if layout == "one-token-rows":
        tokens = args["x"].shape[0]
        args["adapter_w"] = torch.randn(tokens, args["adapter_w"].shape[1], dtype=dtype)
        if args["adapter_idx"] is not None:
            args["adapter_idx"] = torch.randint(0, case.adapters, (tokens, case.slots))
        return args, None
    ids = args["row_ids"]
    if layout == "sorted-plan":
        ids = ids.sort().values
    return args, row_plan(ids, case.rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_shortcut_answers_as_the_reference(spy, dense, mix, layout, dtype):
    case = Case(dense=dense, mix=mix, bias=layout != "rows", duplicate=layout == "rows")
    args, plan = layout_inputs(layout, case, dtype)
    args.pop("row_ids")
    ref_args = {k: (v.double() if v is not None and v.is_floating_point() else v)
                for k, v in args.items()}
    ref = rk.lora_mix_linear(**ref_args, scale=case.scale, mix=mix, plan=plan,
                             backend="reference")
    got = rk.lora_mix_linear(**args, scale=case.scale, mix=mix, plan=plan)
    assert spy.answered == 1, "the shortcut declined a valid inference call"
    assert got.shape == ref.shape and got.dtype == dtype
    assert rel_err(got, ref) <= TOLERANCE[dtype]


def test_shortcut_handles_empty_batches_and_strided_operands(spy):
    args = make_inputs(Case(rows=0))
    assert rk.lora_mix_linear(**{k: v for k, v in args.items() if k != "row_ids"}).shape == (
        0, 5, 23)
    args = make_inputs(Case())
    args.pop("row_ids")
    ref = rk.lora_mix_linear(**args, backend="reference")
    strided = dict(args, x=args["x"].transpose(0, 1).contiguous().transpose(0, 1),
                   weight=args["weight"].t().contiguous().t())
    assert not strided["x"].is_contiguous() and not strided["weight"].is_contiguous()
    assert rel_err(rk.lora_mix_linear(**strided), ref) <= TOLERANCE[torch.float64]
    assert spy.answered == 2


# label -> the arguments it changes in a valid call
DECLINED = {
    "int32 adapter_idx": lambda a: dict(adapter_idx=a["adapter_idx"].int()),
    "index out of range": lambda a: dict(adapter_idx=a["adapter_idx"].clone().fill_(6)),
    "negative index": lambda a: dict(adapter_idx=a["adapter_idx"].clone().fill_(-1)),
    "scale a bool": lambda a: dict(scale=True),
    "scale a string": lambda a: dict(scale="0.5"),
    "scale inf": lambda a: dict(scale=float("inf")),
    "scale nan": lambda a: dict(scale=float("nan")),
    "scale an int past a double": lambda a: dict(scale=10**400),
    "mix code 2": lambda a: dict(mix=2),
    "mix code past a long": lambda a: dict(mix=2**70),
    "weight of another dtype": lambda a: dict(weight=a["weight"].float()),
    "weight on meta": lambda a: dict(weight=a["weight"].to("meta")),
    "x on meta": lambda a: dict(x=a["x"].to("meta")),
    "x of ints": lambda a: dict(x=a["x"].long()),
    "x 1-D": lambda a: dict(x=a["x"][0, 0]),
    "weight's d_in": lambda a: dict(weight=a["weight"][:, :-1]),
    "bias's d_out": lambda a: dict(bias=a["bias"][:-1]),
    "lora_a's d_in": lambda a: dict(lora_a=a["lora_a"][..., :-1]),
    "lora_a's rank 0": lambda a: dict(lora_a=a["lora_a"][:, :0], lora_b=a["lora_b"][..., :0]),
    "lora_b's rank": lambda a: dict(lora_b=a["lora_b"][..., :-1]),
    "lora_b's adapters": lambda a: dict(lora_b=a["lora_b"][:-1]),
    "adapter_w's rows": lambda a: dict(adapter_w=a["adapter_w"][:-1]),
    "adapter_w's slots": lambda a: dict(adapter_w=a["adapter_w"][:, :-1]),
    "no slots": lambda a: dict(adapter_w=a["adapter_w"][:, :0],
                               adapter_idx=a["adapter_idx"][:, :0]),
    "adapter_idx's shape": lambda a: dict(adapter_idx=a["adapter_idx"][:, :-1]),
    "dense with k != M": lambda a: dict(adapter_idx=None),
    "a Tensor subclass": lambda a: dict(x=a["x"].as_subclass(Sub)),
    "a subclass bias": lambda a: dict(bias=a["bias"].as_subclass(Sub)),
    "a list for x": lambda a: dict(x=a["x"].tolist()),
}


class Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("label", sorted(DECLINED))
def test_shortcut_declines_what_it_leaves_to_the_checked_path(label):
    args = make_inputs(Case())
    args.pop("row_ids")
    changed = {**args, **DECLINED[label](args)}
    scale, mix = changed.pop("scale", 0.7), changed.pop("mix", 0)
    assert shortcut(changed, scale=scale, mix=mix) is NotImplemented
    assert shortcut(args) is not NotImplemented  # the unchanged call is answered


def test_out_of_range_index_still_raises_index_error_and_no_grad_is_answered(spy):
    args = make_inputs(Case())
    args.pop("row_ids")
    with pytest.raises(IndexError, match="`adapter_idx`"):
        rk.lora_mix_linear(**dict(args, adapter_idx=args["adapter_idx"].clone().fill_(6)))
    x = args["x"].clone().requires_grad_()
    with torch.no_grad():
        assert rk.lora_mix_linear(**dict(args, x=x)).grad_fn is None
    with torch.inference_mode():
        rk.lora_mix_linear(**args)
    assert spy.answered == 2


DIFF = ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("needs", ["all", "x", "bank", "mixture"])
def test_gradients_through_the_shortcut(spy, needs, dense, mix, layout):
    """Recorded calls go through the C++ autograd kernel: every gradient asked for matches
    the reference's, in float64, whichever subset of the inputs requires grad (the backward
    op is told which to compute)."""
    case = Case(dense=dense, mix=mix, duplicate=layout == "rows")
    args, plan = layout_inputs(layout, case, torch.float64)
    args.pop("row_ids")
    wanted = {"all": DIFF, "x": ("x",), "bank": ("lora_a", "lora_b"),
              "mixture": ("adapter_w", "bias")}[needs]
    outs = {}
    for backend in ("reference", "cpu"):
        leaves = {k: args[k].detach().clone().requires_grad_(k in wanted) for k in DIFF}
        y = rk.lora_mix_linear(**{**args, **leaves}, scale=case.scale, mix=mix, plan=plan,
                               backend=backend)
        grad_y = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(y, [leaves[k] for k in wanted], grad_y)
        outs[backend] = (y, dict(zip(wanted, grads)))
    assert spy.answered >= 1, "the shortcut declined a call that records a gradient"
    (y_ref, g_ref), (y_cpu, g_cpu) = outs["reference"], outs["cpu"]
    assert rel_err(y_cpu, y_ref) <= TOLERANCE[torch.float64]
    for k in wanted:
        assert rel_err(g_cpu[k], g_ref[k]) <= TOLERANCE[torch.float64], k


def test_gradcheck_through_the_shortcut(spy):
    case = Case(tokens_per_row=2, rows=2, d_in=5, d_out=4, adapters=3, rank=2, slots=2)
    args = make_inputs(case)
    args.pop("row_ids")
    leaves = [args[k].detach().clone().requires_grad_() for k in DIFF]

    def f(*tensors):
        return rk.lora_mix_linear(**{**args, **dict(zip(DIFF, tensors))}, scale=0.6)

    assert torch.autograd.gradcheck(f, leaves)
    assert spy.answered > 0 and spy.answered == spy.calls


def test_plans_that_do_not_fit_are_declined():
    args = make_inputs(Case(packed=True))
    ids = args.pop("row_ids")
    plan = row_plan(ids, 3)
    assert shortcut(args, plan=plan) is not NotImplemented
    assert shortcut(args, plan=row_plan(ids, 4)) is NotImplemented  # rows != adapter_w's
    assert shortcut(args, plan=row_plan(ids[:-1], 3)) is NotImplemented  # tokens != x's
    assert shortcut(dict(args, x=args["x"].view(3, 5, 29)), plan=plan) is NotImplemented


def test_a_kernel_error_comes_back_as_a_python_exception():
    """A plan's row ids out of range (written into it after it was made): the kernel's own
    check raises, through the shortcut, as a RuntimeError (not a crash)."""
    args = make_inputs(Case(packed=True))
    plan = row_plan(args.pop("row_ids"), 3, check=False)
    plan.row_ids[4] = 3
    with pytest.raises(RuntimeError, match="row_ids"):
        shortcut(args, plan=plan)


def test_modes_and_the_profiler_still_see_the_op(spy):
    args = make_inputs(Case())
    args.pop("row_ids")
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():  # a dispatch mode: the checked path
        rk.lora_mix_linear(**args)
    assert "reclora.lora_mix_forward.default" in seen and spy.answered == 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rk.lora_mix_linear(**args)
    assert "reclora::lora_mix_forward" in {e.key for e in prof.key_averages()}
    assert spy.answered == 1

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        rk.lora_mix_linear(**args)
    assert spy.answered == 1 and Count.calls > 0  # a torch function mode: the checked path


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_goes_through_the_checked_path(spy):
    """Under vmap the tensors are functorch wrappers (no storage for the index check): the
    shortcut declines, and vmap over x works as one call per sample."""
    args = make_inputs(Case())
    args.pop("row_ids")
    xs = torch.stack([args["x"], 2 * args["x"]])

    def one(x):
        return rk.lora_mix_linear(**dict(args, x=x))

    with torch.no_grad():
        batched = torch.vmap(one)(xs)
        singles = [one(x) for x in xs]
    assert spy.calls == 3 and spy.answered == 2  # the vmapped call was declined
    for got, want in zip(batched, singles):
        assert torch.equal(got, want)


def test_threads_calling_at_once_get_their_own_answers(spy):
    """The shortcut releases the GIL around the kernel (as torch's own ops do): calls from
    several Python threads at once each get their own inputs' answer."""
    import threading

    cases = []
    for seed in range(4):
        args = make_inputs(Case(tokens_per_row=40, d_in=64, d_out=48), seed=seed)
        args.pop("row_ids")
        cases.append((args, rk.lora_mix_linear(**args, backend="reference")))
    errors = []

    def worker(args, ref):
        try:
            for _ in range(25):
                got = rk.lora_mix_linear(**args)
                assert rel_err(got, ref) <= TOLERANCE[torch.float64]
        except Exception as exc:  # noqa: BLE001 - reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert spy.answered == 100


# --- the shortcut on CUDA tensors, for the native cuda backend ------------------------------

def test_the_cuda_shortcut_is_asked_for_only_where_the_cuda_backend_runs():
    """CPU tensors never take the CUDA branch; `_implicit_ids` is the implicit plan's ids."""
    x = torch.randn(3, 4, 5)
    w = torch.randn(3, 2)
    assert not ops._cuda_shortcut(x, w, "cuda")
    assert not ops._cuda_shortcut(x, w, "auto")
    ids, rows, tokens = ops._implicit_ids(x)
    assert (rows, tokens) == (3, 12) and ids.tolist() == [b for b in range(3) for _ in range(4)]
    ids, rows, tokens = ops._implicit_ids(x.reshape(12, 5))
    assert (rows, tokens) == (12, 12) and ids.tolist() == list(range(12))
    assert ops._implicit_ids(torch.randn(())) == (None, -1, -1)


CUDA_NATIVE = pytest.mark.skipif(not (torch.cuda.is_available() and ops.NATIVE_CUDA),
                                 reason="needs a CUDA device and the CUDA kernels")


def _cuda_layout_inputs(layout, case):
    args, plan = layout_inputs(layout, case, torch.float32)
    args.pop("row_ids")
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    if plan is not None:
        plan = row_plan(plan.row_ids.cuda(), case.rows)
    return args, plan


@pytest.mark.cuda
@CUDA_NATIVE
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_cuda_shortcut_answers_as_the_checked_path(spy, monkeypatch, dense, mix, layout):
    """backend="cuda": the shortcut answers valid calls, forward and gradients, with what the
    checked path gives (the same kernels on the same arguments: y, dx, dW and dbias equal to
    the bit; the bank and mixture gradients are summed with atomicAdd across blocks, in an
    order that varies between runs, so those agree to fp32 rounding)."""
    case = Case(dense=dense, mix=mix)
    args, plan = _cuda_layout_inputs(layout, case)
    outs = []
    for shortcut_on in (True, False):
        if not shortcut_on:
            monkeypatch.setattr(ops, "_DIRECT_CALL", None)
        leaves = {k: args[k].detach().clone().requires_grad_(True) for k in DIFF}
        y = rk.lora_mix_linear(**{**args, **leaves}, scale=case.scale, mix=mix, plan=plan,
                               backend="cuda", indices_checked=True)
        grads = torch.autograd.grad(y, [leaves[k] for k in DIFF], torch.ones_like(y))
        outs.append((y, grads))
    assert spy.answered == 1, "the shortcut declined a valid call on CUDA tensors"
    (y_short, g_short), (y_checked, g_checked) = outs
    torch.testing.assert_close(y_short, y_checked, rtol=0, atol=0)
    for name, got, want in zip(DIFF, g_short, g_checked):
        atomic = name in ("lora_a", "lora_b", "adapter_w")
        torch.testing.assert_close(got, want, rtol=1e-5 if atomic else 0,
                                   atol=1e-6 * float(want.abs().max()) if atomic else 0)


@pytest.mark.cuda
@CUDA_NATIVE
def test_cuda_shortcut_leaves_unchecked_indices_and_float64_to_python(spy):
    case = Case()
    args, _ = _cuda_layout_inputs("rows", case)
    y = rk.lora_mix_linear(**args, backend="cuda")  # unchecked: Python's device assert
    assert spy.calls == 1 and spy.answered == 0
    torch.testing.assert_close(
        y, rk.lora_mix_linear(**args, backend="cuda", indices_checked=True), rtol=0, atol=0)
    doubles = {k: (v.double() if v is not None and v.is_floating_point() else v)
               for k, v in args.items()}
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        rk.lora_mix_linear(**doubles, backend="cuda", indices_checked=True)
    assert spy.answered == 1  # the checked call only: float64 was declined


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, CUDA_NATIVE])])
def test_a_packed_plan_with_rows_of_x_is_refused(device):
    """x [R, L, d] with a packed plan: the rows are x's own (token n in row n // L), so the
    plan is an error on every path (the CUDA shortcut once took the plan's rows)."""
    case = Case()
    args = make_inputs(case, dtype=torch.float32, device=device)
    args.pop("row_ids")
    tokens = case.rows * case.tokens_per_row
    ids = torch.randint(0, case.rows, (tokens,), device=device)
    with pytest.raises(ValueError, match="row_ids"):
        rk.lora_mix_linear(**args, plan=row_plan(ids, case.rows),
                           backend="cuda" if device == "cuda" else "cpu",
                           indices_checked=True)
