"""Problem builders and comparison helpers shared by the op tests (and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reclora_kernels import lora_mix_linear

# Relative error bounds (max |err| / max |ref|) against the float64 reference, by the dtype
# the backend computes in. Half types: operands are rounded to 8/11-bit mantissas and the
# shrink result is rounded again before the expand.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


@dataclass
class Case:
    tokens_per_row: int = 5
    rows: int = 3
    d_in: int = 29
    d_out: int = 23
    adapters: int = 6
    rank: int = 3
    slots: int = 4
    dense: bool = False
    packed: bool = False  # packed [T, d_in] with shuffled row_ids (else [R, L, d_in])
    bias: bool = True
    mix: str = "factor"
    scale: float = 0.7
    noncontiguous: bool = False
    duplicate: bool = False  # every row repeats one adapter in all its slots
    extra: dict = field(default_factory=dict)


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=None):
    """Inputs of `case` from their own generator: `seed`, or else one drawn from the global
    RNG, which conftest seeds per test from its node id (printed when the test fails)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    c = case
    slots = c.adapters if c.dense else c.slots
    if c.packed:
        tokens = c.tokens_per_row * c.rows
        row_ids = torch.randint(0, c.rows, (tokens,), generator=gen)
        x = rand(tokens, c.d_in)
    else:
        row_ids = None
        x = rand(c.rows, c.tokens_per_row, c.d_in)
    weight = rand(c.d_out, c.d_in) / c.d_in**0.5
    bias = rand(c.d_out) if c.bias else None
    lora_a = rand(c.adapters, c.rank, c.d_in) / c.d_in**0.5
    lora_b = rand(c.adapters, c.d_out, c.rank) / c.rank**0.5
    adapter_w = rand(c.rows, slots)
    idx = None
    if not c.dense:
        idx = torch.randint(0, c.adapters, (c.rows, slots), generator=gen)
        if c.duplicate:
            idx[:] = idx[:, :1]
    tensors = dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                   adapter_w=adapter_w)
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        moved = t.to(device=device, dtype=dtype)
        if name == "x" and c.noncontiguous:
            moved = _strided(moved)
        out[name] = moved
    out["adapter_idx"] = idx.to(device) if idx is not None else None
    out["row_ids"] = row_ids.to(device) if row_ids is not None else None
    return out


DIFF_ARGS = ("x", "weight", "bias", "lora_a", "lora_b", "adapter_w")


def run(inputs: dict, case: Case, backend: str, grad_out=None):
    """Forward (and backward with grad_out) of one backend; returns y and grads by name."""
    leaves = {}
    args = {}
    for name, t in inputs.items():
        if name in DIFF_ARGS and t is not None:
            if t.is_contiguous():
                t = t.detach().clone().requires_grad_(True)
            else:  # keep it strided: a view of a wider tensor that requires grad
                t = _strided(t.detach().clone().requires_grad_(True))
            leaves[name] = t
        args[name] = t
    y = lora_mix_linear(
        args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
        args["adapter_w"], args["adapter_idx"], scale=case.scale, mix=case.mix,
        row_ids=args["row_ids"], backend=backend,
    )
    grads = {}
    if grad_out is not None:
        got = torch.autograd.grad(y, list(leaves.values()),
                                  grad_out.to(device=y.device, dtype=y.dtype))
        grads = dict(zip(leaves, got))
    return y, grads


def gradcheck_op(inputs: dict, case: Case, backend: str) -> bool:
    """torch.autograd.gradcheck of one backend's op in its six differentiable arguments
    (float64 inputs; fast mode, as the op's tests take it)."""
    names = ["x", "weight", "bias", "lora_a", "lora_b", "adapter_w"]

    def fn(*tensors):
        args = dict(inputs, **dict(zip(names, tensors)))
        return lora_mix_linear(args["x"], args["weight"], args["bias"], args["lora_a"],
                               args["lora_b"], args["adapter_w"], args["adapter_idx"],
                               scale=case.scale, mix=case.mix, row_ids=args["row_ids"],
                               backend=backend)

    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in names]
    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Replace owner.<name> (for the test) by a wrapper that appends 1 to the returned list
    per call."""
    calls = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other column of a wider tensor."""
    return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]


# Worst relative error seen per (backend, dtype) over the session; conftest prints it.
WORST: dict[tuple[str, str], float] = {}


def record(backend: str, dtype: torch.dtype, errors: dict) -> None:
    key = (backend, str(dtype).replace("torch.", ""))
    WORST[key] = max(WORST.get(key, 0.0), *errors.values())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0 if got.numel() == 0 else float("inf")
    scale = ref.abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / max(scale, 1e-12)
