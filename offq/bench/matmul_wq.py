"""matmul_wq benchmark: float32 x packed W4/W3/W2/W8 weights vs NumPy float32 matmul (OpenBLAS) on the
same matrix.

Protocol: x [M, K] and W [N, K] are N(0, 1) float32 (seed 0); W is quantized once per bit width
(asymmetric, groups of 128 inputs, RTN: ``offq.kernels.quantize``) and packed (``pack_wq``). Rows
per shape (M, K, N), width and SIMD variant: `wB g128 [kernel]` = ``matmul_wq`` with that
variant (every one the CPU offers: "avx512", "avx2", else "generic"), against `numpy sgemv`
(M = 1: ``x[0] @ W.T``) or `numpy sgemm` (``x @ W.T``) on the float32 W, timed interleaved with it
in the same process, same thread setting. M = 1 is decode: the float32 W (64 MB) streams from
DRAM, while the packed one (bits/32 of it) would stay in L3 between calls, so a second row,
`streamed`, cycles through copies of the packed weight filling 128 MiB (what a model's decode
reads). At M = 1 the packed product is compute bound (its time per weight row does not change
from L2- to DRAM-sized weights): a mask and a multiply-add per vector of codes, plus a conversion
to float where the CPU does not take the subnormal decode (``simd_info()["wq_subnormal_decode"]``;
``OFFQ_WQ_DECODE=convert`` forces the conversion; both give the same bits). M = 512 is
prefill (panels dequantized to float32, then sgemm). GFLOP/s counts 2*M*N*K; GB/s counts the
packed weight, its scales and zero-points, x and the output.
"""
from __future__ import annotations

import numpy as np

from .. import _C
from ..kernels.matmul_wq import matmul_wq, pack_wq, unpack_wq
from ..kernels.quant import quantize
from .timing import result, timeit_interleaved

SHAPES = [(1, 4096, 4096), (512, 4096, 4096)]
QUICK_SHAPES = [(1, 1024, 1024), (128, 1024, 1024)]
GROUP = 128
BITS = (4, 3, 2, 8)
STREAM_BYTES = 128 << 20  # weight copies a streamed row cycles through (4x a 32 MiB L3; CPUs
# with a larger L3, such as a 300 MiB Xeon, keep them cached: the row then reads L3, not DRAM)


def kernel_names() -> list[str]:
    """The SIMD variants this CPU offers, widest first (``kernel="auto"`` runs the first for
    groups of 128), or the generic one."""
    simd = _C.simd_info()
    names = [name for name, flag in (("avx512", "avx512_bw"), ("avx2", "avx2")) if simd[flag]]
    return names or ["generic"]


def run(threads: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    decode = "subnormal" if _C.simd_info()["wq_subnormal_decode"] else "convert"
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
            nbytes = packed.nbytes + s.nbytes + z.nbytes + x.nbytes + out.nbytes
            cases = {}
            for kern in kernel_names():
                cases[f"[{kern}] {m}x{k}x{n}"] = (
                    lambda kern=kern: matmul_wq(x, packed, s, z, bits, GROUP, out=out, kernel=kern))
                if m == 1 and not quick:
                    cases[f"[{kern}] {m}x{k}x{n} streamed"] = _streamed(packed, s, z, bits, x,
                                                                         out, kern)
            for label, fn in cases.items():
                t = timeit_interleaved({"offq": fn, "blas": base}, quick=quick)
                rows.append(result(
                    "matmul_wq", f"w{bits} g{GROUP} {label}",
                    threads, t["offq"], flops=2.0 * m * n * k, nbytes=nbytes,
                    baselines={blas: t["blas"]},
                    note=f"float32 x, W {bits}-bit asym g{GROUP} packed, dequantized on the fly"
                    + (f"; {decode} decode" if m == 1 and kern != "generic" else "")
                    + (f"; {STREAM_BYTES >> 20} MiB of copies cycled" if "streamed" in label
                       else "")))
    return rows


def _streamed(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, x: np.ndarray,
              out: np.ndarray, kernel: str):
    """A call that cycles through copies of the weight filling STREAM_BYTES, so that each product
    reads its weight from DRAM as a model's decode does (a 4096 x 4096 W4 weight, 8.4 MB, would
    otherwise stay in a 32 MB L3 between calls, while the float32 one, 64 MB, cannot)."""
    one = packed.nbytes + scale.nbytes + zero.nbytes
    codes = unpack_wq(packed, bits, x.shape[1])
    copies = [(pack_wq(codes, bits), scale.copy(), zero.copy())  # aligned as every pack_wq result
              for _ in range(-(-STREAM_BYTES // one))]
    state = {"i": 0}

    def call():
        p, s, z = copies[state["i"]]
        state["i"] = (state["i"] + 1) % len(copies)
        matmul_wq(x, p, s, z, bits, GROUP, out=out, kernel=kernel)

    return call
