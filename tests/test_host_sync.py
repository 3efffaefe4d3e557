"""Host reads (device syncs on a GPU): at most one per model forward, none per op call.

On the CPU there is no device to wait for, so the reads are counted instead: every op that
turns tensor data into a host value (_local_scalar_dense: item/int/bool), every op whose
output size depends on the data (nonzero, unique, masked_select, repeat_interleave without
an output size), and Tensor.tolist / numpy (which read memory without dispatching).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reclora
import reclora_kernels as rk
from reclora_kernels import row_plan

READS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "masked_select", "repeat_interleave"}
BACKENDS = [b for b in rk.available_backends() if b != "reference"]


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS and not (name == "repeat_interleave" and "output_size" in (kwargs or {})):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    counter = _Counter()
    for method in ("tolist", "numpy"):
        real = getattr(torch.Tensor, method)

        def spy(self, *a, _real=real, _name=method, **kw):
            counter.reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, spy)
    with counter:
        yield counter.reads
    monkeypatch.undo()


def test_counter_sees_a_read(monkeypatch):
    """The counter itself: a .item(), an int(), a tolist() and a nonzero() are all seen."""
    t = torch.arange(4)
    with count_host_reads(monkeypatch) as reads:
        t.sum().item()
        int(t.max())
        t.tolist()
        t.nonzero()
    assert len(reads) == 4, reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gathered", [False, True])
def test_op_call_reads_nothing(monkeypatch, backend, gathered):
    """x [R, L, d] or a ready plan, and indices the caller checked: no host read per call,
    forward or backward."""
    torch.manual_seed(0)
    rows, length, d, m = 3, 4, 16, 5
    weight, bias = torch.randn(d, d), torch.randn(d)
    a = torch.randn(m, 2, d).requires_grad_(True)
    b = torch.randn(m, d, 2).requires_grad_(True)
    k = 2 if gathered else m
    w = torch.randn(rows, k).requires_grad_(True)
    idx = torch.randint(0, m, (rows, k)) if gathered else None
    x = torch.randn(rows, length, d)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1])
    plan = row_plan(ids, rows)  # the batch's one read, made before counting
    packed = torch.randn(ids.numel(), d)
    with count_host_reads(monkeypatch) as reads:
        for inp, kw in ((x, {}), (packed, {"plan": plan})):
            y = rk.lora_mix_linear(inp, weight, bias, a, b, w, idx, scale=2.0, backend=backend,
                                   indices_checked=True, **kw)
            y.square().sum().backward()
    assert reads == [], reads


def test_unchecked_indices_are_checked_per_call(monkeypatch):
    """Without indices_checked the CPU checks adapter_idx each call (and rejects it)."""
    weight, a, b = torch.randn(8, 8), torch.randn(4, 2, 8), torch.randn(4, 8, 2)
    idx = torch.tensor([[0, 4]])
    with pytest.raises(IndexError, match=r"`adapter_idx` values must lie in \[0, 4\)"):
        rk.lora_mix_linear(torch.randn(1, 3, 8), weight, None, a, b, torch.ones(1, 2), idx)


def _mlp(depth=6, width=16):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("top_k", [None, 2])
def test_multi_layer_forward_makes_at_most_one_read(monkeypatch, top_k):
    """Six gated layers, packed rows: the plan's one read; [R, L] rows: none."""
    model = _mlp()
    reclora.inject(model, r"\d*[02468]", num_adapters=4, rank=2, gate_dim=8, top_k=top_k)
    model.eval()
    users = torch.randn(3, 8)
    ids = torch.tensor([1, 0, 2, 2, 1, 0, 0])
    with count_host_reads(monkeypatch) as reads:
        with reclora.personalize(model, users, row_ids=ids):
            model(torch.randn(ids.numel(), 16)).sum().backward()
    assert len(reads) <= 1, reads
    with count_host_reads(monkeypatch) as reads:
        with reclora.personalize(model, users):
            model(torch.randn(3, 5, 16)).sum().backward()
    assert reads == [], reads


def test_transformers_model_forward_adds_at_most_one_read(monkeypatch):
    """A tiny Llama with every projection adapted: injection adds at most one read to the
    model's own."""
    from tiny_models import VOCAB, build

    model = build("llama", dtype=torch.float32)
    ids = torch.randint(1, VOCAB, (2, 6))
    with count_host_reads(monkeypatch) as base_reads:
        model(ids)
    reclora.inject(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"), num_adapters=4, rank=2, gate_dim=8)
    with count_host_reads(monkeypatch) as reads:
        with reclora.personalize(model, torch.randn(2, 8)):
            model(ids)
    assert len(reads) - len(base_reads) <= 1, (reads, base_reads)
