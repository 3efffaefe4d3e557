"""Checks shared by the tests of the CPU op's run-time switches (reclora::cpu_thin_gemm,
reclora::cpu_bf16_gemm): `switch(mode)` sets 0 or 1 and returns the mode before; -1 only
reads it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest


@contextlib.contextmanager
def mode(switch, value: int):
    """The switch at `value` inside the block, restored after it."""
    before = switch(value)
    try:
        yield
    finally:
        switch(before)


def check_round_trip(switch) -> None:
    """The switch reports, sets and restores its mode, and refuses modes other than -1/0/1."""
    now = switch(-1)
    assert now in (0, 1)
    assert switch(0) == now
    assert switch(-1) == 0
    switch(now)
    with pytest.raises(RuntimeError, match="mode must be -1, 0 or 1"):
        switch(2)


def default_modes(switch_name: str, env_var: str, expected: dict) -> None:
    """A fresh process's default mode for each value of env_var (None: unset) is expected's."""
    code = f"import torch, reclora_kernels; print(torch.ops.reclora.{switch_name}(-1))"
    for value, want in expected.items():
        env = dict(os.environ)
        env.pop(env_var, None)
        if value is not None:
            env[env_var] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()[-1]
        assert int(out) == want, (env_var, value, out)
