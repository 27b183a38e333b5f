"""Can the tests fail? A mutation check: each `Mutant` below is a small plausible bug in offq (an
off-by-one in a tail, a dropped term, a skipped check, a span that wraps) and the test files that
must catch it.

    python tests/mutants.py                 # every mutant (about a minute each on 2 cores)
    python tests/mutants.py SWIGLU-tail ...  # the named ones
    python tests/mutants.py --list

The check runs in a temporary git worktree of HEAD (so commit what it should see), builds the C
core there once, then for each mutant: edits the file, rebuilds when the edit is in csrc/, runs
the mutant's test files with that worktree first on the import path, and restores the file. A
mutant is KILLED when a test fails, SURVIVED when all pass; it exits 1 when any survives.
Not a pytest file (pytest collects test_*.py only): it rebuilds the core once per mutant.

Every mutant here survived the suite once (tests/ then ran that code only on shapes or CPUs
that never reach it) or is a case the suite already catches that guards a limit worth keeping
watched; each test added for one says so in its docstring.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str   # text that occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail


W4A4_AVX2 = "csrc/x86/matmul_w4a4_avx2.c"
# the symmetric quantizer's scalar tail (a macro: its lines end in backslashes)
QUANT_TAIL = ("bads |= offq_is_nonfinite(g[i]);" + " " * 50
              + "\\\n                const float a = fabsf(g[i]);")
MUTANTS = (
    # AVX2's 16-bit sums of raw 4-bit products hold 64 steps of 4 k; 128 steps wrap
    Mutant("W4A4-avx2-chunk", W4A4_AVX2, "#define CHUNK 256 ", "#define CHUNK 512 ",
           ("tests/test_matmul_w4a4.py",)),
    Mutant("W4A4-avx2-zero-point-term", W4A4_AVX2, "e1 = _mm256_fnmadd_ps(za, wt1, e1);",
           "(void)wt1;", ("tests/test_matmul_w4a4.py",)),
    Mutant("W4A4-avx2-decode-tail", W4A4_AVX2,
           ": (c0 + DEC_SUB < (b + 1) * vpb ? DEC_SUB : (b + 1) * vpb - c0);",
           ": (c0 + DEC_SUB < (b + 1) * vpb ? DEC_SUB : (b + 1) * vpb - c0 - 1);",
           ("tests/test_matmul_w4a4.py",)),
    # the 8-bit attention's AVX2 spans of 16-bit pair sums (scores 8 blocks, values 4)
    Mutant("AI8-avx2-score-span", "csrc/x86/attention_i8_avx2.c", "#define AI8_SPAN_S 8",
           "#define AI8_SPAN_S 16", ("tests/test_attention_kv4.py",)),
    Mutant("AI8-avx2-value-span", "csrc/x86/attention_i8_avx2.c", "#define AI8_SPAN_V 4",
           "#define AI8_SPAN_V 8", ("tests/test_attention_kv4.py",)),
    Mutant("ATT-avx2-softmax-tail", "csrc/x86/attention_tiles.h",
           "memcpy(st + j, pad, (size_t)(n - j) * sizeof(float));",
           "memcpy(st + j, pad, (size_t)(n - j - 1) * sizeof(float));",
           ("tests/test_attention_kv4.py",)),
    Mutant("ATT-binding-odd-group", "csrc/python/bind_attention_kv4.c",
           "hd % ng != 0 ||\n        (hd / ng) % 2 != 0) {", "hd % ng != 0) {",
           ("tests/test_attention_kv4.py::test_arguments_are_validated",)),
    Mutant("SWIGLU-avx2-tail", "csrc/x86/swiglu_avx2.c",
           "        for (int64_t k = 0; k < n - i; k++) {\n            x[i + k] = xp[k];",
           "        for (int64_t k = 0; k < n - i - 1; k++) {\n            x[i + k] = xp[k];",
           ("tests/test_decoder_step.py::test_simd_variants_agree_on_vector_tails",)),
    Mutant("QUANT-avx2-tail-nonfinite", "csrc/x86/quant_avx2.c", QUANT_TAIL,
           QUANT_TAIL.replace("bads |= offq_is_nonfinite(g[i]);", "(void)0;" + " " * 24),
           ("tests/test_quant.py",)),
    Mutant("QUANT-generic-first-value", "csrc/quant.c",
           "        for (int64_t i = 0; i < n; i++) {\n            const float v = g[i];",
           "        for (int64_t i = 1; i < n; i++) {\n            const float v = g[i];",
           ("tests/test_quant.py",)),
    Mutant("WQ-avx2-zero-point-sign", "csrc/x86/matmul_wq_avx2.c",
           "_mm256_mul_ps(s, _mm256_sub_ps(q, z))", "_mm256_mul_ps(s, _mm256_add_ps(q, z))",
           ("tests/test_matmul_wq.py",)),
    Mutant("GPTQ-last-column-update", "csrc/gptq.c",
           "for (int64_t t = i + 1; t < sub_end; t++) {",
           "for (int64_t t = i + 1; t < sub_end - 1; t++) {", ("tests/test_gptq_columns.py",)),
    Mutant("DECODER-WQ-merge-chunks", "csrc/decoder_wq.c",
           "offq_attn_f32_chunks(start + r + 1), H * (hd + 2)",
           "offq_attn_f32_chunks(start + r), H * (hd + 2)", ("tests/test_decoder_wq_step.py",)),
    Mutant("ATTF-avx2-three-vectors", "csrc/x86/attention_f32_avx2.c",
           "case 3: weighted_rows(st, v + i0, stride, n, acc + i0, 3); break;",
           "case 3: weighted_rows(st, v + i0, stride, n, acc + i0, 2); break;",
           ("tests/test_attention_f32.py",)),
    Mutant("EIGEN-sort-last-value", "csrc/linalg.c",
           "for (int64_t j = i + 1; j < count; j++) {\n            lo = w[j]",
           "for (int64_t j = i + 1; j < count - 1; j++) {\n            lo = w[j]",
           ("tests/test_eigenpairs.py",)),
    Mutant("WINDOWS-count", "offq/data.py", "available = len(tokens) // body",
           "available = (len(tokens) - 1) // body", ("tests/test_data.py",)),
    Mutant("SAFETENSORS-overlap-bound", "offq/formats/safetensors.py", "if b1 < e0:",
           "if b1 < e0 - 1:", ("tests/test_formats_safetensors.py",)),
    Mutant("GGUF-data-bound", "offq/formats/gguf_file.py", "if first + n_bytes > self.size:",
           "if first + n_bytes - 1 > self.size:", ("tests/test_formats_gguf.py",)),
    # the method's Python: rotations, statistics, key offsets, OSAQ, RoPE and the CLI's plumbing
    Mutant("R1-pca-sign-fix", "offq/recipe/rotations.py",
           "vecs *= np.sign(vecs[pivot, np.arange(vecs.shape[1])])[None, :]", "pass",
           ("tests/test_rotations.py",)),
    Mutant("R2-per-layer", "offq/recipe/pipeline.py", "r2=None if r2 is None else r2[i]",
           "r2=None if r2 is None else r2[0]", ("tests/test_pipeline.py",)),
    Mutant("TOP1-token-largest", "offq/recipe/statistics.py",
           "idx = np.abs(x).max(axis=-1).argmax(axis=1)\n    t = x",
           "idx = np.abs(x).max(axis=-1).argmin(axis=1)\n    t = x", ("tests/test_cov.py",)),
    Mutant("CENTRED-moment-n", "offq/recipe/statistics.py",
           "return self.acc - self.n * np.outer(mean, mean)",
           "return self.acc - np.outer(mean, mean)", ("tests/test_cov.py",)),
    Mutant("KEY-OFFSET-data-free-r3", "offq/recipe/pipeline.py", "config.rotates and config.r3)",
           "config.rotates)", ("tests/test_key_offset.py",)),
    Mutant("KEY-OFFSET-rtn-propagates", "offq/recipe/pipeline.py",
           "propagate = calib is not None and (hessians_needed or config.centres_keys)",
           "propagate = calib is not None and hessians_needed", ("tests/test_key_offset.py",)),
    Mutant("OSAQ-relative-temperature", "offq/quantizers/osaq.py",
           "inv_tau = 1.0 / (tau_rel * np.where(amax > 0, amax, 1.0))", "inv_tau = 1.0 / tau_rel",
           ("tests/test_osaq.py",)),
    Mutant("ROPE-llama3-band", "offq/model/ops.py",
           "low_wavelen, high_wavelen = orig / low, orig / high",
           "low_wavelen, high_wavelen = orig / high, orig / low", ("tests/test_model_parity.py",)),
    Mutant("CLI-quantize-seed", "offq/cli.py", "seqlen=cfg.calib_seqlen, seed=cfg.seed,",
           "seqlen=cfg.calib_seqlen, seed=0,", ("tests/test_eval.py",)),
    Mutant("CLI-generate-top-k", "offq/cli.py", "top_k=args.top_k, seed=args.seed)",
           "top_k=None, seed=args.seed)", ("tests/test_eval.py",)),
    # running a quantized model: the fused decoder's prompt paths, the packed KV cache, the
    # GPTQ export's zero offset, GGUF tokenizers, perplexity's finiteness check
    Mutant("FUSED-numpy-prefill-threshold", "offq/quant/fused.py",
           "and T > NUMPY_PREFILL_MIN_ROWS", "and T >= NUMPY_PREFILL_MIN_ROWS",
           ("tests/test_decoder_step.py",)),
    Mutant("FUSED-numpy-prefill-empty-cache", "offq/quant/fused.py",
           "if start == 0 and numpy_prompt:", "if numpy_prompt:", ("tests/test_decoder_step.py",)),
    Mutant("FUSED-auto-prefill-threshold", "offq/quant/fused.py",
           "auto_rows is not None and T >= auto_rows", "auto_rows is not None and T > auto_rows",
           ("tests/test_decoder_step.py",)),
    Mutant("ASSEMBLE-auto-streamed", "offq/quant/assemble.py",
           'if mode == "fused" or (mode == "auto" and resident):',
           'if mode == "fused" or mode == "auto":', ("tests/test_decoder_step.py",)),
    Mutant("KV-packed-read-last-step", "offq/quant/kv_codec.py", "for s in range(0, n, step):",
           "for s in range(0, n - 1, step):", ("tests/test_kv_cache.py",)),
    Mutant("GPTQ-EXPORT-zero-offset", "offq/formats/gptq_export.py",
           "np.float32) + ZERO_OFFSET[fmt]", "np.float32) + 1", ("tests/test_gptq_export.py",)),
    Mutant("GGUF-TOKENIZER-bos-needs-id", "offq/formats/gguf.py",
           "adds_bos=adds_bos and bos is not None", "adds_bos=adds_bos",
           ("tests/test_tokenizer.py",)),
    Mutant("GGUF-TOKENIZER-unknown-special", "offq/formats/gguf.py",
           "special_types = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN))",
           "special_types = (int(gguf.TokenType.CONTROL),)", ("tests/test_tokenizer.py",)),
    Mutant("EVAL-infinite-window", "offq/eval.py", "if not np.all(np.isfinite(nll)):",
           "if np.any(np.isnan(nll)):", ("tests/test_eval.py",)),
    Mutant("EVAL-window-index", "offq/eval.py", "window {s + int(np.argmax(",
           "window {int(np.argmax(", ("tests/test_eval.py",)),
    # the quantizers' options reaching the code, and what the checkpoint records of them
    Mutant("GPTQ-static-groups-passed", "offq/quantizers/gptq.py",
           "block_size=self.block_size, static_groups=self.static_groups)",
           "block_size=self.block_size, static_groups=False)", ("tests/test_cd.py",)),
    Mutant("GPTQ-CD-sweep-count", "offq/quantizers/gptq.py", "sweeps=self.cd_sweeps)",
           "sweeps=1)", ("tests/test_cd.py",)),
    Mutant("OSAQ-report-rows-fraction", "offq/quantizers/osaq.py", "moved / max(w.shape[0], 1))",
           "moved)", ("tests/test_osaq.py",)),
    Mutant("CHECKPOINT-r4-recorded-by-r4", "offq/formats/checkpoint.py",
           "model_config.intermediate_size if cfg.rotates and cfg.r4",
           "model_config.intermediate_size if cfg.rotates and cfg.r3", ("tests/test_checkpoint.py",)),
    Mutant("CALIBRATION-blank-line-separator", "offq/data.py", 'sep = tokenizer.encode("\\n\\n")',
           'sep = tokenizer.encode("\\n")', ("tests/test_data.py",)),
    Mutant("CALIBRATION-no-leading-separator", "offq/data.py",
           "            if stream:\n                stream.extend(sep)",
           "            if True:\n                stream.extend(sep)", ("tests/test_data.py",)),
    Mutant("API-calibration-bos", "offq/api.py", "add_bos=bool(model.config.add_bos))",
           "add_bos=False)", ("tests/test_eval.py",)),
    Mutant("API-calibration-seed-recorded", "offq/api.py",
           'kwargs.setdefault("calibration_seed", config.seed)',
           'kwargs.setdefault("calibration_seed", 0)', ("tests/test_eval.py",)),
    Mutant("CLI-threads", "offq/cli.py", "        set_num_threads(n)\n", "        pass\n",
           ("tests/test_eval.py",)),
    Mutant("CLI-osaq-prefix-once", "offq/cli.py",
           'base if base.startswith("osaq+") else "osaq+" + base', '"osaq+" + base',
           ("tests/test_osaq_pipeline.py",)),
    # Python: a tokenizer.json whose normalizer multiplies text (tokenizers aborts on the
    # allocation), and a GPTQ export's group size checked against the model's widths
    Mutant("TOKENIZER-growth-check", "offq/formats/tokenizer.py",
           'check_normalizer_growth(spec.get("normalizer"), str(tok_file))', "pass",
           ("tests/test_tokenizer.py",)),
    Mutant("GPTQ-EXPORT-group-check", "offq/formats/gptq_export.py",
           "        expected_tensors(mc, qcfg)\n", "        pass\n",
           ("tests/test_gptq_export.py",)),
    # Python: one writer per output directory (held for the whole run, given back however it
    # ends), and a directory where the run writes a file (found before any pass)
    Mutant("LOCK-held-through-the-run", "offq/recipe/pipeline.py",
           "    lock = None if out_dir is None else DirectoryLock(out_dir)\n",
           "    lock = None if out_dir is None else DirectoryLock(out_dir)\n"
           "    if lock is not None:\n        lock.release()\n",
           ("tests/test_pipeline.py::"
            "test_a_second_run_into_a_directory_being_written_is_refused",)),
    Mutant("LOCK-released-at-the-end", "offq/recipe/pipeline.py",
           "            lock.release()  # finished or not", "            pass",
           ("tests/test_pipeline.py",)),
    Mutant("LOCK-before-the-checks", "offq/recipe/pipeline.py",
           "            _check_replaced_checkpoint(Path(out_dir), config, calib_record)\n"
           "        store = ", "            pass\n        store = ",
           ("tests/test_pipeline.py::test_what_a_directory_holds_is_judged_under_its_lock",)),
    Mutant("STORE-non-file-at-a-written-name", "offq/recipe/store.py",
           "            if path.exists() and not path.is_file():  # found only after the whole run",
           "            if False:",
           ("tests/test_pipeline.py::"
            "test_a_directory_where_a_file_goes_is_refused_before_any_pass",)),
    # Python: a chat template from a file runs sandboxed, and a checkpoint keeps its template
    Mutant("CHAT-template-outside-the-sandbox", "offq/chat.py",
           "    class BoundedSandbox(ImmutableSandboxedEnvironment):",
           "    class BoundedSandbox(jinja2.Environment):",
           ("tests/test_chat.py::test_hostile_or_broken_templates_are_refused",)),
    Mutant("CHAT-template-not-saved", "offq/formats/tokenizer.py",
           '            cfg["chat_template"] = self.chat_template', "            pass",
           ("tests/test_chat.py::test_quantized_checkpoint_keeps_the_template",)),
    Mutant("CONVERSATION-cache-not-cut-back", "offq/generate.py",
           "            cache.truncate(keep)", "            pass",
           ("tests/test_conversation.py::test_turns_reuse_the_cache_and_answer_as_chat",)),
    Mutant("CLI-ctrl-c-ends-the-conversation", "offq/cli.py",
           "        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the conversation",
           "        except ZeroDivisionError:",
           ("tests/test_chat.py::test_cli_interactive_ctrl_c_stops_a_reply_not_the_conversation",)),
    Mutant("KV-truncate-keeps-everything", "offq/model/kv_cache.py",
           "    return int(length)\n", "    return int(cached)\n",
           ("tests/test_kv_cache.py::test_truncated_cache_equals_one_filled_with_the_prefix",)),
    # the top field of an 8-bit lane is shifted down (in place it would hold the sign bit); read
    # like the other fields it takes m[3], which then masks byte 0
    Mutant("WQ8-avx2-top-field-masked", "csrc/x86/matmul_wq_avx2.c",
           "return bits == 8 && j == 3 ? _mm256_srli_epi32(v, 24) : _mm256_and_si256(v, m[j]);",
           "return _mm256_and_si256(v, m[j]);", ("tests/test_matmul_wq.py",)),
)


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def build(tree: Path) -> None:
    r = sh([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], tree,
           dict(os.environ, OFFQ_WERROR="1"))
    if r.returncode != 0:
        raise RuntimeError(f"build failed in {tree}:\n{r.stderr[-3000:]}")


def run_mutant(m: Mutant, tree: Path, core_is_mutated: bool) -> tuple[bool, str]:
    """(killed, the last lines of pytest's report) for one mutant, the file restored after (the
    C core is rebuilt for a C mutant, and for a Python one when a C mutant's build is left)."""
    path = tree / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: its text occurs {text.count(m.old)} times in {m.path}")
    path.write_text(text.replace(m.old, m.new))
    try:
        if m.path.startswith("csrc/") or core_is_mutated:
            build(tree)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "tests")]))
        r = sh([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
               tree, env)
        report = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")
                  or " passed" in ln or " failed" in ln]
        return r.returncode != 0, " | ".join(report[-2:])
    finally:
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown mutant(s) {unknown}; --list names them")
    chosen = [known[n] for n in args.names] if args.names else list(MUTANTS)
    with tempfile.TemporaryDirectory(prefix="offq-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        r = sh(["git", "worktree", "add", "--detach", str(tree), "HEAD"], ROOT)
        if r.returncode != 0:
            raise SystemExit(f"git worktree add failed: {r.stderr}")
        try:
            build(tree)
            survived, core_is_mutated = [], False
            for m in chosen:
                t0 = time.perf_counter()
                killed, report = run_mutant(m, tree, core_is_mutated)
                core_is_mutated = m.path.startswith("csrc/")
                print(f"{'KILLED  ' if killed else 'SURVIVED'} {m.name:32s} "
                      f"{time.perf_counter() - t0:5.0f} s  {report}", flush=True)
                if not killed:
                    survived.append(m.name)
        finally:
            sh(["git", "worktree", "remove", "--force", str(tree)], ROOT)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} killed"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
