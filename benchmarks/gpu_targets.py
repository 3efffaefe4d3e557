"""The KERNEL_SPEC / issue 12 GPU targets measured in one run, each beside its roofline
prediction (benchmarks/roofline.py); the target table is printed LAST and written to a file
named after the card.

    python benchmarks/gpu_targets.py                 # on the GPU machine (~1-2 minutes)
    python benchmarks/gpu_targets.py --smoke         # CPU plumbing check: tiny sizes, cpu
                                                     # backends, CUDA-only parts skipped

Measured (bf16, d = 4096, 16 meta-LoRAs of rank 8, T = 8192 tokens in 64 rows; GPU):
- ratio to the base (F.linear, same run, CUDA events, inputs rotated through a pool larger
  than L2) for every backend (triton, cuda) and for materialise+bmm (benchmarks/baselines.py):
  dense factor / output forward, gathered M = 4096 k = 4 forward, dense factor fwd+bwd with the
  base frozen; the op's time above the base against materialise+bmm's;
- T = 64 in 8 rows: the ratio under CUDA-graph replay, host us per eager call;
- kernels per call and their times (torch.profiler) for the triton forward and fwd+bwd at the
  spec size, set beside the roofline's launches (measured vs predicted per kernel kind, and
  the fraction of peak HBM bandwidth the streaming kernels reached).
Output: $OUT (if set) or benchmarks/results/gpu/, file targets_<card>.md (smoke: the temp dir).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` as a package, as the tests import it

from benchmarks import baselines, roofline, timing  # noqa: E402
from benchmarks.common import finite_float  # noqa: E402
from reclora.cli import ArgumentParser  # noqa: E402
from reclora_kernels import available_backends, lora_mix_linear  # noqa: E402

SCALE = 2.0  # RecLoRA: alpha 16 / r 8
MATERIALISE = "materialise+bmm"
BASE = "base"
# The triton backend with its fused GEMM forced on (card_plan.force_fused), measured beside
# "triton" as the card's table has it: the data that turns expand.fused on for a card.
FUSED = "triton-fused"
_FUSED_NOW: list[bool | None] = [None]  # the mode the plans were last made in
INTERRUPTED: list[bool] = []  # set once a SIGINT arrived during a measurement
HOST_US_LIMIT = 60.0  # T = 64 in 8 rows: host us per eager call (issue 12, KERNEL_SPEC)


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One target: the roofline case (its sizes), the limit, what is compared."""

    key: str
    case: roofline.Case
    limit: float
    kind: str = "ratio"  # ratio | graph | host


def spec_rows() -> list[Row]:
    t = {x.case.label: x for x in roofline.TARGETS}
    dense = t["dense factor fwd"]
    decode = t["T=64 in 8 rows fwd (graph replay)"]
    return [
        Row("dense factor fwd", dense.case, dense.limit),
        Row("dense output fwd", t["dense output fwd"].case, t["dense output fwd"].limit),
        Row("gathered M=4096 k=4 factor fwd", t["gathered M=4096 k=4 factor fwd"].case,
            t["gathered M=4096 k=4 factor fwd"].limit),
        Row("dense factor fwd+bwd", t["dense factor fwd+bwd"].case,
            t["dense factor fwd+bwd"].limit),
        Row("T=64 in 8 rows fwd, CUDA-graph replay", decode.case, decode.limit, "graph"),
        Row("T=64 in 8 rows fwd, host us per eager call", decode.case, HOST_US_LIMIT, "host"),
    ]


def smoke_rows() -> list[Row]:
    """Tiny sizes with the same structure, for the CPU."""
    small = dict(d_in=64, d_out=48, adapters=4, rank=4)
    dense = roofline.Case("dense factor fwd", tokens=256, rows=8, **small)
    decode = roofline.Case("T=16 in 4 rows fwd", tokens=16, rows=4, **small)
    return [
        Row("dense factor fwd", dense, 1.10),
        Row("dense output fwd", replace(dense, mix="output"), 1.15),
        Row("gathered M=64 k=2 factor fwd", replace(dense, adapters=64, slots=2), 1.15),
        Row("dense factor fwd+bwd", replace(dense, mode="fwd+bwd"), 1.25),
        Row("T=16 in 4 rows fwd, CUDA-graph replay", decode, 2.0, "graph"),
        Row("T=16 in 4 rows fwd, host us per eager call", decode, HOST_US_LIMIT, "host"),
    ]


# --- inputs and calls -------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    adapter_w: torch.Tensor
    adapter_idx: torch.Tensor | None
    grad_y: torch.Tensor


def make_pool(case: roofline.Case, dtype, device, sets: int, seed: int = 0) -> list[Inputs]:
    """`sets` input sets: x, W, w, idx and g per set; the banks shared (at M = 4096 they are
    537 MB, far past L2, and the gathered rows differ per set). Random, never zero."""
    g = torch.Generator().manual_seed(seed)  # indices and weights, on the CPU
    g_dev = torch.Generator(device=device).manual_seed(seed)  # big tensors made in place
    length = case.tokens // case.rows

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g_dev, device=device) * std).to(dtype)

    lora_a = randn(case.adapters, case.rank, case.d_in, std=case.d_in**-0.5)
    lora_b = randn(case.adapters, case.d_out, case.rank, std=0.02)
    out = []
    for _ in range(sets):
        idx = None
        if not case.dense:
            idx = torch.stack([torch.randperm(case.adapters, generator=g)[: case.k]
                               for _ in range(case.rows)]).to(device)
        w = torch.softmax(torch.randn(case.rows, case.k, generator=g), -1).to(device, dtype)
        out.append(Inputs(randn(case.rows, length, case.d_in),
                          randn(case.d_out, case.d_in, std=case.d_in**-0.5), lora_a, lora_b, w,
                          idx, randn(case.rows, length, case.d_out)))
    return out


def _use_fused(on: bool | None, device: torch.device) -> None:
    """Plan the triton calls with the fused GEMM forced on (True) or as the card's table
    says (None); switching clears the plans, so it happens once per candidate (its first,
    warm-up call), not per timed call."""
    if _FUSED_NOW[0] is not on:
        from reclora_kernels.triton import configs
        from reclora_kernels.triton.card_plan import force_fused

        force_fused(on, configs.table_key(device))
        _FUSED_NOW[0] = on


def candidate(name: str, case: roofline.Case) -> Callable[[Inputs], torch.Tensor]:
    if name in ("triton", FUSED):
        fused = True if name == FUSED else None

        def call(i):
            _use_fused(fused, i.x.device)
            # indices_checked: as the model layers call it (a gate's top-k is in range by
            # construction); else each call adds the range check's ~5 kernels.
            return lora_mix_linear(i.x, i.weight, None, i.lora_a, i.lora_b, i.adapter_w,
                                   i.adapter_idx, scale=SCALE, mix=case.mix, backend="triton",
                                   indices_checked=True)
        return call
    if name == BASE:
        return lambda i: F.linear(i.x, i.weight)
    if name == MATERIALISE:
        return lambda i: baselines.materialise_bmm(i.x, i.weight, None, i.lora_a, i.lora_b,
                                                   i.adapter_w, i.adapter_idx, SCALE, case.mix)
    return lambda i: lora_mix_linear(i.x, i.weight, None, i.lora_a, i.lora_b, i.adapter_w,
                                     i.adapter_idx, scale=SCALE, mix=case.mix, backend=name,
                                     indices_checked=True)


def calls_for(fn, pool: list[Inputs], mode: str) -> list[Callable[[], object]]:
    """One no-argument call per input set: the forward under no_grad, or forward + backward
    (grads to x, the banks and w; W frozen, as in bench_lora)."""
    def fwd(i):
        def run():
            with torch.no_grad():
                return fn(i)
        return run

    def step(i):
        leaves = (i.x, i.lora_a, i.lora_b, i.adapter_w)

        def run():
            for t in leaves:
                t.requires_grad_(True)
                t.grad = None
            fn(i).backward(i.grad_y)
        return run

    return [(fwd if mode == "fwd" else step)(i) for i in pool]


def names_for(case: roofline.Case, backends: list[str]) -> list[str]:
    return [BASE, *backends] + ([MATERIALISE] if case.mix == "factor" else [])


# --- measuring --------------------------------------------------------------------------------


class Run:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.cuda = not smoke and timing.cuda_reason() is None
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        wanted = ("triton", "cuda") if self.cuda else ("cpu",)
        self.backends = [b for b in available_backends() if b in wanted]
        if "triton" in self.backends:
            self.backends.insert(self.backends.index("triton") + 1, FUSED)
        if not self.backends:
            self.backends = ["reference"]
        self.card = roofline.card_for(torch.cuda.get_device_name() if self.cuda else "")
        self.rows = smoke_rows() if smoke else spec_rows()
        self.log: list[str] = []
        self.deadline = float("inf")  # time.perf_counter() past which measurements are skipped

    def out_of_time(self) -> str | None:
        """Checked before every candidate, not only every row: a row started just before
        the deadline must not go on compiling and timing (gpu_check.sh's SIGKILL follows
        its SIGINT by 15 s, and the table is written last)."""
        if INTERRUPTED:
            return "skipped: interrupted (time limit)"
        if time.perf_counter() > self.deadline:
            return "skipped: out of the time budget (--budget-s)"
        return None

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.log.append(line)

    def time_ms(self, calls) -> float:
        if self.cuda:
            rounds = [timing.event_ms(calls, warmup=3, reps=15).median for _ in range(3)]
            return sorted(rounds)[1]
        return timing.wall_ms(calls, warmup=2, reps=10).median

    def pool(self, case: roofline.Case) -> list[Inputs]:
        """At least 2 sets, and enough that x, W and g of the pool fill 3x the L2."""
        set_bytes = (case.tokens * (case.d_in + case.d_out) + case.d_in * case.d_out) * 2
        sets = max(2, timing.pool_count(set_bytes, self.device, cap=4)) if self.cuda else 2
        return make_pool(case, self.dtype, self.device, sets)


def _safe(fn, *args, **kw):
    """(value, None) or (None, one-line error): a failing measurement becomes a table cell.
    SIGINT (gpu_check.sh's time limit) ends the measuring, not the run: the table still
    comes out."""
    try:
        return fn(*args, **kw), None
    except KeyboardInterrupt:
        INTERRUPTED.append(True)
        return None, "skipped: interrupted (time limit)"
    except Exception as exc:  # noqa: BLE001 - any failure is reported, the run goes on
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return None, f"{type(exc).__name__}: {first}"


def measure_ratio(run: Run, row: Row) -> dict[str, float | str]:
    """{candidate: time / base time} at one case (str: the error)."""
    pool = run.pool(row.case)
    times: dict[str, float | str] = {}
    for name in names_for(row.case, run.backends):
        skip = run.out_of_time()
        if skip:
            times[name] = skip
            continue
        calls = calls_for(candidate(name, row.case), pool, row.case.mode)
        value, err = _safe(run.time_ms, calls)
        times[name] = value if err is None else err
        shown = f"{value:.4f} ms" if err is None else err
        run.say(f"  {row.key:42s} {name:16s} {shown}")
    base = times[BASE]

    def ratio(v):  # milliseconds without a base are no ratio: never judged against a limit
        if not isinstance(v, float):
            return v
        return v / base if isinstance(base, float) else f"no base: {base}"

    return {k: ratio(v) for k, v in times.items() if k != BASE} | {"_base_ms": base}


def measure_graph(run: Run, row: Row) -> dict[str, float | str]:
    if not run.cuda:
        msg = "skipped: " + (timing.cuda_reason() or "CUDA graphs need the GPU (--smoke)")
        run.say(f"  {row.key}: {msg}")
        return {name: msg for name in names_for(row.case, run.backends)[1:]}
    pool = run.pool(row.case)
    out: dict[str, float | str] = {}
    base, err = _safe(timing.graph_replay_ms, calls_for(candidate(BASE, row.case), pool, "fwd"))
    for name in names_for(row.case, run.backends)[1:]:
        if run.out_of_time():
            out[name] = run.out_of_time()
            continue
        value, e = _safe(timing.graph_replay_ms,
                         calls_for(candidate(name, row.case), pool, "fwd"))
        if e:
            out[name] = e
        elif err:  # milliseconds without a base are no ratio
            out[name] = f"no base: {err}"
        else:
            out[name] = value.median / base.median
        run.say(f"  {row.key:42s} {name:16s} {e or value}")
    if base is not None:
        out["_base_ms"] = base.median
    return out


def measure_host(run: Run, row: Row) -> dict[str, float | str]:
    pool = run.pool(row.case)[:1]
    out: dict[str, float | str] = {}
    for name in names_for(row.case, run.backends):
        if run.out_of_time():
            out[name] = run.out_of_time()
            continue
        call = calls_for(candidate(name, row.case), pool, "fwd")[0]
        value, err = _safe(timing.host_us_per_call, call, calls=50 if run.smoke else 100)
        out[name] = value.us_per_call.median if err is None else err
        run.say(f"  {row.key:42s} {name:16s} {value if err is None else err}")
    return out


# --- kernels: measured beside predicted -------------------------------------------------------

# cuBLAS/cuBLASLt kernel names seen on Hopper (nvjet_*, sm90_xmma_gemm_*, cutlass_*, gemv*,
# Kernel2, splitKreduce_kernel); matched lower-cased.
CUBLAS_NAMES = ("nvjet", "gemm", "gemv", "xmma", "cutlass", "splitk", "kernel2")
# The roofline's name of the backward's one pass over g (v and dB_p, "segment sums" too).
ONE_PASS = "v = B_p^T g"
# (label, which measured kernels by name, which of the roofline's launches)
KINDS = [
    # By name start: the fused GEMM's name mentions the shrink in its main loop.
    ("Triton shrink (fwd s, bwd v)", lambda k: "shrink_kernel" in k,
     lambda x: x.name.startswith("shrink")),
    ("Triton one pass over g (v, dB_p)", lambda k: "grad_pass" in k,
     lambda x: x.name.startswith(ONE_PASS)),
    ("Triton expand (fwd y, bwd dx)", lambda k: "expand_kernel" in k,
     lambda x: x.name.startswith(("expand", "dx = scale"))),
    ("Triton fused GEMM (base + expand)", lambda k: "fused_linear" in k,
     lambda x: x.name.startswith("fused")),
    ("Triton segment sums", lambda k: "segment_outer" in k,
     lambda x: "segment sums" in x.name and not x.name.startswith(ONE_PASS)),
    ("Triton gathered mix", lambda k: "mix_factors" in k, lambda x: "Triton gather" in x.name),
    ("Triton mix of A and B (zeros of s)", lambda k: "mix_pair" in k,
     lambda x: x.name.startswith("mix A and B")),
    ("cuBLAS GEMMs (base, dx, mixing)", lambda k: any(n in k.lower() for n in CUBLAS_NAMES),
     lambda x: x.engine == "cuBLAS"),
    ("memsets", lambda k: timing.launch_kind(k) == "memsets",
     lambda x: x.name.startswith("zeros")),
]


def _design(backend: str) -> str:
    """The roofline design a backend's launches are set beside."""
    return "fused" if backend == FUSED else "new"


def kernel_report(run: Run, case: roofline.Case, backend: str) -> list[str]:
    title = f"kernels of lora_mix_linear[{backend}], {case.label} ({case.mode})"
    if not run.cuda:
        return [f"{title}: skipped: {timing.cuda_reason() or 'needs the GPU (--smoke)'}"]

    def profile():  # the pool too under _safe: a SIGINT there must not end the run
        call = timing.rotating(calls_for(candidate(backend, case), run.pool(case), case.mode))
        return timing.kernel_profile(call, calls=10)

    stats, err = _safe(profile)
    if err:
        return [f"{title}: {err}"]
    predicted = roofline.predict(case, _design(backend), run.card)
    lines = [title + " (torch.profiler, 10 calls)", *timing.profile_table(stats), "",
             f"  measured vs roofline ({run.card.name}), per call:",
             f"  {'kind':34s} {'pred us':>8s} {'meas us':>8s} {'meas/pred':>9s} {'HBM frac':>8s}"]
    for label, is_kernel, is_launch in KINDS:
        meas = sum(s.us_per_call for s in stats if is_kernel(s.name))
        chosen = [x for x in predicted if x.per_call and is_launch(x)]
        if not chosen and not meas:
            continue
        pred = sum(x.time_us(run.card) for x in chosen)
        nbytes = sum(x.hbm_bytes for x in chosen)
        frac = nbytes / (meas * 1e-6) / (run.card.hbm_tbs * 1e12) if meas else float("nan")
        ratio = meas / pred if pred else float("nan")
        lines.append(f"  {label:34s} {pred:8.1f} {meas:8.1f} {ratio:9.2f} {frac:8.2f}")
        if any(x.overlapped_bytes for x in chosen):
            # The persistent schedule's assumed overlap undone: every store after its tile.
            alt = sum(roofline.exposed(x).time_us(run.card) for x in chosen)
            lines.append(f"  {'  the same, stores not overlapped':34s} {alt:8.1f} {meas:8.1f} "
                         f"{meas / alt:9.2f}")
    total = sum(s.us_per_call for s in stats)
    pred_total = roofline.total_us(predicted, run.card)
    launches = sum(s.per_call for s in stats)
    lines.append(f"  {'all kernels':34s} {pred_total:8.1f} {total:8.1f} "
                 f"{total / pred_total:9.2f}")
    lines.append(f"  launches per call: measured {launches:.1f}, predicted "
                 f"{roofline.launches_per_call(predicted)}")
    return lines


def launches_line(run: Run, case: roofline.Case, backend: str) -> str:
    # The roofline models the Triton designs; the CUDA C++ backend's launches have none.
    predicted = ("n/a (the roofline models the Triton designs)" if backend == "cuda" else
                 roofline.launches_per_call(roofline.predict(case, _design(backend), run.card)))
    if not run.cuda:
        return (f"launches per call, {backend}, {case.label}: predicted {predicted}; measured: "
                f"skipped ({timing.cuda_reason() or 'needs the GPU (--smoke)'})")

    def count():  # the pool too under _safe, as in kernel_report
        call = timing.rotating(calls_for(candidate(backend, case), run.pool(case), "fwd"))
        return timing.launches_per_call(call)

    got, err = _safe(count)
    shown = err or ", ".join(f"{k} {v:.1f}" for k, v in got.items())
    return f"launches per call, {backend}, {case.label}: predicted {predicted}; measured {shown}"


# --- the table --------------------------------------------------------------------------------


def _cell(value, limit: float, unit: str = "x") -> str:
    """'1.23x short', '45 us met', '0.40 met' (unit ''), or the error / skip message."""
    if not isinstance(value, float):
        return str(value)
    verdict = "met" if value <= limit else "short"
    if unit == " us":
        return f"{value:.0f} us {verdict}"
    return f"{value:.2f}{unit} {verdict}"


def predicted(run: Run, row: Row, design: str = "new") -> str:
    if row.kind == "host":
        return "n/a (GPU-time model)"
    try:
        return f"{roofline.ratio(row.case, design, run.card):.2f}x"
    except NotImplementedError:
        return "n/a"


def target_table(run: Run, results: dict[str, dict]) -> list[str]:
    cols = [*run.backends, MATERIALISE]
    designs = ["new"] + (["fused"] if FUSED in run.backends else [])
    heads = " | ".join(f"roofline {d} ({run.card.name})" for d in designs)
    lines = [f"| case | target | {' | '.join(cols)} | {heads} |",
             "|---|---|" + "---|" * (len(cols) + len(designs))]
    for row in run.rows:
        got = results.get(row.key, {})
        unit = " us" if row.kind == "host" else "x"
        target = f"<= {row.limit:.0f} us" if row.kind == "host" else f"<= {row.limit:.2f}x"
        cells = [_cell(got.get(c, "n/a"), row.limit, unit) for c in cols]
        label = row.key
        if row.kind == "host" and isinstance(got.get(BASE), float):
            label += f" (F.linear: {got[BASE]:.0f} us)"
        preds = " | ".join(predicted(run, row, d) for d in designs)
        lines.append(f"| {label} | {target} | {' | '.join(cells)} | {preds} |")
    for row in run.rows:  # the op's time above the base against materialise+bmm's
        got = results.get(row.key, {})
        mat = got.get(MATERIALISE)
        if row.kind != "ratio" or not isinstance(mat, float) or mat <= 1:
            continue
        cells = [_cell((got[b] - 1) / (mat - 1), roofline.ABOVE_BASE_FRACTION, "")
                 if isinstance(got.get(b), float) else str(got.get(b, "n/a"))
                 for b in run.backends]
        mat_pred = roofline.ratio(row.case, MATERIALISE, run.card) - 1
        preds = " | ".join(f"{(roofline.ratio(row.case, d, run.card) - 1) / mat_pred:.2f}"
                           for d in designs)
        lines.append(f"| {row.key}: above base / materialise's | <= 0.25 | "
                     f"{' | '.join(cells)} | 1 | {preds} |")
    return lines


def out_dir(smoke: bool, arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(tempfile.gettempdir()) if smoke else ROOT / "benchmarks" / "results" / "gpu"


def ready_folder(folder: Path) -> str | None:
    """Make `folder` (the table's) now, before any measuring; None, or why it cannot hold
    the table (it was once made only after every measurement: a FileExistsError traceback,
    the table lost)."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot make the folder {folder}: {err.strerror or err}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder}"
    return None


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: tiny sizes, cpu backends, CUDA-only parts skipped")
    parser.add_argument("--out", help="folder for the table (default $OUT or results/gpu)")
    parser.add_argument("--budget-s", type=finite_float(), default=float("inf"),
                        help="skip the measurements still to come after this many seconds "
                             "(the table is still printed; 0 or less: nothing is measured); "
                             "default: no limit")
    args = parser.parse_args(argv)
    folder = out_dir(args.smoke, args.out)
    problem = ready_folder(folder)
    if problem:
        source = "--out" if args.out else "$OUT" if os.environ.get("OUT") else "the default"
        parser.error(f"{source} {folder}: {problem}")
    if args.smoke:
        torch.set_num_threads(1)  # a shared 2-core CPU: no oversubscription
    run = Run(args.smoke)
    start = time.perf_counter()
    run.deadline = start + args.budget_s
    device_name = torch.cuda.get_device_name() if run.cuda else f"CPU ({os.cpu_count()} cores)"
    if not run.cuda and not args.smoke:
        print(f"gpu_targets: {timing.cuda_reason()}; use --smoke on a CPU", file=sys.stderr)
        return 2
    header = (f"device: {device_name}; torch {torch.__version__}; dtype {run.dtype}; backends "
              f"{run.backends}; roofline card {run.card.name}; "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    run.say(header)
    results: dict[str, dict] = {}
    measure = {"ratio": measure_ratio, "graph": measure_graph, "host": measure_host}
    # The decode rows first: the cheapest to measure, so a budget cut by cold Triton compiles
    # falls on the big rows' tail, not on them (the table keeps the spec's order).
    for row in sorted(run.rows, key=lambda r: r.kind == "ratio"):
        if run.out_of_time():
            results[row.key] = {c: run.out_of_time() for c in [*run.backends, MATERIALISE]}
            continue
        results[row.key], err = _safe(measure[row.kind], run, row)
        if err:
            run.say(f"  {row.key}: {err}")
            results[row.key] = {}
    run.say()
    spec = run.rows[0].case
    profiled = [(case, "triton" if "triton" in run.backends else run.backends[0])
                for case in (spec, replace(spec, mode="fwd+bwd"))]
    if FUSED in run.backends:
        profiled.append((spec, FUSED))
    for case, backend in profiled:
        lines = [run.out_of_time()] if run.out_of_time() else kernel_report(run, case, backend)
        for line in lines:
            run.say(line)
        run.say()
    for row in run.rows:
        if row.kind == "host" or row is run.rows[0]:
            for backend in run.backends:
                run.say(run.out_of_time() or launches_line(run, row.case, backend))
    title = (f"== targets ({device_name}; {time.perf_counter() - start:.0f} s; ratios to "
             "F.linear in this run; 'roofline new': benchmarks/roofline.py's prediction for "
             "this card)")
    table = [title, "", *target_table(run, results)]
    card = re.sub(r"[^A-Za-z0-9]+", "_", "smoke_cpu" if args.smoke else device_name).lower()
    path = folder / f"targets_{card.strip('_')}.md"
    rc = 0
    try:
        path.write_text("# GPU targets (benchmarks/gpu_targets.py)\n\n```\n"
                        + "\n".join(run.log) + "\n```\n\n" + "\n".join(table) + "\n")
        print(f"\nwrote {path}\n")
    except OSError as err:  # the measured table must still come out, below
        print(f"\ngpu_targets: error: cannot write {path}: {err.strerror or err}\n",
              file=sys.stderr, flush=True)
        rc = 1
    print("\n".join(table))  # last, for whoever reads the tail of the log
    return rc


if __name__ == "__main__":
    sys.exit(main())
