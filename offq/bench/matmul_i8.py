"""matmul_i8 benchmark: the 8-bit LM head's product (float32 x, int8 weights with one scale per
group) against NumPy's float32 product with the same head in float32, which is what the float
head costs.

Protocol: W [N, K] is N(0, 1) float32 (seed 0), quantized once (``quantize_i8``, symmetric, one
scale per group); x [M, K] is N(0, 1). Shapes are the LM heads of the default model
(SmolLM2-135M: 49152 x 576, groups of 64) and of Qwen2.5-1.5B (151936 x 1536, groups of 128);
M = 1 is a decode step's logits (both heads stream from DRAM: 28 and 233 MB in int8, 113 and
934 MB in float32). Rows: `i8 gG [auto]` = ``matmul_i8`` (x rounded to 16 bits per group, then
the dispatched integer row kernel; the rounding is inside the timed call), against
`numpy sgemv` = ``x[0] @ W.T`` on the float32 W, timed interleaved in the same process with the
same thread setting. GFLOP/s counts 2*M*N*K; GB/s counts the int8 weight, its scales, x and the
output.
"""
from __future__ import annotations

import numpy as np

from ..kernels.matmul_i8 import matmul_i8, quantize_i8
from .timing import result, timeit_interleaved

#: (M, K, N, group): SmolLM2-135M's and Qwen2.5-1.5B's heads at decode
SHAPES = [(1, 576, 49152, 64), (1, 1536, 151936, 128)]
QUICK_SHAPES = [(1, 576, 8192, 64)]


def run(threads: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n, group in QUICK_SHAPES if quick else SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        q, s = quantize_i8(w, group)
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        x1, wt = x[0], w.T
        t = timeit_interleaved({"offq": lambda: matmul_i8(x, q, s, group, out=out),
                                "blas": lambda: x1 @ wt}, quick=quick)
        rows.append(result(
            "matmul_i8", f"i8 g{group} [auto] {m}x{k}x{n}", threads, t["offq"],
            flops=2.0 * m * n * k, nbytes=q.nbytes + s.nbytes + x.nbytes + out.nbytes,
            baselines={"numpy sgemv": t["blas"]},
            note=f"float32 x (rounded to 16 bits per group inside), int8 W with one scale per "
                 f"{group} inputs (the 8-bit LM head), "
                 "against the float32 head"))
        del w, wt
    return rows
