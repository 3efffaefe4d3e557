"""Where the time of one lora_mix_linear call goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_op.py [--backend triton] [--tokens 8192] [--rows 64]

bf16, d = 4096, 16 meta-LoRAs of rank 8, dense factor mode (KERNEL_SPEC.md's sizes);
forward, then forward+backward with the base frozen. GPU only.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from reclora_kernels import lora_mix_linear


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--mix", default="factor")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_op: needs a CUDA GPU", file=sys.stderr)
        return 2
    d, m, r, dt = 4096, 16, 8, torch.bfloat16
    rows, length = args.rows, args.tokens // args.rows
    x = torch.randn(rows, length, d, device="cuda", dtype=dt)
    weight = torch.randn(d, d, device="cuda", dtype=dt) / d**0.5
    a = (torch.randn(m, r, d, device="cuda", dtype=dt) / d**0.5).requires_grad_()
    b = (torch.randn(m, d, r, device="cuda", dtype=dt) / r**0.5).requires_grad_()
    w = torch.softmax(torch.randn(rows, m, device="cuda"), -1).to(dt).requires_grad_()
    g = torch.randn(rows, length, d, device="cuda", dtype=dt)

    def forward():
        return lora_mix_linear(x, weight, None, a, b, w, scale=2.0, mix=args.mix,
                               backend=args.backend)

    def forward_backward():
        torch.autograd.grad(forward(), [a, b, w], g)

    for name, fn in (("base F.linear", lambda: F.linear(x, weight)), ("forward", forward),
                     ("forward+backward", forward_backward)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"\n== {name} (10 calls, {args.backend}, T={args.tokens}, R={rows}, {args.mix})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
