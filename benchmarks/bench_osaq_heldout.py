"""Does OSAQ's output-change bound hold on text it was not calibrated on? (issue 11)

OSAQ moves each weight row along the smallest-eigenvalue tail of its site's calibration Hessian
and bounds the change of ``W X`` on the calibration data by ``sqrt(gamma)`` relative
(docs/METHODS.md, "OSAQ"). This script measures the same relative change through the Hessian of
held-out WikiText-2 tokens, per linear, for chosen layers, at one or more calibration sizes: when
the held-out change is several times the calibration one, the "near-null" tail is a property of
the calibration sample, not of the layer.

Protocol (printed): float model (norms not fused; the captured site inputs are the normalised
activations each linear reads), calibration ``--calib`` windows of offq's default corpus (seed
0), held-out = the first ``--heldout-windows`` windows of ``--heldout-seqlen`` tokens of the
WikiText-2 test set shipped with offq; OSAQ with its defaults (or ``--gamma``); Hessians
``2 X^T X / n`` in float64.

    python benchmarks/bench_osaq_heldout.py                      # ~4 min, SmolLM2-135M, 1 thread
    python benchmarks/bench_osaq_heldout.py --layers 0,5 --calib 16x2048
"""
from __future__ import annotations

import argparse

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,5,15,25", help="comma-separated layer indices")
    p.add_argument("--calib", default="8x512,16x2048",
                   help="calibration sizes SAMPLESxSEQLEN, comma-separated")
    p.add_argument("--heldout-windows", type=int, default=8)
    p.add_argument("--heldout-seqlen", type=int, default=512)
    p.add_argument("--gamma", type=float, default=None, help="OSAQ gamma (default: offq's)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from offq.bench.machine import describe_machine
    from offq.bench.site_hessians import float_model_sites
    from offq.data import (DEFAULT_CALIBRATION, load_wikitext2_test, sample_calibration,
                           token_windows, tokenize_text)
    from offq.kernels import threads
    from offq.quantizers.osaq import OSAQ

    layers = [int(s) for s in args.layers.split(",") if s.strip()]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.calib.split(",") if s]
    osaq = OSAQ() if args.gamma is None else OSAQ(gamma=args.gamma)
    with threads(args.threads), float_model_sites(args.model, layers) as (ckpt, arch, hessians):
        text = tokenize_text(ckpt.tokenizer, load_wikitext2_test())
        held = token_windows(text, args.heldout_seqlen)[:args.heldout_windows]
        print(f"model {args.model}; OSAQ gamma {osaq.gamma} (bound sqrt(gamma) = "
              f"{np.sqrt(osaq.gamma):.4f}); held-out WikiText-2 test {held.shape[0]} x "
              f"{held.shape[1]}; calibration {DEFAULT_CALIBRATION} {args.calib}, seed 0; "
              f"threads {args.threads}; {describe_machine()}", flush=True)
        h_held = hessians(held)
        print("calibration | layer | linear | tail dim | rel. change of W X on calibration | "
              "on held-out | held-out / calibration | row-max drop")
        for n, seqlen in sizes:
            h_cal = hessians(sample_calibration(ckpt.tokenizer, DEFAULT_CALIBRATION, n=n,
                                                seqlen=seqlen, seed=0))
            ratios = []
            for (site, i), h in sorted(h_cal.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                tail = osaq.prepare(h, f"layer {i} {site}")
                for lin in arch.sites[site]:
                    w = np.asarray(ckpt.tensors[arch.weight(i, lin)], dtype=np.float32)
                    new, rep = osaq.apply(w, tail)
                    dw = new.astype(np.float64) - w
                    w64 = w.astype(np.float64)

                    def rel(hh: np.ndarray) -> float:
                        return float(np.sqrt(np.sum((dw @ hh) * dw) / np.sum((w64 @ hh) * w64)))

                    cal, out = rel(h), rel(h_held[(site, i)])
                    if cal > 0:
                        ratios.append(out / cal)
                    drop = 1 - rep["row_max_after"] / rep["row_max_before"]
                    print(f"{n}x{seqlen} | {i} | {lin} | {rep['tail_dim']} | {cal:.4f} | "
                          f"{out:.4f} | {out / cal if cal else float('nan'):.1f} | "
                          f"{100 * drop:.2f}%", flush=True)
            if ratios:
                print(f"{n}x{seqlen}: held-out / calibration over {len(ratios)} linears: median "
                      f"{np.median(ratios):.1f}, max {np.max(ratios):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    from offq.bench.site_hessians import run_main

    run_main(main)
