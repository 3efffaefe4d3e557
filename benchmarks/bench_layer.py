"""One Llama decoder block, training-step time and memory: RecLoRA on q_proj and v_proj
against PEFT LoRA on the same projections and against the block without adapters.

    python benchmarks/bench_layer.py            # auto device: GPU block hidden 4096, CPU 576
    python benchmarks/bench_layer.py --quick

The block is transformers' LlamaDecoderLayer, random init (GPU: Llama-2-7B's block, hidden
4096, MLP 11008, 32 heads; CPU: SmolLM2-135M's, hidden 576, MLP 1536, 9 / 3 heads). Every
variant runs the same step: forward on hidden states that need grad (a middle layer: the
gradient flows through the frozen block to earlier layers), loss, backward, and an AdamW step
over the trainable parameters (none for the block alone).

- `no adapters`: the frozen block;
- `PEFT LoRA`: peft's LoRA (r 8, alpha 16) on q and v: one adapter for every row;
- `RecLoRA [<backend>]`: per projection a bank of 16 meta-LoRAs (r 8, scale 2) mixed per row
  by a gate over a 256-d user vector (LayerNorm, 256 -> 60 -> 16, softmax / tau), through
  `lora_mix_linear` (factor mix), one row per backend available at run time; and
  `RecLoRA [materialise+bmm]`, the reference code's path, for scale.
The RecLoRA rows use the package's own layers (`reclora.inject` + `reclora.personalize`, its
default fp32 banks) when `reclora` provides them; otherwise the small wrapper below (the same
math through the same public op), which also carries the materialise+bmm row.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import baselines, common  # noqa: E402
from benchmarks.bench_lora import bench_backends  # noqa: E402
from reclora_kernels import lora_mix_linear  # noqa: E402

USER_DIM, GATE_HIDDEN, META_LORAS, RANK, ALPHA, TAU = 256, 60, 16, 8, 16, 5.0


class UserContext:
    """The batch's user vectors [R, 256], shared by every adapted projection of the model."""

    def __init__(self) -> None:
        self.user: torch.Tensor | None = None

    def personalize(self, user: torch.Tensor):
        self.user = user
        return contextlib.nullcontext()


class PackageContext:
    """The same, through reclora.personalize (the package's own RecLoRALinear layers)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def personalize(self, user: torch.Tensor):
        import reclora

        return reclora.personalize(self.model, user)


def _package_inject():
    try:
        from reclora import inject, reclora_layers
    except (ImportError, AttributeError):
        return None
    return inject, reclora_layers


class MixLoRALinear(nn.Module):
    """base(x) + scale * B_p (A_p x), with A_p, B_p mixed per row by the gate (RecLoRA)."""

    def __init__(self, base: nn.Linear, ctx: UserContext, impl: str) -> None:
        super().__init__()
        self.base, self.ctx, self.impl = base, ctx, impl
        d_in, d_out = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(META_LORAS, RANK, d_in, device=dev, dtype=dt))
        for a in self.lora_a.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        # RecLoRA starts B at zero; small random values here so nothing is skipped as zero.
        self.lora_b = nn.Parameter(
            torch.randn(META_LORAS, d_out, RANK, device=dev, dtype=dt) * 0.02
        )
        self.gate = nn.Sequential(
            nn.LayerNorm(USER_DIM),
            nn.Linear(USER_DIM, GATE_HIDDEN),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(GATE_HIDDEN, META_LORAS),
        ).to(device=dev, dtype=dt)
        self.scale = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.gate(self.ctx.user) / TAU, dim=-1)
        args = (x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, w, None)
        if self.impl == "materialise+bmm":
            return baselines.materialise_bmm(*args, self.scale, "factor")
        return lora_mix_linear(*args, scale=self.scale, mix="factor", backend=self.impl)


def llama_config(device: torch.device):
    from transformers import LlamaConfig

    if device.type == "cuda":  # Llama-2-7B's block
        sizes = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
        )
    else:  # SmolLM2-135M's block (the model shipped for CPU work here)
        sizes = dict(
            hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
        )
    cfg = LlamaConfig(num_hidden_layers=1, max_position_embeddings=4096, **sizes)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(variant: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(block, rope module, trainable params, routing context or None) for one variant."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)  # the same frozen block for every variant
    cfg = llama_config(device)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    for p in layer.parameters():
        p.requires_grad_(False)
    ctx = None
    if variant == "PEFT LoRA":
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        )
        layer = inject_adapter_in_model(lcfg, layer)
        for name, p in layer.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_B" in name:  # peft starts B at zero; see MixLoRALinear
                nn.init.normal_(p, std=0.02)
        layer.to(device=device, dtype=dtype)
    elif variant.startswith("RecLoRA"):
        impl = variant[variant.index("[") + 1 : -1]
        package = _package_inject()
        if impl != "materialise+bmm" and package is not None:
            inject, reclora_layers = package
            inject(
                layer,
                ("q_proj", "v_proj"),
                num_adapters=META_LORAS,
                rank=RANK,
                alpha=ALPHA,
                gate_dim=USER_DIM,
                gate_hidden=GATE_HIDDEN,
                temperature=TAU,
                backend=impl,
            )
            for m in reclora_layers(layer).values():  # B starts at zero; see MixLoRALinear
                nn.init.normal_(m.lora_b, std=0.02)
            ctx = PackageContext(layer)
        else:
            ctx = UserContext()
            attn = layer.self_attn
            attn.q_proj = MixLoRALinear(attn.q_proj, ctx, impl)
            attn.v_proj = MixLoRALinear(attn.v_proj, ctx, impl)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    return layer, rope, trainable, ctx


def variants(device: torch.device) -> list[str]:
    out = ["no adapters", "PEFT LoRA"]
    out += [f"RecLoRA [{b}]" for b in bench_backends(device)]
    return out + ["RecLoRA [materialise+bmm]"]


def make_steps(variant, device, dtype, rows, length, pool_n, seed, amp=False):
    """(train step, inference forward, trainable parameter count) closures over a pool of
    input batches rotated call by call. amp: fp32 weights run under bf16 autocast, as the main
    job runs its LLM where the CPU has bf16 (reclora.llm.amp_context)."""
    layer, rope, trainable, ctx = build(variant, device, dtype, seed)
    hidden = layer.input_layernorm.weight.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    pool = []
    for _ in range(pool_n):
        h = torch.randn(rows, length, hidden, generator=g).to(device=device, dtype=dtype)
        user = torch.randn(rows, USER_DIM, generator=g).to(device=device, dtype=dtype)
        pos = torch.arange(length, device=device).unsqueeze(0).expand(rows, -1)
        cos_sin = rope(h, pos)
        pool.append((h.requires_grad_(True), user, cos_sin))
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    state = {"i": 0}

    def next_batch():
        i = state["i"]
        state["i"] = (i + 1) % len(pool)
        h, user, cos_sin = pool[i]
        routing = ctx.personalize(user) if ctx is not None else contextlib.nullcontext()
        return h, cos_sin, routing

    def run(h, cos_sin):
        with (torch.autocast(device.type, dtype=torch.bfloat16) if amp
              else contextlib.nullcontext()):
            out = layer(h, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out  # older transformers return tuples

    def train_step():
        h, cos_sin, routing = next_batch()
        h.grad = None
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with routing:
            run(h, cos_sin).float().square().mean().backward()
        if opt is not None:
            opt.step()

    def forward():
        h, cos_sin, routing = next_batch()
        with torch.no_grad(), routing:
            return run(h, cos_sin)

    return train_step, forward, sum(p.numel() for p in trainable)


def measure(args, device, dtype, amp, spec, rows, length, prov, cfg):
    """Every variant at one dtype setting: (CSV rows, errors by variant)."""
    gpu = device.type == "cuda"
    results = []
    steps: dict[str, Callable[[], object]] = {}
    fwds: dict[str, Callable[[], object]] = {}
    params: dict[str, int] = {}
    errors: dict[str, str] = {}
    # Rotate a few input batches on the GPU so activations come from DRAM, not L2.
    pool_n = 4 if gpu else 1
    for v in variants(device):
        try:
            step, fwd, n = make_steps(v, device, dtype, rows, length, pool_n, args.seed,
                                      amp)
            step()  # builds AdamW's state, and a broken variant fails here
            steps[v], fwds[v], params[v] = step, fwd, n
        except Exception as e:  # noqa: BLE001 - one broken backend must not end the run
            errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    timings: dict[str, dict[str, common.Timing]] = {}
    for mode, fns in (("train step", steps), ("forward", fwds)):
        if gpu:
            timings[mode] = {
                v: common.time_cuda(f, rep_ms=50 if args.quick else 200) for v, f in fns.items()
            }
        else:
            timings[mode] = common.time_cpu_interleaved(
                fns,
                warmup=1,
                min_rounds=3 if args.quick else 7,
                budget_s=0.0 if args.quick else 4.0,
            )
    peaks = {v: common.peak_memory_mb(f, device) for v, f in steps.items()}

    base_step = timings["train step"].get("no adapters")
    base_fwd = timings["forward"].get("no adapters")
    print(
        f"\n[{spec}]\n{'variant':28s} {'trainable':>10s} {'step ms':>9s} {'p20-p80':>17s} "
        f"{'x none':>7s} {'fwd ms':>8s} {'x none':>7s} {'peak MiB':>9s}"
    )
    for v in variants(device):
        if v in errors:
            print(f"{v:28s} failed: {errors[v]}")
            continue
        t, f = timings["train step"][v], timings["forward"][v]
        r_step = common.paired_ratio(t, base_step) if base_step else math.nan
        r_fwd = common.paired_ratio(f, base_fwd) if base_fwd else math.nan
        print(
            f"{v:28s} {params[v]:10d} {t.median_ms:9.2f} {t.p20_ms:8.2f}-{t.p80_ms:<8.2f} "
            f"{r_step:7.2f} {f.median_ms:8.2f} {r_fwd:7.2f} {peaks[v]:9.1f}"
        )
        results.append(
            {
                **prov,
                "quick": args.quick,
                "load_avg": round(common.load_avg(), 2),
                "hidden": cfg.hidden_size,
                "rows": rows,
                "length": length,
                "dtype": spec,
                "variant": v,
                "trainable": params[v],
                "step_median_ms": t.median_ms,
                "step_p20_ms": t.p20_ms,
                "step_p80_ms": t.p80_ms,
                "step_ratio": r_step,
                "fwd_median_ms": f.median_ms,
                "fwd_ratio": r_fwd,
                "peak_mib": peaks[v],
                "error": "",
            }
        )
    return results, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="one dtype (overrides --dtypes)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: float32, bfloat16 (weights in bf16) or bf16-autocast "
                        "(fp32 weights under bf16 autocast, the main job's setting); default: "
                        "bfloat16 on GPU, float32,bf16-autocast on CPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=None, help="batch rows (GPU 16, CPU 4)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (GPU 256, CPU 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=common.RESULTS / "bench_layer.csv")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="default (full runs): benchmarks/results/layer_<device>.md",
    )
    args = p.parse_args(argv)

    device = common.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    specs = ([args.dtype] if args.dtype
             else (args.dtypes or ("bfloat16" if gpu else "float32,bf16-autocast")).split(","))
    rows = args.rows or (16 if gpu else 4)
    length = args.length or (256 if gpu else 128)
    prov = common.provenance(device)
    cfg = llama_config(device)
    print(
        f"device: {prov['device_name']}"
        + (f", {prov['threads']} threads" if not gpu else "")
        + f"; torch {prov['torch']}; block hidden {cfg.hidden_size}, MLP "
        f"{cfg.intermediate_size}; batch {rows} x {length} tokens; {specs}"
    )
    load_start = common.load_avg()
    start = time.perf_counter()
    results: list[dict] = []
    errors: dict[str, str] = {}
    for spec in specs:
        amp = spec == "bf16-autocast"
        dtype = torch.float32 if amp else getattr(torch, spec)
        res, errs = measure(args, device, dtype, amp, spec, rows, length, prov, cfg)
        results += res
        errors.update({f"{v} ({spec})": e for v, e in errs.items()})
    elapsed = time.perf_counter() - start

    ok = [r for r in results if not r["error"]]
    if not args.no_csv and ok:
        common.append_csv(args.csv, ok)
        print(f"\n{len(ok)} rows appended to {args.csv}")
    md = args.markdown or (None if args.quick else common.RESULTS / f"layer_{device.type}.md")
    if md:
        lines = [
            f"# bench_layer: one Llama decoder block, {'GPU' if gpu else 'CPU'}",
            "",
            f"- machine: {prov['device_name']}"
            + (f", {prov['threads']} torch threads, 1-min load average {load_start:.1f} at "
               f"the start, {common.load_avg():.1f} at the end ({os.cpu_count()} cores)"
               if not gpu else ""),
            f"- torch {prov['torch']}, commit {prov['commit'][:12]}, {prov['timestamp']}",
            f"- block: hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, heads "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}, random init, "
            f"{', '.join(specs)} (bf16-autocast: fp32 weights under bf16 autocast, the main "
            f"job's setting); batch "
            f"{rows} rows x {length} tokens; adapters on q_proj and v_proj",
            "- train step = forward + backward (to the input and the adapters) + AdamW; "
            "ratio to the block without adapters",
            "",
            "| variant | dtype | trainable params | step ms (median) | p20-p80 | x none | "
            "fwd ms | x none | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ok:
            lines.append(
                f"| {r['variant']} | {r['dtype']} | {r['trainable']:,} | "
                f"{r['step_median_ms']:.2f} | "
                f"{r['step_p20_ms']:.2f}-{r['step_p80_ms']:.2f} | {r['step_ratio']:.2f} | "
                f"{r['fwd_median_ms']:.2f} | {r['fwd_ratio']:.2f} | {r['peak_mib']:.1f} |"
            )
        lines += [f"| {v} | | failed: {e} | | | | | | |" for v, e in errors.items()]
        md.write_text("\n".join(lines) + "\n")
        print(f"markdown: {md}")
    print(f"done in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
