"""GFLOP/s of the CPU op's thin GEMMs, one core: MKL (torch.mm, and the op's gemm on its BLAS
path) beside csrc/cpu/thin_gemm.h's AVX2 loops (the op's gemm on its thin path), by thin side.

    python benchmarks/thin_gemm_rates.py [--d 1024] [--tokens 128] [--ranks 8,16,32]

The five shapes are the LoRA GEMMs of one run of `tokens` tokens (KERNEL_SPEC names): the shrink
x A^T, the expand s B^T into y (beta = 1), v = g B_p, and the factor gradients v^T x and g^T s;
the base x W^T is the reference rate. Each cell is the best of 7 repeats of 50 calls (CPU
timings; `torch.ops.reclora.cpu_gemm_f32` is the op's own fp32 gemm).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import common  # noqa: E402


def best_seconds(fn, calls: int = 50, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def shapes(tokens: int, d: int, r: int):
    """name -> (c, a, b, ta, tb, beta) for the op's gemm: c = op(a) op(b) + beta c."""
    g = torch.Generator().manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g)

    return {
        "shrink x A^T": (rnd(tokens, r), rnd(tokens, d), rnd(r, d), False, True, 0.0),
        "expand s B^T (+= y)": (rnd(tokens, d), rnd(tokens, r), rnd(r, d), False, False, 1.0),
        "v = g B_p": (rnd(tokens, r), rnd(tokens, d), rnd(d, r), False, False, 0.0),
        "dA = v^T x": (rnd(r, d), rnd(tokens, r), rnd(tokens, d), True, False, 1.0),
        "dB = g^T s": (rnd(d, r), rnd(tokens, d), rnd(tokens, r), True, False, 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--ranks", default="8,16,32")
    p.add_argument("--markdown", type=Path, default=common.RESULTS / "thin_gemm_cpu.md")
    args = p.parse_args(argv)
    from reclora_kernels import ops

    if not ops.NATIVE_CPU:
        print("thin_gemm_rates: the native cpu kernels are not built", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    switch, gemm = torch.ops.reclora.cpu_thin_gemm, torch.ops.reclora.cpu_gemm_f32
    before = switch(-1)
    d, t = args.d, args.tokens
    base_w, base_x = torch.randn(d, d), torch.randn(t, d)
    base = best_seconds(lambda: torch.mm(base_x, base_w.t()))
    load_start = common.load_avg()
    rows = []
    try:
        for r in (int(v) for v in args.ranks.split(",")):
            for name, (c, a, b, ta, tb, beta) in shapes(t, d, r).items():
                opa, opb = (a.t() if ta else a), (b.t() if tb else b)
                cells = [best_seconds(partial(torch.mm, opa, opb))]
                for mode in (0, 1):
                    switch(mode)
                    cells.append(best_seconds(partial(gemm, c, a, b, ta, tb, 1.0, beta)))
                flops = 2 * t * d * r
                rows.append((r, name, *(flops / s / 1e9 for s in cells)))
                print(f"r={r:3d} {name:22s} " + " ".join(f"{v:6.1f}" for v in rows[-1][2:]),
                      flush=True)
    finally:
        switch(before)
    prov = common.provenance(torch.device("cpu"))
    command = "python benchmarks/thin_gemm_rates.py " + " ".join(argv or sys.argv[1:])
    lines = [
        "# The CPU op's thin fp32 GEMMs: GFLOP/s on one core",
        "",
        f"- machine: {prov['device_name']}, 1 torch thread; torch {prov['torch']}, commit "
        f"{prov['commit'][:12]}, {prov['timestamp']}",
        f"- command: `{command.strip()}`; 1-min load average {load_start:.1f} at start",
        f"- d = {d}, {t} tokens; best of 7 repeats of 50 calls; base x W^T ({t} x {d} x {d}): "
        f"{2 * t * d * d / base / 1e9:.1f} GFLOP/s",
        "",
        "| thin side r | GEMM | torch.mm (MKL) | op's gemm, BLAS path | op's gemm, thin loops |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r} | {name} | {a:.1f} | {b:.1f} | {c:.1f} |" for r, name, a, b, c in rows]
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(lines) + "\n")
    print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
