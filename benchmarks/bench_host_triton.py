"""Python host cost of the Triton path (the GPU default), measured on a CPU: issue 12's decode
row asks for <= 60 us of eager host time per call at T = 64 in 8 rows.

    python benchmarks/bench_host_triton.py [--calls 2000] [--rounds 15] [--out FILE]

There is no GPU here, so every Triton kernel launch is replaced by a counter (the kernels
themselves are checked elsewhere: the op suite under the interpreter, scripts/
triton_aot_check.py for sm_90). What is left is everything the op does on the host for a
CUDA call except Triton's own launcher and the CUDA driver: the argument checks, the backend
choice, the custom op's wrappers, the launch plan (configs, grids, strides), and torch's
calls for the mixing GEMMs, cuBLAS's base and the buffers (here running on tiny CPU tensors,
d = 16, so their arithmetic is nothing). On the GPU add, per launch, Triton's launcher and
the driver: the table's launch counts say how many.

Each case repeats one call with the same shapes, as decode steps do: the op then replays the
checks and the launch plan it kept for that signature (reclora_kernels/triton/eager.py); the
"signature not seen before" row forgets them before every call.

Launch counts: Triton kernels counted by the stubs; torch kernels by a TorchDispatchMode
(each aten op that computes is one GPU kernel launch; views and allocations excluded).
Timing as bench_host.py: the best of `rounds` rounds of `calls` back-to-back calls, all rows
interleaved round by round, one thread. Writes a markdown table with the machine's name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# Triton's path on CPU tensors (see the docstring); the --with-launcher child process keeps
# real JITFunctions instead, so it must decide before triton decorates the kernels.
WITH_LAUNCHER = "--with-launcher" in sys.argv
if WITH_LAUNCHER:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reclora_kernels as rk  # noqa: E402
from reclora import ReclLoRALinear  # noqa: E402
from reclora_kernels import row_plan  # noqa: E402
from reclora_kernels.triton import eager as triton_eager  # noqa: E402
from reclora_kernels.triton import kernels, launch  # noqa: E402
from reclora_kernels.triton.card_plan import force_fused  # noqa: E402

# aten ops that launch no kernel on a GPU (views, metadata, allocation without a fill).
_NO_LAUNCH = ("view", "reshape", "_reshape_alias", "t", "transpose", "expand", "as_strided",
              "empty", "empty_like", "new_empty", "empty_strided", "detach", "alias",
              "_unsafe_view", "unsqueeze", "squeeze", "select", "slice", "permute",
              "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "is_same_size")


class _Stub:
    """Stands in for a Triton kernel: `kernel[grid](...)` counts a launch and does nothing."""

    def __init__(self, counts: dict[str, int], name: str):
        self.counts, self.name = counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return launch


def stub_kernels() -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in dir(kernels):
        if name.endswith("_kernel"):
            setattr(kernels, name, _Stub(counts, name))
    return counts


class _CountKernels(TorchDispatchMode):
    """Counts the aten ops that would each launch a GPU kernel (not views or allocations).
    The op's own custom op is one opaque op to a mode outside it; `count_inside` puts
    another inside the Triton launch plan."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if func.namespace == "aten" and name not in _NO_LAUNCH:
            if not (name == "to" and out is args[0]):  # a `to` that changes nothing is free
                self.names.append(name)
        return out


def count_inside(names: list[str]) -> None:
    """Wrap launch.forward / launch.backward so the ops they run are counted into `names`."""
    for attr in ("forward", "backward"):
        inner = getattr(launch, attr)

        def counted(*args, _inner=inner, **kwargs):
            with _CountKernels(names):
                return _inner(*args, **kwargs)
        setattr(launch, attr, counted)


# The card whose tile table and SM count the --with-launcher run uses (an H200: what the GPU
# machine has).
CARD = "NVIDIA H200"


class _NoKernel:
    """A compiled kernel whose launch does nothing (no cuLaunchKernel here)."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def fake_gpu_launches() -> None:
    """Real Triton JITFunction launches (argument binding, specialization, cache key, kernel
    lookup) with a driver that pretends to be an H200's and a compile that returns a kernel
    whose launch does nothing; the launch plan uses the H200's tile table."""
    from reclora_kernels import ops
    from reclora_kernels.triton.card_plan import stand_in_launches, use_card_tables

    stand_in_launches(lambda key: _NoKernel())
    ops._triton_usable = lambda: True  # the triton backend takes CPU tensors
    use_card_tables(CARD)


def with_launcher(calls: int, rounds: int, tritons_run: bool,
                  fused: bool = False) -> dict[str, float]:
    """The cases' host us per call with a GPU call's launch path, from a child process;
    `tritons_run`: every launch through JITFunction.run (fast_launch's cache off); `fused`:
    the fused GEMM forced on in the card's table."""
    cmd = [sys.executable, __file__, "--with-launcher", "--calls", str(calls),
           "--rounds", str(rounds)] + (["--tritons-run"] if tritons_run else []) + (
           ["--fused"] if fused else [])
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def tritons_run_only() -> None:
    """Every launch through Triton's JITFunction.run, as before fast_launch.py."""
    from reclora_kernels.triton import fast_launch

    launch.run_kernel = lambda meta, grid, *args: fast_launch._slow(meta, grid, args)


def cases() -> dict[str, object]:
    """T = 64 tokens in 8 rows (the decode row of issue 12) at d = 16: host cost only."""
    torch.manual_seed(0)
    rows, length, d, m, r, k = 8, 8, 16, 16, 8, 4
    x = torch.randn(rows, length, d)
    weight, bias = torch.randn(d, d), torch.randn(d)
    a, b, w = torch.randn(m, r, d), torch.randn(m, d, r), torch.randn(rows, m)
    idx, wk = torch.randint(0, m, (rows, k)), torch.randn(rows, k)
    packed = x.reshape(-1, d)
    plan = row_plan(torch.arange(rows).repeat_interleave(length), rows)
    a_grad = a.clone().requires_grad_(True)
    grad_y = torch.randn(rows, length, d)

    def op(*args, **kw):
        return rk.lora_mix_linear(*args, scale=2.0, backend="triton", **kw)

    # As a model calls them: nn.Linear beside a ReclLoRALinear with a set mixture (its bank's
    # factors mixed per row), both under no_grad.
    linear = torch.nn.Linear(d, d)
    layer = ReclLoRALinear(d, d, num_adapters=m, rank=r, backend="triton")
    layer.set_mixture(w)

    def unseen_output():
        # A repeat replays the checks and the launch plan kept for its signature
        # (reclora_kernels/triton/eager.py); forgetting them times a first call's path.
        triton_eager._CALLS.clear()
        return op(x, weight, bias, a, b, w, mix="output")

    return {
        "F.linear": lambda: F.linear(x, weight, bias),
        "op[triton] dense factor": lambda: op(x, weight, bias, a, b, w),
        "op[triton] dense output": lambda: op(x, weight, bias, a, b, w, mix="output"),
        "op[triton] dense output, signature not seen before": unseen_output,
        "op[triton] gathered k=4, idx checked once": lambda: op(
            x, weight, bias, a, b, wk, idx, indices_checked=True),
        "op[triton] gathered k=4, unchecked idx": lambda: op(x, weight, bias, a, b, wk, idx),
        "op[triton] packed with a plan": lambda: op(packed, weight, bias, a, b, w, plan=plan),
        "op[triton] forward with grad (autograd)": lambda: op(x, weight, bias, a_grad, b, w),
        "op[triton] forward+backward": lambda: torch.autograd.grad(
            op(x, weight, bias, a_grad, b, w), a_grad, grad_y),
        "nn.Linear module, no_grad": common.no_grad_call(linear, x),
        "ReclLoRALinear module (triton), no_grad": common.no_grad_call(layer, x),
    }


def launches(fn, triton_counts: dict[str, int]) -> tuple[int, int]:
    """(Triton launches, torch kernel launches) of one call."""
    fn()  # the launch plan's caches (index tables, constants) filled, as in the timed calls
    triton_counts.clear()
    names: list[str] = []
    count_inside(names)
    try:
        with _CountKernels(names):
            fn()
    finally:
        importlib.reload(launch)  # the timed calls run unwrapped
    return sum(triton_counts.values()), len(names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=common.RESULTS / "host_overhead_triton_cpu.md")
    p.add_argument("--with-launcher", action="store_true",
                   help="(internal) time the cases with a GPU call's launch path; print JSON")
    p.add_argument("--fused", action="store_true",
                   help="(internal, with --with-launcher) the fused GEMM forced on")
    p.add_argument("--tritons-run", action="store_true",
                   help="(internal, with --with-launcher) every launch by JITFunction.run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # The stubbed kernels never write their outputs, so the CPU ops that read them (the
    # backward's GEMM w^T dA_p) can meet denormal garbage: on the Xeon that cost forward+
    # backward 20-40 us a call in one launch path and not another. Flushed, the time is the
    # host's alone (on a GPU those ops are device kernels).
    torch.set_flush_denormal(True)
    if args.with_launcher:
        fake_gpu_launches()
        if args.tritons_run:
            tritons_run_only()
        if args.fused:
            force_fused(True, CARD)
        print(json.dumps(common.best_us_per_call(cases(), rounds=args.rounds,
                                                 calls=args.calls)))
        return 0
    if "triton" not in rk.available_backends():
        print("bench_host_triton: needs triton (TRITON_INTERPRET=1 on a CPU)", file=sys.stderr)
        return 2
    counts = stub_kernels()
    fns = cases()
    launch_counts = {name: launches(fn, counts) for name, fn in fns.items()}
    best = common.best_us_per_call(fns, rounds=args.rounds, calls=args.calls)
    # The two launch paths' processes alternate (twice each, the best kept): the machine's
    # drift falls on both alike.
    tritons, launcher, fused = {}, {}, {}
    for _ in range(2):
        for tritons_run, fuse, best_of in ((True, False, tritons), (False, False, launcher),
                                           (False, True, fused)):
            for name, us in with_launcher(args.calls, args.rounds, tritons_run, fuse).items():
                best_of[name] = min(us, best_of.get(name, us))
    base = best["F.linear"]
    lines = [
        "# Host cost per call of the Triton path, its kernel launches stubbed (CPU proxy)",
        "",
        f"Machine: {common.cpu_name()} ({platform.node()}), 1 thread, load average "
        f"{common.load_avg():.2f} at the end, torch {torch.__version__}, triton "
        f"{common.triton_version()}, commit {common.git_commit()}. T = 64 tokens in R = 8 rows "
        f"(issue 12's decode row) at d = 16, M = 16, r = 8; best of {args.rounds} rounds of "
        f"{args.calls} calls. Command: `python benchmarks/bench_host_triton.py "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}`.",
        "",
        "Not a GPU figure: Triton's launcher and the driver's launch cost (per launch, times "
        "the counts here) come on top on a GPU; benchmarks/gpu_targets.py measures the whole.",
        "",
        "The last two columns run the same calls as a GPU call would launch its kernels, in "
        "a process without the interpreter: real JITFunctions, a driver that answers as an "
        f"{CARD}'s, a compiled kernel whose launch does nothing and the {CARD}'s tile table. "
        "That is all of a GPU call's host time but Triton's launcher (CudaLauncher) and the "
        "CUDA driver's. `JITFunction.run`: every launch binds, specializes and hashes its "
        "arguments (Triton's own path); `fast launch`: the op's path, where a launch of a "
        "kind seen before calls the compiled kernel directly "
        "(reclora_kernels/triton/fast_launch.py). `fast launch, fused GEMM`: the same with "
        "the fused GEMM (expand.fused) forced on in that table, as benchmarks/tune_triton.py "
        "turns it on where it measures faster; the tensors are fp32, so it plans the "
        "fused kernel's pointer variant (its TMA variant is for bf16/fp16; it adds a check "
        "of two base addresses and of Triton's allocator a call).",
        "",
        "| call | host us per call, launches stubbed | above F.linear (us) | Triton launches "
        "| torch kernels | host us, JITFunction.run | host us, fast launch "
        "| host us, fast launch, fused GEMM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, us in best.items():
        tri, tor = launch_counts[name]
        lines.append(f"| {name} | {us:.1f} | {us - base:+.1f} | {tri} | {tor} "
                     f"| {tritons[name]:.1f} | {launcher[name]:.1f} | {fused[name]:.1f} |")
    common.write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
