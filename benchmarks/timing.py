"""GPU timing helpers for benchmark scripts (issue 12, items 6 and 7).

- `event_ms(calls)`: median GPU time of one call, CUDA events around each call, the calls
  rotating over a pool of input sets (build it with `pool_count`, larger than L2, so no
  operand comes from cache that would come from DRAM in a model).
- `graph_replay_ms(calls)`: the same calls captured into CUDA graphs (one per input set) and
  timed by replay: what decode sizes cost once Python and launch overhead are gone.
- `host_us_per_call(fn)`: host microseconds per eager call: N calls launched back to back,
  wall time until the last launch returns, before synchronizing. Works on the CPU too
  (there the call's compute is included).
- `kernel_profile(fn)` / `launches_per_call(fn)`: kernels per call and their GPU time, from
  torch.profiler over N calls.

Every CUDA-only helper raises `CudaUnavailable` with a readable reason when there is no GPU;
`cuda_reason()` gives that reason (None when CUDA is usable) so a script can skip and say why.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import rotating  # one pool-rotation helper for every benchmark

Call = Callable[[], object]


class CudaUnavailable(RuntimeError):
    """A CUDA-only measurement was asked for where CUDA cannot run."""


def cuda_reason() -> str | None:
    """Why CUDA timing cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _need_cuda(what: str) -> None:
    reason = cuda_reason()
    if reason:
        raise CudaUnavailable(f"{what} needs a CUDA GPU: {reason}")


@dataclass(frozen=True)
class Timing:
    median: float
    p20: float
    p80: float
    reps: int
    unit: str = "ms"

    def __str__(self) -> str:
        return (f"{self.median:.4g} {self.unit} "
                f"(p20-p80 {self.p20:.4g}-{self.p80:.4g}, n={self.reps})")


def _summary(samples: list[float], unit: str) -> Timing:
    ordered = sorted(samples)

    def q(p: float) -> float:
        pos = p * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(statistics.median(ordered), q(0.2), q(0.8), len(ordered), unit)


# --- input pools ------------------------------------------------------------------------------


def l2_bytes(device: torch.device | str | None = None) -> int:
    """L2 size of the GPU (50 MB on an H100 SXM); 64 MB when unknown or on the CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
        size = getattr(props, "L2_cache_size", 0)
        if size:
            return int(size)
    return 64 * 2**20


def pool_count(set_bytes: int, device: torch.device | str | None = None, *, times: float = 3.0,
               cap: int = 16) -> int:
    """Input sets to rotate so the pool holds `times` x L2 (no partial residency)."""
    return max(1, min(cap, math.ceil(times * l2_bytes(device) / max(set_bytes, 1))))


# --- CUDA events ------------------------------------------------------------------------------


def event_ms(calls: list[Call] | Call, *, warmup: int = 5, reps: int = 50) -> Timing:
    """Median milliseconds of one call, a CUDA event pair around each, rotating the pool.
    Events are read after the last call, so the host does not sync between calls."""
    _need_cuda("event_ms")
    fn = rotating(calls if isinstance(calls, list) else [calls])
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in events], "ms")


def wall_ms(calls: list[Call] | Call, *, warmup: int = 3, reps: int = 20) -> Timing:
    """Median wall-clock milliseconds of one call (synchronizing around each when CUDA is
    in use): the CPU counterpart of `event_ms`."""
    fn = rotating(calls if isinstance(calls, list) else [calls])
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else (lambda: None)
    samples = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples, "ms")


def graph_replay_ms(calls: list[Call] | Call, *, warmup: int = 3, reps: int = 50,
                    replays_per_rep: int = 10) -> Timing:
    """Median milliseconds of one call under CUDA-graph replay: each input set's call is
    captured into its own graph (warmed on a side stream first, as torch asks), then the
    graphs are replayed in turn, `replays_per_rep` between two events."""
    _need_cuda("graph_replay_ms")
    calls = calls if isinstance(calls, list) else [calls]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for fn in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    i = 0
    for start, end in events:
        start.record()
        for _ in range(replays_per_rep):
            graphs[i % len(graphs)].replay()
            i += 1
        end.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) / replays_per_rep for s, e in events], "ms")


# --- host time --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostTime:
    us_per_call: Timing
    drain_us: float  # after the last launch returned: time until the GPU finished (median)
    gpu_bound: bool  # the GPU, not the host, set the pace: us_per_call is then an upper bound

    def __str__(self) -> str:
        flag = " (GPU-bound: an upper bound)" if self.gpu_bound else ""
        return f"{self.us_per_call.median:.1f} us per call{flag}"


def host_us_per_call(fn: Call, *, calls: int = 100, repeats: int = 7, warmup: int = 10) -> HostTime:
    """Host microseconds per eager call: `calls` calls launched back to back, wall time until
    the last one returns, before any synchronize; the median over `repeats`. With CUDA, the
    time the GPU then needs to drain is measured too: if it is long, the launch queue was full
    and the host waited for the GPU (choose sizes where the GPU is not the bottleneck)."""
    for _ in range(warmup):
        fn()
    use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    per_call, drains = [], []
    for _ in range(repeats):
        if use_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        if use_cuda:
            torch.cuda.synchronize()
        drains.append((time.perf_counter() - t1) * 1e6)
        per_call.append((t1 - t0) * 1e6 / calls)
    timing = _summary(per_call, "us")
    drain = statistics.median(drains)
    # The queue holds ~1000 launches: a GPU that is behind shows as a drain long against
    # the host's own time for the batch.
    return HostTime(timing, drain, use_cuda and drain > 0.5 * timing.median * calls)


# --- kernels per call (torch.profiler) --------------------------------------------------------


@dataclass(frozen=True)
class KernelStat:
    name: str
    per_call: float  # launches per call
    us_per_call: float  # GPU time per call


def kernel_profile(fn: Call, *, calls: int = 10, warmup: int = 3) -> list[KernelStat]:
    """GPU kernels (and memsets, memcpys) of `fn`, aggregated by name, per call, longest
    first, from torch.profiler's CUDA activity over `calls` calls."""
    _need_cuda("kernel_profile")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    times: dict[str, float] = {}
    for evt in prof.events():
        if not is_device_launch(evt, DeviceType.CUDA):
            continue
        counts[evt.name] = counts.get(evt.name, 0) + 1
        times[evt.name] = times.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    stats = [KernelStat(name, counts[name] / calls, times[name] / calls) for name in counts]
    return sorted(stats, key=lambda s: -s.us_per_call)


def is_device_launch(evt, cuda) -> bool:
    """Whether a profiler event is a launch on the GPU (`cuda`: DeviceType.CUDA). A
    record_function range (the op's own "reclora::..." label) also comes back as a
    CUDA-side gpu_user_annotation spanning its kernels: not a launch."""
    return (evt.device_type == cuda and not getattr(evt, "is_user_annotation", False)
            and not evt.name.startswith("reclora::"))


def launch_kind(name: str) -> str:
    """"memsets", "memcpys" (host transfers) or "kernels" for a GPU event's name. torch
    2.11's torch.zeros on CUDA is a fill kernel (FillFunctor), not a cudaMemset."""
    if name.startswith("Memset") or "FillFunctor" in name:
        return "memsets"
    return "memcpys" if name.startswith("Memcpy") else "kernels"


def launches_per_call(fn: Call, *, calls: int = 10) -> dict[str, float]:
    """{"kernels": .., "memsets": .., "memcpys": ..} per call (memcpys: host transfers)."""
    out = {"kernels": 0.0, "memsets": 0.0, "memcpys": 0.0}
    for stat in kernel_profile(fn, calls=calls):
        out[launch_kind(stat.name)] += stat.per_call
    return out


def profile_table(stats: list[KernelStat], *, width: int = 60, limit: int = 15) -> list[str]:
    lines = [f"  {'kernel':{width}s} {'per call':>8s} {'us/call':>9s}"]
    for s in stats[:limit]:
        name = s.name if len(s.name) <= width else s.name[: width - 3] + "..."
        lines.append(f"  {name:{width}s} {s.per_call:8.2f} {s.us_per_call:9.1f}")
    if len(stats) > limit:
        rest = stats[limit:]
        label = f"({len(rest)} more)"
        lines.append(f"  {label:{width}s} {sum(s.per_call for s in rest):8.2f} "
                     f"{sum(s.us_per_call for s in rest):9.1f}")
    lines.append(f"  {'total':{width}s} {sum(s.per_call for s in stats):8.2f} "
                 f"{sum(s.us_per_call for s in stats):9.1f}")
    return lines
