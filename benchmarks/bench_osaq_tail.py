"""OSAQ's Hessian tail at a down_proj width: one tridiagonal reduction against the two-call scheme.

``offq.kernels.tail_eigenpairs`` reduces the Hessian once, takes every eigenvalue from the
tridiagonal matrix to find how many pairs fit the budget (``gamma`` of the trace), then forms only
those vectors. Until this benchmark's commit the tail came from two index-range calls (32 pairs,
then as many as the budget could hold), each its own reduction; that scheme is timed here as the
baseline, in the same process, on the same matrix (``smallest_eigenpairs(h, 32)`` then
``smallest_eigenpairs(h, m + 1)``, which is what ``dsyevr`` by index did), and so is a full
``numpy.linalg.eigh`` with ``--eigh``.

The Hessian is ``2 X^T X / n`` of ``n`` synthetic activations with lognormal channel scales and
three massive channels (an LLM site's spectrum; Qwen2.5-1.5B's down_proj tails at the issue
protocol held 46-324 directions of 8960).

    python benchmarks/bench_osaq_tail.py                 # K = 8960, ~4 min on 2 threads
    python benchmarks/bench_osaq_tail.py --k 1536 --eigh
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8960, help="Hessian order (input width)")
    p.add_argument("--tokens", type=int, default=32768, help="activations n behind the Hessian")
    p.add_argument("--gamma", type=float, default=1e-4, help="tail budget, fraction of the trace")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per scheme")
    p.add_argument("--eigh", action="store_true", help="also time numpy.linalg.eigh (all pairs)")
    args = p.parse_args()

    from offq.bench import describe_machine
    from offq.kernels import cov_update, smallest_eigenpairs, tail_eigenpairs, threads

    print(f"# OSAQ tail, K = {args.k}, {args.tokens} synthetic tokens, gamma {args.gamma}, "
          f"{args.threads} thread(s), best of {args.repeats}: {describe_machine()}")
    rng = np.random.default_rng(0)
    scales = np.exp(rng.standard_normal(args.k)).astype(np.float32)
    h = np.zeros((args.k, args.k))
    with threads(args.threads):
        for _ in range(0, args.tokens, 2048):
            x = rng.standard_normal((2048, args.k), dtype=np.float32) * scales
            x[:, :3] *= 40.0
            cov_update(h, x)
        h *= 2.0 / args.tokens
        budget = args.gamma * float(np.trace(h))
        m = len(tail_eigenpairs(h, budget)[0])

        def one_reduction() -> None:
            tail_eigenpairs(h, budget)

        def two_calls() -> None:
            smallest_eigenpairs(h, min(32, args.k))
            if m >= 32:
                smallest_eigenpairs(h, m + 1)

        schemes = {"one reduction (tail_eigenpairs)": one_reduction,
                   "two index-range calls (before)": two_calls}
        if args.eigh:
            schemes["numpy.linalg.eigh (all pairs)"] = lambda: np.linalg.eigh(h)
        best = {name: float("inf") for name in schemes}
        for _ in range(args.repeats):  # interleaved, so drifting load hits every scheme alike
            for name, fn in schemes.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"tail size m = {m}")
    base = best["one reduction (tail_eigenpairs)"]
    for name, seconds in best.items():
        print(f"  {name:34s} {seconds:8.2f} s   {seconds / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
