#!/usr/bin/env python
"""Mutation testing: does the suite catch plausible one-line bugs?

Each mutation below is a one-line change (file, the exact old text, the new text) with the
tests of its area. For each, the script copies the repository into a temporary folder (the
working tree's tracked and untracked, non-ignored files plus the built native extension),
applies the change, rebuilds the native CPU kernel when the change is under csrc/, runs the
area's tests with the copy first on PYTHONPATH, and reports:

    KILLED    a test failed (or the run hit the time limit): the suite catches the bug
    SURVIVED  every test passed: a bug users would get and the suite would not see
    ERROR     the old text is not in the file (the code moved: update the mutation), occurs
              more than once without `nth`, the native build failed, or pytest could not run

Slow (each mutation is a fresh pytest session; the pipeline ones a full quick run): not run
in CI, run before a release. Usage:

    .venv/bin/python scripts/mutants.py                 # all, one at a time
    .venv/bin/python scripts/mutants.py -j 2            # two at a time
    .venv/bin/python scripts/mutants.py --area metrics --area pipeline
    .venv/bin/python scripts/mutants.py --only 3,7      # by number (see --list)
    .venv/bin/python scripts/mutants.py --check         # only apply each: find ERRORs fast

Exit status 0 only when every mutation was killed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OP_TESTS = "tests/test_validation.py tests/test_op.py tests/test_op_large.py"
NATIVE_TESTS = ("tests/test_op.py tests/test_op_large.py tests/test_native.py -k "
                "'not triton'")
TRITON_TESTS = "tests/test_op.py tests/test_op_large.py tests/test_op_hostile.py -k triton"
LAYER_TESTS = "tests/test_layers.py tests/test_inject.py"
DATA_TESTS = "tests/test_data.py"
RETRIEVER_TESTS = "tests/test_retriever.py"
CRM_TESTS = "tests/test_crm.py"
METRIC_TESTS = "tests/test_metrics.py"
TRAINER_TESTS = "tests/test_few2many.py"
PIPELINE_TESTS = "tests/test_pipeline.py"


@dataclass(frozen=True)
class Mutant:
    area: str
    file: str
    old: str  # exact text, must occur once (or pass nth: which occurrence, from 0)
    new: str
    tests: str  # pytest arguments, shell-quoted
    why: str
    nth: int | None = None


MUTANTS = [
    # ---- the op: reference, validation, dispatch
    Mutant("op", "reclora_kernels/reference.py",
           "return delta_sorted[torch.argsort(order)]", "return delta_sorted[order]",
           OP_TESTS, "packed tokens un-sorted with the permutation instead of its inverse"),
    Mutant("op", "reclora_kernels/reference.py",
           "position = torch.arange(row_ids.numel(), device=row_ids.device) - starts[sorted_rows]",
           "position = torch.arange(row_ids.numel(), device=row_ids.device) - starts[row_ids]",
           OP_TESTS, "token position within its row from the unsorted row ids"),
    Mutant("op", "reclora_kernels/validate.py",
           "plan = implicit_plan(rows, x.shape[1])", "plan = implicit_plan(x.shape[1], rows)",
           OP_TESTS, "[R, L, d] rows and lengths swapped in the plan"),
    Mutant("op", "reclora_kernels/validate.py",
           "_check_adapter_range(adapter_idx, num_adapters)",
           "_check_adapter_range(adapter_idx, num_adapters + 1)",
           OP_TESTS, "adapter index M accepted (reads past the bank)"),
    Mutant("op", "reclora_kernels/validate.py",
           "idx = adapter_idx.long()", "idx = adapter_idx",
           OP_TESTS, "int32 adapter indices not widened (backends assume int64)"),
    Mutant("op", "reclora_kernels/triton/eager.py",
           "need[4], need[5])", "need[4], need[4])",
           OP_TESTS + " " + LAYER_TESTS,
           "mixture-weight gradient skipped when the banks are frozen"),
    Mutant("op", "reclora_kernels/triton/eager.py",
           "return t.shape, t.stride(), t.dtype, t.device", "return t.shape, t.dtype, t.device",
           "tests/test_triton_calls.py",
           "a repeat with other strides replays the first call's launch plan"),
    Mutant("op", "reclora_kernels/triton/eager.py",
           "        if call.check_range:", "        if False:",
           "tests/test_triton_calls.py",
           "a repeat skips an unchecked adapter_idx's range check"),
    # ---- the native cpu kernel (rebuilt in the copy)
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "for (int64_t e = 0; e < size; ++e) out[e] += wj * static_cast<Acc<T>>(src[e]);",
           "for (int64_t e = 0; e < size; ++e) out[e] = wj * static_cast<Acc<T>>(src[e]);",
           NATIVE_TESTS, "factor mix keeps only the last slot's adapter"),
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "for (int64_t p = users.start[i]; p < users.start[i + 1]; ++p) {",
           "for (int64_t p = users.start[i]; p < users.start[i + 1] - 1; ++p) {",
           NATIVE_TESTS, "bank gradient drops the last (row, slot) pair of each adapter",
           nth=0),
    # ---- layers and gates
    Mutant("layers", "reclora/layers.py",
           "torch.full((rows, adapters), 1.0 / adapters, dtype=bank_dtype,",
           "torch.full((rows, adapters), 1.0, dtype=bank_dtype,",
           LAYER_TESTS, "no mixture set: weights 1 instead of uniform 1/M"),
    Mutant("layers", "reclora/layers.py",
           "self.scale = self.alpha / rank", "self.scale = self.alpha",
           LAYER_TESTS, "LoRA scale alpha instead of alpha / r"),
    Mutant("layers", "reclora/gates.py",
           "return logits / self.config.temperature",
           "return logits * self.config.temperature",
           LAYER_TESTS, "gate temperature multiplies the logits"),
    Mutant("layers", "reclora/gates.py",
           "return torch.softmax(kept, dim=-1).to(dtype), idx",
           "return (torch.softmax(kept, dim=-1) if idx is None else torch.softmax(logits, "
           "dim=-1).gather(-1, idx)).to(dtype), idx",
           "tests/test_gate_topk.py " + LAYER_TESTS,
           "top-k weights not renormalised over the kept k"),
    # ---- data splits
    Mutant("data", "reclora/data/splits.py",
           "train = samples[ts < cuts[0]]", "train = samples[ts <= cuts[0]]",
           DATA_TESTS, "samples at the validation cut time in train and valid"),
    Mutant("data", "reclora/data/splits.py",
           "new_group[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])", "new_group[1:] = True",
           DATA_TESTS + " " + RETRIEVER_TESTS, "same-second ratings count as history (leak)"),
    Mutant("data", "reclora/data/splits.py",
           'pos = rating >= thr if op == ">=" else rating > thr', "pos = rating > thr",
           DATA_TESTS, "rating 4 of 5 labelled negative"),
    Mutant("data", "reclora/data/splits.py",
           "new = keep & (cu[user] >= k) & (ci[item] >= k)", "new = keep & (cu[user] >= k)",
           DATA_TESTS, "k-core ignores items"),
    # ---- retriever
    Mutant("retriever", "reclora/retriever.py",
           'score = self._scores(targets, hist).masked_fill(~valid, float("-inf"))',
           "score = self._scores(targets, hist)",
           RETRIEVER_TESTS, "padded history slots can be retrieved (batches of mixed lengths)"),
    Mutant("retriever", "reclora/retriever.py",
           "return torch.where(mask, srt, torch.zeros_like(srt)), mask",
           "return torch.where(mask, pos, torch.zeros_like(pos)), mask",
           RETRIEVER_TESTS, "retrieved items in rank order, not time order"),
    Mutant("retriever", "reclora/retriever.py",
           "order = torch.sort(score.flip(1), dim=1, descending=True, stable=True).indices",
           "order = torch.sort(score.flip(1), dim=1, descending=True, stable=False).indices",
           RETRIEVER_TESTS, "ties between equally similar items broken arbitrarily"),
    # ---- CRMs
    Mutant("crm", "reclora/crm/din.py",
           "a = a * mask  # no softmax", "a = a  # no softmax",
           CRM_TESTS, "DIN attention reads padded history slots"),
    Mutant("crm", "reclora/crm/sim.py",
           's = scores.detach().masked_fill(~mask, float("-inf")).flip(1)',
           "s = scores.detach().flip(1)",
           CRM_TESTS, "SIM's search keeps padded slots"),
    Mutant("crm", "reclora/crm/train.py",
           "    model.load_state_dict(best_state)\n", "    pass\n",
           CRM_TESTS, "the last epoch kept instead of the best on validation"),
    # ---- metrics
    Mutant("metrics", "reclora/metrics.py",
           "alpha = (1.0 - level) / 2.0", "alpha = 1.0 - level",
           METRIC_TESTS, "bootstrap intervals at the wrong level: 90% labelled 95% (issue 18)"),
    Mutant("metrics", "reclora/metrics.py",
           "p_value = float(min(1.0, 2.0 * tail))", "p_value = float(min(1.0, tail))",
           METRIC_TESTS, "paired bootstrap p-value halved (issue 18)"),
    Mutant("metrics", "reclora/metrics.py",
           "+ 1) / (diffs.size + 1)", ") / diffs.size",
           METRIC_TESTS, "paired bootstrap p-value without the add-one floor (p = 0 printed)"),
    Mutant("metrics", "reclora/metrics.py",
           "            if own_wins is not None:  # a cluster's own pairs once per copy",
           "            if False:  # a cluster's own pairs once per copy",
           METRIC_TESTS, "cluster bootstrap: a user's own pairs counted c^2 times (interval "
           "off its point estimate)"),
    Mutant("metrics", "reclora/metrics.py",
           "wins = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=-1)",
           "wins = (pos_w * (neg_below + neg_w)).sum(axis=-1)",
           METRIC_TESTS, "AUC: a cross-class tie counts as a win"),
    Mutant("metrics", "reclora/metrics.py",
           "p = np.clip(p, eps, 1.0 - eps)", "p = np.clip(p, eps, 1.0)",
           METRIC_TESTS, "LogLoss infinite for a confident negative"),
    # ---- trainer (Few2Many)
    Mutant("trainer", "reclora/few2many.py",
           "m.size * world / batch.size for m", "m.size / batch.size for m",
           TRAINER_TESTS, "DDP gradients scaled by 1/world (issue 18)"),
    Mutant("trainer", "reclora/llm.py",
           "x = torch.randn(512, 576, generator=gen)", "x = torch.randn(512, 576)",
           TRAINER_TESTS + " tests/test_llm.py",
           "the thread probe moves the global RNG (training randomness depends on it)"),
    Mutant("trainer", "reclora/few2many.py",
           "mine = np.array_split(batch, world)[rank]", "mine = np.array_split(batch, world)[0]",
           TRAINER_TESTS, "every rank trains on rank 0's share"),
    Mutant("trainer", "reclora/few2many.py",
           "    _load_state(ctr, best_state)\n", "    pass\n",
           TRAINER_TESTS, "the last step's adapters kept, not the best on validation"),
    # ---- pipeline (reclora run)
    Mutant("pipeline", "reclora/pipeline.py",
           "if not (self.cfg.resume and p.exists()):", "if not p.exists():",
           PIPELINE_TESTS, "stage files reused without --resume (issue 18)"),
    Mutant("pipeline", "reclora/pipeline.py",
           "self.test = ds.test.copy() if c.n_test == 0 else sample_subset(ds.test, c.n_test,",
           "self.test = ds.test.copy() if c.n_test == 0 else sample_subset(ds.valid, c.n_test,",
           PIPELINE_TESTS, "test subset drawn from the validation split (issue 18)"),
    Mutant("pipeline", "reclora/pipeline.py",
           'mode = "recent" if name in ("tallrec", "reclora-recent-text") else "semantic"',
           'mode = "recent" if name in ("reclora-recent-text",) else "semantic"',
           PIPELINE_TESTS, "TALLRec-style baseline given semantic retrieval (issue 18)"),
    Mutant("pipeline", "reclora/pipeline.py",
           'adapters = 0 if name == "zero-shot" else 1 if name in PLAIN_LORA else cfg.k',
           'adapters = 0 if name == "zero-shot" else 1 if name in PLAIN_LORA[:1] else cfg.k',
           PIPELINE_TESTS, "ReLLa-style baseline gets a bank of k instead of one LoRA"),
    Mutant("pipeline", "reclora/pipeline.py",
           "train = self.ds.train[~np.isin(self.ds.train, self.train_pool)]",
           "train = self.ds.train",
           PIPELINE_TESTS, "the gate CRM trains on the stage-2 pool (in-sample h_u, issue 14)"),
    Mutant("pipeline", "reclora/pipeline.py",
           "                                             groups=users)",
           "                                             groups=None)",
           PIPELINE_TESTS, "paired comparisons resample samples, not users (issue 14)"),
    Mutant("pipeline", "reclora/pipeline.py",
           "d = metrics.paired_bootstrap_auc(y, ref, np.asarray(r[\"probs\"], dtype=np.float64),",
           "d = metrics.paired_bootstrap_auc(y, np.asarray(r[\"probs\"], dtype=np.float64), ref,",
           PIPELINE_TESTS, "comparisons report the other model minus RecLoRA"),
    # ---- Triton kernels and launch: last, since that backend is being rewritten; update
    # the old texts when it changes (an ERROR here means the code moved).
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "ft = tl.load(fac_ptr + f[None, :] * s_f + rk[None, :] * s_c + k[:, None] * s_k,",
           "ft = tl.load(fac_ptr + f[None, :] * s_f + rk[None, :] * s_c + k[:, None],",
           TRITON_TESTS, "shrink K loop steps the bank by BLOCK_K, not BLOCK_K x stride "
           "(issue 18's W pointer bug in the kernel that now holds the K loop)"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)", "o = tl.arange(0, BLOCK_N)",
           TRITON_TESTS, "expand: every output tile writes columns 0-63 (d_out > 64)", nth=0),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)", "o = tl.arange(0, BLOCK_O)",
           TRITON_TESTS, "bank gradient: every o tile writes rows 0-63 (d > 64)", nth=0),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "x.shape[0], x.shape[1], x.stride(), weight.shape[0],",
           "x.shape[0], x.shape[1], (x.stride(0), 1), weight.shape[0],",
           TRITON_TESTS, "x assumed contiguous along d_in"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "0 if bias_stride is None else bias_stride, width,",
           "0 if bias_stride is None else 1, width,",
           TRITON_TESTS, "bias assumed contiguous", nth=0),
    # ---- added 2026-12-01 (AMD machine): thin fp32 loops, MKL half base
    Mutant("native", "csrc/cpu/thin_gemm.h",
           "if (p < k) dots_step<TB, JB, false>(acc, ai, lda, bj, ldb, p, lanes(k - p));",
           "if (p < k) dots_step<TB, JB, false>(acc, ai, lda, bj, ldb, p, lanes(k - p - 1));",
           "tests/test_cpu_thin_gemm.py", "thin shrink drops the last element of a ragged row"),
    Mutant("native", "csrc/cpu/bf16_gemm.h",
           "if (p < k) dots_step<MI, NJ>(acc, a, lda, b, ldb, p, first32(k - p));",
           "if (p < k) dots_step<MI, NJ>(acc, a, lda, b, ldb, p, first32(k - p - 1));",
           "tests/test_cpu_bf16_gemm.py", "bf16 dots drop the last element of a ragged row"),
    Mutant("native", "csrc/cpu/bf16_gemm.h",
           "const __mmask16 lo = first16(n - j), hi = first16(n - j - 16);",
           "const __mmask16 lo = first16(n - j), hi = first16(n - j - 17);",
           "tests/test_cpu_bf16_gemm.py", "bf16 outer drops a column of a ragged tail"),
    Mutant("native", "csrc/cpu/bf16_gemm.h",
           "      if (whole) std::memcpy(&pair, a + t * lda + 2 * q, 4);",
           "      std::memcpy(&pair, a + t * lda + 2 * q, 4);",
           "tests/test_cpu_bf16_gemm.py", "pairs_gemm reads one value past A's row at an odd k"),
    Mutant("native", "csrc/cpu/bf16_gemm.h",
           "(static_cast<int>(j * ld / 2 + q)))",
           "(static_cast<int>(j * ld / 2 + q + (q > 0))))",
           "tests/test_cpu_bf16_gemm.py", "pack_pairs_t gathers the wrong pair"),
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "gemm_acc<T>(false, loops, u.len, r, d_out,",
           "gemm_acc<T>(false, false, u.len, r, d_out,",
           "tests/test_cpu_bf16_gemm.py", "bf16 backward reads the transposed B_p as untransposed"),
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "static_cast<float>(bias[o]);\n      beta = 1.f;",
           "static_cast<float>(bias[o]);\n      beta = 0.f;",
           "tests/test_native_half.py", "half base in MKL drops the bias"),
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "if (mode == 0 || (mode == 2 && t != at::kHalf)) return false;",
           "if (mode == 0 || (mode == 2 && t == at::kHalf)) return false;",
           "tests/test_native_half.py", "half base mode 2 sends bf16, not fp16, to MKL"),
    Mutant("native", "csrc/cpu/thin_gemm.h",
           "  const int64_t full = n / 8 * 8;", "  const int64_t full = (n - 1) / 8 * 8;",
           "tests/test_cpu_thin_gemm.py", "factor gradients lose the last 8 columns of a row"),
    Mutant("native", "csrc/cpu/thin_gemm.h",
           "lanes(w - 8), k, alpha", "lanes(w - 7), k, alpha",
           "tests/test_cpu_thin_gemm.py", "thin GEMM's tail store writes one column too many"),
    # ---- added 2026-12-01 (AMD machine, later): OnceFlags instead of std::call_once
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "        try {\n          work();",
           "        st.store(kDone, std::memory_order_release);\n        try {\n          work();",
           "tests/test_native.py -k thread_counts",
           "a row's factors marked mixed before they are (other threads read stale scratch)"),
    # ---- added 2026-12-01 (AMD machine, fifth session): the inference shortcut
    Mutant("native", "csrc/direct_call.cpp",
           "for (int64_t n = 0; n < len; ++n) *p++ = b;",
           "for (int64_t n = 0; n < len; ++n) *p++ = b > 0 ? b - 1 : 0;",
           "tests/test_direct_call.py", "shortcut: implicit row ids off by one row"),
    Mutant("native", "csrc/direct_call.cpp",
           "if (!checked && (on_cuda || !in_range(*idxp, adapters))) return decline();",
           "if (!checked && (on_cuda || !in_range(*idxp, adapters + 1))) return decline();",
           "tests/test_direct_call.py tests/test_validation.py",
           "shortcut: adapter index M let through (reads past the bank)"),
    Mutant("native", "csrc/direct_call.cpp",
           "if (at::impl::torch_function_mode_enabled()) return decline();", "",
           "tests/test_direct_call.py", "shortcut: torch function modes bypassed"),
    Mutant("native", "csrc/direct_call.cpp",
           "  if (!(std::abs(v) <= dtype_max(dtype))) return std::nullopt;\n", "",
           "tests/test_direct_call.py tests/test_validation.py",
           "shortcut: an infinite scale reaches the kernel"),
    Mutant("native", "csrc/direct_call.cpp",
           "c10::default_included_set).empty())", "c10::default_included_set).empty() && false)",
           "tests/test_direct_call.py", "shortcut: vmap and dispatch modes not declined"),
    Mutant("native", "csrc/autograd.cpp",
           "const size_t after_bias = has_bias ? 4 : 3;", "const size_t after_bias = 3;",
           "tests/test_direct_call.py -k gradients",
           "C++ autograd: the bank's needs read off the wrong edges when there is a bias"),
    Mutant("native", "csrc/autograd.cpp",
           "need_bias ? dbias : Tensor()", "Tensor()",
           "tests/test_direct_call.py tests/test_op.py -k 'not triton'",
           "C++ autograd: the bias gradient dropped"),
    # ---- added 2026-12-02 (eleventh session): the Triton backward planned once per signature
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "weight.shape[0], x.stride(), g.stride(),",
           "weight.shape[0], (x.shape[1], 1), g.stride(),",
           "tests/test_triton_calls.py -k backward",
           "backward plan: x assumed contiguous (a strided x reuses a contiguous x's plan)"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "_run_outer(launch, p, q, table, coef, out, plan, scale_t)",
           "_run_outer(launch, p, q, table, None, out, plan, scale_t)",
           TRITON_TESTS, "backward: the segment sums without the mixture weights"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "_outer_spec, forward_plan, backward_plan):", "_outer_spec, forward_plan):",
           "tests/test_triton_calls.py -k forget",
           "new tile tables keep the backward plans made with the old ones"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "    if OWNED:\n        tl.store(d_ptrs, d_vals, mask=d_mask)",
           "    if OWNED and end > start:\n        tl.store(d_ptrs, d_vals, mask=d_mask)",
           TRITON_TESTS, "owned segment sums: a row without tokens leaves its block unwritten"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "out = (new_output if owned else torch.zeros)(shape, device=device, dtype=dtype)",
           "out = new_output(shape, device=device, dtype=dtype)",
           TRITON_TESTS, "atomic segment sums added into an unzeroed buffer (output mode)"),
    Mutant("triton", "reclora_kernels/ops.py",
           "ctx.set_materialize_grads(False)", "ctx.set_materialize_grads(True)",
           "tests/test_bench_host_triton.py",
           "custom op: zero-filled gradients of the saved outputs (three memsets a backward)"),
    # ---- added 2026-12-04 (twelfth session): the fused GEMM (expand.fused)
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "            x_ptrs += BLOCK_K * s_x_k\n", "",
           "tests/test_fused_gemm.py", "fused GEMM: x's K offset not advanced"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "            k_in = (k0 + kk) < K\n", "            k_in = (k0 + kk) <= K\n",
           "tests/test_fused_gemm.py", "fused GEMM: a ragged K reads one column past d_in"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                acc = _row_lora(acc, row, in_row, tok, o, o_mask, u_ptr,",
           "                acc = acc + 0 * _row_lora(acc, row, in_row, tok, o, o_mask, u_ptr,",
           "tests/test_fused_gemm.py", "fused GEMM: the LoRA part left out of the epilogue"),
    Mutant("triton", "reclora_kernels/triton/eager.py",
           "_meta(x), _meta(weight),", "_meta(x), weight.shape,",
           "tests/test_fused_gemm.py -k strided",
           "eager replay keyed without W's strides (a transposed W replays a contiguous W's plan)"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "d_in, x_strides, weight_strides[::-1],", "d_in, x_strides, weight_strides,",
           "tests/test_fused_gemm.py", "fused forward: W read untransposed"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "_expand_spec, _order,", "_expand_spec,",
           "tests/test_fused_gemm.py -k runs",
           "new tile tables keep the fused/unfused choice made with the old ones"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                a_ptrs += BLOCK_K * s_a_k\n", "",
           "tests/test_fused_gemm.py -k main_loop", "in-loop shrink: A's K offset not advanced"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "            if pid_n == 0:\n", "            if pid_n < 0:\n",
           "tests/test_fused_gemm.py -k main_loop",
           "in-loop shrink: s never stored (the backward reads poison)"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           ".to(acc_type) * scale\n", ".to(acc_type)\n",
           "tests/test_fused_gemm.py -k main_loop", "in-loop shrink: the expand unscaled"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           ' and row_len % cfg["BLOCK_T"] == 0', "",
           "tests/test_fused_gemm.py",
           "in-loop shrink where a token tile spans rows (one row's factor for all)"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "        tl.atomic_add(v_ptr + tok[:, None] * s_v_t + cc[None, :],",
           "        tl.store(v_ptr + tok[:, None] * s_v_t + cc[None, :],",
           "tests/test_grad_pass.py", "one pass over g: v stored per o tile, not summed"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "             (acc * scale).to(d_ptr.dtype.element_ty), mask=o_mask[:, None]",
           "             acc.to(d_ptr.dtype.element_ty), mask=o_mask[:, None]",
           "tests/test_grad_pass.py", "one pass over g: dB_p unscaled"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "        v = torch.zeros(bp.v_shape, device=x.device, dtype=acc)\n",
           "        v = new_output(bp.v_shape, device=x.device, dtype=acc)\n",
           "tests/test_grad_pass.py", "one pass over g: v summed into an unzeroed buffer"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "mask=offs < n_zero)", "mask=offs < n_zero - 1)",
           "tests/test_mix_pair.py", "one-launch mix: the accumulator's last element not zeroed"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "    for row0 in range(tl.program_id(1) * BLOCK_ROWS, rows,",
           "    for row0 in range(0, rows,",
           "tests/test_mix_pair.py", "one-launch mix: every row block mixes the first rows"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "        coefs += s_w_j\n", "        coefs += 1\n",
           "tests/test_mix_pair.py", "one-launch mix, dense: adapter_w's slot stride as 1",
           nth=1),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "tokens * rank if zeroed else 0", "0",
           "tests/test_mix_pair.py", "one-launch mix: the split-K accumulator left unzeroed"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "            ids += s_idx_j\n", "            ids += 1\n",
           "tests/test_mix_pair.py", "one-launch mix, gathered: adapter_idx's slot stride as 1"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "        ids = idx_ptr + r * s_idx_r\n", "        ids = idx_ptr + row0 * s_idx_r\n",
           "tests/test_mix_pair.py",
           "one-launch mix, gathered: a program's rows all take its first row's adapters"),
    # ---- added 2026-12-06 (fifteenth session): the fused GEMM's TMA variant, persistent
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "wt = w_desc.load([pid_n * BLOCK_N, k0]).T",
           "wt = w_desc.load([pid_n * BLOCK_N, 0]).T",
           "tests/test_fused_tma.py", "TMA forward: W's K offset not advanced"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "wt = w_desc.load([k0, pid_n * BLOCK_N])", "wt = w_desc.load([k0, 0])",
           "tests/test_fused_tma.py", "TMA dx: every column block reads W's first columns"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "xt = x_desc.load([first, k0])", "xt = x_desc.load([0, k0])",
           "tests/test_fused_tma.py", "TMA: every token tile reads x's first tile"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "y_desc.store([first, pid_n * BLOCK_N],", "y_desc.store([first, 0],",
           "tests/test_fused_tma.py", "TMA: every column block stored at y's first columns",
           nth=1),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "y_desc.store([first, pid_n * BLOCK_N],", "y_desc.store([first, 0],",
           "tests/test_fused_tma.py",
           "TMA, shrink in the loop: every column block stored at y's first columns", nth=0),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "tl.num_programs(0),\n", "tl.num_programs(0) + 1,\n",
           "tests/test_fused_tma.py -k loop", "persistent grid: programs skip tiles"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "if (x.data_ptr() | weight.data_ptr()) & 15:", "if x.data_ptr() & 15:",
           "tests/test_fused_tma.py -k unaligned",
           "TMA: an unaligned weight base not sent to the fallback"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "if (not asked or ordered or", "if (not asked or",
           "tests/test_fused_tma.py -k gathered",
           "TMA planned for rows gathered through the sort order"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "return ok, ok and w_nk", "return ok, ok and not w_nk",
           "tests/test_fused_tma.py", "TMA: W's orientation inverted"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "ok = _tma_rows(x_strides, size) and", "ok = x_strides[1] == 1 and",
           "tests/test_fused_tma.py -k odd_row", "TMA planned for unaligned rows"),
    Mutant("triton", "reclora_kernels/triton/card_plan.py",
           "    if on is None:\n        configs._table.cache_clear()\n    else:\n",
           "    configs._table.cache_clear()\n    if on is not None:\n",
           "tests/test_fused_tma.py -k descriptors", "forcing a second switch undoes the first"),
    # ---- the LSMR and mixture options of reclora run, and serving at scale (2026-12-07)
    Mutant("options", "reclora/pipeline.py",
           'hist = None if mode == "recent" else history(ds, retriever, s, mode, k, "id")',
           "hist = None", "tests/test_lsmr_options.py",
           "--id-history semantic computes h_u over the recent items all the same"),
    Mutant("options", "reclora/pipeline.py",
           'back = torch.from_numpy(np.argsort(order, kind="stable"))',
           "back = torch.from_numpy(order)", "tests/test_lsmr_options.py",
           "retrieved histories put back in the sorted order, not the input order"),
    Mutant("options", "reclora/pipeline.py",
           'if c.item_encoder != "minilm" and "semantic" in (spec.mode, spec.id_mode):',
           "if False:", "tests/test_lsmr_options.py",
           "stages retrieved with LLM embeddings resumed over MiniLM ones"),
    Mutant("options", "reclora/pipeline.py",
           '        bank = {"mix": self.mix} if name.startswith("reclora") else {}',
           "        bank = {}", "tests/test_mixture_options.py",
           "--mix output never reaches RecLoRA's banks"),
    Mutant("options", "reclora/few2many.py",
           "                  top_k=cfg.gate_top_k, sqrt=cfg.gate_sqrt)",
           "                  )", "tests/test_mixture_options.py",
           "--gate-top-k and --gate-sqrt never reach the gates"),
    Mutant("serving", "reclora/serving.py",
           'at = np.searchsorted(self.keys, keys, "right")',
           'at = np.searchsorted(self.keys, keys, "left")',
           "tests/test_serving.py -k extended",
           "an observed row placed before held rows of the same time (arrival order lost)"),
    Mutant("serving", "reclora/serving.py",
           "            keep = rows != own_row[row_owner]", "            keep = rows == rows",
           "tests/test_serving.py -k 'view_holds or seen'",
           "a seen request's own rating left in its shadow history (a label leak)"),
    Mutant("serving", "reclora/serving.py",
           "        np.maximum.at(held, row_users, hl)", "        held[row_users] = hl",
           "tests/test_serving.py -k view_holds",
           "a user's view holds the last request's history, not the longest"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "    gpu_float64 = dtype == torch.float64 and not interpreting()",
           "    gpu_float64 = False", "tests/test_fused_gemm.py -k float64",
           "float64 planned on the fused GEMM on a GPU, whose tiles overrun shared memory"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "for blk in range(tl.program_id(1), tl.cdiv(size, BLOCK), tl.num_programs(1)):",
           "for blk in range(tl.program_id(1), tl.program_id(1) + 1):",
           "tests/test_mix_pair.py -k longer",
           "a bank gradient past the grid's axis-1 limit: its later blocks never written",
           nth=2),
    Mutant("op", "reclora_kernels/plan.py", "    stream = stream_key(args[-1])",
           "    stream = 0", "tests/test_stream_caches.py",
           "cached row ids and uniform mixtures shared across CUDA streams"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "    return cached_tensor(_arange, n, device)", "    return _arange(n, device)",
           "tests/test_stream_caches.py",
           "cached index tables shared across CUDA streams and handed out after a write"),
    Mutant("layers", "reclora/injection.py",
           "            for param, was in trainable:\n                param.requires_grad_(was)\n",
           "", "tests/test_reliability_layers.py -k refused_module",
           "a refused inject leaves the earlier matches' base weights frozen"),
    Mutant("op", "reclora_kernels/ops.py", "    if value not in allowed:",
           "    if False:", "tests/test_env_vars.py",
           "a RECLORA_* variable with an unknown value silently ignored"),
    # ---- generate's expanded batch (personalize's expand_size)
    Mutant("layers", "reclora/layers.py",
           "weights = weights.repeat_interleave(expand, 0)", "weights = weights.repeat(expand, 1)",
           "tests/test_generate_expand.py",
           "beam rows given the users' mixtures in turn, not each user's n rows in a row"),
    Mutant("layers", "reclora/layers.py",
           "if expand > 1 and rows == weights.size(0) * expand:",
           "if expand > 1 and rows == weights.size(0) * expand and idx is None:",
           "tests/test_generate_expand.py",
           "top-k gates under beam search refused (the expansion only for dense mixtures)"),
    # ---- one [T, N] accumulator in the expand and the fused GEMM's epilogue (two spilled)
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                acc = tl.zeros_like(acc)\n            for row in range(row_lo,",
           "            for row in range(row_lo,",
           "tests/test_fused_gemm.py", "fused GEMM: a tile of several rows adds the base twice"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                    acc += tl.load(y_ptrs, mask=mask, other=0.0).to(acc_type)\n", "",
           "tests/test_fused_gemm.py",
           "fused GEMM: a tile of several rows loses the base it stored first"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                mask = in_row[:, None] & o_mask[None, :]\n",
           "                mask = t_mask[:, None] & o_mask[None, :]\n",
           "tests/test_fused_gemm.py -k 'nan or nonfinite'",
           "fused GEMM: a row's NaN or inf factor reaches the other rows of its tile (0 x inf)"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "        mask = in_row[:, None] & o_mask[None, :]\n",
           "        mask = t_mask[:, None] & o_mask[None, :]\n",
           "tests/test_op.py -k triton",
           "expand: each row's pass stores over the tile's other rows", nth=0),
    # ---- added 2026-12-08: interpreter launches from threads, the fused GEMM's bias
    Mutant("triton", "reclora_kernels/triton/fast_launch.py",
           "_INTERPRETER_TURN = threading.Lock()",
           "_INTERPRETER_TURN = __import__('contextlib').nullcontext()",
           "tests/test_op_hostile.py -k several_threads",
           "interpreter launches from several threads at once (they undo each other's patches)"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "                acc += tl.load(bias_ptr + o * s_bias, mask=o_mask,",
           "                acc += 0 * tl.load(bias_ptr + o * s_bias, mask=o_mask,",
           "tests/test_fused_gemm.py", "fused GEMM: the bias dropped (several-rows tiles)",
           nth=1),
    Mutant("layers", "reclora/injection.py",
           "        if name.startswith(ours):\n            continue\n", "",
           "tests/test_reliability_layers.py -k second_inject",
           "a second inject wraps the Linears inside an earlier layer's gate"),
    Mutant("layers", "reclora/checkpoint.py",
           '    check_finite(tensors, f"save_adapters: nothing written to {path}")\n', "",
           "tests/test_hostile_checkpoints.py -k refuses_nan",
           "save_adapters writes NaN banks over the last loadable file"),
    Mutant("native", "csrc/cpu/lora_mix_cpu.cpp",
           "      if (plan.run_start[b] != plan.run_start[b + 1]) continue;\n", "      continue;\n",
           "tests/test_op_hostile.py -k 'token_less_rows_nonfinite_weight and cpu'",
           "cpu factor backward: a token-less row's NaN weight reaches the shared adapters"),
    Mutant("triton", "reclora_kernels/triton/launch.py",
           "                adapter_w = _weights_of_filled_rows(adapter_w, plan)\n",
           "                pass\n",
           "tests/test_op_hostile.py -k 'token_less_rows_nonfinite_weight and triton'",
           "triton factor backward: a token-less row's NaN weight reaches the shared adapters"),
    Mutant("triton", "reclora_kernels/triton/kernels.py",
           "        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask)",
           "        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)",
           "tests/test_card_plans_interpreted.py",
           "split-K shrink: each split stores over the others (as the cards plan it)"),
]


# ------------------------------------------------------------------------------ running
def _repo_files() -> list[str]:
    """Tracked and untracked non-ignored files of the working tree (as they are now)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def make_base(dest: Path) -> None:
    """The unmutated copy every mutant starts from: the repository files plus the built
    native extension (ignored by git, so listed apart)."""
    for rel in _repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    for so in glob.glob(str(ROOT / "reclora_kernels" / "_C*.so")):
        shutil.copy2(so, dest / "reclora_kernels" / Path(so).name)


def apply(m: Mutant, copy: Path) -> str | None:
    """Apply the mutation in `copy`; an error message when it cannot be applied."""
    path = copy / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    text = path.read_text()
    count = text.count(m.old)
    if count == 0:
        return "old text not found (the code moved: update this mutation)"
    if m.nth is None and count > 1:
        return f"old text occurs {count} times (give nth)"
    nth = m.nth or 0
    if nth >= count:
        return f"old text occurs {count} times, nth={nth}"
    at = -1
    for _ in range(nth + 1):
        at = text.index(m.old, at + 1)
    path.write_text(text[:at] + m.new + text[at + len(m.old):])
    return None


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RECLORA_BACKEND", None)
    return env


def build_native(copy: Path, log: list[str]) -> bool:
    """Rebuild reclora_kernels._C in the copy (the CPU kernels; setup.py's own build)."""
    env = _env(copy)
    env.update(RECLORA_NO_CUDA="1", MAX_JOBS=env.get("MAX_JOBS", "1"))
    for so in glob.glob(str(copy / "reclora_kernels" / "_C*.so")):
        os.remove(so)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                       env=env, capture_output=True, text=True)
    log.append(r.stdout[-4000:] + r.stderr[-4000:])
    return r.returncode == 0 and bool(glob.glob(str(copy / "reclora_kernels" / "_C*.so")))


def run_tests(copy: Path, tests: str, timeout: float) -> tuple[str, str, str]:
    """(status, first failing test or reason, output tail) for one pytest session."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           *shlex.split(tests)]
    try:
        r = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "KILLED", f"timed out after {timeout:.0f} s", ""
    out = r.stdout + r.stderr
    if r.returncode == 0:
        return "SURVIVED", "", out[-2000:]
    if r.returncode in (1, 2):  # 2: interrupted, e.g. by an import error at collection
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
        return "KILLED", failed[0] if failed else "a test failed", out[-2000:]
    return "ERROR", f"pytest exit status {r.returncode}", out[-3000:]


def run_mutant(i: int, m: Mutant, base: Path, work: Path, timeout: float,
               check_only: bool) -> tuple[int, str, str, float, str]:
    t0 = time.perf_counter()
    copy = work / f"m{i:02d}"
    shutil.copytree(base, copy, symlinks=True)
    try:
        problem = apply(m, copy)
        if problem:
            return i, "ERROR", problem, time.perf_counter() - t0, ""
        if check_only:
            return i, "APPLIED", "", time.perf_counter() - t0, ""
        if m.file.startswith("csrc/"):
            log: list[str] = []
            if not build_native(copy, log):
                return i, "ERROR", "native build failed", time.perf_counter() - t0, log[-1]
        status, detail, tail = run_tests(copy, m.tests, timeout)
        return i, status, detail, time.perf_counter() - t0, tail
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once (1)")
    p.add_argument("--area", action="append", help="only these areas (repeatable)")
    p.add_argument("--only", help="comma list of mutant numbers (see --list)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--check", action="store_true",
                   help="only apply each mutation to a copy (finds ERRORs in seconds)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant (900)")
    p.add_argument("--verbose", "-v", action="store_true", help="print pytest's tail")
    a = p.parse_args(argv)

    chosen = list(enumerate(MUTANTS, 1))
    if a.area:
        chosen = [(i, m) for i, m in chosen if m.area in a.area]
    if a.only:
        wanted = {int(s) for s in a.only.split(",") if s.strip()}
        chosen = [(i, m) for i, m in chosen if i in wanted]
    if a.list:
        for i, m in chosen:
            print(f"{i:2d} {m.area:9s} {m.file}: {m.why}")
        return 0
    if not chosen:
        print("mutants: nothing selected", file=sys.stderr)
        return 2

    t_all = time.perf_counter()
    results: dict[int, tuple[str, str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="reclora-mutants-") as tmp:
        work = Path(tmp)
        base = work / "base"
        make_base(base)
        print(f"mutants: {len(chosen)} mutations of {ROOT} (copies in {work}), "
              f"{a.jobs} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            futures = [pool.submit(run_mutant, i, m, base, work, a.timeout, a.check)
                       for i, m in chosen]
            for f in concurrent.futures.as_completed(futures):
                i, status, detail, secs, tail = f.result()
                m = MUTANTS[i - 1]
                results[i] = (status, detail, secs)
                print(f"[{i:2d}] {status:8s} {m.area:9s} {m.file}: {m.why} ({secs:.0f} s)"
                      + (f"\n      {detail}" if detail else ""), flush=True)
                if tail and (a.verbose or status in ("ERROR", "SURVIVED")):
                    print("      | " + "\n      | ".join(tail.strip().splitlines()[-15:]))

    survived = sorted(i for i, r in results.items() if r[0] == "SURVIVED")
    errors = sorted(i for i, r in results.items() if r[0] == "ERROR")
    killed = sorted(i for i, r in results.items() if r[0] == "KILLED")
    print(f"\nmutants: {len(results)} mutations, {len(killed)} killed, {len(survived)} "
          f"survived, {len(errors)} errors ({(time.perf_counter() - t_all) / 60:.1f} min)")
    for title, ids in (("SURVIVED", survived), ("ERROR", errors)):
        for i in ids:
            m = MUTANTS[i - 1]
            print(f"  {title} [{i}] {m.file}: {m.old!r} -> {m.new!r}  ({results[i][1] or m.why})")
    if a.check:
        return 1 if errors else 0
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
