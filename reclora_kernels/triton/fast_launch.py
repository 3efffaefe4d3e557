"""Triton kernel launches without JITFunction.run's per-call Python.

JITFunction.run binds the arguments, specializes each one (dtype, 16-byte alignment, integers
equal to 1 or divisible by 16), hashes a cache key and checks the kernel's globals on every
launch: 15-28 us a launch on the AMD EPYC (benchmarks/bench_host_triton.py), more than the
kernel takes at decode sizes. Here the first launch of a kind goes through JITFunction.run,
which compiles (or loads) the kernel and returns it; later launches with the same key call
that kernel's launcher directly, with the arguments JITFunction.run would give it.

The key holds everything Triton specializes on, and more: the constexprs and launch options
(one LaunchMeta per shape, made once), every integer argument's value, every tensor's dtype
and 16-byte alignment, the device and Triton's debug and instrumentation switches. So a hit
reuses only the kernel Triton itself would pick; tests/test_fast_launch.py checks that
against Triton's own binder and key. Launch hooks (a profiler's), pre-run hooks and the
interpreter's kernels (not JITFunctions) take Triton's own path every time.
"""

from __future__ import annotations

import threading
from functools import lru_cache

from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class LaunchMeta:
    """A kernel's keyword arguments for one shape: `kwargs` as JITFunction.run takes them,
    `constexprs` (their values in parameter order, as its launcher is passed them) and
    `token` (hashable, for the launch cache key)."""

    __slots__ = ("fn", "kwargs", "constexprs", "token", "pointers")

    def __init__(self, fn, kwargs: dict):
        self.fn, self.kwargs = fn, kwargs
        self.token = (id(fn), *sorted(kwargs.items()))
        if not isinstance(fn, JITFunction):  # the interpreter's, or a stand-in: no fast path
            self.constexprs, self.pointers = None, 0
            return
        params = fn.params
        runtime = [p for p in params if not p.is_constexpr]
        if any(p.is_constexpr for p in params[:len(runtime)]):
            raise ValueError(f"{fn}: the fast launch needs the constexprs after every "
                             "runtime parameter")
        # Tensors first, then integers: the kernels name their pointers *_ptr.
        self.pointers = sum(1 for p in runtime if p.name.endswith("_ptr"))
        if any(not p.name.endswith("_ptr") for p in runtime[:self.pointers]):
            raise ValueError(f"{fn}: the fast launch needs the *_ptr parameters first")
        self.constexprs = tuple(kwargs[p.name] if p.name in kwargs else p.default
                                for p in params if p.is_constexpr)


@lru_cache(maxsize=1024)
def _meta(fn, items: tuple) -> LaunchMeta:
    return LaunchMeta(fn, dict(items))


def launch_meta(fn, **kwargs) -> LaunchMeta:
    """The LaunchMeta of `fn` with these keyword arguments (made once per distinct set)."""
    return _meta(fn, tuple(sorted(kwargs.items())))


# (LaunchMeta token, device, switches, integer args, tensor dtypes and alignments) -> kernel.
# Integers are keyed by value, so shapes that vary (training on ragged batches) add keys: the
# table is emptied when it reaches _MAX_KEYS (each entry is a tuple and a reference).
_KERNELS: dict[tuple, object] = {}
_MAX_KEYS = 4096


def _quiet(hook) -> bool:
    """No launch hook set: triton 3.8 keeps an empty HookChain where older ones kept None."""
    return hook is None or (type(hook) is HookChain and not hook.calls)


# Triton's interpreter patches triton.language's attributes for the length of a launch and
# puts them back after it, so two threads launching at once undid each other's patches
# (InterpreterError "Did you forget to add @triton.jit ?"; tests/test_op_hostile.py).
# Its launches take turns; compiled kernels do not need to.
_INTERPRETER_TURN = threading.Lock()


def _slow(meta: LaunchMeta, grid, args):
    return meta.fn[grid](*args, **meta.kwargs)


def run_kernel(meta: LaunchMeta, grid: tuple, *args) -> None:
    """meta.fn[grid](*args, **meta.kwargs), as Triton would run it: tensors first, then
    Python ints (never bools: True would share int 1's key), in the parameter order."""
    if meta.constexprs is None:  # the interpreter's kernel (or a stand-in)
        with _INTERPRETER_TURN:
            _slow(meta, grid, args)
        return
    runtime = knobs.runtime
    if (not _quiet(runtime.launch_enter_hook)
            or not _quiet(runtime.launch_exit_hook)
            or runtime.add_stages_inspection_hook is not None or meta.fn.pre_run_hooks):
        _slow(meta, grid, args)
        return
    n = meta.pointers
    tensors = args[:n]
    device = driver.active.get_current_device()
    key = (meta.token, device, runtime.debug, knobs.compilation.instrumentation_mode,
           *args[n:], *[t.dtype for t in tensors], *[t.data_ptr() & 15 == 0 for t in tensors])
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _slow(meta, grid, args)  # compiles (or finds) Triton's own choice
        if kernel is not None:
            if len(_KERNELS) >= _MAX_KEYS:
                _KERNELS.clear()
            _KERNELS[key] = kernel
        return
    stream = driver.active.get_current_stream(device)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    kernel.run(grid[0], grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
               None, None, None, *args, *meta.constexprs)
