"""The hot Triton kernels' registers as a GPU's JIT compiles them for sm_90, on this machine
without one (scripts/triton_aot_check.py --as-jit: value specialisations and divisibility
hints as the JIT applies them; registers, spill bytes and spills inside the tensor-core loop
read from the cubin). Apart from tests/test_triton_compile.py so that pytest-xdist's
loadfile runs the two on different workers: with an empty Triton cache each takes minutes."""

from __future__ import annotations

import pytest
from test_triton_compile import aot_check

# The launches a model's bf16 forward makes on an H100 by default (the expand's 64 x 128 tile)
# or once a measurement turns the fused GEMM on (its 128 x 256 TMA tiles).
HOT = (r"expand_kernel \[\*bf16.*BLOCK_T=64 BLOCK_N=128"
       r"|fused_linear_kernel \[\*bf16.*BLOCK_T=128 BLOCK_N=256.*TMA=True")


@pytest.mark.timeout(900)
def test_hot_kernels_do_not_spill_as_the_jit_compiles_them():
    """Registers as a GPU's JIT compiles the kernels (arguments equal to 1 as constants,
    divisible-by-16 hints; scripts/triton_aot_check.py --as-jit): the expand's tile spills
    nothing, and the fused GEMM spills nothing inside its main loop. Its epilogue used to sum
    a tile's rows in a second [T, N] accumulator; the compiler then kept acc in local memory
    across the main loop (128 of its ~210 instructions were spill loads and stores)."""
    done, report = aot_check("--as-jit", "--only", HOT, "--no-loop-spills", timeout=880)
    assert done.returncode == 0, report
    lines = done.stdout.splitlines()[1:]
    expand = [line for line in lines if line.startswith("ok    expand_kernel")]
    fused = [line for line in lines if "fused_linear_kernel" in line]
    assert len(expand) >= 8 and len(fused) >= 8, report
    assert all(" registers, 0 B spilled" in line for line in expand), report
    assert all(", 0 spill instructions in the MMA loop" in line for line in fused), report
