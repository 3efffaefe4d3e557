#!/usr/bin/env python
"""Compile every Triton kernel the op launches for a GPU, on a machine without one.

    python scripts/triton_aot_check.py [--card "NVIDIA H200"] [--arch 90] [--out FILE]
                                       [--float64] [--as-jit] [--only REGEX]
                                       [--no-loop-spills]

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not the compiler: a kernel can
pass every CPU test and still fail to compile for a GPU (an op the MLIR lowering rejects, a
shared-memory budget overrun, a dtype rule of the installed triton). A GPU session has 15
minutes in all, so that failure should show here. This runs the op through the interpreter on
small CPU tensors (forward and backward, factor and output mixes, dense and gathered, implicit
and packed rows, short and long rows; fp32, bf16, fp16; the fused GEMM off, then on) with the
tile table and launch options of `--card` (reclora_kernels/configs), records each kernel
launch's argument types, constexpr values and num_warps / num_stages, and compiles each distinct
specialization with triton.compile for a CUDA target (`--arch`, default 90 = H100/H200) with the
ptxas bundled in triton's wheel. Prints one line a specialization (ok with its shared memory,
warps, stages, registers a thread and bytes spilled, read from the cubin by the wheel's
cuobjdump; or the error; shared memory past the 227 KiB a block can get on sm_90 is a
failure too) and exits 1 if any failed. Integer arguments are compiled as i32 or i64 without the
value specialisations the JIT adds on a GPU (1, multiples of 16), so the GPU's own compile may
take a variant of each; the code paths are the same, the registers are not. `--as-jit`
specialises as the JIT does (see jit_specialization) over cases with 16-aligned row strides,
and counts the spill instructions inside each tensor-core main loop: the registers a GPU run
gets (tests/test_triton_registers.py). `--only REGEX` compiles the matching lines alone.
`--float64` adds float64 cases (49 more specializations, 324 with the H100's table: 11.2
min on one core of this machine with an empty Triton cache, so tests/test_triton_compile.py
leaves them out): a GPU runs float64 too, and its fused GEMM's tiles do not fit there
(launch._fused_addressable plans around it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--record" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
else:
    os.environ.pop("TRITON_INTERPRET", None)  # compiling needs real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def record_launches(card: str, float64: bool = False, as_jit: bool = False) -> list[tuple]:
    """Run the op's cases through the interpreter; return (python fn, args, kwargs, launch
    options) of each kernel launch."""
    from triton.runtime.interpreter import InterpretedFunction

    import reclora_kernels as rk  # noqa: F401 - kernels decorated under the interpreter
    from reclora_kernels.triton.card_plan import use_card_tables

    if card != "interpret":
        use_card_tables(card)  # the H200's / H100's tile table, num_warps and num_stages
    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        launches.append((self.fn, args, kwargs, options))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        for case in cases(float64, as_jit):
            case()
        # Again with the fused GEMM (expand.fused) on in every size class: off by default,
        # it must compile for the card that a measurement may turn it on for.
        from reclora_kernels.triton.card_plan import force_fused

        force_fused(True, card)
        for case in cases(float64, as_jit):
            case()
    finally:
        InterpretedFunction.run = original
    return launches


def cases(float64: bool = False, aligned: bool = False):
    """Small calls that reach every kernel: each mix x layout x dtype, forward and backward
    (float64 as well where asked). `aligned`: d_in and d_out multiples of 16, as a model's
    are, so the JIT's divisibility hints match a model's launches (--as-jit)."""
    import reclora_kernels as rk

    m, k = 6, 2
    # 5 and 40 tokens a row: both size classes of a card table (its "_short_rows" entries
    # apply below short_rows_below = 32 tokens a row). Then decode: one token in each of 8
    # rows at d = 512, so few tiles that the shrinks split d (SPLIT_K > 1: the atomic path).
    sizes = [(dtype, length, 3, 40, 24, layouts, 4)
             for dtype in (torch.float32, torch.bfloat16, torch.float16)
             + ((torch.float64,) if float64 else ())
             for length in (5, 40) for layouts in [("implicit", "packed", "gathered")]]
    sizes += [(dtype, 1, 8, 512, 512, ("implicit", "gathered"), 4)
              for dtype in (torch.float32, torch.bfloat16)]
    # Rows of 128 tokens (a card's fused token tile): the fused GEMM's in-loop shrink, at
    # r = 4, 32 and 64 (64: the widest rank block, MAX_BLOCK_R, the most shared memory); then
    # r = 128, over one block (the separate shrinks, and output mode's 256-wide expand).
    sizes += [(dtype, 128, 2, 40, 24, ("implicit", "gathered"), rank)
              for dtype in (torch.float32, torch.bfloat16, torch.float16)
              for rank in (4, 32, 64, 128)]
    # float64 at a fused token tile: the fused GEMM's tiles do not fit sm_90's shared memory
    # in float64, so it must plan the cuBLAS-anchored order (launch._fused_addressable).
    if float64:
        sizes += [(torch.float64, 128, 2, 40, 24, ("implicit", "gathered"), 64)]
    if aligned:  # 40 x 24 -> 64 x 48: every row stride a multiple of 16 elements
        sizes = [(dt, n, rows, d_in if d_in % 16 == 0 else 64, d_out if d_out % 16 == 0 else 48,
                  layouts, r) for dt, n, rows, d_in, d_out, layouts, r in sizes]
    for dtype, length, rows, d_in, d_out, layouts, r in sizes:
        for mix in ("factor", "output"):
            for layout in layouts:
                def call(dtype=dtype, length=length, rows=rows, d_in=d_in, d_out=d_out,
                         mix=mix, layout=layout, r=r):
                    g = torch.Generator().manual_seed(0)

                    def rand(*shape, grad=True):
                        t = torch.randn(*shape, generator=g).to(dtype)
                        return t.requires_grad_(grad)

                    weight, bias = rand(d_out, d_in), rand(d_out)
                    # Unit-variance outputs: at r = 128 unscaled fp16 factors overflowed.
                    lora_a = (rand(m, r, d_in, grad=False) / d_in**0.5).requires_grad_()
                    lora_b = (rand(m, d_out, r, grad=False) / r**0.5).requires_grad_()
                    if layout == "gathered":
                        idx = torch.randint(0, m, (rows, k), generator=g)
                        w = rand(rows, k)
                    else:
                        idx, w = None, rand(rows, m)
                    kwargs = {"mix": mix, "scale": 0.5, "backend": "triton"}
                    if layout == "packed":
                        row_ids = torch.randint(0, rows, (rows * length,), generator=g)
                        x = rand(rows * length, d_in)
                        kwargs["plan"] = rk.row_plan(row_ids, rows)
                    else:
                        x = rand(rows, length, d_in)
                    y = rk.lora_mix_linear(x, weight, bias, lora_a, lora_b, w, idx, **kwargs)
                    y.float().square().sum().backward()
                yield call


def signature_of(jit, args, kwargs) -> tuple[dict, dict]:
    """A JITFunction's compile signature and constexpr values for one launch's arguments."""
    names = [p.name for p in jit.params]
    bound = dict(zip(names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for p in jit.params:
        value = bound.get(p.name, p.default if p.has_default else None)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{jit.__name__}: argument {p.name} of type {type(value).__name__}")
    return signature, constexprs


@functools.cache
def _binder(fn, arch: int):
    """(the JIT's argument binder for kernel `fn`, its backend): built once a kernel, not once
    a launch (it generates and execs a function)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return create_function_from_signature(jit.signature, jit.params, backend), backend


@functools.cache
def _jit(fn):
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def jit_specialization(fn, args, kwargs, arch: int) -> tuple[dict, list, list]:
    """A launch's (signature, constexprs, attributes) as triton's JIT derives them on a GPU:
    integer arguments equal to 1 become constexprs, and integers and pointers divisible by 16
    carry that hint (what lets the compiler vectorise a load). Constexprs and attributes are
    [path, value] pairs (JSON has no tuple keys)."""
    binder, backend = _binder(fn, arch)
    bound, specialization, _ = binder(*args, **kwargs)
    values = list(bound.values())
    signature = {p.name: kind
                 for p, (kind, _) in zip(_jit(fn).params, specialization, strict=True)}
    constexprs = [[[i], values[i]] for i, (kind, _) in enumerate(specialization)
                  if kind == "constexpr"]
    attrs = [[[i], backend.parse_attr(hint)] for i, (kind, hint) in enumerate(specialization)
             if kind != "constexpr" and isinstance(hint, str) and hint]
    return signature, constexprs, attrs


def record(card: str, float64: bool = False, as_jit: bool = False, arch: int = 90) -> list[dict]:
    """(In a child process under the interpreter.) The distinct specializations launched."""
    seen = {}
    for fn, a, kw, options in record_launches(card, float64, as_jit):
        if as_jit:
            signature, constexprs, attrs = jit_specialization(fn, a, kw, arch)
        else:
            (signature, constexprs), attrs = signature_of(_jit(fn), a, kw), []
        spec = {"kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
                "attrs": attrs, "options": options}
        seen.setdefault(json.dumps(spec, sort_keys=True), spec)
    return list(seen.values())


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump (the one in triton's wheel) run with `flag` over a compiled kernel."""
    import tempfile

    from triton.backends.nvidia.compiler import knobs

    tool = Path(knobs.nvidia.ptxas.path).with_name("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes per thread spilled to the stack or local memory)."""
    usage = _cuobjdump(cubin, "-res-usage")
    field = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    return field["REG"], field["STACK"] + field["LOCAL"]


def loop_spills(cubin: bytes) -> int | None:
    """Spill loads and stores (LDL/STL) inside the innermost loop that holds the tensor-core
    instructions (HGMMA/HMMA): a GEMM's main loop. None where no loop holds any. A spill in
    an epilogue costs once a tile; one in the main loop costs every K step."""
    code = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []  # [target, branch] of each backward branch
    for at, text in code:
        m = re.search(r"\bBRA (?:\S+ )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < at:
            loops.append((int(m.group(1), 16), at))
    mma = [at for at, text in code if "GMMA" in text or "HMMA" in text]
    holding = [(lo, hi) for lo, hi in loops if any(lo <= at <= hi for at in mma)]
    if not holding:
        return None
    lo, hi = min(holding, key=lambda span: span[1] - span[0])
    return sum(lo <= at <= hi and re.search(r"\b(LDL|STL)\b", text) is not None
               for at, text in code)


def describe(spec: dict) -> tuple[str, dict, dict]:
    """(the line's head: kernel [pointer dtypes] constexprs options, constexprs and attributes
    keyed as triton.compile takes them)."""
    from reclora_kernels.triton import kernels

    name, signature, constexprs = spec["kernel"], spec["signature"], spec["constexprs"]
    fn = getattr(kernels, name)
    if isinstance(constexprs, list):  # --as-jit: [path, value] pairs, by position
        constexprs = {tuple(path): value for path, value in constexprs}
        shown = {fn.arg_names[path[0]]: value for path, value in constexprs.items()
                 if fn.params[path[0]].is_constexpr}
        ones = [fn.arg_names[path[0]] for path, value in constexprs.items()
                if not fn.params[path[0]].is_constexpr and value == 1]
    else:
        shown, ones = constexprs, []
    attrs = {tuple(path): value for path, value in spec.get("attrs", [])}
    dtypes = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
    consts = " ".join(f"{k}={v}" for k, v in shown.items() if v is not None)
    consts += "".join(f" {k}={v}" for k, v in spec["options"].items())
    if ones:  # arguments the JIT specialised to 1 (--as-jit)
        consts += " =1:" + ",".join(ones)
    return f"{name} [{dtypes}] {consts}", constexprs, attrs


def compile_all(specs: list[dict], arch: int, only: str | None = None, loops: bool = False,
                no_loop_spills: bool = False) -> tuple[list[str], int]:
    """(In this process, no interpreter: the interpreter patches triton.language while it
    runs, so compiling must happen where it never ran.) `only`: a regex over each line's
    head. `loops`: count the spills in each tensor-core loop (reading the SASS takes ~1 s for
    a fused GEMM, so not in the default run). `no_loop_spills`: such a spill fails it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from reclora_kernels.triton import kernels
    from reclora_kernels.triton.card_plan import SMEM_PER_BLOCK_OPTIN

    target = GPUTarget("cuda", arch, 32)
    lines, failed = [], 0
    for spec in sorted(specs, key=lambda s: json.dumps(s, sort_keys=True)):
        head, constexprs, attrs = describe(spec)
        if only and not re.search(only, head):
            continue
        try:
            compiled = triton.compile(
                ASTSource(getattr(kernels, spec["kernel"]), spec["signature"], constexprs,
                          attrs), target=target, options=spec["options"])
            meta = compiled.metadata
            regs, spill = resource_usage(compiled.asm["cubin"])
            in_loop = loop_spills(compiled.asm["cubin"]) if loops or no_loop_spills else None
            line = (f"{head}: shared {meta.shared} B, {meta.num_warps} warps, "
                    f"{meta.num_stages} stages, {regs} registers, {spill} B spilled"
                    + (f", {in_loop} spill instructions in the MMA loop"
                       if in_loop is not None else ""))
            if meta.shared > SMEM_PER_BLOCK_OPTIN:  # the launch would fail: out of resources
                failed += 1
                lines.append(f"FAIL  {line} (over the {SMEM_PER_BLOCK_OPTIN} B a block gets)")
            elif no_loop_spills and in_loop:
                failed += 1
                lines.append(f"FAIL  {line} (spills in the main loop)")
            else:
                lines.append(f"ok    {line}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status
            failed += 1
            detail = " | ".join(str(e).strip().splitlines()[-3:]) or type(e).__name__
            lines.append(f"FAIL  {head}: {type(e).__name__}: {detail[:600]}")
    return lines, failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", type=Path, default=None, help="also write the lines here")
    p.add_argument("--card", default="NVIDIA H100 80GB HBM3",
                   help="whose tile table the launches use, as torch.cuda.get_device_name "
                        "spells it (a card without reclora_kernels/configs/<card>.json gets "
                        "default.json's cuda table, e.g. 'NVIDIA H200'), or 'interpret' for "
                        "the CPU interpreter's")
    p.add_argument("--float64", action="store_true",
                   help="add the float64 cases (not in CI: see the docstring)")
    p.add_argument("--as-jit", action="store_true",
                   help="specialise as triton's JIT does on a GPU (arguments equal to 1 as "
                        "constants, divisible-by-16 hints) over cases whose row strides are "
                        "multiples of 16, as a model's are: the registers and spills a GPU "
                        "run would see")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="compile only the specializations whose line (kernel, dtypes, "
                        "constexprs) matches, e.g. 'expand_kernel.*bf16'")
    p.add_argument("--no-loop-spills", action="store_true",
                   help="fail a specialization that spills inside its tensor-core main loop")
    p.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.record:
        print(json.dumps(record(args.card, args.float64, args.as_jit, args.arch)))
        return 0
    child = subprocess.run([sys.executable, __file__, "--record", "--card", args.card,
                            "--arch", str(args.arch),
                            *(["--float64"] if args.float64 else []),
                            *(["--as-jit"] if args.as_jit else [])],
                           capture_output=True, text=True,
                           env=os.environ | {"TRITON_INTERPRET": "1"})
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        return 2
    specs = json.loads(child.stdout.strip().splitlines()[-1])
    lines, failed = compile_all(specs, args.arch, args.only, args.as_jit, args.no_loop_spills)
    lines.insert(0, f"triton {triton.__version__}, torch {torch.__version__}, target "
                    f"sm_{args.arch}, {args.card} tables: {len(specs)} distinct "
                    f"specializations launched, {len(lines)} compiled, "
                    f"{failed} failed to compile")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
