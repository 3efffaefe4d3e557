"""RowPlan: which row every token belongs to, built once per batch and shared by every layer.

Three layouts, cheapest first:
- implicit: x is [R, L, d_in]; token n belongs to row n // L. No tensor at all, no sort.
- sorted: packed x [T, d_in] whose row_ids never decrease (e.g. sequences packed in order):
  the row ids are used as they are, plus where each row starts.
- unsorted: packed x with row_ids in any order: a stable argsort gives the row-sorted token
  order, so the kernels can visit each row's tokens together.

A packed plan is made by `row_plan(row_ids, rows)`, which checks the ids against the row count
and tests whether they are sorted with ONE host read (a device sync on a GPU). Make it once per
batch (reclora.personalize does) and pass it to every lora_mix_linear call: the op itself then
reads no data on the host. Plans built inside torch.compile or CUDA-graph capture skip the
check (a sync would break the graph) and always sort.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@lru_cache(maxsize=1)
def _has_cuda() -> bool:
    return torch.cuda.is_available()  # ~5 us per call on a CUDA build without a GPU: cached


def tracing() -> bool:
    """True while torch.compile traces or a CUDA graph captures: no host reads allowed."""
    if torch.compiler.is_compiling():
        return True
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True, eq=False)
class RowPlan:
    """Token -> row map of one batch. Fields are None where the layout makes them implicit.

    rows: R; tokens: T; row_len: L > 0 for implicit rows (T = R * L), 0 for packed;
    row_ids [T] int64 (packed: the row of each token, in x's token order);
    order [T] int32 (unsorted only: sorted position -> token);
    sorted_rows [T] int32 (packed: the row of each sorted position);
    row_start [R + 1] int32 (packed: where each row's run of sorted positions begins).
    """

    rows: int
    tokens: int
    row_len: int = 0
    row_ids: torch.Tensor | None = None
    order: torch.Tensor | None = None
    sorted_rows: torch.Tensor | None = None
    row_start: torch.Tensor | None = None
    # Set only by this module's row_plan (and the op's own rebuild of a plan it was given):
    # the kernels index with a packed plan's ids unchecked, so a hand-built one is refused.
    _made_by: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Shape, dtype and layout consistency (no data read): a plan the kernels would read
        out of bounds with is refused here, on every backend and every path."""
        if self._made_by is _REBUILT:
            # The op's rebuild of a checked plan inside its custom op, on every call (the
            # checks below cost ~3 us of Python); never handed out.
            return

        def bad(what: str) -> None:
            raise ValueError(f"RowPlan: invalid `plan` ({what}); make plans with "
                             f"reclora_kernels.row_plan")

        for name in ("rows", "tokens", "row_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
                bad(f"{name} must be an int, got {type(value).__name__}")
            if isinstance(value, int) and value < 0:
                bad(f"{name} must be >= 0, got {value}")
        tensors = (self.row_ids, self.order, self.sorted_rows, self.row_start)
        if self.row_len > 0 or self.row_ids is None:
            # Implicit: token n is in row n // row_len, so T must be exactly R * L.
            if any(t is not None for t in tensors):
                bad("an implicit plan (row_len > 0 or no row_ids) holds no tensors")
            if self.tokens != self.rows * self.row_len:
                bad(f"an implicit plan needs tokens = rows * row_len, got tokens={self.tokens},"
                    f" rows={self.rows}, row_len={self.row_len}")
            return
        if self._made_by is not _MADE:
            bad("a packed plan (with row_ids) must come from reclora_kernels.row_plan, which "
                "checks the row ids")
        ids = self.row_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1 \
                or ids.shape[0] != self.tokens:
            bad(f"row_ids must be int64 [T={self.tokens}]")
        if self.tokens == 0:
            return
        for name, length in (("sorted_rows", self.tokens), ("row_start", self.rows + 1),
                             ("order", self.tokens)):
            t = getattr(self, name)
            if t is None and name == "order":
                continue
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1
                    or t.shape[0] != length or t.device != ids.device):
                bad(f"{name} must be int32 [{length}] on row_ids' device")

    @property
    def implicit(self) -> bool:
        return self.row_len > 0 or self.tokens == 0

    @property
    def device(self) -> torch.device | None:
        return None if self.row_ids is None else self.row_ids.device

    def token_rows(self, device: torch.device) -> torch.Tensor:
        """row_ids [T] int64 on `device` (materialised for an implicit plan, no host sync;
        cached by size, read-only: the native kernels take row ids as a tensor)."""
        if self.row_ids is not None:
            return self.row_ids
        return cached_tensor(_implicit_rows, self.tokens, self.row_len, device)

    def describe(self) -> str:
        kind = "implicit" if self.implicit else ("unsorted" if self.order is not None
                                                 else "sorted")
        return f"RowPlan({kind}, rows={self.rows}, tokens={self.tokens})"

    __repr__ = describe


_CPU = torch.device("cpu")


def stream_key(device: torch.device) -> int:
    """The current stream of a CUDA `device` (0 elsewhere), in the key of every cached
    read-only device tensor, so that each is made and read on one stream: made on stream S
    (its fill queued there) and read from another, a kernel could read it before the fill
    ran, and once evicted its memory goes back to S's pool while the other stream may still
    be reading it."""
    if device == _CPU or device.type != "cuda":  # == first: .type costs ~0.25 us, == 0.05
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


def cached_tensor(cache, *args) -> torch.Tensor:
    """cache(*args, stream), for an lru_cache'd function that makes a read-only tensor on
    the device args end with, one per stream (stream_key): made fresh while tracing (a
    tensor made during CUDA-graph capture holds nothing until replay) and under a torch.func
    transform (one made there is the transform's wrapper: kept, it no longer counted writes,
    so a later write went unseen), and made again if someone it was handed to wrote it in
    place. `cache` makes its tensors outside inference mode (see _implicit_rows)."""
    if tracing() or torch._C._are_functorch_transforms_active():
        return cache.__wrapped__(*args)
    stream = stream_key(args[-1])
    tensor = cache(*args, stream)  # positional: a keyword makes lru_cache's key slower
    if tensor._version:
        cache.cache_clear()
        tensor = cache(*args, stream)
    return tensor


_MADE = object()  # RowPlan._made_by of the plans made here
_REBUILT = object()  # ... and of the op's own copy of one (reclora_kernels.ops._plan_of)


@lru_cache(maxsize=64)
def _implicit_rows(tokens: int, row_len: int, device: torch.device, stream: int = 0
                   ) -> torch.Tensor:
    # stream: a cache key only (cached_tensor). Made outside inference mode: a cached tensor
    # made inside it (a served batch) could not be saved for a later training call's backward.
    with torch.inference_mode(False):
        if tokens == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        return torch.arange(tokens, device=device) // row_len


def implicit_plan(rows: int, row_len: int) -> RowPlan:
    """x [R, L, d_in]: token n is in row n // L. (Cached: plans are immutable, and this runs
    on every call; not while tracing: torch.export's symbolic sizes (SymInt) cannot be
    hashed, and the cache raised "unhashable type: non-nested SymInt".)"""
    if tracing():
        return _make_implicit_plan(rows, row_len)
    return _cached_implicit_plan(rows, row_len)


def _make_implicit_plan(rows: int, row_len: int) -> RowPlan:
    return RowPlan(rows=rows, tokens=rows * row_len, row_len=row_len if rows * row_len else 0)


_cached_implicit_plan = lru_cache(maxsize=256)(_make_implicit_plan)


def row_plan(row_ids: torch.Tensor, rows: int, *, check: bool = True) -> RowPlan:
    """The plan of packed tokens: row_ids [T] integer, every value in [0, rows).

    check=True reads min, max and sortedness in one host read and raises IndexError on an
    id out of range; check=False costs no sync, but then always sorts, and an id out of range
    stops the work at a device-side assert (on a GPU the error comes at the next sync; on
    the CPU, where a read costs no sync, it is the IndexError). Either way the plan is made
    once per batch.
    """
    if not isinstance(row_ids, torch.Tensor):
        raise TypeError(f"row_plan: `row_ids` must be a torch.Tensor, got "
                        f"{type(row_ids).__name__}")
    if row_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"row_plan: `row_ids` must be an integer tensor, got {row_ids.dtype}")
    if row_ids.dim() != 1:
        raise ValueError(f"row_plan: `row_ids` must be 1-D [T], got shape {list(row_ids.shape)}")
    # (A SymInt under torch.export with a dynamic row count.)
    if not isinstance(rows, (int, torch.SymInt)) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"row_plan: `rows` must be an int >= 0, got {rows!r}")
    # A copy: the caller may refill its buffer for the next batch before this one's backward
    # (Triton's output-mode dw read the refilled ids).
    ids = row_ids.to(torch.int64, copy=True)
    tokens = ids.numel()
    if tokens == 0:
        return RowPlan(rows=rows, tokens=0, row_ids=ids, _made_by=_MADE)
    if rows == 0:
        raise IndexError("row_plan: `row_ids` is not empty but there are 0 rows")
    is_sorted = False
    # On the CPU a read costs no sync, so check=False reads there too; while tracing, none.
    traced = tracing()
    host_read = (check or ids.device.type == "cpu") and not traced
    if not host_read and not traced:
        # Never a kernel reading past a table through an unchecked id (it segfaulted).
        torch._assert_async(((ids >= 0) & (ids < rows)).all(),
                            f"row_plan: `row_ids` values must lie in [0, {rows})")
    if host_read:
        stats = torch.stack([ids.min(), ids.max(),
                             (ids[1:] >= ids[:-1]).all().long() if tokens > 1
                             else ids.new_ones(())])
        lo, hi, is_sorted = stats.tolist()  # the one host read of the batch
        if lo < 0 or hi >= rows:
            raise IndexError(f"lora_mix_linear: `row_ids` values must lie in [0, {rows}) "
                             f"(rows of adapter_w), got values in [{lo}, {hi}]")
    bounds = torch.arange(rows + 1, device=ids.device, dtype=torch.int64)
    if is_sorted:
        sorted_rows, order = ids, None
    else:
        order = torch.argsort(ids, stable=True)
        sorted_rows = ids[order]
        order = order.to(torch.int32)
    # searchsorted (not bincount + cumsum) has no data-dependent output size: no sync.
    row_start = torch.searchsorted(sorted_rows, bounds).to(torch.int32)
    return RowPlan(rows=rows, tokens=tokens, row_ids=ids, order=order,
                   sorted_rows=sorted_rows.to(torch.int32), row_start=row_start,
                   _made_by=_MADE)
