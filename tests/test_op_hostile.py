"""Hostile inputs to the op and the layers (reliability issue): every backend either raises the
same error class as the reference or gives the reference's result, with NaNs exactly where the
reference has them; one row's bad value never reaches another row; threads do not mix users."""

from __future__ import annotations

import threading

import pytest
import torch
from op_cases import rel_err

import reclora
import reclora_kernels as rk

BACKENDS = rk.available_backends()
FAST = [b for b in BACKENDS if b != "reference"]


def inputs(seed, rows=3, length=4, d_in=24, d_out=20, m=5, r=3, k=2, dense=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(
        x=rand(rows, length, d_in), weight=rand(d_out, d_in) / d_in**0.5, bias=rand(d_out),
        lora_a=rand(m, r, d_in) / d_in**0.5, lora_b=rand(m, d_out, r),
        adapter_w=rand(rows, m if dense else k),
        adapter_idx=None if dense else torch.randint(0, m, (rows, k), generator=gen),
    )


def call(p, backend, mix="factor", scale=0.7, **kw):
    return rk.lora_mix_linear(p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
                              p["adapter_w"], p["adapter_idx"], scale=scale, mix=mix,
                              backend=backend, **kw)


def outcome(p, backend, mix, scale=0.7):
    """("ok", y) or ("error", exception class)."""
    try:
        return "ok", call(p, backend, mix, scale)
    except Exception as err:  # noqa: BLE001 - the class is what is compared
        return "error", type(err)


def _float64(p):
    return {k: (v.double() if v is not None and v.is_floating_point() else v)
            for k, v in p.items()}


def same_as_reference(p, mix, scale=0.7, backends=FAST):
    """Each backend raises the reference's error class (the reference run in the same dtype),
    or gives its result: NaN and inf exactly where the float64 reference has them, values
    within 1e-4. Where the values overflow the dtype (an inf in the same-dtype reference's
    row), only "not finite" is compared there: inf - inf is NaN in one summation order and inf
    in another."""
    kind, ref_same = outcome(p, "reference", mix, scale)
    _, ref = outcome(_float64(p), "reference", mix, scale) if kind == "ok" else (kind, ref_same)
    for backend in backends:
        got_kind, got = outcome(p, backend, mix, scale)
        assert got_kind == kind, f"{backend}: {got_kind} {got} vs reference {kind} {ref}"
        if kind == "error":
            assert got is ref_same, (f"{backend}: raised {got.__name__}, reference "
                                     f"{ref_same.__name__}")
            continue
        overflow = torch.isinf(ref_same).flatten(1).any(1) if ref_same.dim() > 1 else None
        finite = torch.isfinite(ref_same)
        assert torch.equal(torch.isfinite(got), finite), f"{backend}: non-finite pattern differs"
        exact = ~overflow[(...,) + (None,) * (got.dim() - 1)] if overflow is not None else True
        assert torch.equal(torch.isnan(got) & exact, torch.isnan(ref_same) & exact), \
            f"{backend}: NaN pattern differs"
        both = finite & torch.isfinite(ref)
        if both.any():
            assert rel_err(got[both], ref[both].to(got.dtype)) < 1e-4, backend


@pytest.mark.parametrize("backend", FAST)
def test_strided_bias(backend):
    """Item 3: a strided bias (every other element of a longer vector) is read by its stride."""
    p = inputs(0)
    p["bias"] = torch.randn(2 * p["weight"].shape[0])[::2]
    same_as_reference(p, "factor", backends=[backend])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("where", ["x", "adapter_w"])
def test_nan_stays_in_its_row(backend, mix, where):
    """Item 4: a NaN in one row's activations or mixture weights gives NaN in that row only,
    forward and dx; rows of one token each, so a kernel tile spans many rows."""
    p = inputs(1, rows=9, length=1, dense=False)
    bad_row = 4
    if where == "x":
        p["x"][bad_row, 0, 3] = float("nan")
    else:
        p["adapter_w"][bad_row, 1] = float("nan")
    same_as_reference(p, mix, backends=[backend])
    y = call(p, backend, mix)
    rows_nan = torch.isnan(y).flatten(1).any(1)
    assert rows_nan.tolist() == [r == bad_row for r in range(9)]
    x = p["x"].clone().requires_grad_(True)
    y = rk.lora_mix_linear(x, p["weight"], p["bias"], p["lora_a"], p["lora_b"], p["adapter_w"],
                           p["adapter_idx"], scale=0.7, mix=mix, backend=backend)
    grad_out = torch.zeros_like(y)
    grad_out[:bad_row] = 1.0  # the bad row's output gets no gradient
    grad_out[bad_row + 1:] = 1.0
    (dx,) = torch.autograd.grad(y, [x], grad_out)
    nan_rows = torch.isnan(dx).flatten(1).any(1).tolist()
    if where == "x":
        assert not any(nan_rows)
    else:  # the bad row's own dx may be NaN (its factors are), no other row's
        assert not any(n for r, n in enumerate(nan_rows) if r != bad_row)


def nonfinite_bank_entry(bad: float, bad_row: int = 4) -> dict:
    """Nine one-token rows (a kernel tile spans them all); adapter 4's B holds `bad` at output
    column 5, rank 0, and only row `bad_row` uses adapter 4, so that row's shrink stays
    finite and its outputs at column 5 alone should be non-finite."""
    p = inputs(2, rows=9, length=1)
    p["adapter_idx"] = torch.randint(0, 4, (9, 2), generator=torch.Generator().manual_seed(3))
    p["adapter_idx"][bad_row, 1] = 4
    p["lora_b"][4, 5, 0] = bad
    return p


def nonfinite_where(y: torch.Tensor) -> list:
    return torch.nonzero(~torch.isfinite(y)).tolist()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_rows_nonfinite_bank_entry_stays_in_its_row(backend, mix, bad):
    """A NaN or inf in a bank entry only one row uses reaches that row's outputs at its column,
    and no other row's: another row's zero shrink times it (0 x inf) would be NaN there."""
    p = nonfinite_bank_entry(bad)
    same_as_reference(p, mix, backends=[backend])
    assert nonfinite_where(call(p, backend, mix)) == [[4, 0, 5]]


@pytest.mark.parametrize("mix", ["factor", "output"])
def test_fuzz_hostile(mix):
    """Random hostile inputs against the reference: transposed and strided operands, NaN/inf
    placed in one row, empty dimensions, extreme scales."""
    gen = torch.Generator().manual_seed(1234)
    for trial in range(24):
        def pick(n):
            return int(torch.randint(0, n, (1,), generator=gen))

        shape = dict(rows=1 + pick(4), length=pick(4), d_in=[0, 1, 17, 70][pick(4)],
                     d_out=[1, 19, 70][pick(3)], m=1 + pick(4), r=1 + pick(3), k=1 + pick(3))
        dense = bool(pick(2))
        p = inputs(trial, dense=dense, **shape)
        if pick(2):  # W given as a transposed view
            p["weight"] = p["weight"].t().contiguous().t()
        if pick(2):  # strided x and banks
            p["x"] = torch.repeat_interleave(p["x"], 2, dim=-1)[..., ::2]
            p["lora_a"] = torch.repeat_interleave(p["lora_a"], 2, dim=-1)[..., ::2]
        if pick(2) and p["x"].numel():
            row = pick(shape["rows"])
            p["x"][row].view(-1)[0] = [float("nan"), float("inf")][pick(2)]
        if pick(2):
            p["adapter_w"][pick(shape["rows"]), 0] = [float("nan"), float("inf"), 1e30][pick(3)]
        scale = [0.7, 1e-30, 1e30, 1e300, -2.0][pick(5)]
        try:
            same_as_reference(p, mix, scale)
        except AssertionError as err:
            raise AssertionError(f"trial {trial}: {shape} dense={dense} scale={scale}: "
                                 f"{err}") from None


def test_scale_beyond_dtype_is_rejected():
    """Item 8: scale = 1e300 in fp32 would round to inf: rejected alike by every backend."""
    p = inputs(2)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="`scale`"):
            call(p, backend, scale=1e300)
    p64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in p.items()}
    assert torch.isfinite(call(p64, "reference", scale=1e300)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_input(backend):
    """Item 8: d_in = 0 is a valid (if odd) layer: y = bias."""
    p = inputs(3, d_in=0)
    y = call(p, backend)
    assert torch.allclose(y, p["bias"].expand_as(y))


@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6), (2, 0, 6)])
def test_layer_on_empty_batch(shape):
    """Item 8: RecLoRALinear on an empty batch returns an empty output, as nn.Linear does."""
    layer = reclora.RecLoRALinear(6, 4, num_adapters=3, rank=2)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 4)
    assert torch.nn.functional.linear(x, layer.weight, layer.bias).shape == y.shape


def test_personalize_is_thread_safe():
    """Item 5: threads personalizing one model for different users each get their own output
    (the same as a single-threaded run for that user)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    layers = reclora.inject(model, r"\d", num_adapters=4, rank=2, gate_dim=6)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_b)
    model.eval()
    users = torch.randn(8, 1, 6)
    x = torch.randn(1, 5, 16)
    expected = []
    for u in users:
        with reclora.personalize(model, u):
            expected.append(model(x))
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(users))}
    barrier = threading.Barrier(len(users))

    def work(i):
        barrier.wait()
        for _ in range(20):
            with reclora.personalize(model, users[i]):
                results[i].append(model(x))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wrong = sum(not torch.equal(y, expected[i]) for i, ys in results.items() for y in ys)
    assert all(len(ys) == 20 for ys in results.values())
    assert wrong == 0, f"{wrong} of {20 * len(users)} outputs belonged to another user"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["factor", "output"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["packed", "empty"])
def test_a_token_less_rows_nonfinite_weight_leaves_shared_adapters_clean(backend, mix, dense,
                                                                        bad, layout):
    """Row 1 has no tokens (packed: every token in row 0; empty: no tokens at all) and a NaN
    or inf mixture weight: y does not read it, so the banks' gradients must be those with a
    finite weight there. In factor mode every backend made 0 * NaN in the gradients of the
    adapters the row lists (dA_p = 0 there, times its weight), and so did the reference in
    output mode."""
    gen = torch.Generator().manual_seed(12)
    tokens = 4 if layout == "packed" else 0
    x = torch.randn(tokens, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    adapter_w = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    idx = None if dense else torch.tensor([[1, 0], [0, 1]])
    row_ids = torch.zeros(tokens, dtype=torch.long)
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    grads = []
    for broken in (False, True):
        w = adapter_w.clone()
        if broken:
            w[1, 0] = bad
        leaves = [t.to(dtype).requires_grad_() for t in (lora_a, lora_b, w)]
        y = rk.lora_mix_linear(x.to(dtype), weight.to(dtype), None, *leaves, idx, mix=mix,
                               row_ids=row_ids, backend=backend)
        assert torch.isfinite(y).all()
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for clean, broken in zip(*grads):
        assert torch.isfinite(broken).all()
        torch.testing.assert_close(broken, clean, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_triton_calls_from_several_threads_give_each_its_own_result():
    """Threads calling the Triton backend at once (a server's worker threads) each get their
    own output and gradients. Under the interpreter up to 3 of 4 threads raised InterpreterError:
    each launch patches triton.language for its length, and another's launch undid it."""
    grads = ("x", "lora_a", "lora_b", "adapter_w")

    def run(seed, backend):
        p = inputs(seed)
        for name in grads:
            p[name].requires_grad_(True)
        y = call(p, backend)
        y.square().sum().backward()
        return [y.detach()] + [p[name].grad for name in grads]

    expected = {seed: run(seed, "reference") for seed in range(4)}
    results: dict[int, list] = {seed: [] for seed in expected}
    errors: list[str] = []
    barrier = threading.Barrier(len(expected))

    def work(seed):
        barrier.wait()
        try:
            for _ in range(4):
                results[seed].append(run(seed, "triton"))
        except Exception as e:  # reported below, with the thread's seed
            errors.append(f"seed {seed}: {e!r}"[:300])

    threads = [threading.Thread(target=work, args=(seed,)) for seed in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for seed, runs in results.items():
        assert len(runs) == 4
        for got in runs:
            for g, e in zip(got, expected[seed]):
                assert rel_err(g, e) < 1e-4, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["factor", "output"])
def test_a_token_less_rows_nan_adapter_leaves_shared_adapters_clean(backend, mix):
    """Row 1 has no tokens and lists a NaN adapter (0) beside a clean one (1) that row 0 uses:
    y does not depend on row 1, so adapter 1's gradients must be those of a run without the
    NaN. The reference padded rows with zero tokens and its 0 * NaN there reached them."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    adapter_w = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    idx = torch.tensor([[1, 1], [0, 1]])
    row_ids = torch.zeros(4, dtype=torch.long)  # every token in row 0
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    grads = []
    for broken in (False, True):
        a = lora_a.clone()
        if broken:
            a[0, 0, 0] = float("nan")
        leaves = [t.to(dtype).requires_grad_() for t in (a, lora_b)]
        y = rk.lora_mix_linear(x.to(dtype), weight.to(dtype), None, *leaves,
                               adapter_w.to(dtype), idx, mix=mix, row_ids=row_ids,
                               backend=backend)
        assert torch.isfinite(y).all()
        grads.append(torch.autograd.grad(y.sum(), leaves))
    for clean, with_nan in zip(*grads):
        torch.testing.assert_close(with_nan[1], clean[1], rtol=0, atol=0)
