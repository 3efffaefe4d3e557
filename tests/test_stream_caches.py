"""The cached read-only device tensors (implicit row ids, the uniform mixture, the Triton
launch's index tables and scale constants) are kept per CUDA stream (plan.stream_key): one
made on stream S and read from another could be read before its fill ran on S, and once
evicted its memory would go back to S's pool while the other stream still read it. On the
CPU the stream is faked; on a GPU two real streams are used."""

from __future__ import annotations

import pytest
import torch

from reclora import layers
from reclora_kernels import plan as plans
from reclora_kernels.plan import implicit_plan

CPU = torch.device("cpu")


@pytest.fixture
def streams(monkeypatch):
    """A settable fake current stream for plan.stream_key's users."""
    current = [1]
    monkeypatch.setattr(plans, "stream_key", lambda device: current[0])
    return current


def test_implicit_rows_and_uniform_mixtures_are_kept_per_stream(streams):
    plan = implicit_plan(3, 4)
    first = plan.token_rows(CPU)
    uniform = layers.uniform_mixture(3, 5, torch.float32, torch.float32, CPU)
    assert plan.token_rows(CPU) is first  # cached on its stream
    assert layers.uniform_mixture(3, 5, torch.float32, torch.float32, CPU) is uniform
    streams[0] = 2
    other = plan.token_rows(CPU)
    assert other is not first and torch.equal(other, first)
    other_uniform = layers.uniform_mixture(3, 5, torch.float32, torch.float32, CPU)
    assert other_uniform is not uniform and torch.equal(other_uniform, uniform)
    streams[0] = 1
    assert plan.token_rows(CPU) is first


def test_triton_tables_and_constants_are_kept_per_stream(streams):
    launch = pytest.importorskip("reclora_kernels.triton.launch")
    like = torch.zeros(2, dtype=torch.float32)
    table, scale = launch._index_table(7, CPU), launch._scale_tensor(0.5, like)
    assert launch._index_table(7, CPU) is table and launch._scale_tensor(0.5, like) is scale
    streams[0] = 2
    assert launch._index_table(7, CPU) is not table
    assert launch._scale_tensor(0.5, like) is not scale
    assert torch.equal(launch._index_table(7, CPU), table)


def test_triton_tables_written_in_place_are_made_again(streams):
    """The launch's tables go through plan.cached_tensor as the others do: one that someone
    wrote in place is not handed out again."""
    launch = pytest.importorskip("reclora_kernels.triton.launch")
    like = torch.zeros(2, dtype=torch.float32)
    table, scale = launch._index_table(5, CPU), launch._scale_tensor(0.25, like)
    table[0] = 3
    scale.fill_(9.0)
    assert torch.equal(launch._index_table(5, CPU), torch.arange(5))
    assert launch._scale_tensor(0.25, like).item() == 0.25


def test_stream_key_is_zero_off_cuda():
    assert plans.stream_key(CPU) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_cuda_stream_gets_its_own_cached_tensors():
    device = torch.device("cuda", torch.cuda.current_device())
    plan = implicit_plan(2, 3)
    on_default = plan.token_rows(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        assert plans.stream_key(device) == side.cuda_stream
        on_side = plan.token_rows(device)
        assert plan.token_rows(device) is on_side
    assert on_side is not on_default
    assert plan.token_rows(device) is on_default
    torch.cuda.synchronize(device)
    assert torch.equal(on_side, on_default)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_a_first_call_under_inference_mode_leaves_later_calls_working(backend):
    """Every cached tensor is made outside inference mode: the Triton launch's index table and
    scale constant, made by a first call under torch.inference_mode, had no version counter,
    and every later call of that shape or scale (inside or outside) raised "Inference
    tensors do not track version counter"."""
    import reclora_kernels as rk

    if backend not in rk.available_backends():
        pytest.skip(f"{backend} not available")
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(3, 4, 8, generator=gen), torch.randn(6, 8, generator=gen)
    a, b = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 6, 3, generator=gen)
    w, idx = torch.randn(3, 2, generator=gen), torch.randint(0, 5, (3, 2), generator=gen)
    for mix, dense, scale in [("factor", False, 0.37), ("output", True, 0.41)]:
        args = (x, weight, None, a, b, torch.randn(3, 5) if dense else w,
                None if dense else idx)
        want = rk.lora_mix_linear(*args, scale=scale, mix=mix, backend="reference")
        with torch.inference_mode():
            inside = rk.lora_mix_linear(*args, scale=scale, mix=mix, backend=backend)
            again = rk.lora_mix_linear(*args, scale=scale, mix=mix, backend=backend)
        outside = rk.lora_mix_linear(*args, scale=scale, mix=mix, backend=backend)
        for got in (inside, again, outside):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
