"""matmul_w4a4 benchmark: W4A4 product vs NumPy float32 matmul (OpenBLAS) on the same shapes.

Protocol: A [M, K] and W [N, K] are N(0, 1) float32 (seed 0). W is quantized once (4-bit,
symmetric, per output channel: the OffQ default), A 4-bit asymmetric with groups of 128 (the
OffQ runtime setting). Rows per shape (M, K, N):
  - `w4a4 [kernel]`: matmul_w4a4 on pre-quantized A (the kernel alone),
  - `w4a4+quantA [kernel]`: quantize(A) then matmul_w4a4 (what a linear layer pays at run time),
  - `w4a4 dec [kernel]` (M <= 4): W also in the decode layout (pack_w4_decode, what the C decoder
    reads), pre-quantized A,
each against `numpy sgemm` = `A @ W.T` in float32 (NumPy's OpenBLAS; for M = 1 the vector form
`a @ W.T`, i.e. sgemv), timed in the same process with the same thread setting and interleaved
with it run by run (``timing.timeit_interleaved``: load drifting on a shared machine hits both
alike). `kernel` is the SIMD variant offq dispatches to (auto); on CPUs with AVX-512 VNNI the
AVX2 variant (what Zen3 and other AVX2-only machines run) is reported as well. GFLOP/s counts
2*M*N*K operations (integer MACs for offq); GB/s counts the packed operands read and the float32
output written.
"""
from __future__ import annotations

import numpy as np

from .. import _C
from ..kernels.quant import matmul_w4a4, pack_w4_decode, quantize

from .timing import result, timeit_interleaved

SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (128, 4096, 4096), (512, 4096, 4096),
          (2048, 4096, 4096), (512, 4096, 11008)]
QUICK_SHAPES = [(1, 1024, 1024), (8, 1024, 1024), (128, 1024, 1024), (512, 1024, 2752)]
A_GROUP = 128


def kernels_to_report() -> list[str]:
    simd = _C.simd_info()
    out = ["auto"]
    if simd["avx512_vnni"] and simd["avx2"]:
        out.append("avx2")  # auto = vnni here; also report the AVX2-only machines' kernel
    return out


def kernel_name(kernel: str) -> str:
    if kernel != "auto":
        return kernel
    simd = _C.simd_info()
    return "vnni" if simd["avx512_vnni"] else "avx2" if simd["avx2"] else "generic"


def run(threads: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in QUICK_SHAPES if quick else SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        qw = quantize(w, bits=4, group_size=-1, symmetric=True)
        qa = quantize(a, bits=4, group_size=A_GROUP)
        if m == 1:
            a1, wt = a[0], w.T
            blas, base = "numpy sgemv", (lambda: a1 @ wt)
        else:
            c = np.empty((m, n), np.float32)
            blas, base = "numpy sgemm", (lambda: np.matmul(a, w.T, out=c))
        out = np.empty((m, n), np.float32)
        flops = 2.0 * m * n * k
        nbytes = qw.nbytes + qa.nbytes + out.nbytes
        dec = pack_w4_decode(qw) if m <= 4 else None
        for kernel in kernels_to_report():
            name = kernel_name(kernel)
            # (label, call, extra bytes read, note): each timed interleaved with the baseline
            cases = []
            if dec is not None:
                cases.append((f"w4a4 dec [{name}]",
                              lambda: matmul_w4a4(qa, qw, out=out, kernel=kernel, w_decode=dec), 0,
                              f"W in the decode layout; A asym g{A_GROUP} pre-quantized, 4-bit"))
            cases.append((f"w4a4 [{name}]", lambda: matmul_w4a4(qa, qw, out=out, kernel=kernel), 0,
                          f"A asym g{A_GROUP} pre-quantized, W sym per-channel, 4-bit"))
            cases.append((f"w4a4+quantA [{name}]",
                          lambda: matmul_w4a4(quantize(a, bits=4, group_size=A_GROUP), qw, out=out,
                                              kernel=kernel), a.nbytes,
                          f"includes quantize(A) asym g{A_GROUP}; W sym per-channel, 4-bit"))
            for label, fn, extra, note in cases:
                t = timeit_interleaved({"offq": fn, "blas": base}, quick=quick)
                rows.append(result(
                    "matmul_w4a4", f"{label} {m}x{k}x{n}", threads, t["offq"], flops=flops,
                    nbytes=nbytes + extra, baselines={blas: t["blas"]}, note=note))
    return rows
