"""Serving throughput and adapter memory: RecLoRA's per-row mixtures against what a user would
do instead, for requests drawn from many distinct users (issue 15 item 5).

    python benchmarks/bench_serving.py                 # the run's default LLM, bf16, 64 users
    python benchmarks/bench_serving.py --run runs/default --requests 64 --batch-size 16

`--run` names a finished run (one with stages/reclora.json), or the folder this benchmark makes
its own run in: a `reclora run --quick` with N = 8 (the default LLM, Gemma-3-270M since
2026-12-01; K_text = 3, about 170-token prompts; a couple of minutes), resumed there if it was
cut short. It makes (or resumes) a run only in a folder that does not exist yet or is empty, in
the default runs/bench-serving, or in a folder it marked as its own (the file .bench-serving,
written before the run starts); any other folder without a finished RecLoRA stage (a run of
yours cut short, say) is refused before anything runs, never resumed with the benchmark's
options. Its RecLoRA is what `score` serves; only speed and memory are measured here.

Requests: one test interaction from each of `--requests` distinct users, so no two rows of
a batch share a user. Rows (requests per second, each path on the same token ids, batches of
`--batch-size` sorted by length as `score` does; one timed pass each, after one untimed
`score` of all the requests, so every path meets batch shapes already seen):

- base forward: the LLM alone, no adapter (the floor of any path).
- RecLoRA forward: the banks with per-row mixtures from the users' h_u (personalize with
  the batch's reps: one lora_mix_linear per adapted projection).
- RecLoRA score end to end: Recommender.score on the requests (histories, retrieval, CRM h_u,
  prompts, tokenization, LLM); its time split by stage is the second table.
- (a) PEFT, one adapter per user (reclora.export_peft of each user's mixture, loaded into one
  PeftModel): PEFT's mixed batch (`adapter_names`, one name per row), and switching the
  active adapter per request (batches of 1).
- (b) merged weights per user: W + scale B_p A_p written into q/v before each request
  (batches of 1; the merge is timed with it).
- (c) one shared plain LoRA (PEFT, r = 8 on q/v), no personalization: the ceiling.

Adapter memory is computed from tensor sizes (not measured): RecLoRA holds its banks and
gates whatever the number of users; per-user PEFT adapters and merged q/v weights grow
linearly; shown for the requests' users and for 10,000 users. The header gives the machine,
the 1-minute load average before and after, torch's thread count and the process's peak RSS.
Writes benchmarks/results/serving_<device>.md and serving_<device>.png.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--quick", "--crms", "din", "--n", "8", "--n-valid", "8", "--n-test", "16",
            "--no-progress"]
USERS_AT_SCALE = 10_000
DEFAULT_RUN = ROOT / "runs" / "bench-serving"
# Written into a run folder before the benchmark makes its run there: the only folders (with
# the default and new or empty ones) it ever resumes a run in.
MARKER = ".bench-serving"
SKIPPABLE = ("switch", "merged")


class RunRefused(Exception):
    """--run names a folder the benchmark must not write its own run into."""


def _same_folder(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def run_to_make(run: Path) -> bool:
    """False: `run` holds a finished RecLoRA stage, to serve as it is. True: the benchmark
    makes (or resumes) its own run there: a folder that does not exist or is empty, the
    default one, or one it marked. Any other folder raises RunRefused: resuming a `--quick`
    run into a user's run cut short rewrote its run_config.json and redid its stages."""
    if run.exists() and not run.is_dir():
        raise RunRefused(f"--run {run} is not a folder")
    if (run / "stages" / "reclora.json").is_file():
        return False
    if (not run.exists() or (run / MARKER).is_file() or _same_folder(run, DEFAULT_RUN)
            or not any(run.iterdir())):
        return True
    if (run / "run_config.json").is_file():
        raise RunRefused(f"--run {run} has no finished RecLoRA stage (stages/reclora.json); "
                         f"finish it with `reclora run --resume --output {run}` or pass "
                         "another --run")
    raise RunRefused(f"--run {run} is not a finished run (no stages/reclora.json) nor a "
                     f"folder this benchmark made (no {MARKER}); pass a finished run, a "
                     "folder that does not exist yet, or no --run")


def ensure_run(run: Path) -> None:
    """Make the benchmark's run in `run` unless it is finished (RunRefused: not ours)."""
    if not run_to_make(run):
        return
    from reclora.pipeline import main

    print(f"making the benchmark's run folder {run} (reclora run {' '.join(RUN_ARGS)})",
          flush=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("made by benchmarks/bench_serving.py: reclora run "
                              f"{' '.join(RUN_ARGS)}\n", encoding="utf-8")
    t = time.perf_counter()
    if main([*RUN_ARGS, "--output", str(run), "--resume"]) != 0:
        raise SystemExit("the benchmark's run failed")
    print(f"run made in {time.perf_counter() - t:.0f} s", flush=True)


def unrated_item(rec, user_id) -> str:
    """An item the user never rated in the dataset: observe refuses a second rating of a
    pair (the request's own item, rated, would enter its own history)."""
    ds = rec.ds
    user = np.flatnonzero(np.asarray(ds.user_raw_id).astype(str) == str(user_id))
    rated = (set(np.asarray(ds.item)[np.asarray(ds.user) == user[0]].tolist()) if user.size
             else set())
    return str(next(v for i, v in enumerate(ds.item_raw_id) if i not in rated))


def distinct_user_requests(rec, n: int) -> dict[str, np.ndarray]:
    """One test interaction per user, for n distinct users (test users first, then valid);
    all the users, with a note, where the dataset has fewer than n."""
    if n < 1:  # 0 or less once took every user
        raise ValueError(f"requests must be >= 1, got {n}")
    ds = rec.ds
    picked: list[int] = []
    seen: set[int] = set()
    for pool in (ds.test, ds.valid, ds.train):
        for i in pool:
            u = int(ds.user[i])
            if u not in seen:
                seen.add(u)
                picked.append(int(i))
                if len(picked) == n:
                    break
        if len(picked) == n:
            break
    if len(picked) < n:
        print(f"note: {n} requests asked for, but the run's dataset has {len(picked)} users: "
              f"benchmarking {len(picked)}", flush=True)
    s = np.asarray(picked)
    return {"user_id": np.asarray(ds.user_raw_id, dtype=object)[ds.user[s]],
            "item_id": np.asarray(ds.item_raw_id, dtype=object)[ds.item[s]],
            "timestamp": ds.time[s].astype(np.int64)}


def batches(tokens: list[list[int]], size: int) -> list[np.ndarray]:
    order = np.argsort([len(t) for t in tokens], kind="stable")
    return [order[a:a + size] for a in range(0, len(tokens), size)]


@torch.no_grad()
def forward_pass(ctr, tokens, size: int, amp: str, context=None) -> float:
    """Seconds to score every prompt in batches of `size` (sorted by length); `context(idx)`
    gives each batch's context (personalize, PEFT's adapter_names ...)."""
    from reclora.llm import amp_context

    groups = batches(tokens, size)
    with amp_context(ctr.device, amp):  # warm-up: one batch
        with (context(groups[0]) if context else contextlib.nullcontext()):
            ctr(**ctr.collate([tokens[i] for i in groups[0]]))
    t = time.perf_counter()
    for idx in groups:
        with (context(idx) if context else contextlib.nullcontext()), \
                amp_context(ctr.device, amp):
            ctr(**ctr.collate([tokens[i] for i in idx]))
    common.sync(ctr.device)
    return time.perf_counter() - t


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> int:
    from reclora.cli import ArgumentParser, device_option, int_at_least

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(DEFAULT_RUN),
                   help="a finished run, or where the benchmark makes its own (default "
                        "runs/bench-serving; see the module's help)")
    p.add_argument("--requests", type=int_at_least(1), default=64,
                   help="requests = distinct users, >= 1 (all of them, with a note, where "
                        "the dataset has fewer)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--device", type=device_option, default="auto")
    p.add_argument("--per-request", type=int_at_least(1), default=16,
                   help="requests timed on the batch-1 rows (switched, merged): their rate "
                   "is per request, so a subset gives it (default 16)")
    p.add_argument("--skip", type=common.comma_choices(SKIPPABLE), default=None,
                   help="comma list of rows to skip: switch, merged")
    p.add_argument("--out", default=None, help="markdown path (default results/serving_*.md)")
    a = p.parse_args(argv)
    skip = set(a.skip or ())
    # Checked before anything runs (the run folder, then where the results go): a refused
    # folder must not be written, and a bad --out once failed after the whole benchmark.
    run = Path(a.run)
    try:
        run_to_make(run)
    except RunRefused as err:
        p.error(str(err))
    if a.out:
        for path in (Path(a.out), Path(a.out).with_suffix(".png")):
            problem = common.output_file_problem(path)
            if problem:
                p.error(f"argument --out: cannot write {path}: {problem}")

    from peft import LoraConfig, PeftModel, get_peft_model

    from reclora import export_peft, merged_factors, personalize
    from reclora.injection import reclora_layers
    from reclora.pipeline import load_llm
    from reclora.serving import Recommender

    load_before = common.load_avg()
    ensure_run(run)
    rec = Recommender.load(run, device=a.device, batch_size=a.batch_size)
    device, amp, bs = rec.device, rec.amp, a.batch_size
    req = distinct_user_requests(rec, a.requests)
    n = req["user_id"].size
    assert len(set(req["user_id"])) == n
    rows: list[tuple[str, float, str]] = []  # (path, seconds for all n requests, note)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    say(f"{n} requests of {n} users; warm-up score")

    # RecLoRA end to end. Warm-up: one whole untimed pass, so that every path below meets
    # batch shapes (prompt lengths) the math libraries have seen before.
    rec.score(req)
    t = time.perf_counter()
    rec.score(req)
    e2e = time.perf_counter() - t
    stages = dict(rec.timings)
    tokens, reps = rec.last_inputs["tokens"], rec.last_inputs["user_reps"]
    say(f"score end to end: {n / e2e:.2f} requests/s")
    mean_tokens = float(np.mean([len(x) for x in tokens]))

    # RecLoRA forward alone, per-row mixtures.
    model = rec.ctr.model
    rec_fwd = forward_pass(rec.ctr, tokens, bs, amp, lambda idx: personalize(
        model, reps[torch.from_numpy(idx)].to(device)))

    # Each user's mixture as plain LoRA factors (what export_peft writes).
    layers = reclora_layers(model)
    user_factors = []
    with torch.no_grad():
        for g in layers.values():
            g.gate.eval()
        for j in range(n):
            with personalize(model, reps[j:j + 1].to(device)):
                per = {}
                for name, layer in layers.items():
                    w, idx, _ = layer._resolve_mixture()
                    per[name] = merged_factors(layer, w[0], None if idx is None else idx[0])
            user_factors.append(per)
    scale = next(iter(layers.values())).scale
    recl_bytes = rec.adapter_bytes()

    # A second copy of the LLM for the other paths (the base model, PEFT on top of it).
    base_ctr, _ = load_llm(rec.cfg.model, rec.cfg.max_length, device)
    base_fwd = forward_pass(base_ctr, tokens, bs, amp)
    say(f"RecLoRA forward {n / rec_fwd:.2f}, base forward {n / base_fwd:.2f} requests/s")
    rows.append(("base forward (no adapter)", base_fwd, f"batches of {bs}"))
    rows.append(("RecLoRA forward, per-row mixtures", rec_fwd, f"batches of {bs}"))
    rows.append(("RecLoRA score end to end", e2e, "histories, retrieval, h_u, prompts, LLM"))

    # (c) one shared plain LoRA.
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(base_ctr.model, cfg)
    peft_model.eval()
    shared_fwd = forward_pass(base_ctr, tokens, bs, amp)
    say(f"shared LoRA forward {n / shared_fwd:.2f} requests/s")
    shared_bytes = nbytes(p for nm, p in peft_model.named_parameters() if "lora_" in nm)
    peft_model = peft_model.unload()  # the plain base model back

    # (a) one exported PEFT adapter per user.
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for j in range(n):
            export_peft(model, Path(tmp) / f"u{j}", user_reps=reps[j:j + 1].to(device))
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        pm = PeftModel.from_pretrained(base_ctr.model, Path(tmp) / "u0", adapter_name="u0")
        for j in range(1, n):
            pm.load_adapter(Path(tmp) / f"u{j}", adapter_name=f"u{j}")
        pm.eval()
        load_s = time.perf_counter() - t
    per_user_bytes = nbytes(p for nm, p in pm.named_parameters()
                            if "lora_" in nm and nm.endswith(".u0.weight"))
    names = [f"u{j}" for j in range(n)]
    mixed = forward_pass(base_ctr, tokens, bs, amp, lambda idx: pm.base_model.
                         _enable_peft_forward_hooks(adapter_names=[names[i] for i in idx]))
    say(f"PEFT mixed batch {n / mixed:.2f} requests/s")
    sub = tokens[: max(1, min(a.per_request, n))]
    per = len(sub)
    rows.append(("(a) PEFT adapter per user, mixed batch (adapter_names)", mixed,
                 f"batches of {bs}; export {export_s:.1f} s, load {load_s:.1f} s for {n}"))
    if "switch" not in skip:
        def switched(idx):
            pm.set_adapter(names[int(idx[0])])
            return contextlib.nullcontext()
        sw = forward_pass(base_ctr, sub, 1, amp, switched) * n / per
        say(f"PEFT switched {n / sw:.2f} requests/s")
        rows.append(("(a) PEFT adapter per user, switched per request", sw,
                     f"batch 1 (timed on {per} requests)"))
    pm.unload()  # drop every adapter: the plain base model back

    # (b) merged weights per user, written in before each request.
    merged_bytes_user = 0
    if "merged" not in skip:
        mods = {name: base_ctr.model.get_submodule(name) for name in layers}
        orig = {name: m.weight.detach().clone() for name, m in mods.items()}
        merged_bytes_user = nbytes(orig.values())

        @contextlib.contextmanager
        def merged(idx):
            per = user_factors[int(idx[0])]
            with torch.no_grad():
                for name, m in mods.items():
                    a_, b_ = per[name]
                    m.weight.copy_(orig[name] + scale * (b_.float() @ a_.float()).to(
                        orig[name].dtype))
            yield

        mg = forward_pass(base_ctr, sub, 1, amp, merged) * n / per
        say(f"merged {n / mg:.2f} requests/s")
        with torch.no_grad():
            for name, m in mods.items():
                m.weight.copy_(orig[name])
        rows.append(("(b) merged weights per user (W + B_p A_p)", mg,
                     f"batch 1, merge timed with it (timed on {per} requests)"))
    rows.append(("(c) one shared plain LoRA (no personalization)", shared_fwd,
                 f"batches of {bs}"))

    # observe, then score one user's request: on top of the forward itself.
    one = {k: v[:1] for k, v in req.items()}
    fork = rec.fork()
    fork.score(one)
    t = time.perf_counter()
    fork.observe([{"user_id": one["user_id"][0], "item_id": unrated_item(rec, one["user_id"][0]),
                   "timestamp": int(one["timestamp"][0]) - 1, "rating": 5}])
    fork.score(one)
    obs_total = time.perf_counter() - t
    obs_extra = obs_total - fork.timings["llm_s"]

    load_after = common.load_avg()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    mem = {
        "base forward (no adapter)": (0, 0),
        "RecLoRA forward, per-row mixtures": (recl_bytes, recl_bytes),
        "RecLoRA score end to end": (recl_bytes, recl_bytes),
        "(a) PEFT adapter per user, mixed batch (adapter_names)":
            (per_user_bytes * n, per_user_bytes * USERS_AT_SCALE),
        "(a) PEFT adapter per user, switched per request":
            (per_user_bytes * n, per_user_bytes * USERS_AT_SCALE),
        "(b) merged weights per user (W + B_p A_p)":
            (merged_bytes_user * n, merged_bytes_user * USERS_AT_SCALE),
        "(c) one shared plain LoRA (no personalization)": (shared_bytes, shared_bytes),
    }
    prov = common.provenance(device)

    def mib(b: float) -> str:
        return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.1f} GiB"

    lines = [
        f"# Serving: {n} requests from {n} distinct users",
        "",
        f"`{shlex.join(['python', 'benchmarks/bench_serving.py', *sys.argv[1:]])}` on "
        f"{prov['device_name']} ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads), {prov['timestamp']}, commit {prov['commit']}; load average "
        f"{load_before:.2f} before, {load_after:.2f} after (the CPU is shared: compare rows "
        f"with each other, not with other days); peak RSS {peak_rss:,.0f} MiB. Model: "
        f"{rec.cfg.model or 'smollm2-135m (the shipped GGUF)'}, amp {amp} "
        f"({'bf16 autocast' if _bf16(device, amp) else 'float32'}), prompts of "
        f"{mean_tokens:.0f} tokens on average; RecLoRA k = {rec.cfg.k}, r = {rec.cfg.r} on "
        "q/v of every layer. One timed pass per row, after one untimed score of the "
        "requests.",
        "",
        "| path | requests/s | vs base forward | adapter memory, "
        f"{n} users | {USERS_AT_SCALE:,} users | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec, note in rows:
        m64, m10k = mem[name]
        lines.append(f"| {name} | {n / sec:.2f} | {base_fwd / sec:.2f}x | {mib(m64)} | "
                     f"{mib(m10k)} | {note} |")
    total = stages["total_s"]
    keys = ("parse_s", "history_s", "retrieval_s", "crm_s", "prompts_s", "llm_s")
    lines += ["", "Recommender.score, time by stage (the end-to-end row):", "",
              "| stage | s | share |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| {k[:-2]} | {stages[k]:.3f} | {100 * stages[k] / total:.1f}% |")
    lines.append(f"| total | {total:.3f} | 100% |")
    lines += [
        "",
        f"- score end to end at {e2e and (base_fwd / e2e):.2f}x the base forward's requests/s "
        f"and {rec_fwd / e2e:.2f}x RecLoRA's own forward (target >= 0.85x the forward alone); "
        f"against PEFT's mixed batch: {mixed / e2e:.2f}x (target >= 1).",
        f"- observe then score for one user: {obs_total:.2f} s, of which "
        f"{obs_extra:.3f} s on top of the forward itself (target < 0.5 s).",
        f"- Adapter memory (from tensor sizes): RecLoRA {mib(recl_bytes)} for any number of "
        f"users (banks + gates); one PEFT adapter per user {mib(per_user_bytes)} each, "
        f"{mib(per_user_bytes * USERS_AT_SCALE)} for {USERS_AT_SCALE:,} users; merged q/v "
        f"weights {mib(merged_bytes_user)} per user, "
        f"{mib(merged_bytes_user * USERS_AT_SCALE)} for {USERS_AT_SCALE:,}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out) if a.out else common.RESULTS / f"serving_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    plot([(nm, n / s) for nm, s, _ in rows], stages, out.with_suffix(".png"),
         f"{prov['device_name']}, load {load_before:.1f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _bf16(device, amp) -> bool:
    from reclora.llm import bf16_supported

    return amp in ("bf16", True) or (amp == "auto" and bf16_supported(device))


def plot(rates: list[tuple[str, float]], stages: dict[str, float], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rates) + 1.6),
                                 gridspec_kw={"width_ratios": [3, 1]})
    names = [n for n, _ in rates][::-1]
    vals = [v for _, v in rates][::-1]
    colors = ["tab:red" if "RecLoRA" in n else "tab:gray" if "base" in n else "tab:blue"
              for n in names]
    ax.barh(range(len(names)), vals, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("requests / s")
    ax.set_title(f"serving, distinct users per row ({title})", fontsize=9)
    keys = ("parse_s", "history_s", "retrieval_s", "crm_s", "prompts_s", "llm_s")
    bottom = 0.0
    for k in keys:
        bx.bar([0], [stages[k]], bottom=bottom, label=k[:-2])
        bottom += stages[k]
    bx.set_xticks([])
    bx.set_ylabel("s")
    bx.set_title("score: time by stage", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
