"""Host (Python + dispatch) cost of one lora_mix_linear call at tiny sizes, against F.linear.

    python benchmarks/bench_host.py [--threads 1] [--calls 2000] [--rounds 15]

At R = 2 rows of L = 2 tokens, d = 16, M = 4 adapters of rank 2 the arithmetic is nothing, so
the time per call is the op's fixed cost: argument checks, backend choice, the custom op's
dispatch (and its autograd layer when a gradient is needed), the kernel's own set-up.
Calls on CPU tensors take the C++ shortcut (csrc/direct_call.cpp), those with a gradient to
record through the op's C++ autograd (csrc/autograd.cpp); the forward+backward rows take one
gradient (W's for F.linear, lora_a's for the op). The module rows put nn.Linear beside a
ReclLoRALinear with a set mixture, both under no_grad, and the layer once more recording the
bank's gradient (a training forward).
KERNEL_SPEC's target: within 15 us of F.linear on the cpu backend. Each figure is the best of
`rounds` rounds of `calls` back-to-back calls (the minimum is the host cost without the noise
of other processes); every row is measured in the same run, interleaved round by round.
Writes benchmarks/results/host_overhead_cpu.md with the machine's name and load average.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reclora_kernels as rk  # noqa: E402
from reclora import ReclLoRALinear  # noqa: E402
from reclora_kernels import row_plan  # noqa: E402


def cases(backends: list[str]) -> dict[str, object]:
    torch.manual_seed(0)
    rows, length, d, m, r = 2, 2, 16, 4, 2
    x = torch.randn(rows, length, d)
    weight, bias = torch.randn(d, d), torch.randn(d)
    a, b, w = torch.randn(m, r, d), torch.randn(m, d, r), torch.randn(rows, m)
    idx = torch.randint(0, m, (rows, 2))
    w2 = torch.randn(rows, 2)
    a_grad = a.clone().requires_grad_(True)
    packed = x.reshape(-1, d)
    plan = row_plan(torch.arange(rows).repeat_interleave(length), rows)
    grad_y = torch.randn(rows, length, d)
    weight_grad = weight.clone().requires_grad_(True)
    out = {"F.linear": lambda: F.linear(x, weight, bias),
           "F.linear forward+backward": lambda: torch.autograd.grad(
               F.linear(x, weight_grad, bias), weight_grad, grad_y)}
    # The same sizes as modules, called as a model calls them (no_grad: the layer's base and
    # bank are parameters).
    linear = torch.nn.Linear(d, d)
    layer = ReclLoRALinear(d, d, num_adapters=m, rank=r)
    layer.set_mixture(w)

    out["nn.Linear module, no_grad"] = common.no_grad_call(linear, x)
    out["ReclLoRALinear module, no_grad"] = common.no_grad_call(layer, x)
    out["ReclLoRALinear module, forward with grad"] = lambda: layer(x)  # the bank's
    for backend in backends:
        out[f"op[{backend}] dense"] = lambda be=backend: rk.lora_mix_linear(
            x, weight, bias, a, b, w, scale=2.0, backend=be)
        out[f"op[{backend}] gathered, unchecked idx"] = lambda be=backend: rk.lora_mix_linear(
            x, weight, bias, a, b, w2, idx, scale=2.0, backend=be)
        out[f"op[{backend}] gathered, idx checked once"] = lambda be=backend: rk.lora_mix_linear(
            x, weight, bias, a, b, w2, idx, scale=2.0, backend=be, indices_checked=True)
        out[f"op[{backend}] packed with a plan"] = lambda be=backend: rk.lora_mix_linear(
            packed, weight, bias, a, b, w, scale=2.0, backend=be, plan=plan)
        out[f"op[{backend}] forward with grad (autograd)"] = lambda be=backend: rk.lora_mix_linear(
            x, weight, bias, a_grad, b, w, scale=2.0, backend=be)
        out[f"op[{backend}] forward+backward"] = lambda be=backend: torch.autograd.grad(
            rk.lora_mix_linear(x, weight, bias, a_grad, b, w, scale=2.0, backend=be), a_grad,
            grad_y)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=common.RESULTS / "host_overhead_cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = [b for b in ("cpu", "reference") if b in rk.available_backends()]
    fns = cases(backends)
    best = common.best_us_per_call(fns, rounds=args.rounds, calls=args.calls)
    base = best["F.linear"]
    lines = [
        "# Host cost per call at tiny sizes (CPU)",
        "",
        f"Machine: {common.cpu_name()} ({platform.node()}), {args.threads} thread(s), load "
        f"average {common.load_avg():.2f} at the end, torch {torch.__version__}, commit "
        f"{common.git_commit()}. R = 2, L = 2, d = 16, M = 4, r = 2; best of {args.rounds} "
        f"rounds of {args.calls} calls. Command: `python benchmarks/bench_host.py "
        f"{shlex.join(sys.argv[1:] if argv is None else argv)}`.",
        "",
        "| call | us per call | above F.linear (us) |",
        "|---|---|---|",
    ]
    for name, us in best.items():
        lines.append(f"| {name} | {us:.1f} | {us - base:+.1f} |")
    common.write_markdown(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
