"""The main job's per-sample cost: one RecLoRA training step and one eval forward of the LLM
CTR model, in float32 and under bf16 autocast, side by side.

    python benchmarks/bench_llm_step.py                 # SmolLM2-135M (shipped GGUF), CPU
    python benchmarks/bench_llm_step.py --rounds 2 --length 120

What runs is what `reclora run` runs in stage 2 (reclora.few2many): LLMCTR on the shipped
SmolLM2-135M, RecLoRA banks (16 meta-LoRAs, r 8, gated by a 256-d user vector) injected on
q_proj and v_proj by `inject_adapters` with the default Stage2Config; a training step is
forward (Yes/No logits at the answer position) + loss + backward + AdamW over the adapters
and gates, batch 8; an eval forward is `torch.no_grad` at batch 16. Prompts are random token
ids of about `--length` tokens (uneven lengths, so batches carry padding as real prompts do).
`fp32` is amp="off"; `bf16` is amp="bf16" (torch.autocast, what amp="auto" picks where
reclora.llm.bf16_supported is true). The two settings run interleaved round by round, so load
from other processes lands on both alike; each cell is the median over rounds of the batch
time divided by the batch size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks`

from benchmarks import common  # noqa: E402


def build(seed: int, model: str | None):
    from reclora.few2many import Stage2Config, inject_adapters
    from reclora.llm import LLMCTR

    ctr = LLMCTR.from_pretrained(model)
    cfg = Stage2Config(progress=False)
    inject_adapters(ctr, cfg)
    params = [p for p in ctr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return ctr, cfg, opt, sum(p.numel() for p in params)


def prompts(ctr, n: int, length: int, gen: torch.Generator) -> list[list[int]]:
    vocab = len(ctr.tokenizer) if hasattr(ctr, "tokenizer") else 49152
    out = []
    for _ in range(n):
        size = length + int(torch.randint(-length // 10, length // 10 + 1, (1,), generator=gen))
        out.append(torch.randint(100, min(vocab, 49152) - 100, (size,), generator=gen).tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--length", type=int, default=200, help="tokens per prompt (about)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None,
                   help="an LLM as `reclora run --model` takes it (default: SmolLM2-135M)")
    p.add_argument("--thin-ab", action="store_true",
                   help="compare fp32 with the CPU op's thin GEMMs on BLAS vs csrc/cpu/"
                        "thin_gemm.h's loops (reclora::cpu_thin_gemm) instead of fp32 vs bf16")
    p.add_argument("--bf16-ab", action="store_true",
                   help="compare bf16 with the CPU op's bf16 GEMMs in MKL vs csrc/cpu/"
                        "bf16_gemm.h's AVX512-BF16 loops (reclora::cpu_bf16_gemm)")
    p.add_argument("--markdown", type=Path, default=common.RESULTS / "llm_step_cpu.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    from reclora.llm import amp_context, bf16_supported

    ctr, cfg, opt, trainable = build(args.seed, args.model)
    gen = torch.Generator().manual_seed(args.seed)
    # name -> (amp, {CPU op switch: mode} set before each run)
    settings = {"fp32": ("off", {}), "bf16": ("bf16", {})}
    if args.thin_ab:
        settings = {"fp32 BLAS": ("off", {"cpu_thin_gemm": 0}),
                    "fp32 thin loops": ("off", {"cpu_thin_gemm": 1})}
    if args.bf16_ab:
        settings = {"bf16 MKL": ("bf16", {"cpu_bf16_gemm": 0}),
                    "bf16 AVX512-BF16 loops": ("bf16", {"cpu_bf16_gemm": 1})}
    names = list(settings)

    def run_setting(fn, setting) -> None:
        amp, switches = setting
        for switch, mode in switches.items():
            getattr(torch.ops.reclora, switch)(mode)
        fn(amp)

    def train_step(amp: str) -> None:
        enc = ctr.collate(prompts(ctr, args.train_batch, args.length, gen))
        labels = torch.randint(0, 2, (args.train_batch,), generator=gen)
        reps = torch.randn(args.train_batch, cfg.gate_dim, generator=gen)
        ctr.train()
        with ctr.personalized(reps), amp_context(device, amp):
            loss = ctr.loss(ctr(**enc), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_forward(amp: str) -> None:
        enc = ctr.collate(prompts(ctr, args.eval_batch, args.length, gen))
        reps = torch.randn(args.eval_batch, cfg.gate_dim, generator=gen)
        ctr.eval()
        with torch.no_grad(), ctr.personalized(reps), amp_context(device, amp):
            ctr(**enc)

    jobs = {(kind, name): (fn, setting, batch)
            for kind, fn, batch in (("train step", train_step, args.train_batch),
                                    ("eval forward", eval_forward, args.eval_batch))
            for name, setting in settings.items()}
    load_start, start = common.load_avg(), time.perf_counter()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    for round_ in range(args.rounds + 1):
        keys = list(jobs)
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn, setting, batch = jobs[key]
            t0 = time.perf_counter()
            run_setting(fn, setting)
            if round_ > 0:  # round 0 is the warm-up
                samples[key].append((time.perf_counter() - t0) / batch)
            print(f"round {round_} {key[0]:12s} {key[1]}: "
                  f"{(time.perf_counter() - t0) / batch:.3f} s/sample", flush=True)
    load_end, elapsed = common.load_avg(), time.perf_counter() - start

    prov = common.provenance(device)
    command = "python benchmarks/bench_llm_step.py " + " ".join(argv or sys.argv[1:])
    model = args.model or "SmolLM2-135M"
    lines = [
        f"# The main job's per-sample cost: {model} + RecLoRA, {names[0]} vs {names[1]} (CPU)",
        "",
        f"- machine: {prov['device_name']}, {args.threads} torch threads; torch "
        f"{prov['torch']}, commit {prov['commit'][:12]}, {prov['timestamp']}",
        f"- command: `{command.strip()}` ({elapsed / 60:.1f} min)",
        f"- 1-min load average {load_start:.1f} at start, {load_end:.1f} at end (2 cores, shared "
        "with other jobs: absolute times carry that load; the two settings ran interleaved, so "
        "the ratio is the steadier number)",
        f"- reclora.llm.bf16_supported(cpu) = {bf16_supported(device)}; prompts ~{args.length} "
        f"tokens; RecLoRA on q_proj, v_proj (16 meta-LoRAs, r 8, gated), {trainable:,} "
        "trainable parameters; train step = forward + backward + AdamW",
        "",
        f"| | batch | {names[0]} s/sample | {names[1]} s/sample | {names[1]} / {names[0]} "
        "| rounds |",
        "|---|---|---|---|---|---|",
    ]
    print()
    for kind, batch in (("train step", args.train_batch), ("eval forward", args.eval_batch)):
        f32 = samples[(kind, names[0])]
        b16 = samples[(kind, names[1])]
        ratio = statistics.median(b / f for b, f in zip(b16, f32))
        row = (f"| {kind} | {batch} | {statistics.median(f32):.3f} | "
               f"{statistics.median(b16):.3f} | {ratio:.2f} | {len(f32)} |")
        lines.append(row)
        print(row)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(lines) + "\n")
    print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
