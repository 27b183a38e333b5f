"""GPTQ's Hessian factor, three ways: the first path (NumPy inverse, then Cholesky of it), the C
kernel offq.kernels.upper_cholesky_of_inverse (LAPACK potrf + trtri of the reversed matrix), and
offq.kernels.udu_factor, what GPTQ uses now (the same potrf, no trtri: H = S diag(d) S^T,
docs/METHODS.md section 3).

Protocol: H = x^T x / K for Gaussian x [K + 256, K] (float64), damped by 0.01 * mean(diag H);
each path timed once per (K, BLAS threads) with time.perf_counter, BLAS threads set with
threadpoolctl (NumPy's OpenBLAS and offq's scipy-openblas32 alike); the printed difference is
max |U_old - U_new| / max |U_old| and, for the UDU^T factor, max |(S sqrt(d)) U_new - I|. One
run, so on a shared machine the figures are noisy: the
machine line gives the load average at the start.

    python benchmarks/bench_gptq_factor.py                  # K = 1536 and 8960, 1 and 2 threads
    python benchmarks/bench_gptq_factor.py --k 4096 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()

from offq.bench import describe_machine  # noqa: E402
from offq.kernels import udu_factor, upper_cholesky_of_inverse  # noqa: E402


def old_factor(h: np.ndarray, add: float) -> np.ndarray:
    """What offq's GPTQ computed before: inv(H + add I), symmetrized, then its Cholesky factor."""
    hinv = np.linalg.inv(h + add * np.eye(h.shape[0]))
    return np.linalg.cholesky((hinv + hinv.T) / 2).T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[1536, 8960])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    for k in args.k:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((k + 256, k))
        h = x.T @ x / k
        add = 0.01 * float(np.mean(np.diag(h)))
        for nt in args.threads:
            with threadpool_limits(limits=nt, user_api="blas"):
                t0 = time.perf_counter()
                u_old = old_factor(h, add)
                t1 = time.perf_counter()
                u_new = upper_cholesky_of_inverse(h, add)
                t2 = time.perf_counter()
                s, d = udu_factor(h, add)
                t3 = time.perf_counter()
            assert u_new is not None
            diff = np.abs(u_old - u_new).max() / np.abs(u_old).max()
            inv_err = np.abs((s * np.sqrt(d)) @ u_new - np.eye(k)).max()
            print(f"K={k:5d} threads={nt}: inverse+Cholesky {t1 - t0:7.2f} s  potrf+trtri "
                  f"{t2 - t1:7.2f} s ({(t1 - t0) / (t2 - t1):5.2f}x)  UDU^T {t3 - t2:7.2f} s "
                  f"({(t1 - t0) / (t3 - t2):5.2f}x)  rel diff {diff:.1e}  |R U - I| {inv_err:.1e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
