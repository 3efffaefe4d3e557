"""benchmarks/gpu_check.sh without a GPU: its steps run with a stand-in interpreter that logs
its arguments, so the order, the rerun mode and the test selection are checked here, where a
mistake costs nothing (on the GPU machine it costs minutes of a 15-minute budget)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path: Path, *args: str) -> list[list[str]]:
    """The interpreter calls gpu_check.sh makes, each as its argument list."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\n[ "$1" = "-" ] && cat > /dev/null\n'
                    f'for a in "$@"; do printf "%s\\037" "$a"; done >> {log}\n'
                    f'echo >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def test_a_full_check_builds_then_tests_gpu_cases_then_times(tmp_path):
    calls = run_check(tmp_path)
    steps = [c for c in calls if c[:2] in (["-m", "pip"], ["-m", "pytest"])
             or c[:1] == ["benchmarks/gpu_targets.py"]]
    assert steps[0][:3] == ["-m", "pip", "install"]
    cuda, fused, tests = steps[1:4]
    # the cuda-marked tests, from the files that have them (not a collection of all tests/)
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")
                    if "mark.cuda" in p.read_text())
    assert cuda[cuda.index("-m", 1):][:2] == ["-m", "cuda"]
    assert sorted(a for a in cuda if a.startswith("tests/")) == marked
    assert "tests/test_stream_caches.py" in marked
    # then the fused GEMM's, then the op suite, whose limit cuts its tail
    assert [a for a in fused if a.startswith("tests/")] == ["tests/test_fused_gemm.py",
                                                             "tests/test_fused_tma.py"]
    files = [a for a in tests if a.startswith("tests/")]
    # the short files first: a cut by the limit falls on the op suite's tail
    assert files[0] == "tests/test_custom_ops.py::test_cuda_graph_replay"
    assert files[-1] == "tests/test_op.py"
    # one module that fails to collect (hypothesis not carried) must not stop a step
    assert all("--continue-on-collection-errors" in c for c in (cuda, fused, tests))
    assert steps[-1][0] == "benchmarks/gpu_targets.py"


def test_the_gpu_selection_parses_and_leaves_out_cpu_device_cases(tmp_path):
    tests = [c for c in run_check(tmp_path) if c[:2] == ["-m", "pytest"]][2]  # the op suite
    files = [a for a in tests if a.startswith("tests/")]
    expression = tests[tests.index("-k") + 1]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *files, "-k", expression],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and not [i for i in ids if i.endswith("-cpu]")]
    assert "deselected" in done.stdout  # the CPU-device cases CI runs


def test_a_rerun_builds_and_runs_only_the_given_tests(tmp_path):
    ids = "tests/test_native.py::test_schemas tests/test_op.py::test_fuzz_shapes"
    calls = run_check(tmp_path, "--only", ids)
    pytest_calls = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert [c[-2:] for c in pytest_calls] == [shlex.split(ids)]
    assert any(c[:3] == ["-m", "pip", "install"] for c in calls)
    assert not any(c[:1] == ["benchmarks/gpu_targets.py"] for c in calls)
