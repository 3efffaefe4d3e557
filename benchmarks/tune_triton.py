"""Sweep the Triton backend's tile configs on this GPU; write the winners as data.

    python benchmarks/tune_triton.py [--out reclora_kernels/configs/<device>.json]
                                     [--budget-s SECONDS]

Times the whole forward of lora_mix_linear (bf16, d = 4096, 16 meta-LoRAs of rank 8, dense
factor mode; KERNEL_SPEC.md's sizes) at T = 8192 in 64 rows (long rows) and T = 64 in 64
rows (decode: one token per row), and the forward+backward at T = 8192 for the shrink and
outer kernels; the fused GEMM (expand.fused) is swept too, tiles then schedule (TMA,
persistent grid, tl.range options), and kept on per size class only where its forward beats
cuBLAS + the expand, and the dense mixing's one launch (mix.ONE_LAUNCH)
against two cuBLAS GEMMs and a memset. Last, `auto`: per size class the fastest backend,
written only where it is no slower than plain torch's materialise+bmm timed beside it (what
was timed goes under "_auto_measured"). Medians from triton.testing.do_bench. GPU only.

Most candidates compile a kernel first (~150 in all), so a full sweep can outlast a lent
GPU's time. --budget-s stops the sweeps when it is spent (each keeps the best it timed),
keeping AUTO_RESERVE_S for the `auto` choice, and the card's file is rewritten after every
stage (atomically, over the entries it held), so a run cut off still leaves what it measured.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import baselines  # noqa: E402
from benchmarks.common import finite_float, output_file_problem  # noqa: E402
from reclora.checkpoint import atomic_write  # noqa: E402
from reclora.cli import ArgumentParser  # noqa: E402
from reclora_kernels import lora_mix_linear  # noqa: E402
from reclora_kernels.triton import configs, eager, launch  # noqa: E402

D, M, RANK = 4096, 16, 8


def problem(tokens: int, rows: int, dtype=torch.bfloat16, dev: str = "cuda"):
    x = torch.randn(rows, tokens // rows, D, device=dev, dtype=dtype)
    weight = torch.randn(D, D, device=dev, dtype=dtype) / D**0.5
    a = (torch.randn(M, RANK, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
    b = (torch.randn(M, D, RANK, device=dev, dtype=dtype) / RANK**0.5).requires_grad_()
    w = torch.softmax(torch.randn(rows, M, device=dev), -1).to(dtype).requires_grad_()
    return x, weight, a, b, w


def timed(fn) -> float:
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=60)
    except Exception as err:  # a config that does not compile (shared memory) is skipped
        print(f"    skipped: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        return float("inf")


# Seconds kept back from --budget-s for pick_auto: per size class, a forward of each backend
# (the Triton kernels compile first: assumed ~5 s each on the GPU machine; never measured
# there) and plain torch's two (materialise+bmm, F.linear).
AUTO_RESERVE_S = 60.0


class Budget:
    """The sweeps' time: out() once `seconds` (None: no limit) have passed since the start;
    `cut` names the entries whose sweep stopped early."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        self.clock = clock
        self.deadline = float("inf") if seconds is None else clock() + seconds
        self.cut: list[str] = []

    def out(self) -> bool:
        return self.clock() > self.deadline


NO_LIMIT = Budget(None)


def set_entry(table: dict, key: str, value: dict) -> None:
    """table[key] = value, and the launch plans made with the old entry forgotten (they are
    cached per signature: without this every candidate would time the first one's plan)."""
    table[key] = value
    launch.clear_plans()
    eager._CALLS.clear()


def sweep(table: dict, key: str, candidates: list[dict], fn, budget: Budget = NO_LIMIT) -> dict:
    """Time each candidate, laid over table[key] as it stood (so the entry's switches the
    grid does not sweep, e.g. outer.ONE_PASS and fused.SHRINK, are kept), and leave the
    fastest in the table."""
    current = dict(table[key])
    best, best_ms = current, float("inf")
    for done, cand in enumerate(candidates):
        if budget.out():
            print(f"  {key}: out of the time budget, {len(candidates) - done} of "
                  f"{len(candidates)} candidates not timed", flush=True)
            budget.cut.append(key)
            break
        cand = dict(current, **cand)
        set_entry(table, key, cand)
        ms = timed(fn)
        print(f"  {key} {cand} -> {ms * 1e3:.1f} us", flush=True)
        if ms < best_ms:
            best, best_ms = cand, ms
    set_entry(table, key, best)
    print(f"  best {key}: {best} ({best_ms * 1e3:.1f} us)", flush=True)
    return best


def grid(**axes) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, vals)) for vals in itertools.product(*axes.values())]


# The fused GEMM's schedule, swept with its best tiles: pointer loads or TMA descriptors, a
# program a tile or a persistent grid of 1-2 programs an SM, and the tile loop's options.
SCHEDULES = grid(TMA=[False, True], PROGRAMS_PER_SM=[0, 1, 2], FLATTEN=[False, True],
                 WARP_SPECIALIZE=[False, True])


def choose_fused(table: dict, expand_key: str, fused_key: str, fused_tiles: list[dict],
                 fn, budget: Budget = NO_LIMIT) -> None:
    """Sweep the fused GEMM's tiles with expand.fused on (under the table's schedule), then
    its schedule (SCHEDULES) with the best tiles; keep it on only if its best beats the best
    unfused expand (already in table[expand_key]) on `fn`. Out of time before it starts:
    the fused GEMM stays off (unmeasured)."""
    unfused = dict(table[expand_key], fused=False)
    set_entry(table, expand_key, unfused)
    if budget.out():
        print(f"  {expand_key}.fused: out of the time budget, left off", flush=True)
        budget.cut.append(fused_key)
        return
    unfused_ms = timed(fn)
    set_entry(table, expand_key, dict(unfused, fused=True))
    schedule = {k: v for k, v in table[fused_key].items() if k in SCHEDULES[0]}
    tiles = sweep(table, fused_key, [dict(t, **schedule) for t in fused_tiles], fn, budget)
    tiles = {k: v for k, v in tiles.items() if k not in SCHEDULES[0]}
    sweep(table, fused_key, [dict(tiles, **s) for s in SCHEDULES], fn, budget)
    fused_ms = timed(fn)
    on = fused_ms < unfused_ms
    set_entry(table, expand_key, dict(unfused, fused=on))
    print(f"  {expand_key}.fused = {on}: fused {fused_ms * 1e3:.1f} us, cuBLAS + expand "
          f"{unfused_ms * 1e3:.1f} us", flush=True)


def _forward(inputs, backend: str):
    x, weight, a, b, w = inputs
    return lambda: lora_mix_linear(x, weight, None, a, b, w, scale=2.0, backend=backend)


def workloads() -> dict:
    """The timed calls, each over its own inputs: "prefill" (T = 8192 in 64 rows, forward),
    "prefill_fwd_bwd" (the same with the gradients to the banks and the mixture), "decode"
    (T = 64 in 64 rows) and "mixed" (a prefill and a T = 64 in 8 rows forward together)."""
    prefill, decode, decode8 = problem(8192, 64), problem(64, 64), problem(64, 8)
    fwd, small = _forward(prefill, "triton"), _forward(decode8, "triton")
    x, _, a, b, w = prefill
    g = torch.randn_like(x)

    def fwd_bwd():
        torch.autograd.grad(fwd(), [a, b, w], g)

    def mixed():
        fwd()
        small()

    return {"prefill": fwd, "prefill_fwd_bwd": fwd_bwd, "decode": _forward(decode, "triton"),
            "mixed": mixed}


FLOOR = "materialise+bmm"  # plain torch: the RecLoRA reference code's path (baselines.py)


def _plain_torch(inputs) -> dict:
    """Plain torch on the op's inputs: materialise+bmm (the floor a backend must beat) and
    F.linear (the base alone, for scale)."""
    x, weight, a, b, w = inputs
    return {FLOOR: lambda: baselines.materialise_bmm(x, weight, None, a, b, w, None, 2.0,
                                                     "factor"),
            "F.linear": lambda: F.linear(x, weight)}


def pick_auto(configs) -> tuple[dict, dict]:
    """The backend `auto` takes on this card, per size class ("decode": under 32 tokens per
    row on average, else "prefill"): the fastest of triton and cuda on the spec sizes, only
    where it is no slower than plain torch's materialise+bmm on the same inputs (issue 12:
    never a backend measured slower than plain torch). A class where none is, or where every
    backend failed, gets no entry: configs.auto_backend then takes its default (triton).
    Returns ({class: backend}, {class: what was timed, in us, and a note}): the second goes
    into the card's file as "_auto_measured", which the op does not read."""
    from reclora_kernels import available_backends

    chosen, measured = {}, {}
    for cls, (tokens, rows) in {"prefill": (8192, 64), "decode": (64, 8)}.items():
        inputs = problem(tokens, rows)
        backends = [b for b in ("triton", "cuda") if b in available_backends()]
        times = {backend: timed(_forward(inputs, backend)) for backend in backends}
        torch_ms = {name: timed(fn) for name, fn in _plain_torch(inputs).items()}
        best = min(times, key=times.get) if times else None
        floor = torch_ms[FLOOR]
        if best is None or not math.isfinite(times[best]):
            note = "every backend failed to run: no entry (auto takes its default, triton)"
        elif not math.isfinite(floor):
            note = (f"plain torch's {FLOOR} failed to run, so no backend was shown to beat it: "
                    "no entry (auto takes its default, triton)")
        elif times[best] > floor:
            note = (f"no backend beats plain torch here: the fastest, {best}, takes "
                    f"{times[best] / floor:.2f}x {FLOOR}'s time; no entry (auto takes its "
                    "default, triton)")
        else:
            chosen[cls] = best
            note = f"{best}: {times[best] / floor:.2f}x {FLOOR}'s time"
        us = {k: round(v * 1e3, 1) if math.isfinite(v) else None
              for k, v in {**times, **torch_ms}.items()}
        measured[cls] = {"us": us, "note": note}
        flag = "" if cls in chosen else "WARNING: "
        print(f"  {flag}auto[{cls}]: {note} ({us} us)", flush=True)
    return chosen, measured


def card_file(name: str) -> Path:
    """The card's tile table in reclora_kernels/configs (what configs._table reads)."""
    return configs.CONFIG_DIR / configs._device_file_name(name)


def held_entries(name: str) -> dict:
    """The entries the card's file in reclora_kernels/configs held before this run."""
    path = card_file(name)
    return json.loads(path.read_text()) if path.exists() else {}


def save_winners(path: Path, winners: dict, about: str, held: dict) -> None:
    """Write the card's file atomically (reclora.checkpoint.atomic_write): the entries it
    `held`, the winners over them (an entry not tuned yet keeps its old value or, absent,
    default.json's), wherever --out puts it."""
    text = json.dumps({**held, **winners, "_about": about}, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _about(name: str, budget: Budget, stages_left: list[str]) -> str:
    about = (f"Tuned by benchmarks/tune_triton.py on {name} (torch {torch.__version__}, "
             f"triton {triton.__version__}).")
    if budget.cut:
        about += f" Cut short by --budget-s in: {', '.join(budget.cut)}."
    if stages_left:
        about += f" Not tuned yet: {', '.join(stages_left)} (held or default.json's values)."
    return about


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="card file to write (default: reclora_kernels/configs/<card>.json, "
                        "or $OUT/<card>.json where $OUT is set)")
    # A finite number: NaN passed the reserve's check below and never ran out (clock() > nan
    # is False), so the sweep went on unbounded; inf is no limit, which is leaving it out.
    parser.add_argument("--budget-s", type=finite_float(), default=None,
                        help="stop sweeping after this many seconds (keeping "
                             f"{AUTO_RESERVE_S:.0f} s for the auto choice); default: no limit")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= AUTO_RESERVE_S:
        parser.error(f"--budget-s must exceed {AUTO_RESERVE_S:.0f} (kept for the auto "
                     f"choice), got {args.budget_s:g}")
    # Before any sweep: the file is first written after the first stage's minutes of GPU time.
    problem = args.out and output_file_problem(args.out)
    if problem:
        parser.error(f"argument --out: cannot write {args.out}: {problem}")
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    table = configs._table(name)
    print(f"tuning on {name}, torch {torch.__version__}, triton {triton.__version__}")
    budget = Budget(None if args.budget_s is None else args.budget_s - AUTO_RESERVE_S)
    out = args.out or card_file(name)
    if args.out is None and os.environ.get("OUT"):  # the device machine: only $OUT comes back
        out = Path(os.environ["OUT"]) / out.name
    held = held_entries(name)
    stages = ["expand", "fused", "shrink", "outer", "expand_short_rows", "fused_short_rows",
              "mix", "auto"]
    winners = {}

    def stage_done(*keys: str) -> None:
        for key in keys:
            stages.remove(key)
        save_winners(out, winners, _about(name, budget, stages), held)

    # Each over its own inputs (a lambda over main's rebound locals once timed the decode
    # problem where the mixing's sweep meant the prefill).
    calls = workloads()
    fwd, fwd_bwd, dec = calls["prefill"], calls["prefill_fwd_bwd"], calls["decode"]
    winners["expand"] = sweep(table, "expand", grid(
        BLOCK_T=[32, 64, 128], BLOCK_N=[64, 128, 256], MAX_BLOCK_R=[64], num_warps=[4, 8],
        base_first=[False, True], fused=[False]), fwd, budget)
    choose_fused(table, "expand", "fused", grid(
        BLOCK_T=[64, 128], BLOCK_N=[128, 256], BLOCK_K=[64], GROUP_T=[8], MAX_BLOCK_R=[64],
        num_warps=[4, 8], num_stages=[3, 4]), fwd, budget)
    winners["expand"], winners["fused"] = table["expand"], table["fused"]
    stage_done("expand", "fused")
    winners["shrink"] = sweep(table, "shrink", grid(
        BLOCK_T=[64, 128], BLOCK_K=[64, 128], MAX_BLOCK_R=[64], num_warps=[4], num_stages=[3]),
        fwd_bwd, budget)
    winners["outer"] = sweep(table, "outer", grid(
        BLOCK_T=[32, 64], BLOCK_O=[64, 128], MAX_BLOCK_R=[64], num_warps=[4], num_stages=[3]),
        fwd_bwd, budget)
    stage_done("shrink", "outer")
    winners["expand_short_rows"] = sweep(table, "expand_short_rows", grid(
        BLOCK_T=[16, 32], BLOCK_N=[64, 128, 256], MAX_BLOCK_R=[64], num_warps=[4],
        base_first=[False, True], fused=[False]), dec, budget)
    choose_fused(table, "expand_short_rows", "fused_short_rows", grid(
        BLOCK_T=[16, 32], BLOCK_N=[32, 64, 128], BLOCK_K=[128], GROUP_T=[8], MAX_BLOCK_R=[64],
        num_warps=[4], num_stages=[3, 4]), dec, budget)
    winners["expand_short_rows"] = table["expand_short_rows"]
    winners["fused_short_rows"] = table["fused_short_rows"]
    stage_done("expand_short_rows", "fused_short_rows")

    # The dense mixing: one Triton launch (which also zeroes s) or two cuBLAS GEMMs and a
    # memset (ONE_LAUNCH false), timed over a prefill and a decode forward together (the
    # entry has no size class).
    mix_base = {k: v for k, v in table["mix"].items() if k in ("BLOCK", "num_warps")}
    winners["mix"] = sweep(table, "mix", [dict(mix_base, ONE_LAUNCH=False)] + [
        dict(mix_base, ONE_LAUNCH=True, TILE=tile, MAX_ROWS=rows)
        for tile in (2048, 4096, 8192) for rows in (16, 32, 64)], calls["mixed"], budget)
    stage_done("mix")
    # always: AUTO_RESERVE_S was kept for it. The whole "auto" entry is replaced, so a class
    # left out now does not keep an earlier run's choice.
    winners["auto"], winners["_auto_measured"] = pick_auto(configs)
    stage_done("auto")
    print(out.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
