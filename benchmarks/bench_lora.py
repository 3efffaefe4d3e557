"""Side-by-side benchmark of `lora_mix_linear` against its roofline and its baselines.

    python benchmarks/bench_lora.py            # every suite on the auto-picked device
    python benchmarks/bench_lora.py --quick    # about a minute on a 2-core CPU

Rows, all measured in one run on the same inputs:
- `F.linear (base)`: the base projection alone, the roofline every ratio is taken against;
- `lora_mix_linear[<backend>]` for every backend available at run time (Triton only on a GPU:
  on a CPU it runs under the interpreter, which is not a speed);
- `materialise+bmm`: the RecLoRA reference code's path (factor mix only);
- `PEFT-style loop`, `naive two-GEMM`: see benchmarks/baselines.py;
- on a GPU, for the k = 1 suites, `vLLM-style stand-in`: a shrink + expand pair of Triton
  kernels written in baselines.py after vLLM's design; a stand-in, not vLLM's own kernels.

Modes: `fwd` is an inference forward (torch.no_grad); `bwd` is the backward alone, replayed on
a retained graph; `fwd+bwd` is a training step's share (forward, then backward). The base is
frozen; x, the banks and the mixture weights require grad (as for a middle layer under
RecLoRA training). Each row: median with p20 and p80 (ms), peak memory above the inputs
(MiB), and the ratio to the base: on a GPU the ratio of medians; on a CPU, where the
candidates run interleaved round by round, the median of the per-round ratios, so load from
other processes that comes and goes between rounds cancels out.

On a GPU, `--graphs` adds, for the forward, each implementation timed under CUDA-graph
replay (rows "<impl> (graph replay)", one graph per input set of the pool, replayed in turn;
the op is capture-safe) and its host time per eager call (rows "<impl> (host us/call)", whose
time column is host milliseconds per call), measured with benchmarks/timing.py: at decode
sizes the launch path, not the GPU, sets the pace. A capture or host timing that fails is a
row with its error. The GPU verdicts take their limits from benchmarks/gpu_targets.py.

Results are appended to benchmarks/results/bench_lora.csv (with device, torch, triton, git
commit, CPU thread count and load); a full run also writes benchmarks/results/<device>.md and
a plot of the ratio against T per implementation, benchmarks/results/bench_lora_<device>.png.
--suites, --modes, --mixes and --dtypes take only the names listed in --help (a typo is refused
before anything runs, as are counts below 1 and output paths that cannot be written); a case
in which every candidate failed is not appended to the CSV, and a run that measured no row
writes nothing and exits 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import baselines, common, gpu_targets, roofline  # noqa: E402
from benchmarks.common import comma_choices, finite_float  # noqa: E402
from reclora.cli import (  # noqa: E402
    SEED_MAX,
    ArgumentParser,
    device_option,
    int_at_least,
    int_between,
)
from reclora_kernels import available_backends, lora_mix_linear  # noqa: E402

BASE = "F.linear (base)"
MATERIALISE = "materialise+bmm (ref code)"
PEFT = "PEFT-style loop"
NAIVE = "naive two-GEMM"
VLLM = "vLLM-style stand-in"
GRAPH, HOST = " (graph replay)", " (host us/call)"  # suffixes of the --graphs rows
MODES = ("fwd", "bwd", "fwd+bwd")
SUITES = ("spec", "smollm", "k1", "sweep-T", "sweep-M")
MIXES = ("factor", "output")
# --dtype / --dtypes: the floating dtypes by torch's names (any other name is refused).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MAX_THREADS = 1024  # --threads: far past any core count; a huge count aborted in libgomp
SCALE = 2.0  # RecLoRA: alpha 16 / r 8


@dataclass(frozen=True)
class Case:
    suite: str  # spec | smollm | k1 | sweep-T | sweep-M
    d_in: int
    d_out: int
    tokens: int  # T
    rows: int  # R (T / R tokens per row)
    adapters: int  # M
    slots: int  # k (= M when dense)
    rank: int
    gathered: bool
    unit_weights: bool = False  # k = 1 per-row multi-LoRA: w = 1, as Punica / vLLM

    @property
    def length(self) -> int:
        return self.tokens // self.rows

    @property
    def label(self) -> str:
        kind = (
            f"gather M={self.adapters} k={self.slots}"
            if self.gathered
            else f"dense M={self.adapters}"
        )
        return f"d={self.d_in} T={self.tokens} R={self.rows} {kind} r={self.rank}"


# --- the sizes --------------------------------------------------------------------------------


def cases_for(device: torch.device, suites: list[str], quick: bool) -> list[Case]:
    """KERNEL_SPEC sizes (GPU: d 4096, T 8192 in 64 rows, 16 meta-LoRAs r 8, and the decode
    case T 64 in 8 rows; CPU: the three (d, T) pairs) plus the sweeps over T and over M.
    T / R = 128 tokens per row where the spec leaves R open (the GPU spec's 8192 / 64), and
    R = min(64, T) in the T sweep, so T = 64 there is one token per row."""
    out: list[Case] = []
    gpu = device.type == "cuda"
    if "spec" in suites:
        if gpu:
            out += [
                Case("spec", 4096, 4096, 8192, 64, 16, 16, 8, False),
                Case("spec", 4096, 4096, 64, 8, 16, 16, 8, False),  # decode (gpu_targets')
                Case("spec", 4096, 4096, 8192, 64, 4096, 4, 8, True),
            ]
        else:
            out += [
                Case("spec", d, d, t, t // 128, 16, 16, 8, False)
                for d, t in ((1024, 512), (2048, 512), (576, 1024))
            ]
    if "smollm" in suites and not gpu:
        # The main job's layer: SmolLM2-135M's q_proj/v_proj (576 -> 576), a training batch of
        # 8 prompts of ~200 tokens, 16 meta-LoRAs of rank 8.
        out.append(Case("smollm", 576, 576, 1600, 8, 16, 16, 8, False))
    if "k1" in suites:
        d, ts = (4096, (8192, 64)) if gpu else (1024, (512,))
        out += [Case("k1", d, d, t, 64, 16, 1, 8, True, unit_weights=True) for t in ts]
    if "sweep-T" in suites:
        d = 4096 if gpu else 576
        ts = (64, 256, 1024, 4096, 8192, 16384) if gpu else (64, 256, 1024, 4096, 16384)
        if quick:
            ts = (64, 1024, 8192) if gpu else (64, 1024, 4096)
        out += [Case("sweep-T", d, d, t, min(64, t), 16, 16, 8, False) for t in ts]
    if "sweep-M" in suites:
        d, t = (4096, 8192) if gpu else (576, 1024)
        ms = (1, 16, 256, 4096) if not quick else (16, 4096)
        out += [Case("sweep-M", d, d, t, 64, m, min(4, m), 8, True) for m in ms]
    return out


# --- inputs -----------------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    adapter_w: torch.Tensor
    adapter_idx: torch.Tensor | None
    grad_y: torch.Tensor

    def args(self):
        return (
            self.x,
            self.weight,
            self.bias,
            self.lora_a,
            self.lora_b,
            self.adapter_w,
            self.adapter_idx,
        )

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.lora_a, self.lora_b, self.adapter_w]

    def nbytes(self) -> int:
        ts = [self.x, self.weight, self.lora_a, self.lora_b, self.grad_y]
        return sum(t.numel() * t.element_size() for t in ts)


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """Random, never zero (B is not zero-initialised here, unlike training's start, so no
    kernel can skip work); the weights are a softmax gate's output as in RecLoRA."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = randn(case.rows, case.length, case.d_in)
    weight = randn(case.d_out, case.d_in, std=case.d_in**-0.5)
    lora_a = randn(case.adapters, case.rank, case.d_in, std=case.d_in**-0.5)
    lora_b = randn(case.adapters, case.d_out, case.rank, std=0.02)
    if case.unit_weights:
        adapter_w = torch.ones(case.rows, case.slots, device=device, dtype=dtype)
    else:
        adapter_w = torch.softmax(torch.randn(case.rows, case.slots, generator=g), -1).to(
            device=device, dtype=dtype
        )
    idx = None
    if case.gathered:
        idx = torch.stack(
            [torch.randperm(case.adapters, generator=g)[: case.slots] for _ in range(case.rows)]
        ).to(device)
    grad_y = randn(case.rows, case.length, case.d_out)
    # Llama's q_proj / v_proj have no bias; the base stays frozen.
    inp = Inputs(x, weight, None, lora_a, lora_b, adapter_w, idx, grad_y)
    for t in inp.leaves():
        t.requires_grad_(True)
    return inp


# --- the candidates ---------------------------------------------------------------------------


def bench_backends(device: torch.device) -> list[str]:
    """Backends of lora_mix_linear worth timing on this device."""
    keep = []
    for b in available_backends():
        if b == "triton" and device.type != "cuda":
            continue  # only the interpreter on a CPU: correct, but not a speed
        if (b == "cuda" and device.type != "cuda") or (b == "cpu" and device.type != "cpu"):
            continue
        keep.append(b)
    return keep


Fn = Callable[..., torch.Tensor]


def candidates(case: Case, mix: str, device: torch.device, mode: str) -> dict[str, Fn]:
    out: dict[str, Fn] = {BASE: lambda x, w, b, *_: F.linear(x, w, b)}
    for backend in bench_backends(device):

        def op(x, w, b, a, bb, aw, idx, _backend=backend):
            return lora_mix_linear(x, w, b, a, bb, aw, idx, scale=SCALE, mix=mix, backend=_backend)

        out[f"lora_mix_linear[{backend}]"] = op
    if mix == "factor":
        out[MATERIALISE] = lambda *a: baselines.materialise_bmm(*a, SCALE, mix)
    out[PEFT] = lambda *a: baselines.peft_loop(*a, SCALE, mix)
    out[NAIVE] = lambda *a: baselines.naive_two_gemm(*a, SCALE, mix)
    if device.type == "cuda" and mode == "fwd" and case.slots == 1 and _has_triton():
        out[VLLM] = lambda *a: baselines.vllm_style_shrink_expand(*a, SCALE, mix)
    return out


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_call(fn: Fn, name: str, inp: Inputs, mode: str, case: Case, mix: str):
    """A no-argument callable that runs one rep of `mode`; for `bwd`, the forward it replays
    is run here, once (its graph retained)."""
    if mode not in MODES:  # an unknown mode once fell through to the backward, mislabelled
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    args = inp.args()
    leaves = inp.leaves()
    if name == VLLM:
        # vLLM builds the sorted-token metadata once per batch and reuses it in every layer;
        # the stand-in gets the same: built here, outside the timed call.
        meta = baselines.vllm_meta(
            case.rows, case.length, inp.adapter_w, inp.adapter_idx, SCALE, mix
        )

        def fwd_vllm():
            with torch.no_grad():
                return baselines.vllm_style_shrink_expand(*args, SCALE, mix, meta=meta)

        return fwd_vllm

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(*args)

        return fwd
    if mode == "fwd+bwd":

        def step():
            clear()
            fn(*args).backward(inp.grad_y)

        return step
    y = fn(*args)

    def bwd():
        clear()
        torch.autograd.backward(y, inp.grad_y, retain_graph=True)

    return bwd


# --- running ----------------------------------------------------------------------------------


@dataclass
class Row:
    suite: str
    case: str
    d_in: int
    d_out: int
    tokens: int
    rows: int
    adapters: int
    slots: int
    rank: int
    gathered: bool
    dtype: str
    mix: str
    mode: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float
    ratio_to_base: float
    error: str = ""


def run_case(
    case: Case,
    mix: str,
    modes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> list[Row]:
    first = make_inputs(case, dtype, device, args.seed)
    pool = [first] + [
        make_inputs(case, dtype, device, args.seed + i)
        for i in range(1, common.pool_size(first.nbytes(), device))
    ]
    rows: list[Row] = []
    for mode in modes:
        names = list(candidates(case, mix, device, mode))
        if args.impls:
            names = [n for n in names if n == BASE or any(s in n for s in args.impls)]
        fns = candidates(case, mix, device, mode)
        calls: dict[str, Callable[[], object]] = {}
        pool_calls: dict[str, list[Callable[[], object]]] = {}  # one call per input set
        errors: dict[str, str] = {}
        for name in names:
            try:
                pool_calls[name] = [make_call(fns[name], name, inp, mode, case, mix)
                                    for inp in pool]
                calls[name] = common.rotating(pool_calls[name])
                calls[name]()  # a failing candidate fails here, not mid-measurement
            except Exception as e:  # noqa: BLE001 - one broken backend must not end the run
                errors[name] = _one_line(e)
                calls.pop(name, None)
                pool_calls.pop(name, None)
        timings: dict[str, common.Timing] = {}
        if device.type == "cpu":
            # The trial call above was the warm-up in a quick run.
            timings = common.time_cpu_interleaved(
                calls, warmup=0 if args.quick else 1, min_rounds=args.rounds, budget_s=args.budget
            )
        else:
            for name, call in calls.items():
                try:
                    timings[name] = common.time_cuda(call, rep_ms=args.rep_ms)
                except Exception as e:  # noqa: BLE001
                    errors[name] = _one_line(e)
        extra: dict[str, common.Timing | str] = {}
        if device.type == "cuda" and args.graphs and mode == "fwd":
            extra = _graph_and_host_timings(pool_calls)
        base_graph, base_host = (t if isinstance(t, common.Timing) else None
                                 for t in (extra.get(BASE + GRAPH), extra.get(BASE + HOST)))
        peaks = {}
        for name in timings:
            # One fresh input set per memory probe so earlier calls' outputs are not counted.
            peaks[name] = common.peak_memory_mb(
                make_call(fns[name], name, pool[0], mode, case, mix), device
            )
        base = timings.get(BASE)
        for name in names:
            t = timings.get(name)
            rows.append(
                Row(
                    case.suite,
                    case.label,
                    case.d_in,
                    case.d_out,
                    case.tokens,
                    case.rows,
                    case.adapters,
                    case.slots,
                    case.rank,
                    case.gathered,
                    str(dtype).replace("torch.", ""),
                    mix,
                    mode,
                    name,
                    t.median_ms if t else math.nan,
                    t.p20_ms if t else math.nan,
                    t.p80_ms if t else math.nan,
                    peaks.get(name, math.nan),
                    common.paired_ratio(t, base) if t and base else math.nan,
                    errors.get(name, ""),
                )
            )
        for name, t in extra.items():  # a failed capture or host timing is a row too
            ref = base_graph if name.endswith(GRAPH) else base_host
            ok = isinstance(t, common.Timing)
            rows.append(Row(
                case.suite, case.label, case.d_in, case.d_out, case.tokens, case.rows,
                case.adapters, case.slots, case.rank, case.gathered,
                str(dtype).replace("torch.", ""), mix, mode, name,
                t.median_ms if ok else math.nan, t.p20_ms if ok else math.nan,
                t.p80_ms if ok else math.nan, math.nan,
                common.paired_ratio(t, ref) if ok and ref else math.nan, "" if ok else t,
            ))
        del calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _graph_and_host_timings(
    pool_calls: dict[str, list[Callable[[], object]]],
) -> dict[str, common.Timing | str]:
    """CUDA-graph replay time and host time per eager call of every forward candidate, keyed
    "<impl> (graph replay)" and "<impl> (host us/call)"; a failure is its one-line error."""
    from benchmarks import timing

    out: dict[str, common.Timing | str] = {}
    for name, calls in pool_calls.items():
        try:
            # The list: one graph per input set, replayed in turn. One graph would replay one
            # set, its W then read from L2 (32 MB at d = 4096; an H100's L2 is 50 MB).
            g = timing.graph_replay_ms(calls)
            out[name + GRAPH] = common.Timing(g.median, g.p20, g.p80, g.reps)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be captured is a row
            out[name + GRAPH] = _one_line(e)
        try:  # apart: a failed capture must not lose the host time
            h = timing.host_us_per_call(common.rotating(calls)).us_per_call
            out[name + HOST] = common.Timing(h.median / 1e3, h.p20 / 1e3, h.p80 / 1e3, h.reps)
        except Exception as e:  # noqa: BLE001
            out[name + HOST] = _one_line(e)
    return out


def print_block(case: Case, mix: str, rows: list[Row]) -> None:
    dt = rows[0].dtype if rows else ""
    print(f"\n[{case.suite}] {case.label}  mix={mix}  {dt}")
    print(
        f"  {'mode':8s} {'implementation':30s} {'median ms':>10s} {'p20-p80 ms':>17s} "
        f"{'x base':>7s} {'peak MiB':>9s}"
    )
    for r in rows:
        if r.error:
            print(f"  {r.mode:8s} {r.impl:30s} failed: {r.error}")
            continue
        print(
            f"  {r.mode:8s} {r.impl:30s} {r.median_ms:10.3f} "
            f"{r.p20_ms:8.3f}-{r.p80_ms:<8.3f} {r.ratio_to_base:7.2f} {r.peak_mib:9.1f}"
        )
    sys.stdout.flush()


# --- targets (KERNEL_SPEC.md) ----------------------------------------------------------------


def _pick(rows: list[Row], **want) -> list[Row]:
    return [r for r in rows if all(getattr(r, k) == v for k, v in want.items()) and not r.error]


def _ops(rows: list[Row], suffix: str = "") -> list[Row]:
    """The op's rows: eager (suffix ""), or its GRAPH / HOST rows."""
    return [r for r in rows if r.impl.startswith("lora_mix_linear[")
            and r.impl.endswith("]" + suffix)]


def _verdict(ok: bool) -> str:
    return "MEETS" if ok else "misses"


# The op does the base GEMM plus more, so a measured ratio well below 1 can only be noise
# (load from other processes landing on the base's turns); such a verdict is not a result.
# Except where the op's base is another GEMM than F.linear's: half inputs on a CPU where torch
# has no oneDNN bf16 (ATen's half GEMM is scalar loops there; the op's base is MKL's).
NOISE_FLOOR = 0.97


def _own_half_base(dtype: str) -> bool:
    """Whether the native cpu op's base GEMM for `dtype` is MKL's rather than F.linear's."""
    from reclora_kernels import ops

    if dtype not in ("bfloat16", "float16") or not ops.NATIVE_CPU:
        return False
    mode = torch.ops.reclora.cpu_half_base(-1)  # 1: MKL for both, 2: for float16 only
    return mode == 1 or (mode == 2 and dtype == "float16")


def _cpu_ratio_verdict(ratio: float, limit: float, own_base: bool = False) -> str:
    if own_base:
        return _verdict(ratio <= limit) + " (the op's base: MKL's half GEMM; F.linear's: ATen's)"
    if ratio < NOISE_FLOOR:
        return "not resolved (below the base it contains: noise)"
    return _verdict(ratio <= limit)


CPU_SIZES = ((1024, 512), (2048, 512), (576, 1024))
# (dtype, mix, mode, limit): KERNEL_SPEC's CPU targets and issue 13's.
CPU_TARGETS = (
    ("bfloat16", "factor", "fwd", 1.20),
    ("float32", "output", "fwd", 1.20),
    ("float32", "factor", "fwd+bwd", 1.25),
    ("float32", "factor", "fwd", 1.10),
    ("bfloat16", "factor", "fwd+bwd", 1.30),
)


def issue13_table(rows: list[Row]) -> list[str]:
    """Issue 13's table: per case, op[cpu] and materialise+bmm as ratios to F.linear in the
    same dtype at the three CPU spec sizes. Output mode has no materialise+bmm of its own (the
    reference code is factor-only): that column shows the factor path's ratio at the same
    size, dtype and mode (as the issue's table did), and naive two-GEMM is shown beside it."""
    out = ["", "## Issue 13's table: ratio to F.linear in the same dtype, "
           "(d, T) = (1024, 512), (2048, 512), (576, 1024)", "",
           "| case | op[cpu] | materialise+bmm (plain torch) | naive two-GEMM |",
           "|---|---|---|---|"]
    found = False
    for dtype, mix, mode, _ in CPU_TARGETS:
        cells: dict[str, list[str]] = {"op": [], "mat": [], "naive": []}
        for d, t in CPU_SIZES:
            sel = _pick(rows, suite="spec", d_in=d, tokens=t, dtype=dtype, mode=mode)
            op = next((r for r in sel if r.mix == mix and r.impl == "lora_mix_linear[cpu]"), None)
            mat = next((r for r in sel if r.impl == MATERIALISE), None)
            naive = next((r for r in sel if r.mix == mix and r.impl == NAIVE), None)
            for key, r in (("op", op), ("mat", mat), ("naive", naive)):
                cells[key].append(f"{r.ratio_to_base:.2f}x" if r else "-")
            found = found or op is not None
        name = f"{dtype}, {mix}, {mode}"
        out.append(f"| {name} | " + " | ".join(", ".join(cells[k]) for k in cells) + " |")
    return out if found else []


def _gpu_target_lines(rows: list[Row]) -> list[str]:
    """Issue 12's GPU targets, with gpu_targets.py's limits (one place for both scripts):
    each op's ratio to the base, its time above the base against materialise+bmm's, and at
    the decode case its CUDA-graph replay ratio and host us per call (--graphs rows)."""
    lines: list[str] = []
    if not any(r.suite == "spec" for r in rows):
        return lines
    for target in gpu_targets.spec_rows():
        c = target.case
        sizes = (c.d_in, c.d_out, c.tokens, c.rows, c.adapters, c.k, c.rank, c.mix, c.mode)
        sel = [r for r in rows if r.suite == "spec" and sizes == (
            r.d_in, r.d_out, r.tokens, r.rows, r.adapters, r.slots, r.rank, r.mix, r.mode)]
        suffix = {"ratio": "", "graph": GRAPH, "host": HOST}[target.kind]
        ops = _ops(sel, suffix)
        if not ops:
            hint = " (its rows need --graphs)" if suffix else ""
            lines.append(f"GPU {target.key}: not measured in this run{hint}")
            continue
        mat = next((r for r in sel if r.impl == MATERIALISE and not r.error), None)
        for op in ops:
            head = f"GPU {target.key}, {op.impl}"
            if op.error:
                lines.append(f"{head}: failed: {op.error}")
            elif target.kind == "host":
                us = op.median_ms * 1e3
                lines.append(f"{head}: {us:.1f} us (target <= {target.limit:.0f} us): "
                             f"{_verdict(us <= target.limit)}")
            elif math.isnan(op.ratio_to_base):
                lines.append(f"{head}: no ratio (the base's measurement failed)")
            else:
                lines.append(f"{head}: {op.ratio_to_base:.3f}x base (target <= "
                             f"{target.limit:.2f}x): {_verdict(op.ratio_to_base <= target.limit)}")
            if target.kind != "ratio" or not mat or op.error or math.isnan(op.ratio_to_base):
                continue
            if mat.ratio_to_base <= 1:
                lines.append(f"{head}: time above the base vs materialise+bmm's: not resolved "
                             f"(materialise+bmm at {mat.ratio_to_base:.3f}x base)")
                continue
            frac = (op.ratio_to_base - 1) / (mat.ratio_to_base - 1)
            limit = roofline.ABOVE_BASE_FRACTION
            lines.append(f"{head}: time above the base {frac:.2f} of materialise+bmm's "
                         f"({mat.ratio_to_base:.3f}x base; target <= {limit:.2f}): "
                         f"{_verdict(frac <= limit)}")
    return lines


def check_targets(rows: list[Row], device: torch.device) -> list[str]:
    """One line per KERNEL_SPEC target and op backend, from this run's medians."""
    lines: list[str] = []
    if device.type == "cpu":
        for dtype, mix, mode, limit in CPU_TARGETS:
            for d, t in CPU_SIZES:
                sel = _pick(rows, suite="spec", d_in=d, tokens=t, dtype=dtype, mode=mode)
                mat = next((r for r in sel if r.impl == MATERIALISE), None)
                for op in _ops([r for r in sel if r.mix == mix]):
                    line = (
                        f"CPU (d, T) = ({d}, {t}) {dtype} {mix} {mode}, {op.impl}: "
                        f"{op.ratio_to_base:.2f}x F.linear (target <= {limit:.2f}x): "
                        f"{_cpu_ratio_verdict(op.ratio_to_base, limit, _own_half_base(dtype))}"
                    )
                    if mat:  # compared by the (paired) ratios the table shows
                        line += (
                            f"; vs materialise+bmm{'' if mix == 'factor' else ' (factor)'} "
                            f"({mat.ratio_to_base:.2f}x): "
                            f"{_verdict(op.ratio_to_base < mat.ratio_to_base)}"
                        )
                    lines.append(line)
        return lines or ["no CPU spec rows in this run"]
    lines += _gpu_target_lines(rows)
    for tokens in (8192, 64):
        sel = _pick(rows, suite="k1", tokens=tokens, mode="fwd")
        for mix in ("factor", "output"):
            stand_in = next((r for r in sel if r.impl == VLLM and r.mix == mix), None)
            for op in _ops([r for r in sel if r.mix == mix]):
                if stand_in:
                    lines.append(
                        f"GPU k=1 T={tokens} {mix} fwd, {op.impl}: {op.median_ms:.3f} ms vs "
                        f"vLLM-style stand-in {stand_in.median_ms:.3f} ms (target: no slower): "
                        f"{_verdict(op.median_ms <= stand_in.median_ms)}"
                    )
    return lines or ["no GPU spec rows in this run"]


# --- outputs ----------------------------------------------------------------------------------


def plot_ratio_vs_tokens(rows: list[Row], path: Path, title: str) -> bool:
    """Ratio to base against T (sweep-T suite), one line per implementation; a panel per
    (mix, mode)."""
    sweep = [r for r in rows if r.suite == "sweep-T" and not r.error]
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = [m for m in ("factor", "output") if any(r.mix == m for r in sweep)]
    modes = [m for m in MODES if any(r.mode == m for r in sweep)]
    fig, axes = plt.subplots(
        len(mixes), len(modes), figsize=(4.6 * len(modes), 3.6 * len(mixes)), squeeze=False
    )
    for i, mix in enumerate(mixes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in sweep if r.mix == mix and r.mode == mode]
            for impl in dict.fromkeys(r.impl for r in sel if r.impl != BASE):  # base: y = 1
                pts = sorted((r.tokens, r.ratio_to_base) for r in sel if r.impl == impl)
                style = "-o" if impl.startswith("lora_mix_linear") else "--."
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
            ax.axhline(1.0, color="black", lw=0.8, label="F.linear (base)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mix} mix, {mode}", fontsize=10)
            ax.set_xlabel("tokens T (R = min(64, T) rows)")
            ax.set_ylabel("time / F.linear alone")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_markdown(
    path: Path,
    rows: list[Row],
    prov: dict,
    targets: list[str],
    plot: str,
    command: str,
    load_start: float,
    load_end: float,
    elapsed_s: float,
) -> None:
    device = prov["device"]
    lines = [
        f"# bench_lora results: {'CPU' if device == 'cpu' else 'GPU'} ({prov['device_name']})",
        "",
        f"- machine: {prov['device_name']}"
        + (f", {prov['threads']} torch threads" if device == "cpu" else ""),
        f"- torch {prov['torch']}, triton {prov['triton']}, Python {prov['python']}, "
        f"commit {prov['commit'][:12]}, {prov['timestamp']}",
        f"- command: `{command}` ({elapsed_s / 60:.1f} min)",
    ]
    if device == "cpu":
        cores = os.cpu_count() or 1
        # A load average above the core count means other work shared the CPU.
        busy = max(load_start, load_end) > cores
        lines.append(
            f"- 1-min load average {load_start:.1f} at start, {load_end:.1f} at end "
            f"({cores} cores; "
            + ("other jobs shared the machine, so medians carry that noise"
               if busy else "no other heavy job ran")
            + "; the p20-p80 spread is in the CSV)"
        )
    lines += [
        "- ratio to F.linear alone on the same inputs"
        + (
            " (median over interleaved rounds of the per-round ratio)"
            if device == "cpu"
            else " (ratio of do_bench medians)"
        )
        + "; "
        "fwd = no-grad forward; fwd+bwd = forward + backward with the base frozen "
        "(x, banks, mixture weights need grad)",
        "",
    ]
    spec = [r for r in rows if r.suite == "spec"]
    if spec:
        lines += ["## KERNEL_SPEC sizes, ratio to F.linear", ""]
        impls = list(dict.fromkeys(r.impl for r in spec if r.impl != BASE))
        lines.append("| size | dtype | mix | mode | base ms | " + " | ".join(impls) + " |")
        lines.append("|---|---|---|---|---|" + "---|" * len(impls))
        for case, dt, mix, mode in dict.fromkeys((r.case, r.dtype, r.mix, r.mode) for r in spec):
            sel = {r.impl: r for r in spec
                   if (r.case, r.dtype, r.mix, r.mode) == (case, dt, mix, mode)}
            base = sel.get(BASE)
            cells = [
                "n/a"
                if i not in sel
                else "failed"
                if sel[i].error
                else f"{sel[i].ratio_to_base:.2f}"
                for i in impls
            ]
            base_ms = f"{base.median_ms:.2f}" if base and not base.error else "-"
            lines.append(f"| {case} | {dt} | {mix} | {mode} | {base_ms} | " + " | ".join(cells)
                         + " |")
        lines += issue13_table(rows)
    for suite, key, what in (
        ("smollm", "case", "SmolLM2-135M layer (d = 576, 8 rows of 200 tokens)"),
        ("k1", "case", "k = 1 per-row multi-LoRA (w = 1)"),
        ("sweep-T", "tokens", "sweep over T"),
        ("sweep-M", "adapters", "sweep over M (gathered)"),
    ):
        lines += _sweep_table(rows, suite, key, what)
    lines += ["", "## Targets (KERNEL_SPEC.md)", ""] + [f"- {t}" for t in targets]
    if plot:
        lines += ["", f"![ratio vs T]({plot})"]
    lines += [
        "",
        "Every row, with p20/p80 and peak memory: `bench_lora.csv` in this folder; the "
        f"layer-level benchmark: `layer_{device}.md` (benchmarks/bench_layer.py).",
        "",
    ]
    path.write_text("\n".join(lines))


def _sweep_table(rows: list[Row], suite: str, key: str, what: str) -> list[str]:
    """Ratio to F.linear per implementation, one line per (size, mix, mode)."""
    sel = [r for r in rows if r.suite == suite]
    if not sel:
        return []
    impls = list(dict.fromkeys(r.impl for r in sel if r.impl != BASE))
    first = sel[0]
    lines = [
        "",
        f"## {what}: {first.case.split(' ', 1)[0]}, ratio to F.linear",
        "",
        f"| {key} | dtype | mix | mode | base ms | " + " | ".join(impls) + " |",
        "|---|---|---|---|---|" + "---|" * len(impls),
    ]
    for k, dt, mix, mode in dict.fromkeys((getattr(r, key), r.dtype, r.mix, r.mode)
                                          for r in sel):
        cell = {r.impl: r for r in sel
                if (getattr(r, key), r.dtype, r.mix, r.mode) == (k, dt, mix, mode)}
        base = cell.get(BASE)
        vals = [
            "n/a"
            if i not in cell
            else "failed"
            if cell[i].error
            else f"{cell[i].ratio_to_base:.2f}"
            for i in impls
        ]
        base_ms = f"{base.median_ms:.2f}" if base and not base.error else "-"
        lines.append(f"| {k} | {dt} | {mix} | {mode} | {base_ms} | " + " | ".join(vals) + " |")
    return lines


def _impls_matching_nothing(impls: list[str], cases: list[Case], mixes: list[str],
                            modes: list[str], device: torch.device) -> list[str]:
    """The --impls substrings that name no candidate of this run (a typo would keep only
    the base rows)."""
    names = {n for case in cases for mix in mixes for mode in modes
             for n in candidates(case, mix, device, mode)}
    return [s for s in impls if not any(s in n for n in names)]


def measured(rows: list[Row]) -> list[Row]:
    """The rows with a time (not failed, not skipped)."""
    return [r for r in rows if not r.error and not math.isnan(r.median_ms)]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute on CPU)")
    p.add_argument("--device", default="auto", type=device_option,
                   help="auto (cuda if present), cpu or cuda")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="one dtype (overrides --dtypes)")
    p.add_argument("--dtypes", default=None, type=comma_choices(list(DTYPES)),
                   help="comma-separated; default: bfloat16 on GPU, float32,bfloat16 on CPU "
                        "(the sweeps on CPU: the first only)")
    p.add_argument("--threads", type=int_between(1, MAX_THREADS), default=2,
                   help="CPU threads (KERNEL_SPEC: 2)")
    p.add_argument("--suites", default=None, type=comma_choices(SUITES),
                   help=f"comma-separated, out of {','.join(SUITES)} (default: all; "
                        "--quick: spec)")
    p.add_argument("--mixes", default=None, type=comma_choices(MIXES),
                   help="comma-separated, out of factor,output (default: both; the CPU "
                        "sweeps: factor)")
    p.add_argument("--modes", default=None, type=comma_choices(MODES),
                   help=f"comma-separated, out of {','.join(MODES)} (default: all; "
                        "--quick: fwd,fwd+bwd)")
    p.add_argument("--impls", default="", help="comma-separated substrings of rows to keep")
    p.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="CPU: minimum timed rounds, >= 1 (default 5, --quick 3)")
    p.add_argument("--budget", type=finite_float(0.0), default=None,
                   help="CPU: seconds per measurement, >= 0 (default 1.5, --quick 0)")
    p.add_argument("--rep-ms", type=int_at_least(1), default=None,
                   help="GPU: do_bench rep time, >= 1 (default 100, --quick 40)")
    p.add_argument("--seed", type=int_between(0, SEED_MAX), default=0)
    p.add_argument("--graphs", action="store_true",
                   help="GPU: also time the forward under CUDA-graph replay, and host us/call")
    p.add_argument("--csv", type=Path, default=common.RESULTS / "bench_lora.csv")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="default (full runs): benchmarks/results/bench_lora_<device>.png",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="default (full runs): benchmarks/results/<device>.md",
    )
    args = p.parse_args(argv)

    device = common.pick_device(args.device)
    dtype_names = ([args.dtype] if args.dtype else None) or args.dtypes or (
        ["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    dtypes = [DTYPES[n] for n in dtype_names]
    dtype = dtypes[0]
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    args.budget = args.budget if args.budget is not None else (0.0 if args.quick else 1.5)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (40 if args.quick else 100)
    args.impls = [s for s in args.impls.split(",") if s]
    # About a minute on the 2-core CPU with --quick: the spec sizes, forward and training
    # step only (where --suites / --modes are not given).
    suites = args.suites or (["spec"] if args.quick else list(SUITES))
    modes = args.modes or (["fwd", "fwd+bwd"] if args.quick else list(MODES))
    mixes = args.mixes or list(MIXES)
    cases = cases_for(device, suites, args.quick)
    if not cases:
        p.error(f"argument --suites: {','.join(suites)} has no case on {device.type} "
                "(smollm is CPU-only)")
    unknown = _impls_matching_nothing(args.impls, cases, mixes, modes, device)
    if unknown:
        p.error(f"argument --impls: {', '.join(map(repr, unknown))} matches no "
                f"implementation of this run")
    plot_path = args.plot or (
        None if args.quick else common.RESULTS / f"bench_lora_{device.type}.png"
    )
    md_path = args.markdown or (None if args.quick else common.RESULTS / f"{device.type}.md")
    # Checked before measuring: a bad path once failed after the whole run, in a traceback.
    for option, path in (("--csv", None if args.no_csv else args.csv),
                         ("--markdown", md_path), ("--plot", plot_path)):
        problem = path and common.output_file_problem(path)
        if problem:
            p.error(f"argument {option}: cannot write {path}: {problem}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    prov = common.provenance(device)
    threads = f", {prov['threads']} threads" if device.type == "cpu" else ""
    print(
        f"device: {prov['device_name']}{threads}; torch {prov['torch']}, triton "
        f"{prov['triton']}, commit {prov['commit'][:12]}; dtypes {dtype_names}; "
        f"backends timed: {bench_backends(device)}"
    )
    torch.manual_seed(args.seed)

    start, load_start = time.perf_counter(), common.load_avg()
    rows: list[Row] = []
    csv_rows: list[dict] = []
    full_rounds = args.rounds
    for case in cases:
        sweep = case.suite.startswith("sweep")
        case_mixes = mixes
        if sweep and device.type == "cpu" and args.mixes is None:
            # 2 shared cores: the sweeps run the RecLoRA (factor) mix only, with fewer rounds;
            # the output mix is measured at the spec sizes and k = 1.
            case_mixes = ["factor"]
        args.rounds = min(full_rounds, 3) if sweep and device.type == "cpu" else full_rounds
        case_dtypes = dtypes[:1] if sweep and device.type == "cpu" else dtypes
        for dt, mix in ((dt, mix) for dt in case_dtypes for mix in case_mixes):
            block = run_case(case, mix, modes, device, dt, args)
            print_block(case, mix, block)
            rows += block
            if not measured(block):  # every candidate failed: no measurement to keep
                print("  (nothing measured: not written to the CSV)")
                continue
            extra = {"quick": args.quick, "load_avg": round(common.load_avg(), 2)}
            block_csv = [{**prov, **extra, **asdict(r)} for r in block]
            if not args.no_csv:  # case by case, so a run cut short keeps what it measured
                common.append_csv(args.csv, block_csv)
            csv_rows += block_csv
    elapsed, load_end = time.perf_counter() - start, common.load_avg()

    if not measured(rows):
        # A run that timed nothing must not replace a results file with an empty table.
        print(f"bench_lora: no row was measured ({len(rows)} failed); nothing written",
              file=sys.stderr)
        return 1
    targets = check_targets(rows, device)
    print("\nKERNEL_SPEC targets:")
    for line in targets:
        print("  " + line)
    if not args.no_csv:
        print(f"\n{len(csv_rows)} rows appended to {args.csv}")
    title = (
        f"time relative to F.linear alone (dense M=16, r=8, {dtype})\n"
        f"{prov['device_name']}{threads}"
    )
    if plot_path and plot_ratio_vs_tokens(rows, plot_path, title):
        print(f"plot: {plot_path}")
    else:
        plot_path = None
    if md_path:
        plot_rel = os.path.relpath(plot_path, md_path.parent) if plot_path else ""
        command = "python benchmarks/bench_lora.py " + " ".join(argv or sys.argv[1:])
        md_path.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(
            md_path, rows, prov, targets, plot_rel, command.strip(), load_start, load_end, elapsed
        )
        print(f"markdown: {md_path}")
    print(f"done in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
