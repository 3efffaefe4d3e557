"""reclora_kernels/triton/fast_launch.py: the cached launch runs the kernel Triton's own path
would and gives its launcher the same arguments. Each check runs in its own process without
the interpreter (tests/fast_launch_check.py), with a stand-in sm_90 driver, so it runs here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
# fast_launch_check.CHECKS (not imported here: it turns the interpreter off for its process)
CHECKS = ["check_keys", "check_launcher_args", "check_hooks_take_tritons_path",
          "check_op_launches"]


@pytest.mark.parametrize("check", CHECKS)
def test_fast_launch(check):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RECLORA_POISON")}
    run = subprocess.run([sys.executable, str(HERE / "fast_launch_check.py"), check],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith(f"ok {check}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_fast_launch_on_a_gpu_gives_tritons_results(monkeypatch, dense, mix, dtype):
    """On a GPU (benchmarks/gpu_check.sh's `-m cuda` step): the op's output and gradients
    through the fast launch are those with every launch through JITFunction.run, for a
    16-byte aligned x and a misaligned one, and no launch of the second call takes Triton's
    path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import reclora_kernels as rk
    from reclora_kernels.triton import fast_launch, launch

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, length, d, m, r, k = 8, 3, 96, 6, 4, 2

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    buf = rand(rows * length * d + 1)
    xs = {"aligned": buf[:-1].view(rows, length, d), "misaligned": buf[1:].view(rows, length, d)}
    weight, bias = rand(d, d), rand(d)
    lora_a, lora_b = rand(m, r, d), rand(m, d, r)
    if dense:
        adapter_w, adapter_idx = rand(rows, m), None
    else:
        adapter_w = rand(rows, k)
        adapter_idx = torch.randint(0, m, (rows, k), generator=g, device="cuda")

    def call(x):
        # x detached, not cloned: a clone would be a fresh, aligned allocation.
        leaves = [x.detach().requires_grad_(True)] + [
            t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b, adapter_w)]
        y = rk.lora_mix_linear(leaves[0], weight, bias, *leaves[1:3], leaves[3], adapter_idx,
                               scale=0.5, mix=mix, backend="triton", indices_checked=True)
        return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))

    slow = []
    real_slow = fast_launch._slow

    def counted_slow(*args):
        slow.append(1)
        return real_slow(*args)

    for name, x in xs.items():
        with monkeypatch.context() as mp:
            mp.setattr(launch, "run_kernel",
                       lambda meta, grid, *args: real_slow(meta, grid, args))
            want = call(x)
        call(x)  # fills the fast launch's cache for these shapes and alignments
        slow.clear()
        with monkeypatch.context() as mp:
            mp.setattr(fast_launch, "_slow", counted_slow)
            got = call(x)
        assert not slow, f"{name}: {len(slow)} launches went through JITFunction.run"
        # The forward has no atomics here (d = 96: one d-chunk, no split): equal to the bit.
        # The backward's segment sums add atomically, in no fixed order: dtype tolerances.
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg=name)
        for w, o in zip(want[1:], got[1:], strict=True):
            torch.testing.assert_close(o, w, msg=name)
