"""FWHT benchmark: offq.kernels.fwht vs a NumPy butterfly and vs a dense NumPy matmul x @ H.

Rows of n = 128, 576, 1536, 4096, 11008 (block 256: no Hadamard of order 172 here), 14336, float32,
normalised. `GFLOP/s` counts the algorithm's additions (m * p * log2 p for the butterflies plus
2 * m * m * p for the H_m mix when n = m * p); `GB/s` counts one read and one write of the rows.
The n=4096 "1 row" case repeats one in-cache vector (the FFHT protocol: 1.87 us on one Zen3 core);
it includes the Python call (~1 us), the batched n=4096 row is the kernel's own per-vector time.
Batches above 128K elements run on a thread team: 2-thread figures need an otherwise idle machine
(on an oversubscribed one each fork/join waits for a descheduled thread).
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels import fwht, hadamard_factor, hadamard_matrix

from .timing import result, timeit_interleaved

SIZES = [128, 576, 1536, 4096, 11008, 14336]
DENSE_MAX = 4096  # x @ H with a dense H beyond this is hundreds of MB


def numpy_butterfly(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Unnormalised power-of-two FWHT of the rows of x by NumPy slicing (the plain-NumPy baseline)."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    np.copyto(out.reshape(-1, n), y)
    y = out.reshape(-1, n)
    h = 1
    while h < n:
        v = y.reshape(-1, n // (2 * h), 2, h)
        a = v[:, :, 0].copy()
        v[:, :, 0] += v[:, :, 1]
        np.subtract(a, v[:, :, 1], out=v[:, :, 1])
        h *= 2
    return out


def flops_per_row(n: int) -> float:
    m = hadamard_factor(n)
    p = n // m
    return m * p * math.log2(p) + (2.0 * m * m * p if m > 1 else 0.0)


def run(threads: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows_out = []
    cases = [(4096, 1, None)]
    for n in SIZES:
        block = 256 if n == 11008 else None
        rows = max(1, (1 << 20 if quick else 1 << 22) // (4 * n))  # ~1 MiB (quick) / 4 MiB of rows
        cases.append((n, rows, block))
    for n, rows, block in cases:
        x = rng.standard_normal((rows, n)).astype(np.float32)
        out = np.empty_like(x)
        length = block or n
        fns = {"offq": lambda: fwht(x, block=block, out=out)}
        m = hadamard_factor(length)
        xb = x.reshape(-1, length)
        ob = np.empty_like(xb)
        if m == 1:  # the butterfly baseline exists for powers of two (and blocks of them)
            fns["numpy butterfly"] = lambda: numpy_butterfly(xb, ob)
        if length <= DENSE_MAX:
            h = hadamard_matrix(length, dtype=np.float32)
            fns["numpy x@H (sgemm)"] = lambda: np.matmul(xb, h, out=ob)
        times = timeit_interleaved(fns, quick=quick)
        t = times.pop("offq")
        base: dict[str, float | None] = {
            k: times.get(k) for k in ("numpy butterfly", "numpy x@H (sgemm)")}
        case = f"n={n}" + (f" block={block}" if block else "") + f" rows={rows}"
        rows_out.append(result(
            "fwht f32", case, threads, t / rows,
            flops=flops_per_row(length) * (n // length), nbytes=8.0 * n,
            baselines={k: (v / rows if v is not None else None) for k, v in base.items()},
            note="seconds per row"))
    return rows_out
