"""What plain torch GEMMs need for a per-row LoRA in bf16 on this CPU, next to F.linear.

    python benchmarks/bf16_floor.py

For the three KERNEL_SPEC CPU sizes (factor mode, dense rows x [R, L, d], r = 8): F.linear,
the shrink as one thin bmm (x_r @ A_b^T), the expand as one baddbmm into y, and one
elementwise pass over y; medians of 200 calls after 20 warm-ups, 2 threads. The mixing of
the factors (R x k x r x d multiply-adds) is left out: it is a [R, k] x [k, r*d] GEMM.
Issue 13 asks for the whole op at <= 1.20x F.linear; these rows say how much of that the
LoRA part's two GEMMs alone take.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, n: int = 200) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure(d: int, tokens: int, rows: int) -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).bfloat16()
    w = torch.randn(d, d, generator=g).bfloat16()
    a = torch.randn(rows, 8, d, generator=g).bfloat16()
    b = torch.randn(rows, d, 8, generator=g).bfloat16()
    y = F.linear(x, w)
    xr, yr = x.view(rows, tokens // rows, d), y.view(rows, tokens // rows, d)
    s = torch.bmm(xr, a.transpose(1, 2))
    base = median_ms(lambda: F.linear(x, w))
    shrink = median_ms(lambda: torch.bmm(xr, a.transpose(1, 2)))
    expand = median_ms(lambda: yr.baddbmm_(s, b.transpose(1, 2)))
    one_pass = median_ms(lambda: y.add_(x))
    return (f"| d={d} T={tokens} R={rows} | {base:.3f} | {shrink:.3f} ({shrink / base:.2f}x) "
            f"| {expand:.3f} ({expand / base:.2f}x) | {one_pass:.3f} ({one_pass / base:.2f}x) "
            f"| {1 + (shrink + expand) / base:.2f}x |")


def main() -> None:
    torch.set_num_threads(2)
    print("| size | F.linear ms | thin shrink bmm | expand baddbmm into y | one pass over y "
          "| base + shrink + expand |")
    print("|---|---|---|---|---|---|")
    for d, tokens, rows in ((1024, 512, 4), (2048, 512, 4), (576, 1024, 8)):
        print(measure(d, tokens, rows))


if __name__ == "__main__":
    main()
