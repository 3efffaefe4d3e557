"""Checks of reclora_kernels/triton/fast_launch.py against Triton's own launch path, run in a
process without TRITON_INTERPRET (tests/test_fast_launch.py starts it): real JITFunctions, a
stand-in sm_90 driver (card_plan.stand_in_launches) and compiled kernels that record what
their launcher is given instead of launching.

    python tests/fast_launch_check.py CHECK      (CHECK: one of CHECKS; exit 0 = passed)
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton decorates the kernels

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import compute_cache_key  # noqa: E402

from reclora_kernels import lora_mix_linear, ops, row_plan  # noqa: E402
from reclora_kernels.triton import fast_launch, kernels, launch  # noqa: E402
from reclora_kernels.triton.card_plan import stand_in_launches, use_card_tables  # noqa: E402

RUNS: list[tuple] = []  # (kernel, launcher args) of every launch, in order


class _Recording:
    """A compiled kernel that records its launches; `key` is Triton's cache key for it."""

    packed_metadata = None

    def __init__(self, key):
        self.key, self.function = key, object()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        RUNS.append((self, args))


def triton_key(meta, args) -> str:
    """The cache key JITFunction.run computes for meta.fn(*args, **meta.kwargs)."""
    fn = meta.fn
    kwargs = dict(meta.kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    _, key_cache, _, _, binder = fn.device_caches[0]
    _, specialization, options = binder(*args, **kwargs)
    return compute_cache_key(key_cache, specialization, options)


def checked_launches() -> list[int]:
    """Route launch.py's launches through a check that the kernel each one ran is the one
    Triton's own key picks; returns a list that counts the launches Triton's path made."""
    slow = [0]
    real_slow, real_run = fast_launch._slow, fast_launch.run_kernel

    def counted_slow(meta, grid, args):
        slow[0] += 1
        return real_slow(meta, grid, args)

    def run_checked(meta, grid, *args):
        before = len(RUNS)
        real_run(meta, grid, *args)
        assert len(RUNS) == before + 1, "one launch, one run"
        ran = RUNS[-1][0]
        assert ran.key == triton_key(meta, args), f"{meta.fn}: a kernel of another key ran"

    fast_launch._slow = counted_slow
    launch.run_kernel = run_checked
    return slow


def shrink_args(x, fac, ints):
    """shrink_kernel's positional arguments with x, fac and the 13 integers given."""
    table = torch.arange(4)
    out = torch.empty(8, 4, 8)
    return (x, fac, table, out, table, table, *ints)


SHRINK_INTS = [(64, 16, 8, 32, 8, 16, 1, 32, 256, 16, 0, 1, 32),
               (64, 16, 8, 32, 8, 1, 1, 32, 256, 16, 0, 1, 32),      # an int becomes 1
               (64, 17, 8, 32, 8, 17, 1, 32, 256, 17, 0, 1, 32),     # not divisible by 16
               (64, 16, 8, 32, 8, 2**33, 1, 32, 256, 16, 0, 1, 32)]  # needs 64 bits


def check_keys() -> None:
    """Every launch, fast or not, runs the kernel Triton's own key picks, across alignments,
    dtypes and integers equal to 1, off 16 and past 32 bits; each distinct key compiles."""
    checked_launches()
    meta = launch.launch_meta(kernels.shrink_kernel, BLOCK_T=16, BLOCK_R=32, BLOCK_K=32,
                              SPLIT_K=1, ORDERED=False, IMPLICIT=True, DOT_FP32=False,
                              IEEE=True, ACC64=False, num_warps=4)
    buf = torch.randn(4096)
    fac = torch.randn(4, 8, 16)
    xs = [buf[:1024].view(64, 16), buf[1:1025].view(64, 16),  # 16-byte aligned, and not
          buf.half()[:1024].view(64, 16), buf.bfloat16()[3:1027].view(64, 16)]
    keys = set()
    for _ in range(2):  # the second pass hits the fast path
        for x in xs:
            for ints in SHRINK_INTS:
                args = shrink_args(x, fac, ints)
                launch.run_kernel(meta, (4, 1, 1), *args)
                keys.add(triton_key(meta, args))
    compiled = {ran.key for ran, _ in RUNS}
    assert compiled == keys and len(keys) > len(SHRINK_INTS), (len(compiled), len(keys))


def check_launcher_args() -> None:
    """The fast path gives the launcher what JITFunction.run gives it: grid, stream, the
    kernel's handle and metadata, every argument in order and the constexprs' values; only
    the launch metadata and the (empty) hook chains become None."""
    meta = launch.launch_meta(kernels.expand_kernel, ACCUMULATE=True, HAS_BIAS=False,
                              HAS_COEF=True, ORDERED=False, IMPLICIT=True, BLOCK_T=16,
                              BLOCK_N=32, BLOCK_R=16, DOT_FP32=False, IEEE=True, ACC64=False,
                              num_warps=4)
    y, u, fac = torch.randn(64, 16), torch.randn(64, 16), torch.randn(2, 16, 8)
    table, coef, scale = torch.arange(2), torch.randn(8, 2), torch.ones(1)
    args = (y, y, u, fac, table, coef, table, table, scale,
            64, 16, 8, 16, 8, 16, 1, 0, 16, 128, 8, 1, 0, 1, 2, 1)
    kernels.expand_kernel[(4, 1)](*args, **meta.kwargs)  # Triton's own path
    fast_launch.run_kernel(meta, (4, 1), *args)  # a miss (Triton's path), cached
    fast_launch.run_kernel(meta, (4, 1), *args)  # the fast path
    (k0, slow), (k1, miss), (k2, fast) = RUNS[-3:]
    assert k0 is k1 is k2
    assert len(miss) == len(slow) and all(a is b or a == b for a, b in zip(miss, slow))
    for i, (s, f) in enumerate(zip(slow, fast, strict=True)):
        if i in (6, 7, 8):  # launch metadata, enter and exit hooks
            assert f is None
            assert s is None or not getattr(s, "calls", ())
        elif isinstance(s, torch.Tensor):
            assert f is s, i
        else:
            assert f == s and type(f) is type(s), (i, s, f)
    params = kernels.expand_kernel.params
    assert len(fast) == 9 + len(params)
    for p, value in zip(params, fast[9:], strict=True):
        if p.is_constexpr:
            assert value == meta.kwargs[p.name], p.name


def check_hooks_take_tritons_path() -> None:
    """A launch hook (a profiler's) makes every launch go through JITFunction.run, which
    calls it."""
    slow = checked_launches()
    calls = []
    knobs.runtime.launch_enter_hook.add(calls.append)
    try:
        x = torch.randn(64, 16)
        args = shrink_args(x, torch.randn(4, 8, 16), SHRINK_INTS[0])
        meta = launch.launch_meta(kernels.shrink_kernel, BLOCK_T=16, BLOCK_R=32, BLOCK_K=32,
                                  SPLIT_K=1, ORDERED=False, IMPLICIT=True, DOT_FP32=False,
                                  IEEE=True, ACC64=False, num_warps=4)
        for _ in range(3):
            launch.run_kernel(meta, (4, 1, 1), *args)
        assert slow[0] == 3
        assert RUNS[-1][1][7] is knobs.runtime.launch_enter_hook
    finally:
        knobs.runtime.launch_enter_hook.remove(calls.append)
    for _ in range(3):
        launch.run_kernel(meta, (4, 1, 1), *args)
    assert slow[0] == 4  # hook gone: Triton's path once (the cache fills), then the fast one


def check_op_launches() -> None:
    """The op's calls (every layout and mix, forward and backward, on the H200's tile table)
    run the kernels Triton's own key picks, and after the first call of a shape none goes
    through JITFunction.run."""
    slow = checked_launches()
    use_card_tables("NVIDIA H200")
    ops._triton_usable = lambda: True  # the triton backend takes CPU tensors
    torch.manual_seed(0)
    rows, length, d, m, r, k = 8, 8, 32, 16, 8, 4
    x = torch.randn(rows, length, d, requires_grad=True)
    weight, bias = torch.randn(d, d), torch.randn(d)
    a = torch.randn(m, r, d, requires_grad=True)
    b = torch.randn(m, d, r, requires_grad=True)
    w = torch.randn(rows, m, requires_grad=True)
    wk, idx = torch.randn(rows, k, requires_grad=True), torch.randint(0, m, (rows, k))
    plan = row_plan(torch.randint(0, rows, (rows * length,)), rows)

    def calls():
        for mix in ("factor", "output"):
            for mixture in ((w, None), (wk, idx)):
                y = lora_mix_linear(x, weight, bias, a, b, *mixture, mix=mix, scale=2.0,
                                    backend="triton", indices_checked=True)
                y.sum().backward()
                lora_mix_linear(x.detach().reshape(-1, d), weight, bias, a, b, *mixture,
                                mix=mix, plan=plan, backend="triton", indices_checked=True)

    calls()
    first = len(RUNS)
    slow[0] = 0
    calls()
    assert len(RUNS) == 2 * first and first > 20, first
    assert slow[0] == 0, slow[0]


CHECKS = {f.__name__: f for f in (check_keys, check_launcher_args,
                                  check_hooks_take_tritons_path, check_op_launches)}

if __name__ == "__main__":
    stand_in_launches(_Recording)
    CHECKS[sys.argv[1]]()
    print("ok", sys.argv[1])
