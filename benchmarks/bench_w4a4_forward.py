"""Real-kernel W4A4KV4 forward vs the FP32 OpenBLAS forward of the same model: prefill and decode.

Protocol (printed with the results): the default model (smollm2-135m) in FP32 (offq's
NumPy/OpenBLAS forward) and the same model quantized W4A4KV4 and run on the real path (packed
4-bit weights, activations quantized on the fly, ``matmul_w4a4``, online R3/R4 FWHTs, KV cache
stored packed). The quantized model is QuaRot-style + RTN by default because it needs no
calibration; OffQ has exactly the same run-time work (same online transforms, same kernels), so
its speed is the same (``--ckpt DIR`` times any offq checkpoint instead, e.g. an OffQ/GPTQ one).
Both models are resident and use the same thread count (offq's one setting).

* Prefill: per-token NLL of the first ``--windows`` WikiText-2 windows of ``--seqlen`` tokens
  (batch 1, logits materialised as in eval); after one untimed warm-up per model, every window is
  timed once per model, FP32 and W4A4 alternating.
* Decode: a prompt of ``--prompt`` tokens (a WikiText-2 window) is prefilled untimed into a fresh
  KV cache, then ``--decode-tokens`` single-token greedy steps (batch 1, logits of every step) are
  timed. ``--rounds`` rounds, FP32 and W4A4 alternating within each round.

Ratios are W4A4 tokens/s over FP32 tokens/s (targets: prefill >= 2, decode >= 3). Timings on a
shared machine are noisy: the script prints the load average and, per phase, the median of the
per-round ratios next to the ratio of the totals.

    python benchmarks/bench_w4a4_forward.py --quick     # 1 window x 256, 2 rounds x 8 steps
    python benchmarks/bench_w4a4_forward.py             # 2 windows x 2048, 3 rounds x 32 steps
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()
# OpenMP threads that spin while they wait take the cores a busy machine's other processes (and
# the waited-for thread) need: on the shared 2-core box every kernel's thread team then costs
# milliseconds (W4A4 prefill 3x slower). Passive waiting must be chosen before offq (libgomp) is
# loaded; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_time(model, prompt: np.ndarray, steps: int) -> float:
    """Seconds for ``steps`` greedy single-token steps after an untimed prefill of ``prompt``."""
    cache = model.new_cache()
    logits = model.forward(prompt, cache=cache)
    ids = logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        logits = model.forward(ids, cache=cache)
        ids = logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def summary(name: str, unit_tokens: int, times: dict[str, list[float]]) -> str:
    fp, q = sum(times["fp"]), sum(times["q"])
    per_round = [f / g for f, g in zip(times["fp"], times["q"])]
    return (f"{name} tok/s: fp32 {unit_tokens * len(times['fp']) / fp:8.1f}, w4a4kv4 "
            f"{unit_tokens * len(times['q']) / q:8.1f}, ratio {fp / q:.2f} (median of "
            f"{len(per_round)} rounds {statistics.median(per_round):.2f}, range "
            f"{min(per_round):.2f}-{max(per_round):.2f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ckpt", default=None, help="time this offq checkpoint directory instead")
    ap.add_argument("--seqlen", type=int, default=2048, help="prefill window length")
    ap.add_argument("--windows", type=int, default=2, help="prefill windows")
    ap.add_argument("--prompt", type=int, default=256, help="decode context before the steps")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seqlen, args.windows, args.prompt = 256, 1, 128
        args.decode_tokens, args.rounds = 8, 2

    from offq.recipe import pipeline
    from offq.quant.assemble import load_quantized
    from offq.config import QuantConfig
    from offq.data import eval_windows, load_wikitext2_test
    from offq.formats import open_checkpoint
    from offq.kernels import threads
    from offq.model import Model

    with threads(args.threads), open_checkpoint(args.model) as ckpt:
        fp = Model.from_checkpoint(ckpt, resident=True)
        if args.ckpt:
            q, _, qcfg = load_quantized(args.ckpt, mode="real")
        else:
            qcfg = QuantConfig(method="quarot", w_quantizer="rtn")
            q = pipeline.quantize(ckpt, qcfg, None, progress=False).model("real")
        text = load_wikitext2_test()
        add_bos = bool(ckpt.config.add_bos)
        windows = eval_windows(ckpt.tokenizer, text, args.seqlen, args.windows, add_bos)
        prompt = eval_windows(ckpt.tokenizer, text, args.prompt, 1, add_bos)[:1]
        label = args.ckpt or f"{args.model} quantized in process"
        print(f"model {args.model}: FP32 vs {qcfg.describe(ckpt.config.hidden_size)} ({label}), "
              f"real path; threads {args.threads}; OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}; "
              f"load average {os.getloadavg()[0]:.1f}")
        models = (("fp", fp), ("q", q))
        for _, m in models:
            m.nll(windows[:1, :64])  # warm-up (loads every layer)
        if not args.skip_prefill:
            print(f"prefill: NLL of {len(windows)} WikiText-2 window(s) x {args.seqlen} tokens, "
                  "batch 1, one timing per window and model, alternating")
            t: dict[str, list[float]] = {"fp": [], "q": []}
            for w in windows:
                for name, m in models:
                    t[name].append(timed(lambda: m.nll(w[None])))
            print("  " + summary("prefill", args.seqlen, t))
        if not args.skip_decode:
            print(f"decode: {args.rounds} round(s) x {args.decode_tokens} greedy single-token "
                  f"steps after an untimed {args.prompt}-token prompt, batch 1, alternating")
            t = {"fp": [], "q": []}
            for _ in range(args.rounds):
                for name, m in models:
                    t[name].append(decode_time(m, prompt, args.decode_tokens))
            print("  " + summary("decode ", args.decode_tokens, t))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
