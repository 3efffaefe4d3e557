"""Test-session setup: Triton runs through its interpreter when there is no GPU, every
Python-backend output is NaN-poisoned before a kernel writes it, every test starts from
global RNGs seeded by its node id (the seed is printed with a failure), and datasets and
caches (torch.compile's too) live in a session temporary folder, never in ~/.cache/reclora."""

import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels (at import of reclora_kernels.triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RECLORA_POISON"] = "1"

# Under pytest-xdist (scripts/run_tests.sh runs one worker a core on a multi-core machine) the
# workers share the cores: torch's own intra-op pool in each worker would oversubscribe them
# (OpenMP threads spinning against each other). Tests that set a thread count restore it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the machine is shared: tiny models stay fast and
    leave the other cores free); the count is restored after. Files opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_seed(nodeid: str) -> int:
    """The seed of a test: stable across runs and machines, different per test; override
    every test's seed with RECLORA_TEST_SEED to look for seed-dependent failures."""
    salt = os.environ.get("RECLORA_TEST_SEED", "")
    return zlib.crc32(f"{nodeid}{salt}".encode()) & 0x7FFFFFFF


test_seed.__test__ = False  # not a test, despite the name


@pytest.fixture(autouse=True)
def _seeded_rngs(request):
    """torch, numpy and random seeded from the node id: make_inputs(seed=None), randn_like,
    make_synthetic(seed=None) ... all draw from these, so a failure replays exactly."""
    seed = test_seed(request.node.nodeid)
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            rep.sections.append(("seed", f"global RNGs seeded with {seed} "
                                 f"(zlib.crc32 of the node id; RECLORA_TEST_SEED salts it)"))


@pytest.fixture(scope="session", autouse=True)
def _temporary_data_dir(tmp_path_factory):
    """$RECLORA_DATA in a session temporary folder holding ML-100K copied from the installed
    recbole wheel (where the set-up gets it), so no test reads or writes ~/.cache/reclora;
    the MiniLM item embeddings are computed there once per session."""
    from reclora.data.fetch import copy_installed_ml100k

    root = tmp_path_factory.mktemp("reclora_data")
    copy_installed_ml100k(root)  # None (nothing copied) without the wheel: those tests skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLORA_DATA", str(root))
        # torch.compile's caches too: their keys leave out a custom op's schema, so a graph
        # compiled before the op gained an argument came back from /tmp/torchinductor_$USER
        # and called the op with the old arguments (2026-12-02).
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
        yield root


# The slowest files, slowest first (pytest --durations on the idle 2-core machine,
# 2026-12-01: test_torchrun.py ~58 s, test_few2many.py ~42 s, test_reliability_run.py ~30 s,
# test_pipeline.py ~25 s). Under pytest-xdist with --dist loadfile --no-loadscope-reorder
# (scripts/run_tests.sh) files go to the workers in collection order, each worker taking the
# next file as it finishes one: starting with the long ones keeps a long file from running
# alone at the end.
SLOW_FILES = ("test_torchrun.py", "test_few2many.py", "test_reliability_run.py",
              "test_pipeline.py", "test_serving.py", "test_op.py", "test_scale.py",
              "test_op_large.py", "test_custom_ops.py", "test_inject.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the usual file order
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_terminal_summary(terminalreporter):
    """The worst relative error per backend and dtype over the op suite (vs float64)."""
    try:
        from op_cases import TOLERANCE, WORST
    except ImportError:
        return
    if not WORST:
        return
    bounds = {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()}
    terminalreporter.write_sep("-", "worst relative error vs the float64 reference")
    for (backend, dtype), err in sorted(WORST.items()):
        terminalreporter.write_line(
            f"{backend:10s} {dtype:9s} {err:.2e}  (bound {bounds[dtype]:.0e})")
