"""Real-kernel W4A4KV4 forward vs the FP32 OpenBLAS forward of the same model.

Protocol: the default model (smollm2-135m) in FP32 (offq's NumPy/OpenBLAS forward) and the same
model quantized W4A4KV4 and run on the real path (packed 4-bit weights, activations quantized on
the fly, ``matmul_w4a4``, online R3/R4 FWHTs, KV cache stored packed). The quantized model is
QuaRot-style + RTN by default because it needs no calibration; OffQ has exactly the same run-time
work (same online transforms, same kernels), so its speed is the same (``--ckpt DIR`` times any
offq checkpoint instead). Prefill: per-token NLL of the first N WikiText-2 windows of SEQLEN
tokens (logits materialised, as in eval), one untimed warm-up each, calls alternating FP32 /
W4A4. Decode: ``--decode-tokens`` single-token steps after a prompt of 128 tokens, with the KV
cache (logits of each step). Same thread count for both (offq's one setting). Ratios are
W4A4 tokens/s divided by FP32 tokens/s (targets: prefill >= 2, decode >= 3).

    python benchmarks/bench_w4a4_forward.py --quick     # 1 window x 256, 8 decode steps
    python benchmarks/bench_w4a4_forward.py             # 2 windows x 2048, 32 decode steps
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_time(model, prompt: np.ndarray, steps: int) -> float:
    cache = model.new_cache()
    model.forward(prompt, cache=cache)
    ids = prompt[:, -1:]
    t = time.perf_counter()
    for _ in range(steps):
        logits = model.forward(ids, cache=cache)
        ids = logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ckpt", default=None, help="time this offq checkpoint directory instead")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seqlen, args.windows, args.decode_tokens = 256, 1, 8

    from offq import pipeline
    from offq.checkpoint import load_quantized
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
        windows = eval_windows(ckpt.tokenizer, load_wikitext2_test(), args.seqlen, args.windows,
                               bool(ckpt.config.add_bos))
        print(f"model {args.model}; FP32 vs {qcfg.describe(ckpt.config.hidden_size)} (real path); "
              f"{len(windows)} x {args.seqlen} tokens prefill, {args.decode_tokens} decode steps "
              f"after 128 tokens; threads {args.threads}")
        for m in (fp, q):
            m.nll(windows[:1, :64])  # warm-up (loads every layer)
        t = {"fp": 0.0, "q": 0.0}
        for w in windows:
            for name, m in (("fp", fp), ("q", q)):
                t[name] += timed(lambda: m.nll(w[None]))
        ntok = windows.size
        pre = {k: ntok / v for k, v in t.items()}
        dec = {name: args.decode_tokens / decode_time(m, windows[:1, :128], args.decode_tokens)
               for name, m in (("fp", fp), ("q", q))}
    print(f"prefill tok/s: fp32 {pre['fp']:.0f}, w4a4kv4 {pre['q']:.0f}, ratio {pre['q'] / pre['fp']:.2f}")
    print(f"decode  tok/s: fp32 {dec['fp']:.1f}, w4a4kv4 {dec['q']:.1f}, ratio {dec['q'] / dec['fp']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
