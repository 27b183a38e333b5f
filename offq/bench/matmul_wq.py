"""matmul_wq benchmark: float32 x packed W4/W3/W2 weights vs NumPy float32 matmul (OpenBLAS) on the
same matrix.

Protocol: x [M, K] and W [N, K] are N(0, 1) float32 (seed 0); W is quantized once per bit width
(asymmetric, groups of 128 inputs, RTN: ``offq.kernels.quantize``) and packed (``pack_wq``). Rows
per shape (M, K, N) and width: `wB g128 [kernel]` = ``matmul_wq`` (auto, the SIMD variant offq
dispatches to), against `numpy sgemv` (M = 1: ``x[0] @ W.T``) or `numpy sgemm` (``x @ W.T``) on
the float32 W, timed interleaved with it in the same process, same thread setting. M = 1 is
decode (memory-bound: the packed weight is bits/32 of the float32 bytes); M = 512 is prefill
(panels dequantized to float32, then sgemm). GFLOP/s counts 2*M*N*K; GB/s counts the packed
weight, its scales and zero-points, x and the output.
"""
from __future__ import annotations

import numpy as np

from .. import _C
from ..kernels.matmul_wq import matmul_wq, pack_wq
from ..kernels.quant import quantize
from .timing import result, timeit_interleaved

SHAPES = [(1, 4096, 4096), (512, 4096, 4096)]
QUICK_SHAPES = [(1, 1024, 1024), (128, 1024, 1024)]
GROUP = 128
BITS = (4, 3, 2)


def kernel_name() -> str:
    """The variant ``kernel="auto"`` runs (matmul_wq has no AVX-512 VNNI variant)."""
    return "avx2" if _C.simd_info()["avx2"] else "generic"


def run(threads: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in QUICK_SHAPES if quick else SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        if m == 1:
            x1, wt = x[0], w.T
            blas, base = "numpy sgemv", (lambda: x1 @ wt)
        else:
            c = np.empty((m, n), np.float32)
            blas, base = "numpy sgemm", (lambda: np.matmul(x, w.T, out=c))
        out = np.empty((m, n), np.float32)
        for bits in BITS:
            qw = quantize(w, bits=bits, group_size=GROUP)
            packed = pack_wq(qw.unpacked_codes(), bits)
            s, z = qw.scale, qw.zero
            t = timeit_interleaved(
                {"offq": lambda: matmul_wq(x, packed, s, z, bits, GROUP, out=out),
                 "blas": base}, quick=quick)
            nbytes = packed.nbytes + s.nbytes + z.nbytes + x.nbytes + out.nbytes
            rows.append(result(
                "matmul_wq", f"w{bits} g{GROUP} [{kernel_name()}] "
                f"{m}x{k}x{n}", threads, t["offq"], flops=2.0 * m * n * k, nbytes=nbytes,
                baselines={blas: t["blas"]},
                note=f"float32 x, W {bits}-bit asym g{GROUP} packed, dequantized on the fly"))
    return rows
