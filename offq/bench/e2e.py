"""End-to-end speed: prompt processing and generation tokens/s, FP32 vs W4A4KV4 (and llama.cpp).

The tests follow llama-bench's, so the columns compare like with like:

* ``ppN``: a fresh KV cache, one forward over ``N`` prompt tokens (WikiText-2 text), logits of the
  last position only (what generation needs); tokens/s = N / seconds.
* ``tgN``: a fresh KV cache, then ``N`` single-token steps from a one-token context, each with
  its logits and a greedy pick; tokens/s = N / seconds.
* ``tgN@dD`` (``depths``; llama-bench's ``tgN @ dD``): the same ``N`` steps after a ``D``-token
  prompt filled the cache (its prefill not timed): generation in a long conversation, where
  attention over the cache, not the weights, sets the pace.

Each (model, test, threads) is timed ``repeats`` times, the models alternating within a round so
that load drifting on a shared machine hits them alike; the best round counts. The W4A4KV4 model
is an offq checkpoint (``ckpt``) on the real path (packed 4-bit weights, ``matmul_w4a4``, 4-bit
KV cache), or, without one, the model quantized in process with QuaRot-style + RTN: it needs no
calibration and OffQ's run-time work is exactly the same (same kernels, same online transforms).
It runs twice: "w4a4kv4" sequenced by NumPy (``mode="real"``) and "w4a4kv4 fused" with every
layer of a step in one C call (``mode="fused"``, :mod:`offq.quant.fused`); both compute the LM
head in float32 with NumPy/OpenBLAS (int8 when the checkpoint stores it so). With ``weight_only``
two more engines run the model with RTN 4-bit weights (asymmetric, groups of 64; float
activations and KV cache; the LM head as the W4A4KV4 model stores it) quantized in process and
run packed: "w4 weight-only" sequenced by NumPy (``matmul_wq``, ``mode="real"``) and "w4
weight-only fused" with every layer of a step in one C call (``mode="fused"``,
:mod:`offq.quant.fused_wq`): what a weight-only offq checkpoint (GPTQ or OSAQ) runs, since only
the codes differ. ``weight_only_bits`` adds other widths ("w8 weight-only", ...) the same way.

A ``llama-bench`` binary (``llama_bench``, with a GGUF ``llama_model``, e.g. the model requantized
to Q4_0) adds llama.cpp's figures for the same tests and threads, run as a subprocess; it is
never a dependency (benchmarks/README.md says how to build one). It takes its turn in every
round, after offq's engines (one ``llama-bench -r 1`` per test and round, with llama-bench's own
warm-up run), and its best round counts too: the same statistic over the same stretch of time
as offq's, which matters on shared machines whose speed drifts by 20% within minutes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress
from ..quant.fused import ATTENTION_MODES, PREFILL_MODES

__all__ = ["E2EConfig", "run_e2e", "format_e2e", "llama_bench_command", "llama_bench_seconds",
           "parse_llama_bench", "peer_environment"]


@dataclass(frozen=True)
class E2EConfig:
    """What ``run_e2e`` measures.

    Attributes:
        model: FP32 model (registered name, HF directory or .gguf).
        ckpt: offq checkpoint directory to time as the quantized model (default: QuaRot-style +
            RTN W4A4KV4 quantized in process).
        threads: thread counts, each a separate column set.
        prompt_lengths: the ``ppN`` tests.
        gen_tokens: the ``tgN`` test (0 skips it).
        depths: cached prompt lengths for the ``tgN@dD`` tests (generation after ``D`` tokens).
        repeats: timed rounds per test (best counts).
        llama_bench: path to a ``llama-bench`` binary (optional).
        llama_model: the GGUF llama-bench runs (required with ``llama_bench``).
        fused_kernel: the product variant of the fused C decoder ("auto", "avx2", "vnni",
            "generic"); the other kernels follow the dispatch (OFFQ_SIMD_MAX=avx2 in the
            environment times what AVX2-only CPUs run).
        weight_only: also time the weight-only W4 (g64, asymmetric) model, packed.
        weight_only_bits: the weight widths of those engines ("w{bits} weight-only"), each
            quantized in process; (4,) by default. The protocol records WEIGHT_ONLY (whose
            w_bits is 4) and these widths: the engines differ in w_bits only.
        fused_prefill: how the fused engine runs a prompt: "c" (the C step over the whole prompt,
            attention over the packed cache), "numpy" (the NumPy real path, as
            ``FusedDecoder``'s default does so that perplexity equals ``mode="real"``) or "auto"
            (C below ``auto_numpy_prefill_rows()`` tokens, NumPy from there: every prompt takes
            the C step with the AVX2 and AVX-512 attentions, 1024 tokens with the generic one).
        fused_attention: the fused C step's attention, "float" (the default) or "int8" (the
            opt-in 8-bit attention, ``FusedDecoder(attention="int8")``).
    """

    model: str = "smollm2-135m"
    ckpt: str | None = None
    threads: tuple[int, ...] = (1, 2)
    prompt_lengths: tuple[int, ...] = (512, 2048)
    gen_tokens: int = 128
    depths: tuple[int, ...] = ()
    repeats: int = 3
    llama_bench: str | None = None
    llama_model: str | None = None
    fused_kernel: str = "auto"
    fused_prefill: str = "auto"
    fused_attention: str = "float"
    weight_only: bool = True
    weight_only_bits: tuple[int, ...] = (4,)
    tests: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.threads or any(int(t) < 1 for t in self.threads):
            raise ValueError(f"threads: expected positive integers, got {self.threads}")
        if any(int(n) < 1 for n in self.prompt_lengths) or self.gen_tokens < 0:
            raise ValueError("prompt_lengths / gen_tokens: expected positive token counts")
        if any(int(d) < 1 for d in self.depths) or (self.depths and not self.gen_tokens):
            raise ValueError(f"depths: expected positive token counts and gen_tokens > 0, got "
                             f"{self.depths} with gen_tokens {self.gen_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats: expected a positive integer, got {self.repeats}")
        from ..kernels.matmul_wq import WQ_BITS

        widths = self.weight_only_bits
        if not widths or any(b not in WQ_BITS for b in widths) or len(set(widths)) < len(widths):
            raise ValueError(f"weight_only_bits: expected distinct widths among {WQ_BITS}, got "
                             f"{widths}")
        if self.fused_kernel not in ("auto", "generic", "avx2", "vnni"):
            raise ValueError(f"fused_kernel: expected auto, generic, avx2 or vnni, got "
                             f"{self.fused_kernel!r}")
        if self.fused_prefill not in PREFILL_MODES:
            raise ValueError(f"fused_prefill: expected one of {PREFILL_MODES}, got "
                             f"{self.fused_prefill!r}")
        if self.fused_attention not in ATTENTION_MODES:
            raise ValueError(f"fused_attention: expected one of {ATTENTION_MODES}, got "
                             f"{self.fused_attention!r}")
        if (self.llama_bench is None) != (self.llama_model is None):
            raise ValueError("llama_bench and llama_model go together (the binary and its GGUF)")
        if self.llama_bench is not None:  # checked now, not after the offq rows have run
            if shutil.which(str(self.llama_bench)) is None:
                raise ValueError(f"llama_bench: {self.llama_bench} is not an executable file")
            if not Path(self.llama_model).is_file():
                raise ValueError(f"llama_model: {self.llama_model} is not a file")
        tests = [f"pp{n}" for n in self.prompt_lengths]
        if self.gen_tokens:
            tests.append(f"tg{self.gen_tokens}")
            tests += [f"tg{self.gen_tokens}@d{d}" for d in self.depths]
        object.__setattr__(self, "tests", tuple(tests))


def _prefill_seconds(model: Any, ids: np.ndarray) -> float:
    cache = model.new_cache()
    t = time.perf_counter()
    h = model.hidden_states(ids[None], cache=cache)
    model.logits(h[:, -1:])
    return time.perf_counter() - t


def _generate_seconds(model: Any, first: int, steps: int,
                      prompt: np.ndarray | None = None) -> float:
    cache = model.new_cache()
    if prompt is not None and len(prompt):  # a tgN@dD test's cached context: not timed, and no
        model.hidden_states(prompt[None], cache=cache)  # logits over its positions
    token = np.array([[first]], dtype=np.int64)
    t = time.perf_counter()
    for _ in range(steps):
        logits = model.forward(token, cache=cache)
        token = logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


WEIGHT_ONLY = dict(method="rtn", w_bits=4, a_bits=16, kv_bits=16, w_group_size=64,
                   w_symmetric=False)  # the "w4 weight-only" engine's QuantConfig


def check_context(cfg: E2EConfig, model_config: Any = None) -> None:
    """ValueError when a test would run past the model's context (``model_config``, else read
    from ``cfg.model``): ppN fills N positions, tgN (from one token) N. ``offq bench`` calls it
    before its kernel table, ``run_e2e`` before it quantizes anything."""
    if model_config is None:
        from ..formats import open_checkpoint

        with open_checkpoint(cfg.model) as ckpt:
            model_config = ckpt.config
    context = int(model_config.max_position_embeddings)
    longest = max(max(cfg.prompt_lengths, default=0), cfg.gen_tokens,
                  max(cfg.depths, default=0) + cfg.gen_tokens)
    if longest > context:
        raise ValueError(f"prompt_lengths / gen_tokens: {longest} positions exceed the model's "
                         f"context of {context}")


def _load_models(cfg: E2EConfig, show: bool | None) -> tuple[dict[str, Any], str, np.ndarray]:
    """{"fp32": Model, "w4a4kv4": Model, "w4a4kv4 fused": Model[, "wB weight-only": Model,
    "wB weight-only fused": Model for each B of weight_only_bits]}, the quantized model's
    description, prompt tokens."""
    from ..config import QuantConfig
    from ..data import eval_windows, load_wikitext2_test
    from ..formats import open_checkpoint
    from ..model import Model
    from ..quant.assemble import load_quantized
    from ..recipe.pipeline import quantize

    with open_checkpoint(cfg.model) as ckpt:
        check_context(cfg, ckpt.config)
        fp = Model.from_checkpoint(ckpt, resident=True)
        fp.layers  # read every layer now: the checkpoint closes below
        if cfg.ckpt:
            q, _, qcfg = load_quantized(cfg.ckpt, mode="real")
            fused = load_quantized(cfg.ckpt, mode="fused")[0]
            label = f"{qcfg.describe(ckpt.config.hidden_size)} ({cfg.ckpt})"
        else:
            qcfg = QuantConfig(method="quarot", w_quantizer="rtn")
            result = quantize(ckpt, qcfg, None, progress=show)
            q, fused = result.model("real"), result.model("fused")
            label = f"{qcfg.describe(ckpt.config.hidden_size)} (quantized in process)"
        fused.fused_runner.kernel = cfg.fused_kernel
        fused.fused_runner.prefill = cfg.fused_prefill
        fused.fused_runner.attention = cfg.fused_attention
        models = {"fp32": fp, "w4a4kv4": q, "w4a4kv4 fused": fused}
        for bits in cfg.weight_only_bits if cfg.weight_only else ():
            wcfg = QuantConfig(**{**WEIGHT_ONLY, "w_bits": bits}, lm_head_bits=qcfg.lm_head_bits)
            wq = quantize(ckpt, wcfg, None, progress=show)
            models[f"w{bits} weight-only"] = wq.model("real")
            models[f"w{bits} weight-only fused"] = wq.model("fused")
            label += f"; weight-only {wcfg.describe(ckpt.config.hidden_size)}"
        # a tgN@dD test caches D tokens and starts from the next one
        need = max(max(cfg.prompt_lengths, default=1), max(cfg.depths, default=0) + 1)
        ids = eval_windows(ckpt.tokenizer, load_wikitext2_test(), need, 1,
                           bool(ckpt.config.add_bos))[0]
    return models, label, ids


def run_e2e(cfg: E2EConfig = E2EConfig(), *, show: bool | None = None,
            on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure ``cfg``; returns ``{"protocol": ..., "rows": [...]}``.

    A row: ``engine`` ("offq fp32", "offq w4a4kv4", "offq w4a4kv4 fused", "llama.cpp"), ``test``
    ("pp512", "tg128"),
    ``threads``, ``tokens_per_s``, ``seconds`` (best round).
    """
    from ..kernels import threads as thread_limit

    models, label, ids = _load_models(cfg, show)
    rows: list[dict[str, Any]] = []
    steps = len(cfg.threads) * len(cfg.tests)
    with Progress(steps, "e2e benchmark", unit="test", show=show) as bar:
        for t in cfg.threads:
            with thread_limit(t):
                for m in models.values():  # warm-up: loads and touches every layer
                    _prefill_seconds(m, ids[:16])
                for test in cfg.tests:
                    n, _, depth = test[2:].partition("@d")
                    n, depth = int(n), int(depth or 0)
                    best = {name: float("inf") for name in models}
                    peer = float("inf")
                    for _ in range(cfg.repeats):
                        for name, m in models.items():
                            sec = (_prefill_seconds(m, ids[:n]) if test.startswith("pp")
                                   else _generate_seconds(m, int(ids[depth]), n, ids[:depth]))
                            best[name] = min(best[name], sec)
                        if cfg.llama_bench:
                            peer = min(peer, llama_bench_seconds(cfg, test, t))
                    engines = {f"offq {name}": sec for name, sec in best.items()}
                    if cfg.llama_bench:
                        engines["llama.cpp"] = peer
                    for engine, sec in engines.items():
                        row = {"engine": engine, "test": test, "threads": t,
                               "tokens_per_s": n / sec, "seconds": sec}
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                    bar.update()
    from .machine import machine_info
    return {"protocol": {"model": cfg.model, "quantized": label, "tests": list(cfg.tests),
                         "threads": list(cfg.threads), "repeats": cfg.repeats,
                         "fused_kernel": cfg.fused_kernel, "fused_prefill": cfg.fused_prefill,
                         "fused_attention": cfg.fused_attention,
                         "weight_only": WEIGHT_ONLY if cfg.weight_only else None,
                         "weight_only_bits": list(cfg.weight_only_bits) if cfg.weight_only
                         else [],
                         "prompt": "WikiText-2 test text (first tokens)",
                         "llama_model": cfg.llama_model, "machine": machine_info()},
            "rows": rows}


def peer_environment() -> dict[str, str]:
    """The environment for a peer program: this one without offq's ``OMP_WAIT_POLICY=PASSIVE``
    default (sleeping OpenMP waiters cut llama.cpp's token generation ~4x; the user's own setting
    is kept)."""
    import offq

    env = dict(os.environ)
    if offq.USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = offq.USER_OMP_WAIT_POLICY
    return env


def llama_bench_command(cfg: E2EConfig, test: str, threads: int) -> list[str]:
    """The ``llama-bench`` command line timing one of ``cfg``'s tests ("pp512", "tg128",
    "tg128@d2000") once (``-r 1``) at ``threads`` threads, JSON output."""
    n, _, depth = test[2:].partition("@d")
    cmd = [str(cfg.llama_bench), "-m", str(cfg.llama_model), "-t", str(threads), "-r", "1",
           "-o", "json"]
    if test.startswith("pp"):
        return cmd + ["-p", n, "-n", "0"]
    return cmd + ["-p", "0", "-n", n] + (["-d", depth] if depth else [])


def parse_llama_bench(out: str, test: str) -> float:
    """Seconds of ``test`` in ``llama-bench -o json`` output: its best sample (``samples_ts``;
    ``avg_ts`` where a build lacks them). ValueError when the output has no record of it."""
    try:
        records = json.loads(out)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench: output is not JSON ({e}): {out.strip()[:200]!r}") from None
    n, _, depth = test[2:].partition("@d")
    for rec in records if isinstance(records, list) else []:
        try:
            n_prompt, n_gen = int(rec.get("n_prompt", 0)), int(rec.get("n_gen", 0))
            got = (f"pp{n_prompt}" if n_prompt else f"tg{n_gen}") + (
                f"@d{int(rec['n_depth'])}" if int(rec.get("n_depth", 0)) else "")
            if got != test:
                continue
            tps = max(float(v) for v in rec.get("samples_ts") or [rec["avg_ts"]])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"llama-bench: a malformed record ({type(e).__name__}: {e}): "
                             f"{str(rec)[:200]}") from None
        return int(n) / tps if tps > 0 else float("inf")
    raise ValueError(f"llama-bench: no {test} record in its output: {out.strip()[:200]!r}")


def llama_bench_seconds(cfg: E2EConfig, test: str, threads: int) -> float:
    """One timed run of ``test`` by llama.cpp (:func:`llama_bench_command`) in the user's
    environment (:func:`peer_environment`); OSError naming the command when it fails."""
    cmd = llama_bench_command(cfg, test, threads)
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env=peer_environment()).stdout
        return parse_llama_bench(out, test)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise OSError(f"llama-bench failed ({' '.join(cmd)}): {detail.strip()[-500:]}") from e


def format_e2e(result: dict[str, Any]) -> str:
    """A table: one row per engine and thread count, one column per test, then the ratios
    W4A4KV4 / FP32 and W4A4KV4 / llama.cpp (> 1: offq's 4-bit model is faster)."""
    rows = result["rows"]
    tests = result["protocol"]["tests"]
    table: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["engine"], r["threads"]), {})[r["test"]] = r["tokens_per_s"]
    head = f"{'tokens/s':<32}{'threads':>8}" + "".join(f"{t:>12}" for t in tests)
    lines = [head, "-" * len(head)]
    for (engine, t), vals in table.items():
        lines.append(f"{engine:<32}{t:>8}" + "".join(
            f"{vals[x]:>12.1f}" if x in vals else f"{'-':>12}" for x in tests))
    quantized = dict.fromkeys(e for e, _ in table if e.startswith("offq ") and e != "offq fp32")
    for engine in quantized:
        for base in ("offq fp32", "llama.cpp"):
            for t in result["protocol"]["threads"]:
                q, b = table.get((engine, t)), table.get((base, t))
                if q and b:
                    name = f"{engine[5:]} / {base[5:] if base.startswith('offq') else base}"
                    lines.append(f"{name:<32}{t:>8}" + "".join(
                        f"{q[x] / b[x]:>11.2f}x" if x in q and x in b else f"{'-':>12}"
                        for x in tests))
    return "\n".join(lines)
