"""Where the opt-in 8-bit attention's error comes from (``csrc/attention_i8.c``): its two
roundings emulated in NumPy (float64) on a real model's queries and 4-bit K/V, one at a time and
together, against the float attention over the same cache.

The 8-bit attention rounds (1) each query to 8 bits per KV group (max |q| / 127) and (2) each
query's softmax weights times the value scales to 8 bits on a grid per 64-row tile; everything
else is exact integer arithmetic or the float attention's own steps. This script runs one
WikiText-2 window through the NumPy real path of an offq W4A4KV4 checkpoint and, in every
layer's attention, for ``--queries`` sampled query positions of every head, measures the
relative RMS error ``|out - ref| / |ref|`` of the attention output against the float attention
(``ref``) for: ``q8`` (query rounding alone), ``q8sub32`` (8 bits per 32 dims instead of per
group), ``q12`` (a 12-bit query), ``w8`` (weight rounding alone), and their combinations. The
model's own forward is unchanged (the float attention's output goes on), so every layer sees the
same inputs in every variant. The value scales are recovered from the dequantized values (min-max
grids put codes 0 and 15 at a row's extremes).

    python benchmarks/int8_attention_error.py --ckpt runs/offq8               # ~15 s, SmolLM2
    python benchmarks/int8_attention_error.py --ckpt runs/qwen --queries 96   # ~40 s, Qwen2.5
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

VARIANTS = ("q8", "q8sub32", "q12", "w8", "q8+w8", "q8sub32+w8", "q12+w8")
TILE = 64  # rows of the 8-bit weights' grid (OFFQ_ATTN_TILE_ROWS)


def round_query(q: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Symmetric rounding per `group` dims on the grid max |q| / (2^(bits-1) - 1)."""
    levels = 2 ** (bits - 1) - 1
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group, group)
    step = np.abs(g).max(-1, keepdims=True) / levels
    step = np.where(step > 0, step, 1.0)
    return (np.rint(g / step) * step).reshape(q.shape)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, vs: np.ndarray, n: np.ndarray,
           weights8: bool) -> np.ndarray:
    """Rows q [m, hd] seeing keys 0..n-1 of k, v [S, hd] (vs [S] the value scales): the float
    attention, or with the weights e_j vs_j rounded to 8 bits per tile as the kernel does."""
    s = q @ k.T
    s = np.where(np.arange(k.shape[0])[None, :] < n[:, None], s, -np.inf)
    e = np.exp(s - s.max(1, keepdims=True))
    den = e.sum(1, keepdims=True)
    if not weights8:
        return (e @ v) / den
    safe = np.where(vs > 0, vs, 1.0)
    codes = np.where(vs[:, None] > 0, v / safe[:, None], 0.0)  # code - zero-point
    p = e * vs[None, :]
    out = np.zeros((q.shape[0], v.shape[1]))
    for j0 in range(0, k.shape[0], TILE):
        pt = p[:, j0:j0 + TILE]
        wmax = pt.max(1, keepdims=True)
        w8 = np.where(wmax > 0, np.rint(pt * 255 / np.where(wmax > 0, wmax, 1.0)), 0.0)
        out += wmax / 255 * (w8 @ codes[j0:j0 + TILE])
    return out / den


def main() -> int:
    import offq.model.decoder as decoder
    from offq.bench.machine import describe_machine
    from offq.data import eval_windows, load_wikitext2_test
    from offq.kernels import set_num_threads
    from offq.quant.assemble import load_quantized

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="an offq W4A4KV4 checkpoint")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=128,
                    help="query positions sampled per layer (every head)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    set_num_threads(args.threads)
    model, tok, qcfg = load_quantized(args.ckpt, mode="real")
    float_attention = decoder.causal_attention
    rng = np.random.default_rng(0)
    err: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}

    def measured(q, k, v, start):
        out = float_attention(q, k, v, start)
        _, H, T, hd = q.shape
        if T < TILE:  # decode steps: not measured
            return out
        rep = H // k.shape[1]
        sel = np.sort(rng.choice(T, size=min(args.queries, T), replace=False))
        n = start + sel + 1
        for var in VARIANTS:
            err[var].append([])
        for h in range(H):
            kk = k[0, h // rep].astype(np.float64)
            vv = v[0, h // rep].astype(np.float64)
            vs = (vv.max(1) - vv.min(1)) / 15
            qq = q[0, h, sel].astype(np.float64) / np.sqrt(hd)
            ref = attend(qq, kk, vv, vs, n, False)
            for var in VARIANTS:
                qv = (round_query(qq, 8, 32) if "q8sub32" in var else
                      round_query(qq, 8, hd) if "q8" in var else
                      round_query(qq, 12, hd) if "q12" in var else qq)
                got = attend(qv, kk, vv, vs, n, "w8" in var)
                err[var][-1].append(((got - ref) ** 2).sum() / (ref ** 2).sum())
        return out

    decoder.causal_attention = measured
    ids = eval_windows(tok, load_wikitext2_test(), args.seqlen, 1, bool(model.config.add_bos))[0]
    t = time.perf_counter()
    model.nll(ids[None])
    print(f"# {qcfg.describe(model.config.hidden_size)} ({args.ckpt}); WikiText-2 test, first "
          f"window of {args.seqlen} tokens, {args.queries} query positions a layer, every head; "
          f"{describe_machine()}; {time.perf_counter() - t:.0f} s")
    print(f"{'variant':12s} {'rel RMS error (mean of layers)':>32s} {'worst layer':>14s}")
    for var in VARIANTS:
        per_layer = np.sqrt(np.array(err[var]).mean(1))
        print(f"{var:12s} {per_layer.mean():32.4f} {per_layer.max():9.4f} ({int(per_layer.argmax())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
