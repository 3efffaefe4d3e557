"""The Triton interpreter's version check (ops.interpreter_problem): triton 3.6's interpreter,
the one torch 2.11 pins, fails every kernel under numpy >= 2.4 with an obscure
InterpreterError; the op says why instead."""

from __future__ import annotations

import pytest
import torch

import reclora_kernels as rk
from reclora_kernels import ops


@pytest.mark.parametrize(("triton_version", "numpy_version", "broken"), [
    ("3.6.0", "2.4.0", True),
    ("3.6.0", "2.5.5", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.1", "2.4.0", False),
    ("3.8.0", "2.5.5", False),
    ("3.10.0", "2.4.6", False),  # two-digit minor versions compare as numbers
    ("3.6.0+git1234", "2.4.0rc1", True),
])
def test_interpreter_problem_by_version(triton_version, numpy_version, broken):
    problem = ops.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and "triton>=3.7" in problem


def test_this_environment_runs_the_interpreter():
    # CI's pins (triton 3.8) are a combination that works: the Triton tests run here.
    if not ops.TRITON_IMPORTED:
        pytest.skip("triton is not installed")
    assert ops.interpreter_problem() is None


@pytest.mark.skipif("triton" not in rk.available_backends(), reason="no Triton here")
def test_backend_triton_on_cpu_names_the_fix(monkeypatch):
    monkeypatch.setattr(ops.triton, "__version__", "3.6.0")
    monkeypatch.setattr("numpy.__version__", "2.4.0")
    x = torch.randn(2, 3, 8)
    args = (x, torch.randn(5, 8), None, torch.randn(4, 2, 8), torch.randn(4, 5, 2),
            torch.rand(2, 4))
    with pytest.raises(RuntimeError, match=r"`backend` 'triton' on CPU tensors: .*numpy<2.4"):
        rk.lora_mix_linear(*args, backend="triton")
