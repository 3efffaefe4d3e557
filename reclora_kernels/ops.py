"""The public op: custom ops per backend, their fake kernels, autograd, and backend dispatch.

Every fast backend exposes the same two ops (names differ by backend):

    <ns>::<name>_forward(Tensor x, Tensor row_ids, Tensor weight, Tensor? bias, Tensor lora_a,
        Tensor lora_b, Tensor adapter_w, Tensor? adapter_idx, float scale, int mix)
        -> (Tensor y, Tensor shrink)
    <ns>::<name>_backward(Tensor grad_y, Tensor x, Tensor row_ids, Tensor weight,
        Tensor lora_a, Tensor lora_b, Tensor adapter_w, Tensor? adapter_idx, Tensor shrink,
        float scale, int mix, bool need_x, bool need_weight, bool need_bias, bool need_lora)
        -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dlora_a, Tensor dlora_b,
            Tensor dadapter_w)

(The Triton backward takes need_a, need_b, need_w, one per LoRA gradient, for need_lora.)
x is packed [T, d_in], row_ids [T] int64 (any order), adapter_idx [R, k] int64 or None
(dense), mix 0 = factor, 1 = output. The Triton ops take the batch's RowPlan
(reclora_kernels.plan) in place of row_ids, as its tensors (row_ids, order, sorted_rows,
row_start; None where the layout makes them implicit) and row_len. `shrink` is saved for
backward, float32 (float64 for float64 inputs) [T, k', r]:
factor mode k' = 1 and shrink = A_p[row] x (unscaled); output mode k' = k and shrink[:, j] =
A[idx[row, j]] x (unweighted). Gradients that are not needed come back as empty tensors.
The Triton backend defines these and their autograd in Python; the native backends (cpu,
cuda) in C++ (csrc/, autograd in csrc/autograd.cpp), and this module adds fake kernels to
both alike.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import reference, validate
from .plan import _REBUILT, RowPlan, _cached_implicit_plan, _has_cuda
from .triton.configs import auto_backend, auto_may_pick, interpreting

BACKENDS = ("reference", "triton", "cpu", "cuda")
NATIVE_FORWARD = "reclora::lora_mix_forward"
NATIVE_BACKWARD = "reclora::lora_mix_backward"


def shrink_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved shrink is float32, or float64 for float64 inputs (gradcheck precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shrink_shape(x, lora_a, adapter_w, mix):
    slots = adapter_w.shape[1] if mix == 1 else 1
    return (x.shape[0], slots, lora_a.shape[1])


def _fake_forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix):
    y = x.new_empty(x.shape[0], weight.shape[0])
    shrink = x.new_empty(_shrink_shape(x, lora_a, adapter_w, mix), dtype=shrink_dtype(x.dtype))
    return y, shrink


def _fake_backward(grad_y, x, row_ids, weight, lora_a, lora_b, adapter_w, adapter_idx, shrink,
                   scale, mix, need_x, need_weight, need_bias, need_lora):
    # Contiguous, whatever the input's strides: every backend's backward writes its
    # gradients into fresh contiguous tensors (empty_like kept a transposed x's strides,
    # and inductor's stride check failed the compiled backward).
    def maybe(flag, like):
        return like.new_empty(like.shape) if flag else like.new_empty(0)

    return (
        maybe(need_x, x),
        maybe(need_weight, weight),
        x.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
        maybe(need_lora, lora_a),
        maybe(need_lora, lora_b),
        maybe(need_lora, adapter_w),
    )


# --- Triton: defined here, launched from reclora_kernels.triton ------------------------------
# The plan travels as its tensors and sizes (custom-op arguments are tensors and scalars).


def _plan_of(tokens, rows, row_len, row_ids, order, sorted_rows, row_start) -> RowPlan:
    # The op's own arguments, split from a plan that was checked when it was made.
    return RowPlan(rows=rows, tokens=tokens, row_len=row_len, row_ids=row_ids, order=order,
                   sorted_rows=sorted_rows, row_start=row_start, _made_by=_REBUILT)


@torch.library.custom_op("reclora::triton_lora_mix_forward", mutates_args=())
def triton_lora_mix_forward(
    x: torch.Tensor, row_ids: torch.Tensor | None, order: torch.Tensor | None,
    sorted_rows: torch.Tensor | None, row_start: torch.Tensor | None, row_len: int,
    weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_w: torch.Tensor,
    adapter_idx: torch.Tensor | None, scale: float, mix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import launch

    plan = _plan_of(x.shape[0], adapter_w.shape[0], row_len, row_ids, order, sorted_rows,
                    row_start)
    return launch.forward(x, plan, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                          scale, mix)


@torch.library.custom_op("reclora::triton_lora_mix_backward", mutates_args=())
def triton_lora_mix_backward(
    grad_y: torch.Tensor, x: torch.Tensor, row_ids: torch.Tensor | None,
    order: torch.Tensor | None, sorted_rows: torch.Tensor | None,
    row_start: torch.Tensor | None, row_len: int, weight: torch.Tensor,
    lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_w: torch.Tensor,
    adapter_idx: torch.Tensor | None, shrink: torch.Tensor, a_mix: torch.Tensor,
    b_mix: torch.Tensor, scale: float, mix: int,
    need_x: bool, need_weight: bool, need_bias: bool, need_a: bool, need_b: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import launch

    plan = _plan_of(x.shape[0], adapter_w.shape[0], row_len, row_ids, order, sorted_rows,
                    row_start)
    return launch.backward(grad_y, x, plan, weight, lora_a, lora_b, adapter_w, adapter_idx,
                           shrink, (a_mix, b_mix), scale, mix, need_x, need_weight, need_bias,
                           need_a, need_b, need_w)


def _triton_fake_forward(x, row_ids, order, sorted_rows, row_start, row_len, weight, bias,
                         lora_a, lora_b, adapter_w, adapter_idx, scale, mix):
    y, shrink = _fake_forward(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                              scale, mix)
    rows = adapter_w.shape[0]
    if mix == 0:  # the rows' mixed factors, saved for the backward
        a_mix = x.new_empty(rows, *lora_a.shape[1:])
        b_mix = x.new_empty(rows, *lora_b.shape[1:])
    else:
        a_mix, b_mix = x.new_empty(0), x.new_empty(0)
    return y, shrink, a_mix, b_mix


def _triton_fake_backward(grad_y, x, row_ids, order, sorted_rows, row_start, row_len, weight,
                          lora_a, lora_b, adapter_w, adapter_idx, shrink, a_mix, b_mix, scale,
                          mix, need_x, need_weight, need_bias, need_a, need_b, need_w):
    dx, dweight, dbias, da, db, dw = _fake_backward(
        grad_y, x, row_ids, weight, lora_a, lora_b, adapter_w, adapter_idx, shrink, scale, mix,
        need_x, need_weight, need_bias, True)
    # The Triton backward asks for each LoRA gradient on its own.
    return (dx, dweight, dbias, da if need_a else x.new_empty(0),
            db if need_b else x.new_empty(0), dw if need_w else x.new_empty(0))


def _triton_setup_context(ctx, inputs, output):
    (x, row_ids, order, sorted_rows, row_start, row_len, weight, bias, lora_a, lora_b,
     adapter_w, adapter_idx, scale, mix) = inputs
    ctx.save_for_backward(x, row_ids, order, sorted_rows, row_start, weight, lora_a, lora_b,
                          adapter_w, adapter_idx, *output[1:])
    ctx.scale, ctx.mix, ctx.has_bias, ctx.row_len = scale, mix, bias is not None, row_len
    # Only y's gradient is read: zero-filled gradients of the saved outputs (s, A_p, B_p)
    # would be three memset launches a backward.
    ctx.set_materialize_grads(False)


def _triton_backward(ctx, grad_y, *_grad_saved):
    (x, row_ids, order, sorted_rows, row_start, weight, lora_a, lora_b, adapter_w, adapter_idx,
     shrink, a_mix, b_mix) = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dweight, dbias, da, db, dw = triton_lora_mix_backward(
        grad_y.contiguous(), x, row_ids, order, sorted_rows, row_start, ctx.row_len, weight,
        lora_a, lora_b, adapter_w, adapter_idx, shrink, a_mix, b_mix, ctx.scale, ctx.mix, need[0],
        need[6], need[7] and ctx.has_bias, need[8], need[9], need[10],
    )
    return (
        dx if need[0] else None, None, None, None, None, None,
        dweight if need[6] else None,
        dbias if need[7] and ctx.has_bias else None,
        da if need[8] else None,
        db if need[9] else None,
        dw if need[10] else None,
        None, None, None,
    )


torch.library.register_fake(triton_lora_mix_forward)(_triton_fake_forward)
torch.library.register_fake(triton_lora_mix_backward)(_triton_fake_backward)
torch.library.register_autograd(triton_lora_mix_forward, _triton_backward,
                                setup_context=_triton_setup_context)


# --- Native (csrc/): the ops are defined in C++ when the extension is built -----------------


def env_choice(name: str, allowed: tuple[str, ...]) -> str:
    """$name, one of `allowed` ("auto" when unset or empty); any other value is refused here,
    at import, naming the variable (a typo such as RECLORA_CPU_THIN=BLAS was ignored, and a
    bad RECLORA_BACKEND failed each op call blaming its `backend` argument)."""
    value = os.environ.get(name, "") or "auto"
    if value not in allowed:
        raise ValueError(f"reclora_kernels: ${name} must be one of {', '.join(allowed)} (or "
                         f"unset), got {value!r}")
    return value


# Read by the native extension when it loads (csrc/cpu): checked first.
env_choice("RECLORA_CPU_THIN", ("auto", "avx2", "blas"))
env_choice("RECLORA_CPU_BF16", ("auto", "mkl"))


def _load_native() -> tuple[bool, bool, bool]:
    """Import the compiled extension once, at import time (a try/import inside a traced
    region breaks torch.compile's graph); attach fake kernels to its ops.
    Returns (loaded, has CPU kernels, has CUDA kernels)."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False, False, False
    # Autograd is C++ (csrc/autograd.cpp); the fake kernels, for torch.compile, are here.
    torch.library.register_fake(NATIVE_FORWARD)(_fake_forward)
    torch.library.register_fake(NATIVE_BACKWARD)(_fake_backward)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return True, has(NATIVE_FORWARD, "CPU"), has(NATIVE_FORWARD, "CUDA")


NATIVE_LOADED, NATIVE_CPU, NATIVE_CUDA = _load_native()
# The shortcut on CPU tensors (csrc/direct_call.cpp): the checks of validate.py in C++ and an
# unboxed call of the op; it returns NotImplemented for whatever it leaves to the checked path
# below (which then names the bad argument).
_DIRECT_CALL = None
if NATIVE_CPU:
    from . import _C

    _DIRECT_CALL = getattr(_C, "lora_mix_direct", None)
_MIX_CODES = validate.MIX_MODES
# $RECLORA_BACKEND, read once at import: os.environ.get costs ~1.4 us a call on the AMD EPYC,
# a quarter of F.linear's whole call at tiny sizes.
ENV_BACKEND = env_choice("RECLORA_BACKEND", ("auto", *BACKENDS))


def cpu_half_gemm_is_native(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch's own GEMM in `dtype` (bfloat16 or float16) on this CPU is oneDNN's: where
    it is not, ATen runs it far slower than fp32 (AMD EPYC Zen 3, AVX2, 2 threads: bf16
    F.linear 53 ms vs 7.8 ms in fp32 at d = 1024, T = 512, benchmarks/results/
    cpu_issue13_amd_*.md; Zen 5, AVX512-BF16 without AVX512-FP16: fp16 F.linear 20.5 ms vs
    5.1 in fp32, bf16 1.4)."""
    name = "_is_mkldnn_fp16_supported" if dtype == torch.float16 else "_is_mkldnn_bf16_supported"
    probe = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:
        return True


def _choose_cpu_half_base() -> None:
    """The native cpu op's half base GEMM, per dtype: ATen's (as F.linear) where it is
    oneDNN's, else MKL's gemm_bf16bf16f32 / gemm_f16f16f32 (fp32 accumulation, no fp32 copy of
    W or x): mode 1 for both, 2 for fp16 only. RECLORA_CPU_HALF_BASE=aten|mkl overrides (0 or
    1)."""
    if not NATIVE_CPU or not hasattr(torch.ops.reclora, "cpu_half_base"):
        return
    choice = env_choice("RECLORA_CPU_HALF_BASE", ("auto", "aten", "mkl"))
    if choice == "auto":
        mode = (1 if not cpu_half_gemm_is_native(torch.bfloat16)
                else 2 if not cpu_half_gemm_is_native(torch.float16) else 0)
    else:
        mode = 1 if choice == "mkl" else 0
    try:
        torch.ops.reclora.cpu_half_base(mode)
    except RuntimeError:  # this torch has no MKL half GEMM: ATen's it is
        torch.ops.reclora.cpu_half_base(0)


_choose_cpu_half_base()
try:
    import triton  # noqa: F401

    TRITON_IMPORTED = True
except ImportError:
    TRITON_IMPORTED = False


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem(triton_version: str | None = None,
                        numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run the kernels with these
    versions, or None. triton 3.6's interpreter turns size-1 arrays into ints, which numpy 2.4
    made an error: every kernel then fails with an InterpreterError (measured with torch 2.11's
    pinned triton 3.6.0: fails under numpy 2.4.0 and 2.5.5, passes under 2.3.5; triton 3.7.1
    and 3.8.0 pass under 2.4)."""
    import numpy

    if triton_version is None:
        if not TRITON_IMPORTED:
            return None
        triton_version = triton.__version__
    return _interpreter_problem(triton_version, numpy_version or numpy.__version__)


@lru_cache(maxsize=8)
def _interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton's interpreter in triton {triton_version} does not run under numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7")
    return None


def _triton_usable() -> bool:
    return TRITON_IMPORTED and (_has_cuda() or interpreting())


def available_backends() -> list[str]:
    """Backends usable in this process, in no particular order of preference."""
    found = ["reference"]
    if _triton_usable():
        found.append("triton")
    if NATIVE_CPU:
        found.append("cpu")
    if _has_cuda() and NATIVE_CUDA:
        found.append("cuda")
    return found


def resolve_backend(backend: str, device: torch.device, tokens: int | None = None,
                    rows: int | None = None) -> str:
    """'auto' (or $RECLORA_BACKEND, read at import): on CUDA tensors the backend measured
    fastest on this card for the size class (reclora_kernels/configs/<card>.json "auto",
    written by benchmarks/tune_triton.py), else the cuBLAS-anchored Triton path; never a
    backend measured slower than plain torch. On CPU tensors the native cpu kernels, else the
    reference."""
    asked = backend
    if backend == "auto":
        backend = ENV_BACKEND
    # Fast paths (this runs on every call): the common answers without listing the backends.
    if device.type == "cpu" and (backend == "cpu" or backend == "auto") and NATIVE_CPU:
        return "cpu"
    if backend == "reference":
        return backend
    if backend == "triton" and device.type == "cuda" and TRITON_IMPORTED:
        return backend
    if backend not in ("auto", *BACKENDS):
        raise ValueError(
            f"lora_mix_linear: `backend` must be one of {['auto', *BACKENDS]}, got {backend!r}"
        )
    usable = available_backends()
    if backend == "auto":
        if device.type == "cuda":
            order = (auto_backend(device, tokens, rows), "triton", "reference")
        else:
            order = ("cpu", "reference")
        return next(b for b in order if b in usable)
    if backend not in usable:
        source = ("$RECLORA_BACKEND" if asked == "auto" else "`backend`")
        hint = ("; on CPU tensors it needs TRITON_INTERPRET=1 set before triton is imported"
                if backend == "triton" and device.type == "cpu" else "")
        raise ValueError(
            f"lora_mix_linear: {source} {backend!r} is not available here; available: "
            f"{usable}{hint}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError("lora_mix_linear: `backend` 'cuda' needs CUDA tensors, got x on "
                         f"{device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"lora_mix_linear: `backend` 'cpu' needs CPU tensors, got x on {device}")
    if backend == "triton" and device.type == "cpu":
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(f"lora_mix_linear: `backend` 'triton' on CPU tensors: {problem}")
    return backend


def _cuda_shortcut(x, adapter_w, backend: str) -> bool:
    """Whether a call on CUDA tensors may take the C++ shortcut: the backend is the native
    cuda one, asked for or chosen by `auto` for this card and size class."""
    if not NATIVE_CUDA or type(x) is not torch.Tensor or not x.is_cuda:
        return False
    if backend == "cuda" or (backend == "auto" and ENV_BACKEND == "cuda"):
        return True
    if backend != "auto" or ENV_BACKEND != "auto" or not isinstance(adapter_w, torch.Tensor):
        return False
    if not auto_may_pick(x.device, "cuda"):  # the usual answer, without resolving twice a call
        return False
    tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0] if x.dim() else 0
    rows = adapter_w.shape[0] if adapter_w.dim() else 0
    return resolve_backend("auto", x.device, tokens, rows) == "cuda"


def _implicit_ids(x) -> tuple[torch.Tensor | None, int, int]:
    """(row ids, rows, tokens) of x's implicit plan on its device, for the CUDA shortcut:
    x [R, L, d_in] is R rows of L tokens, a packed x one token per row (cached per size;
    the shortcut never runs while compiling, so no symbolic size reaches the cache)."""
    if x.dim() == 3:
        plan = _cached_implicit_plan(x.shape[0], x.shape[1])
    elif x.dim() == 2:
        plan = _cached_implicit_plan(x.shape[0], 1)
    else:
        return None, -1, -1  # the shortcut declines; the checked path names `x`
    return plan.token_rows(x.device), plan.rows, plan.tokens


@lru_cache(maxsize=1)
def _triton_eager():
    """reclora_kernels.triton.eager, imported on first use (it imports triton)."""
    from .triton import eager

    return eager


FORWARD_MODE = "forward-mode AD (torch.autograd.forward_ad, torch.func.jvp)"
REVERSE_TRANSFORMS = "torch.func's reverse mode (grad, vjp, jacrev, vmap(grad))"


def _unsupported_autodiff() -> str | None:
    """The differentiation the fast backends cannot run that is active, or None. Forward mode:
    a dual level (torch.autograd.forward_ad) or torch.func.jvp anywhere in the functorch
    stack. torch.func's reverse-mode transforms: a Grad interpreter in the stack with grad
    mode on (the native op's C++ autograd Function and Triton's eager one are refused by
    functorch). Costs one attribute read and one C call when no transform is active (every
    eager call asks). Never asked while compiling."""
    if torch.autograd.forward_ad._current_level >= 0:
        return FORWARD_MODE
    if not torch._C._are_functorch_transforms_active():
        return None
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    if TransformType.Jvp in kinds:
        return FORWARD_MODE
    if TransformType.Grad in kinds and torch.is_grad_enabled():
        return REVERSE_TRANSFORMS
    return None  # vmap alone (or functionalize): the ops run under it


def _needs_autograd(x, weight, bias, lora_a, lora_b, adapter_w) -> bool:
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return True  # let the compiler see the op's autograd registration
    return (x.requires_grad or weight.requires_grad or lora_a.requires_grad
            or lora_b.requires_grad or adapter_w.requires_grad
            or (bias is not None and bias.requires_grad))


def lora_mix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_w: torch.Tensor,
    adapter_idx: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    mix: str = "factor",
    row_ids: torch.Tensor | None = None,
    plan: RowPlan | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    indices_checked: bool = False,
) -> torch.Tensor:
    """Base projection fused with a per-row mixture of LoRA adapters gathered from a bank.

    Shapes: x [R, L, d_in] (or packed [T, d_in] with row_ids [T] or a `plan`; a packed x
    without either is one token per row), weight [d_out, d_in], bias [d_out] or None,
    lora_a [M, r, d_in], lora_b [M, d_out, r], adapter_w [R, k], adapter_idx [R, k] or None
    (dense: k = M, slot j is adapter j). Returns x's leading shape with d_out, in x's dtype.

    Semantics, for every token n of row b = row(n), with i_j = adapter_idx[b, j]:

        y[n] = weight @ x[n] + bias
        if mix == "factor":                      # RecLoRA: mix the factors, then apply
            A_p = sum_j adapter_w[b, j] * lora_a[i_j]
            B_p = sum_j adapter_w[b, j] * lora_b[i_j]
            y[n] += scale * B_p @ (A_p @ x[n])
        else:  # mix == "output"                 # MoE-LoRA: apply each, then mix
            y[n] += scale * sum_j adapter_w[b, j] * lora_b[i_j] @ (lora_a[i_j] @ x[n])

    k = 1 with weight 1 is per-row multi-LoRA; M = 1 is plain LoRA. Gradients flow to x,
    weight, bias, lora_a, lora_b and adapter_w (not to indices). `backend`: "auto", or one
    of available_backends(); $RECLORA_BACKEND (read when reclora_kernels is imported)
    overrides "auto".

    Host syncs: none per call for x [R, L, d_in] or with a `plan` (reclora_kernels.row_plan,
    made once per batch and shared by every layer). Raw `row_ids` build a plan per call (one
    host read). adapter_idx is range-checked per call (eagerly on the CPU, by an asynchronous
    device assert on a GPU) unless `indices_checked` says the caller already did (the gates'
    top-k indices, a set_mixture checked once): that is a promise, and on a GPU an index
    out of range under it is not caught (the kernels would read past the bank); the native
    CPU kernels check it anyway.
    `check_finite` also rejects NaN/inf mixture weights (a device sync).

    Host cost: a call on CPU tensors (not traced) takes a C++ shortcut for the checks and the
    dispatch (csrc/direct_call.cpp); anything it does not accept goes through validate.py as
    before, which raises the error that names the argument. An eager Triton call with the
    metadata of one that passed the checks before replays what they and the launch plan made
    of it (reclora_kernels/triton/eager.py); data checks still run on every call.
    """
    if backend != "reference" and not torch.compiler.is_compiling():
        unsupported = _unsupported_autodiff()
        # The kernels have no forward-mode derivative: run below autograd, a dual input's
        # tangent lost its LoRA part (or came back zero), silently. Under torch.func.grad the
        # autograd Functions failed with torch's generic functorch error. "auto" does not
        # switch backends under a transform (as without one): it is refused unless it
        # resolves to the reference itself ($RECLORA_BACKEND, or no native build).
        if unsupported is not None and (not isinstance(x, torch.Tensor)
                                        or resolve_backend(backend, x.device) != "reference"):
            hint = (" (for 'auto', set RECLORA_BACKEND=reference before importing "
                    "reclora_kernels)" if backend == "auto" else "")
            raise NotImplementedError(
                f"lora_mix_linear: {unsupported} runs on backend='reference' only, got "
                f"backend={backend!r}{hint}")
    if (_DIRECT_CALL is not None and row_ids is None and not check_finite
            and not torch.compiler.is_compiling()):
        cuda_ok = _cuda_shortcut(x, adapter_w, backend)
        if cuda_ok or backend == "cpu" or (backend == "auto" and ENV_BACKEND in ("auto", "cpu")):
            # The shortcut (x on the CPU, or on a GPU for the cuda backend; every argument
            # valid): ~4 us above F.linear at tiny sizes on the CPU instead of ~50
            # (benchmarks/bench_host.py).
            if plan is None:
                ids, plan_rows, plan_tokens = (_implicit_ids(x) if cuda_ok
                                               else (None, -1, -1))
            elif type(plan) is RowPlan and plan.row_ids is not None and x.dim() == 2:
                # (A packed plan with x [R, L, d]: validate.py names the mismatch.)
                ids, plan_rows, plan_tokens = plan.row_ids, plan.rows, plan.tokens
            else:
                ids = False
            if ids is not False:
                code = _MIX_CODES.get(mix, -1) if type(mix) is str else -1
                y = _DIRECT_CALL(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                                 scale, code, ids, plan_rows, plan_tokens, indices_checked,
                                 cuda_ok)
                if y is not NotImplemented:
                    return y
    key = None
    if (row_ids is None and not check_finite and TRITON_IMPORTED
            and (backend == "triton" or (backend == "auto" and type(x) is torch.Tensor
                                         and x.is_cuda))):
        # A repeat of an eager Triton call seen before: its checks and launch plan are kept
        # (triton/eager.py; 3x less host time at decode sizes, bench_host_triton.py).
        eager = _triton_eager()
        key = eager.call_key(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale,
                             mix, backend, indices_checked, plan)
        call = None if key is None else eager.kept(key)
        if call is not None:
            return eager.replay(call, x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                                scale, _needs_autograd(x, weight, bias, lora_a, lora_b,
                                                       adapter_w), plan)
    problem = validate.prepare(
        x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix, row_ids,
        check_finite=check_finite, plan=plan, indices_checked=indices_checked,
    )
    p = problem
    chosen = resolve_backend(backend, x.device, p.x2d.shape[0], p.rows)
    pl = p.plan
    if chosen == "reference":
        y2d = reference.lora_mix_reference(p.x2d, pl.token_rows(x.device), weight, bias, lora_a,
                                           lora_b, adapter_w, p.adapter_idx, float(scale), p.mix)
    else:
        eager = _triton_eager() if chosen == "triton" else None
        if eager is not None and eager.eager_ok(x, weight, bias, lora_a, lora_b, adapter_w,
                                                p.adapter_idx):
            fplan = (None if key is None else
                     eager.remember(key, p, weight, bias, lora_a, lora_b, adapter_w,
                                    indices_checked))
            y2d = eager.forward(
                p.x2d, weight, bias, lora_a, lora_b, adapter_w, p.adapter_idx, pl,
                float(scale), p.mix, _needs_autograd(x, weight, bias, lora_a, lora_b, adapter_w),
                fplan)
            return y2d.view(*p.lead_shape, p.d_out)
        if chosen == "triton":
            op = triton_lora_mix_forward
            args = (p.x2d, pl.row_ids, pl.order, pl.sorted_rows, pl.row_start, pl.row_len)
        else:
            op = torch.ops.reclora.lora_mix_forward.default
            args = (p.x2d, pl.token_rows(x.device))
        args = (*args, weight, bias, lora_a, lora_b, adapter_w, p.adapter_idx, float(scale),
                p.mix)
        if (_needs_autograd(x, weight, bias, lora_a, lora_b, adapter_w)
                or torch.compiler.is_compiling()):  # dynamo cannot trace the guard below
            y2d = op(*args)[0]
        else:
            # Inference: straight to the kernel, past the op's autograd layer (Triton's is
            # Python: about 4.5 us per call on this CPU at tiny sizes).
            with torch._C._AutoDispatchBelowAutograd():
                y2d = op(*args)[0]
    return y2d.view(*p.lead_shape, p.d_out)
