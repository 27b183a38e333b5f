"""OSAQ's Hessian tail at a down_proj width: subspace iteration, one tridiagonal reduction, and
the two-call scheme before it.

``offq.kernels.tail_subspace`` (OSAQ's default from input width 4096 up) skips the reduction:
a float32 Cholesky factor, then inverse subspace iteration on a block that grows with the tail;
its basis' energy fits the same budget and its count m is at most the exact one (both printed).

``offq.kernels.tail_eigenpairs`` reduces the Hessian once, takes every eigenvalue from the
tridiagonal matrix to find how many pairs fit the budget (``gamma`` of the trace), then forms only
those vectors. Until this benchmark's commit the tail came from two index-range calls (32 pairs,
then as many as the budget could hold), each its own reduction; that scheme is timed here as the
baseline, in the same process, on the same matrix (``smallest_eigenpairs(h, 32)`` then
``smallest_eigenpairs(h, m + 1)``, which is what ``dsyevr`` by index did; ``--two-calls``), and
so is a full ``numpy.linalg.eigh`` with ``--eigh``.

The Hessian is ``2 X^T X / n`` of ``n`` synthetic activations with lognormal channel scales and
three massive channels (an LLM site's spectrum; Qwen2.5-1.5B's down_proj tails at the issue
protocol held 46-324 directions of 8960).

    python benchmarks/bench_osaq_tail.py                 # K = 8960, ~4 min on 2 threads
    python benchmarks/bench_osaq_tail.py --k 1536 --eigh
    python benchmarks/bench_osaq_tail.py --hessian H.npy      # a real site's Hessian
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from source_tree import add_repository  # noqa: E402  (this directory)

add_repository()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8960, help="Hessian order (input width)")
    p.add_argument("--tokens", type=int, default=32768, help="activations n behind the Hessian")
    p.add_argument("--gamma", type=float, default=1e-4, help="tail budget, fraction of the trace")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per scheme")
    p.add_argument("--eigh", action="store_true", help="also time numpy.linalg.eigh (all pairs)")
    p.add_argument("--two-calls", action="store_true",
                   help="also time the two index-range calls used before the one reduction")
    p.add_argument("--hessian", default=None,
                   help="a saved float64 [K, K] Hessian (.npy) instead of the synthetic one")
    args = p.parse_args()

    from offq.bench import describe_machine
    from offq.kernels import (cov_update, smallest_eigenpairs, tail_eigenpairs, tail_subspace,
                              threads)

    source = args.hessian or f"{args.tokens} synthetic tokens"
    if args.hessian:
        h = np.ascontiguousarray(np.load(args.hessian), dtype=np.float64)
        args.k = h.shape[0]
    print(f"# OSAQ tail, K = {args.k}, {source}, gamma {args.gamma}, "
          f"{args.threads} thread(s), best of {args.repeats}: {describe_machine()}")
    rng = np.random.default_rng(0)
    with threads(args.threads):
        if not args.hessian:
            scales = np.exp(rng.standard_normal(args.k)).astype(np.float32)
            h = np.zeros((args.k, args.k))
            for _ in range(0, args.tokens, 2048):
                x = rng.standard_normal((2048, args.k), dtype=np.float32) * scales
                x[:, :3] *= 40.0
                cov_update(h, x)
            h *= 2.0 / args.tokens
        budget = args.gamma * float(np.trace(h))
        m = len(tail_eigenpairs(h, budget)[0])
        sub_vals, _, sub_steps = tail_subspace(h, budget)

        def one_reduction() -> None:
            tail_eigenpairs(h, budget)

        def two_calls() -> None:
            smallest_eigenpairs(h, min(32, args.k))
            if m >= 32:
                smallest_eigenpairs(h, m + 1)

        schemes = {"subspace iteration (tail_subspace)": lambda: tail_subspace(h, budget),
                   "one reduction (tail_eigenpairs)": one_reduction}
        if args.two_calls:
            schemes["two index-range calls (before)"] = two_calls
        if args.eigh:
            schemes["numpy.linalg.eigh (all pairs)"] = lambda: np.linalg.eigh(h)
        best = {name: float("inf") for name in schemes}
        for _ in range(args.repeats):  # interleaved, so drifting load hits every scheme alike
            for name, fn in schemes.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"tail size m = {m} (exact); subspace iteration: m = {len(sub_vals)} in {sub_steps} "
          f"steps, energy {sub_vals.sum() / budget:.4f} of the budget")
    base = best["one reduction (tail_eigenpairs)"]
    for name, seconds in best.items():
        print(f"  {name:34s} {seconds:8.2f} s   {seconds / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
