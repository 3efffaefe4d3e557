"""reclora.llm.bf16_supported must agree with what this CPU has: the probe it calls moved
(torch 2.14 has torch.cpu._is_avx512_bf16_supported, not torch._C._cpu's), and a probe that
quietly answers False leaves bf16 autocast off on a CPU that has it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reclora import llm


def read_cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags() -> set[str]:
    flags = read_cpu_flags()
    if not flags:
        pytest.skip("no flags line in /proc/cpuinfo")
    return flags


def test_cpu_probe_agrees_with_cpuinfo():
    flags = cpu_flags()
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    assert llm.bf16_supported(torch.device("cpu")) == has, sorted(
        f for f in flags if "bf16" in f or "amx" in f)


def test_this_machine_has_avx512_bf16_and_the_probe_sees_it():
    """This project's CPU machine has AVX512-BF16: the probe must say so (it said False on
    torch 2.14.1 before the fix)."""
    if "avx512_bf16" not in cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16")
    assert llm._cpu_probe("_is_avx512_bf16_supported") is True
    assert llm.bf16_supported(torch.device("cpu")) is True


def test_probe_falls_back_to_the_old_location(monkeypatch):
    """torch 2.11 (the GPU machine) keeps the probe in torch._C._cpu: found there too."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)

    class Old:
        @staticmethod
        def _is_avx512_bf16_supported():
            return True

    monkeypatch.setattr(torch._C, "_cpu", Old, raising=False)
    assert llm._cpu_probe("_is_avx512_bf16_supported") is True
    monkeypatch.setattr(torch._C, "_cpu", object(), raising=False)
    assert llm._cpu_probe("_is_avx512_bf16_supported") is False


def test_item_embeddings_take_bf16_where_the_llm_does(monkeypatch):
    """--item-precision auto and --amp auto answer one question (native bf16 on this CPU):
    the embeddings followed oneDNN's probe, which says yes on plain AVX512 too (emulated),
    so a Cascade Lake ran the LLM in fp32 and the items in bf16."""
    from reclora.data import embeddings

    assert embeddings.use_bf16("auto", "cpu") == llm.bf16_supported(torch.device("cpu"))
    for has in (True, False):
        monkeypatch.setattr(llm, "bf16_supported", lambda device, has=has: has)
        assert embeddings.use_bf16("auto", "cpu") is has
    assert embeddings.use_bf16("fp32", "cpu") is False
    assert embeddings.use_bf16("bf16", "cpu") is True
