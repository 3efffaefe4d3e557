"""The op under torch's tracers and transforms: torch.export with dynamic sizes (the exported
program against eager on other sizes) and torch.func's reverse-mode transforms (refused with
a clear error on the fast backends, exact on the reference; vmap alone runs everywhere)."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, make_inputs, rel_err
from torch.export import Dim, export

import reclora
import reclora_kernels as rk
from reclora_kernels import ops
from reclora_kernels.triton.configs import interpreting

F64 = torch.float64
# The fast backends on CPU tensors (Triton through its interpreter). The reference reads the
# rows' lengths on the host, so it does not export.
FAST = [b for b in rk.available_backends() if b == "cpu" or (b == "triton" and interpreting())]
# "auto" on CPU tensors is the native cpu backend where it is built.
AUTO = ["auto"] if "cpu" in FAST else []
# Each case: mix, dense (adapter_w [R, M]) or gathered (adapter_idx [R, k]).
MIXES = [("factor", True), ("output", True), ("factor", False), ("output", False)]


class Op(torch.nn.Module):
    """The op's tensors as inputs (x, adapter_w, adapter_idx, row_ids: the dynamic ones), the
    rest as buffers."""

    def __init__(self, inputs: dict, mix: str, backend: str):
        super().__init__()
        for name in ("weight", "bias", "lora_a", "lora_b"):
            self.register_buffer(name, inputs[name])
        self.mix, self.backend = mix, backend

    def forward(self, x, adapter_w, adapter_idx, row_ids):
        return rk.lora_mix_linear(x, self.weight, self.bias, self.lora_a, self.lora_b,
                                  adapter_w, adapter_idx, scale=0.7, mix=self.mix,
                                  row_ids=row_ids, backend=self.backend)


def sized(rows: int, tokens_per_row: int, dense: bool, layout: str) -> tuple:
    """(x, adapter_w, adapter_idx, row_ids) of one size. layout "3d": x [R, L, d_in];
    "token-rows": packed x [R, d_in], one token per row; "row-ids": packed x [R * L, d_in]
    with shuffled row ids."""
    case = Case(rows=rows, tokens_per_row=1 if layout == "token-rows" else tokens_per_row,
                dense=dense, packed=layout == "row-ids", d_in=7, d_out=5, adapters=3, rank=2,
                slots=2)
    inp = make_inputs(case, dtype=F64)
    x = inp["x"].reshape(rows, case.d_in) if layout == "token-rows" else inp["x"]
    return x, inp["adapter_w"], inp["adapter_idx"], inp["row_ids"]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix,dense", MIXES)
@pytest.mark.parametrize("layout", ["3d", "token-rows", "row-ids"])
def test_export_with_dynamic_rows_matches_eager(backend, mix, dense, layout):
    """Non-strict torch.export (torch's default) with the row and token counts dynamic: the
    row plan is made from symbolic sizes (the implicit plan's cache raised "unhashable type:
    non-nested SymInt", row_plan refused a symbolic row count), and the program matches
    eager on sizes it was not traced with."""
    weights = make_inputs(Case(d_in=7, d_out=5, adapters=3, rank=2), dtype=F64)
    module = Op(weights, mix, backend)
    rows, tokens = Dim("rows", min=1, max=64), Dim("tokens", min=1, max=64)
    x_dims = {"3d": {0: rows, 1: tokens}, "token-rows": {0: rows}, "row-ids": {0: tokens}}
    dynamic = (x_dims[layout], {0: rows}, None if dense else {0: rows},
               {0: tokens} if layout == "row-ids" else None)
    program = export(module, sized(3, 4, dense, layout), dynamic_shapes=dynamic).module()
    for size in ((2, 5), (5, 1)):
        other = sized(*size, dense, layout)
        assert rel_err(program(*other), module(*other)) < 1e-12


class Mixed(torch.nn.Module):
    """A RecLoRALinear whose mixture is a forward input (a mixture set before export would be
    baked into the program as a constant)."""

    def __init__(self, layer: reclora.RecLoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x, weights):
        self.layer.set_mixture(weights)
        return self.layer(x)


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_export_layer_with_dynamic_batch_matches_eager(mix):
    """A RecLoRALinear with a dense mixture per row, exported with the batch and sequence
    lengths dynamic: the program matches the eager layer on other sizes."""
    layer = reclora.RecLoRALinear(7, 5, num_adapters=3, rank=2, mix=mix, dtype=F64).eval()
    with torch.no_grad():
        layer.lora_b.normal_()  # B = 0 at init would hide the LoRA part
    module = Mixed(layer)

    def inputs(batch, length):
        return torch.randn(batch, length, 7, dtype=F64), torch.randn(batch, 3, dtype=F64)

    batch, length = Dim("batch", min=1, max=64), Dim("length", min=1, max=64)
    program = export(module, inputs(3, 4),
                     dynamic_shapes=({0: batch, 1: length}, {0: batch})).module()
    for size in ((2, 5), (5, 1)):
        other = inputs(*size)
        assert rel_err(program(*other), module(*other)) < 1e-12


# --- torch.func ---------------------------------------------------------------------------


def small_inputs() -> dict:
    return make_inputs(Case(rows=2, tokens_per_row=3, d_in=7, d_out=5, adapters=3, rank=2,
                            slots=2), dtype=F64)


def op_of(inputs: dict, backend: str):
    """lora_b -> the op's output, the rest fixed (the bank is what torch.func differentiates
    in per-user fine-tuning). The indices are in range by construction: vmap cannot read a
    batched one on the host for the range check."""
    def f(lora_b, x=inputs["x"], adapter_w=inputs["adapter_w"], idx=inputs["adapter_idx"]):
        return rk.lora_mix_linear(x, inputs["weight"], inputs["bias"], inputs["lora_a"],
                                  lora_b, adapter_w, idx, scale=0.7, backend=backend,
                                  indices_checked=True)
    return f


def reverse(how: str, f, lora_b: torch.Tensor, inputs: dict) -> torch.Tensor:
    """d sum(f(lora_b)^2) / d lora_b through one of torch.func's reverse-mode transforms
    (per-sample: one gradient per row, stacked)."""
    def loss(b, *row):
        return f(b, *row).square().sum()

    if how == "grad":
        return torch.func.grad(loss)(lora_b)
    if how == "vjp":
        y, pull = torch.func.vjp(f, lora_b)
        return pull(2 * y)[0]
    if how == "jacrev":
        y = f(lora_b)
        return torch.einsum("...,...abc->abc", 2 * y, torch.func.jacrev(f)(lora_b))
    rows = (inputs["x"][:, None], inputs["adapter_w"][:, None], inputs["adapter_idx"][:, None])
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(lora_b, *rows)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("backend", FAST + AUTO)
@pytest.mark.parametrize("how", ["grad", "vjp", "jacrev", "per-sample"])
def test_func_reverse_mode_is_refused_clearly_and_exact_on_reference(backend, how,
                                                                      monkeypatch):
    """torch.func's reverse-mode transforms: the fast backends' autograd Functions cannot run
    under them (torch's generic "cannot use C++ torch::autograd::Function with functorch"),
    so they are refused naming the backend that runs them; the reference's gradients equal
    ordinary autograd's, per sample too."""
    monkeypatch.setattr(ops, "ENV_BACKEND", "auto")  # whatever $RECLORA_BACKEND says
    inputs = small_inputs()
    lora_b = inputs["lora_b"]
    with pytest.raises(NotImplementedError, match=r"reverse mode .* backend='reference' only"):
        reverse(how, op_of(inputs, backend), lora_b, inputs)
    got = reverse(how, op_of(inputs, "reference"), lora_b, inputs)

    def plain_grad(*row):
        b = lora_b.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(op_of(inputs, "reference")(b, *row).square().sum(), b)
        return g

    if how == "per-sample":
        want = torch.stack([plain_grad(inputs["x"][i:i + 1], inputs["adapter_w"][i:i + 1],
                                       inputs["adapter_idx"][i:i + 1]) for i in range(2)])
    else:
        want = plain_grad()
    assert rel_err(got, want) < 1e-12


def test_auto_that_resolves_to_reference_runs_under_func_grad(monkeypatch):
    """"auto" is refused under a transform only where it would pick a fast backend: with
    RECLORA_BACKEND=reference it is the reference, and runs."""
    monkeypatch.setattr(ops, "ENV_BACKEND", "reference")
    inputs = small_inputs()
    got = reverse("grad", op_of(inputs, "auto"), inputs["lora_b"], inputs)
    want = reverse("grad", op_of(inputs, "reference"), inputs["lora_b"], inputs)
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("backend", FAST)
def test_func_vmap_alone_still_runs(backend):
    """vmap without a grad transform runs the fast ops (through torch's batching fallback):
    the reverse-mode refusal leaves it alone."""
    inputs = small_inputs()
    f = op_of(inputs, backend)
    rows = (inputs["x"][:, None], inputs["adapter_w"][:, None], inputs["adapter_idx"][:, None])
    got = torch.func.vmap(f, in_dims=(None, 0, 0, 0))(inputs["lora_b"], *rows)
    assert rel_err(got[:, 0], f(inputs["lora_b"])) < 1e-12


@pytest.mark.skipif("triton" not in FAST, reason="Triton is not usable here")
def test_func_grad_leaves_a_call_under_no_grad_alone():
    """Inside torch.func.grad, a call under torch.no_grad records nothing, and the Triton op
    runs there: only a call that would record a gradient is refused."""
    inputs = small_inputs()
    f = op_of(inputs, "triton")

    def loss(s):
        with torch.no_grad():
            y = f(inputs["lora_b"])
        return (s * y).sum()

    got = torch.func.grad(loss)(torch.tensor(2.0, dtype=F64))
    assert rel_err(got, op_of(inputs, "reference")(inputs["lora_b"]).sum()) < 1e-12
