"""GPTQ in float32 against float64 (QuantConfig.gptq_dtype: the Hessian's factorization, the
errors and the weight updates), per linear of a real model: does the cheaper arithmetic change
what GPTQ achieves?

For each capture site of ``--layers`` (the site's linears stacked, as the recipe quantizes them),
the input Hessian of the float model over ``--calib`` sequences of offq's default calibration
corpus (seed 0) and over held-out windows of WikiText-2 test; GPTQ (act-order, damp 0.01, MSE clip
search) at W4 symmetric and W3 asymmetric per channel, once in each precision. Printed per site
and setting: GPTQ's loss ``tr(dW H dW^T)`` in float32 over the loss in float64, on the
calibration Hessian and on the held-out one; at the end their geometric means and the worst.
Ratios near 1 say the precision does not matter to GPTQ's objective. (Until 2026-12-03 the
float32 setting covered the factorization only; the figures of that day's first runs are its.)

``--in-recipe`` asks the same question of the Hessians GPTQ meets inside the W4A4KV4 recipe
(``offq.quantize`` with the Quick start's OffQ settings: rotated inputs, earlier layers
quantized): the run quantizes in float64 and, at every site, also quantizes the same rotated
weight with the same Hessian in float32; the ratio is on that calibration Hessian only.

    python benchmarks/bench_gptq_precision.py                       # SmolLM2-135M, ~2 min
    python benchmarks/bench_gptq_precision.py --model qwen2.5-coder-1.5b --layers 0,27 \\
        --calib 4x2048
    python benchmarks/bench_gptq_precision.py --in-recipe --calib 16x512   # ~2 min
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

SETTINGS = ((4, True), (3, False))  # (bits, symmetric), per channel


def loss(dw: np.ndarray, h: np.ndarray) -> float:
    """tr(dW H dW^T) in float64."""
    return float(np.sum((dw @ h) * dw))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,5,10,15,20,29", help="comma-separated layer indices")
    p.add_argument("--calib", default="8x2048", help="calibration SAMPLESxSEQLEN")
    p.add_argument("--heldout", default="4x2048", help="held-out WINDOWSxSEQLEN of WikiText-2 test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--in-recipe", action="store_true",
                   help="the Hessians of the OffQ W4A4KV4 recipe instead of the float model's")
    args = p.parse_args()
    if args.in_recipe:
        return in_recipe(args)

    from offq.bench.machine import describe_machine
    from offq.bench.site_hessians import float_model_sites
    from offq.data import (DEFAULT_CALIBRATION, load_wikitext2_test, sample_calibration,
                           token_windows, tokenize_text)
    from offq.kernels import threads
    from offq.quantizers.gptq import GPTQ

    layers = [int(s) for s in args.layers.split(",") if s.strip()]
    n_cal, len_cal = (int(v) for v in args.calib.lower().split("x"))
    n_held, len_held = (int(v) for v in args.heldout.lower().split("x"))
    ratios: dict[str, list[float]] = {"calibration": [], "held-out": []}
    with threads(args.threads), float_model_sites(args.model, layers) as (ckpt, arch, hessians):
        text = tokenize_text(ckpt.tokenizer, load_wikitext2_test())
        held = token_windows(text, len_held)[:n_held]
        cal = sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=n_cal, seqlen=len_cal,
                                 seed=0)
        print(f"# {args.model}, layers {layers}; calibration {DEFAULT_CALIBRATION} "
              f"{n_cal}x{len_cal} seed 0; held-out WikiText-2 test "
              f"{held.shape[0]}x{held.shape[1]}; GPTQ act-order, "
              f"damp 0.01, MSE clip, per channel; {args.threads} threads; {describe_machine()}",
              flush=True)
        h_cal, h_held = hessians(cal), hessians(held)
        print("layer site     K      " + " | ".join(f"W{b} {'sym' if s else 'asym'}: cal, held"
                                                   for b, s in SETTINGS), flush=True)
        for (site, i), h in sorted(h_cal.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            w = np.concatenate([np.asarray(ckpt.tensors[arch.weight(i, lin)], dtype=np.float32)
                                for lin in arch.sites[site]])
            cells = []
            for bits, symmetric in SETTINGS:
                losses = []
                for dtype in ("float64", "float32"):
                    gptq = GPTQ(bits=bits, group_size=-1, symmetric=symmetric, clip_search=True,
                                dtype=dtype)
                    dw = gptq.quantize(w, gptq.prepare(h, f"layer {i} {site}")).dequantized
                    dw = dw.astype(np.float64) - w
                    losses.append((loss(dw, h), loss(dw, h_held[(site, i)])))
                cal_ratio, held_ratio = (losses[1][j] / losses[0][j] for j in (0, 1))
                ratios["calibration"].append(cal_ratio)
                ratios["held-out"].append(held_ratio)
                cells.append(f"{cal_ratio:.5f}, {held_ratio:.5f}")
            print(f"{i:5d} {site:8s} {h.shape[0]:5d}  " + " | ".join(cells), flush=True)
    for name, values in ratios.items():
        mean = np.exp(np.mean(np.log(values)))
        print(f"{name}: float32 / float64 loss, geometric mean {mean:.5f}"
              f", worst {max(values):.5f} ({len(values)} site-settings)")
    return 0


def in_recipe(args: argparse.Namespace) -> int:
    """Per site of an OffQ W4A4KV4 quantization (float64 GPTQ, as it runs by default): GPTQ's
    loss on that site's Hessian with float32 arithmetic over the loss with float64."""
    import offq
    from offq.bench.machine import describe_machine
    from offq.kernels import threads
    from offq.quantizers.gptq import GPTQ

    n_cal, len_cal = (int(v) for v in args.calib.lower().split("x"))
    cfg = offq.QuantConfig(method="offq", calib_samples=n_cal, calib_seqlen=len_cal,
                           gptq_dtype="float64")
    print(f"# {args.model}, {cfg.describe()}; W{cfg.w_bits} per channel; {args.threads} threads; "
          f"{describe_machine()}", flush=True)
    print("site                    K   float32 / float64 loss   log10 max/min diag(H)", flush=True)
    ratios: list[float] = []
    held: dict[int, tuple[str, np.ndarray]] = {}  # id(factor) -> (site, its Hessian)
    prepare, quantize = GPTQ.prepare, GPTQ.quantize

    def prepare_keeping(self: GPTQ, hessian: np.ndarray | None, where: str):
        factor = prepare(self, hessian, where)
        held[id(factor)] = (where, np.array(hessian, dtype=np.float64))
        return factor

    def quantize_both(self: GPTQ, w: np.ndarray, factor):
        where, h = held.pop(id(factor))
        q = quantize(self, w, factor)
        single = replace(self, dtype="float32")
        q32 = quantize(single, w, prepare(single, h, where))
        w64 = np.asarray(w, dtype=np.float64)
        ratio = (loss(q32.dequantized.astype(np.float64) - w64, h)
                 / loss(q.dequantized.astype(np.float64) - w64, h))
        ratios.append(ratio)
        d = np.diag(h)
        spread = np.log10(d.max() / max(d[d > 0].min(), 1e-300))
        print(f"{where:20s} {h.shape[0]:5d}   {ratio:.5f}{spread:24.1f}", flush=True)
        return q

    GPTQ.prepare, GPTQ.quantize = prepare_keeping, quantize_both
    try:
        with threads(args.threads):
            offq.quantize(offq.load(args.model), cfg)
    finally:
        GPTQ.prepare, GPTQ.quantize = prepare, quantize
    values = np.array(ratios)
    print(f"float32 / float64 loss in the recipe: geometric mean "
          f"{np.exp(np.mean(np.log(values))):.5f}, worst {values.max():.5f}, best "
          f"{values.min():.5f} ({len(values)} sites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
