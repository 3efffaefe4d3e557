"""What plain torch GEMMs need for a per-row LoRA in bf16 on this CPU, next to F.linear.

    python benchmarks/bf16_floor.py

For the three KERNEL_SPEC CPU sizes (factor mode, dense rows x [R, L, d], r = 8): F.linear,
the shrink as one thin bmm (x_r @ A_b^T), the expand as one baddbmm into y, and one
elementwise pass over y; timed in interleaved rounds (common.time_cpu_interleaved, 2 threads),
ratios to F.linear paired round by round. The mixing of the factors (R x k x r x d
multiply-adds) is left out: it is a [R, k] x [k, r*d] GEMM. Issue 13 asks for the whole op at
<= 1.20x F.linear; these rows say how much of that the LoRA part's two GEMMs alone take.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(d: int, tokens: int, rows: int) -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).bfloat16()
    w = torch.randn(d, d, generator=g).bfloat16()
    a = torch.randn(rows, 8, d, generator=g).bfloat16()
    b = torch.randn(rows, d, 8, generator=g).bfloat16()
    y = F.linear(x, w)
    xr, yr = x.view(rows, tokens // rows, d), y.view(rows, tokens // rows, d)
    s = torch.bmm(xr, a.transpose(1, 2))
    t = common.time_cpu_interleaved({
        "base": lambda: F.linear(x, w),
        "shrink": lambda: torch.bmm(xr, a.transpose(1, 2)),
        "expand": lambda: yr.baddbmm_(s, b.transpose(1, 2)),
        "pass": lambda: y.add_(x),
    }, warmup=20, min_rounds=200, max_rounds=200)
    ratio = {k: common.paired_ratio(v, t["base"]) for k, v in t.items()}
    cells = [f"{t[k].median_ms:.3f} ({ratio[k]:.2f}x)" for k in ("shrink", "expand", "pass")]
    return (f"| d={d} T={tokens} R={rows} | {t['base'].median_ms:.3f} | " + " | ".join(cells)
            + f" | {1 + ratio['shrink'] + ratio['expand']:.2f}x |")


def main() -> None:
    torch.set_num_threads(2)
    print(f"{common.cpu_name()}, 2 torch threads, load average {common.load_avg():.2f}")
    print("| size | F.linear ms | thin shrink bmm | expand baddbmm into y | one pass over y "
          "| base + shrink + expand |")
    print("|---|---|---|---|---|---|")
    for d, tokens, rows in ((1024, 512, 4), (2048, 512, 4), (576, 1024, 8)):
        print(measure(d, tokens, rows))


if __name__ == "__main__":
    main()
