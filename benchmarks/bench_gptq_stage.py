"""What GPTQ costs per decoder layer, and in what parts (issue 10: the GPTQ stage of `offq quantize`).

For each capture site of one layer of a real model (its linears stacked, as the recipe quantizes
them), GPTQ at offq's default weight setting (4 bits, symmetric, per channel, MSE clip search,
act-order, damping 0.01) is timed in its three parts: the Hessian factor
(`offq.quantizers.gptq.factor_hessian`), the clip search alone (`offq.quant.grid.group_params`)
and `gptq_quantize` from the factor (clip search, per-column steps and block products). The
baseline, measured in the same run: the layer's float32 products (OpenBLAS sgemm through NumPy)
over one sequence of `--seqlen` tokens, i.e. what a forward pass of one calibration sequence
spends in this layer's linears. The ratio says how many such sequences' products GPTQ costs.

Protocol: the weights are the model's own (layer `--layer`, float32 as offq reads them); the
Hessians are synthetic, 2 X^T X / n of `--tokens` Gaussian tokens with 4 channels 20x louder
(GPTQ's time does not depend on the Hessian's values; act-order's column order does, a little).
Each part is timed once with time.perf_counter after one untimed GPTQ of the same site; the
machine line gives the load at the start.

    python benchmarks/bench_gptq_stage.py                           # SmolLM2-135M, layer 1
    python benchmarks/bench_gptq_stage.py --model qwen2.5-coder-1.5b
    python benchmarks/bench_gptq_stage.py --model qwen2.5-coder-1.5b \
        --gptq-dtype float64 auto float32 float64 auto float32      # precisions, alternated

With several ``--gptq-dtype`` values each site is timed once per value, in the order given, so
that a machine's drift hits every precision alike ("auto": the precision
``QuantConfig.gptq_dtype="auto"`` picks for the site's K, ``offq.quantizers.gptq.gptq_precision``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench import describe_machine  # noqa: E402
from offq.formats.registry import open_checkpoint  # noqa: E402
from offq.kernels import threads  # noqa: E402
from offq.model.arch import architecture_of  # noqa: E402
from offq.quant.grid import group_params  # noqa: E402
from offq.config import GPTQ_DTYPES  # noqa: E402
from offq.quantizers.gptq import factor_hessian, gptq_precision, gptq_quantize  # noqa: E402


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the synthetic Hessians")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens of the sgemm baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptq-dtype", nargs="+", choices=GPTQ_DTYPES, default=["float64"],
                    help="GPTQ's precision(s), each timed per site in turn (default float64)")
    args = ap.parse_args()
    ckpt = open_checkpoint(args.model)
    arch = architecture_of(ckpt.config)
    print(describe_machine(), flush=True)
    print(f"# {args.model} layer {args.layer}: GPTQ W4 sym per channel, MSE clip search, "
          f"act-order, damp 0.01; synthetic Hessians from {args.tokens} Gaussian tokens; "
          f"baseline: the site's float32 products over {args.seqlen} tokens; "
          f"{args.threads} threads", flush=True)
    rng = np.random.default_rng(0)
    totals = {d: {"factor": 0.0, "clip": 0.0, "quantize": 0.0, "sgemm": 0.0}
              for d in dict.fromkeys(args.gptq_dtype)}
    counted: set[tuple[str, str]] = set()  # (site, precision) already in the layer's total
    print(f"{'site':8s} {'N x K':>13s} {'precision':>16s} {'factor s':>9s} {'clip s':>8s} "
          f"{'quantize s':>11s} {'sgemm s':>8s} {'GPTQ / sgemm':>13s}")
    with threads(args.threads):
        for site, names in arch.sites.items():
            w = np.ascontiguousarray(np.concatenate(
                [np.asarray(ckpt.tensors[arch.weight(args.layer, n)], np.float32)
                 for n in names]))
            n_out, k = w.shape
            x = rng.standard_normal((args.tokens, k)).astype(np.float32)
            x[:, :4] *= 20
            h = 2.0 * (x.T.astype(np.float64) @ x) / args.tokens
            a = rng.standard_normal((args.seqlen, k)).astype(np.float32)
            gptq_quantize(w, h, bits=4)  # warm-up: pages, thread teams
            for setting in args.gptq_dtype:
                dtype = gptq_precision(setting, k)
                factor = [None]
                t_factor = seconds(lambda: factor.__setitem__(0, factor_hessian(h, dtype=dtype)))
                t_clip = seconds(lambda: group_params(w, 4, -1, True, True))
                t_quant = seconds(lambda: gptq_quantize(w, factor=factor[0], bits=4))
                t_gemm = seconds(lambda: a @ w.T)
                # a precision given more than once: its first round goes into the layer's total
                if (site, setting) not in counted:
                    counted.add((site, setting))
                    for key, v in zip(totals[setting], (t_factor, t_clip, t_quant, t_gemm)):
                        totals[setting][key] += v
                label = setting if setting == dtype else f"{setting}={dtype}"
                print(f"{site:8s} {n_out:6d} x {k:<5d} {label:>16s} {t_factor:9.2f} "
                      f"{t_clip:8.2f} {t_quant:11.2f} {t_gemm:8.3f} "
                      f"{(t_factor + t_quant) / t_gemm:12.1f}x", flush=True)
    for setting, total in totals.items():
        gptq = total["factor"] + total["quantize"]
        print(f"{'layer':8s} {'':13s} {setting:>16s} {total['factor']:9.2f} {total['clip']:8.2f} "
              f"{total['quantize']:11.2f} {total['sgemm']:8.3f} {gptq / total['sgemm']:12.1f}x")
        print(f"GPTQ of the layer in {setting} (factor + quantize; the clip search is inside "
              f"quantize) = {gptq:.2f} s = the products of {gptq / total['sgemm']:.1f} sequences "
              f"of {args.seqlen} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
