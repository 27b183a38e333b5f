"""cov_update benchmark: X [tokens, d] float32, acc += X^T X, vs OpenBLAS ssyrk called directly
(ctypes, the scipy-openblas32 library offq links) and vs NumPy's X.T @ X (sgemm, NumPy's own
OpenBLAS). `GFLOP/s` counts the symmetric product's tokens * d * (d + 1) flops for every row
(sgemm does twice the arithmetic for the same result); `GB/s` counts X read once plus the
accumulator read and written.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import scipy_openblas32

from ..kernels import cov_update

from .timing import result, timeit, timeit_interleaved

ROW_MAJOR, UPPER, TRANS = 101, 121, 112  # CBLAS enums


def _openblas() -> ctypes.CDLL:
    lib_dir = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()
    path = os.path.join(lib_dir, f"lib{name}.so")
    lib = ctypes.CDLL(path)
    f = lib.scipy_cblas_ssyrk
    f.restype = None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                  ctypes.c_int]
    return lib


def run(threads: int, quick: bool) -> list[dict]:
    tokens, d = (512, 1024) if quick else (2048, 4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    lib = _openblas()
    c = np.zeros((d, d), np.float32)

    def ssyrk() -> None:
        lib.scipy_cblas_ssyrk(ROW_MAJOR, UPPER, TRANS, d, tokens, 1.0, x.ctypes.data, d, 1.0,
                              c.ctypes.data, d)

    g = np.empty((d, d), np.float32)
    acc32 = np.zeros((d, d), np.float32)
    acc64 = np.zeros((d, d), np.float64)
    times = timeit_interleaved({
        "openblas ssyrk": ssyrk,
        "numpy X.T@X (sgemm)": lambda: np.matmul(x.T, x, out=g),
        "float32": lambda: cov_update(acc32, x),
        "float64": lambda: cov_update(acc64, x),
    }, quick=quick)
    flops = float(tokens) * d * (d + 1)
    out = []
    for acc in (acc32, acc64):
        t = times[acc.dtype.name]
        nbytes = x.nbytes + 2.0 * acc.nbytes
        out.append(result(
            "cov_update", f"X {tokens}x{d} f32, acc {acc.dtype.name}", threads, t,
            flops=flops, nbytes=nbytes,
            baselines={k: times[k] for k in ("openblas ssyrk", "numpy X.T@X (sgemm)")}))
    xb = x.reshape(16, tokens // 16, d)
    acc = np.zeros((d, d))
    t = timeit(lambda: cov_update(acc, xb, top1=True), quick=quick)
    out.append(result("cov_update", f"top1 X 16x{tokens // 16}x{d} f32, acc float64", threads, t,
                      flops=16.0 * d * (d + 1), nbytes=x.nbytes + 2.0 * acc.nbytes,
                      baselines={}, note="selection + rank-16 update"))
    return out
