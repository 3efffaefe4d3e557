"""Timing, memory and provenance helpers shared by the benchmarks in this folder.

- CPU: wall-clock medians (time.perf_counter) after warm-up, the candidates of one size timed
  in interleaved rounds, so that load from other processes on a shared machine lands on all
  of them alike instead of on whichever ran during the burst.
- CUDA: triton.testing.do_bench (CUDA events; it flushes L2 before each call) with the p20 /
  median / p80 quantiles, falling back to CUDA events when triton is missing. Inputs are
  rotated through a pool larger than L2 (see `pool_size`), so cached operands cannot
  flatter any row.
- Peak memory: CUDA max_memory_allocated above the level at the call's start; on the CPU
  the same quantity from the profiler's allocation events (there is no CPU allocator stat).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Bytes an input pool must exceed so operands come from DRAM, not cache: H100's L2 is 50 MB,
# H200's 60 MB; this CPU's L3 is 32 MB. Three times over leaves no partial residency.
POOL_BYTES = {"cuda": 180 * 2**20, "cpu": 96 * 2**20}
MAX_POOL = {"cuda": 8, "cpu": 4}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    samples: tuple[float, ...] = ()  # in run order (CPU), for ratios paired round by round


def paired_ratio(t: Timing, base: Timing) -> float:
    """Median over rounds of t / base within the same round (CPU, interleaved timing): load
    that comes and goes between rounds cancels out. Falls back to the ratio of medians."""
    if t.samples and len(t.samples) == len(base.samples):
        return statistics.median(a / b for a, b in zip(t.samples, base.samples))
    return t.median_ms / base.median_ms


def load_avg() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores visible)"


def git_commit() -> str:
    """HEAD of the checkout (read-only); 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def provenance(device: torch.device) -> dict[str, str | int]:
    """What every CSV row carries, so numbers from different machines never mix silently."""
    return {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pool_size(set_bytes: int, device: torch.device) -> int:
    """How many independent input sets to rotate through so the pool exceeds the cache."""
    want = math.ceil(POOL_BYTES[device.type] / max(set_bytes, 1))
    return max(1, min(MAX_POOL[device.type], want))


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the pool's calls in turn (a different input set each call)."""
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return run


def _quantiles(samples_ms: list[float], keep: bool = False) -> Timing:
    ordered = sorted(samples_ms)

    def q(p: float) -> float:
        # linear interpolation between order statistics, like numpy's default
        pos = p * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(
        statistics.median(ordered), q(0.2), q(0.8), len(ordered), tuple(samples_ms) if keep else ()
    )


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 1.0,
) -> dict[str, Timing]:
    """Median/p20/p80 per candidate; each round runs every candidate once, in a rotated order
    so none always follows a particular other (allocator and cache state carry over)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: _quantiles(s, keep=True) for name, s in samples.items()}


def time_cuda(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """do_bench's median with p20/p80 (CUDA events, L2 flushed before every call)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), -1)
    # Fallback without triton: CUDA events around each call after a warm-up.
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return _quantiles(samples)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The CPU profiler's backend prints start/stop lines on fd 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during one call, above what was allocated when it began (MiB).
    Includes the call's outputs; excludes inputs and anything alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    peak = 0
    for _ in range(2):  # the profiler rarely returns no allocation events: retry once
        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        current = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        if events:
            break
    return peak / 2**20


def best_us_per_call(fns: dict[str, Callable[[], object]], *, rounds: int, calls: int,
                     warmup: int = 200) -> dict[str, float]:
    """Host microseconds per call of each function: the best of `rounds` rounds of `calls`
    back-to-back calls (the minimum is the fixed cost without other processes' noise), every
    function timed in each round, interleaved, after `warmup` calls each."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def no_grad_call(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """module(x) under no_grad, as a model is called for inference."""
    def call():
        with torch.no_grad():
            return module(x)
    return call


def write_markdown(path: Path, lines: list[str]) -> None:
    """Print a results table and write it to `path` (its folder made if missing)."""
    text = "\n".join(lines) + "\n"
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def append_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """Append rows (header written once, when the file is new); columns from the first row."""
    import csv

    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open() as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise SystemExit(
                f"{path} has other columns than this version writes; move it aside first"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


# --- command-line checks shared by the benchmarks ----------------------------------------------
# Each refuses a bad value at parse time, in one line naming the option (argparse's
# "argument --x: ..."), instead of a traceback or a silent default once the measuring is done.


def comma_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of values out of `choices`, in the order given,
    a repeat dropped; an unknown value (a typo) or an empty list is refused."""

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list out of {', '.join(choices)}; got {text!r}")
        unknown = [s for s in items if s not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    parse.__name__ = "comma list"
    return parse


def finite_float(low: float | None = None) -> Callable[[str], float]:
    """argparse type: a finite float (NaN and inf refused), >= low where low is given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    parse.__name__ = "finite float"
    return parse


def output_file_problem(path: Path) -> str | None:
    """Why `path` cannot be written as a file (None: it can), checked before any measuring:
    a folder in its place, or its nearest existing parent not a writable folder. Creates
    nothing."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent}"
    return None
