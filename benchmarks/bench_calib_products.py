"""The products of one calibration batch: float32 sgemm (what `calib_activations="float"` runs
on the dequantized weights) against the activation quantizer plus `matmul_w4a4` (what
`calib_activations="quantized"` runs), on Qwen2.5-1.5B's four input sites at the calibration
batch size (4 x 2048 = 8192 rows). Random operands: the speed of both products does not depend
on the values.

    python benchmarks/bench_calib_products.py [--threads 2] [--kernel auto|avx2|vnni|generic]

Printed per site: sgemm seconds, quantize + W4A4 seconds and their ratio (best of 3 each), then
the layer's totals, with the machine line. Where the time of the whole stage goes is in
benchmarks/results_quantize_time.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

#: (name, K, N, activation group) of Qwen2.5-1.5B's input sites, q/k/v and gate/up stacked
SITES = (("attn_in (q, k, v)", 1536, 2048, 128), ("o_in", 1536, 1536, 128),
         ("mlp_in (gate, up)", 1536, 17920, 128), ("down_in", 8960, 1536, 128))


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    from offq.bench.machine import describe_machine
    from offq.kernels import matmul_w4a4, quantize, set_num_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8192, help="tokens per calibration batch")
    ap.add_argument("--kernel", default="auto", help="matmul_w4a4 variant (auto: the best)")
    args = ap.parse_args()
    set_num_threads(args.threads)
    print(f"# {describe_machine()}, {args.threads} threads, {args.rows} rows, "
          f"matmul_w4a4 kernel {args.kernel}")
    rng = np.random.default_rng(0)
    total_f = total_q = 0.0
    print("| site | K x N | sgemm s | quantize + W4A4 s | ratio |\n|---|---|---|---|---|")
    for name, k, n, g in SITES:
        x = rng.standard_normal((args.rows, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        wq = quantize(w, bits=4, group_size=-1, symmetric=True)
        tf = best(lambda: x @ w.T)
        tq = best(lambda: matmul_w4a4(quantize(x, bits=4, group_size=g), wq, kernel=args.kernel))
        total_f += tf
        total_q += tq
        print(f"| {name} | {k} x {n} | {tf:.3f} | {tq:.3f} | {tf / tq:.2f}x |")
    print(f"| layer | | {total_f:.3f} | {total_q:.3f} | {total_f / total_q:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
