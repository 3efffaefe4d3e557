"""Plan the Triton launches as on a named GPU, for tools that check or time the GPU path on a
machine without that GPU (scripts/triton_aot_check.py, benchmarks/bench_host_triton.py,
tests/fast_launch_check.py); `stand_in_launches` also runs Triton's launch path there.

The launch plan (reclora_kernels/triton/launch.py) then takes `card`'s tile table
(reclora_kernels/configs), passes its num_warps / num_stages and sizes the pipeline for the
shared memory a block of that card may opt into, whatever device the tensors are on. Never
used by the op itself: it replaces launch.py's lookups for the rest of the process.
"""

from __future__ import annotations

from . import configs, eager, launch

# Shared memory a block may opt into on an H100 / H200 (sm_90): 227 KiB.
SMEM_PER_BLOCK_OPTIN = 232_448

# SM counts (torch.cuda.get_device_properties(...).multi_processor_count on each card): the
# split-K choice at decode sizes depends on them.
CARD_SMS = {"NVIDIA H100 80GB HBM3": 132, "NVIDIA H200": 132}


def use_card_tables(card: str, sms: int | None = None) -> None:
    """Launch as on `card`; `sms`: its SM count for the split-K choice (None: CARD_SMS's
    entry, or, for a card not in it, the tensors' device's, 1 on a CPU)."""
    sms = CARD_SMS.get(card) if sms is None else sms
    launch.config = lambda kernel, device, tokens=None, rows=None: configs.card_config(
        card, kernel, tokens, rows)
    launch.interpreting = lambda: False
    launch._smem_optin = lambda device: SMEM_PER_BLOCK_OPTIN
    if sms is not None:
        launch._num_sms = lambda device: sms
    # Plans made before were made with the old tables.
    launch.clear_plans()
    eager._CALLS.clear()


def _force(table: str, keys: tuple, switch: str, on: bool | None) -> None:
    """entries[key][switch] = on for each key of the tile table `table` that has it, on top
    of the switches forced before (None: every table as its file says, all forcing undone);
    the plans made with the old entries are forgotten."""
    if on is None:
        configs._table.cache_clear()
    else:
        entries = configs._table(table)
        for key in keys:
            if key in entries:
                entries[key] = dict(entries[key], **{switch: on})
    launch.clear_plans()
    eager._CALLS.clear()


def force_fused(on: bool | None, table: str) -> None:
    """Force the fused GEMM (expand.fused) on or off in every size class of the tile table
    `table` (configs.table_key: a card's name, or "interpret"); None: every table as its file
    says. For benchmarks and tests that compare the two paths; the op never calls it."""
    _force(table, ("expand", "expand_short_rows"), "fused", on)


def force_tma(on: bool | None, table: str) -> None:
    """Force the fused GEMM's TMA variant (fused.TMA) on or off in every size class of the
    tile table `table`, as force_fused does for the fused GEMM itself."""
    _force(table, ("fused", "fused_short_rows"), "TMA", on)


def force_one_launch_mix(on: bool | None, table: str) -> None:
    """Force factor mode's one-launch mix (mix.ONE_LAUNCH) on or off in the tile table
    `table`, as force_fused does for the fused GEMM."""
    _force(table, ("mix",), "ONE_LAUNCH", on)


class _StandInDriver:
    """Triton's driver as an sm_90 card's (H100 / H200) would answer, for the Python side of
    a launch: device 0, stream 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def stand_in_launches(make_kernel) -> None:
    """Real JITFunction launches without a GPU (argument binding, specialization, cache key,
    kernel lookup, then the compiled kernel's `run`): the driver answers as an sm_90 card's
    and compiling a kernel returns `make_kernel(key)` instead, cached under Triton's key as
    a compiled kernel is. The process must run without TRITON_INTERPRET. For the host-cost
    benchmark and the fast-launch tests; never used by the op itself."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    def compile_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = make_kernel(key)
        self.device_caches[device][0][key] = kernel
        return kernel

    driver.set_active(_StandInDriver())
    JITFunction._do_compile = compile_stand_in
