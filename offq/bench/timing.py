"""Timing helpers shared by the kernel benchmarks (offq/bench/{fwht,cov,matmul}.py).

Protocol: every case is timed as the best of `repeats` runs, each run looping the call until at
least `min_time` seconds have passed (so one run is never a single short call); warm-up first.
`timeit_interleaved` alternates the runs of offq and its baselines round by round, each run after
an untimed settling loop of the same call (half the run's length).
Baselines are timed the same way in the same process, on the same arrays, with the same thread
setting, and reported as ratios `baseline_seconds / offq_seconds` (> 1: offq is faster).
"""
from __future__ import annotations

import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], *, quick: bool) -> float:
    """Seconds per call of fn (best of several runs)."""
    return timeit_interleaved({"fn": fn}, quick=quick)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], object]], *, quick: bool) -> dict[str, float]:
    """Seconds per call of each fn, with the runs of all fns interleaved round by round (offq,
    baseline, offq, baseline, ...) so that load drifting on a shared machine hits all alike."""
    min_time, repeats = (0.02, 3) if quick else (0.2, 5)
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            # Settle first: the previous fn's thread pool may still be spinning on the other cores
            # (OpenBLAS's workers busy-wait for about 2^28 cycles after a call), and its data
            # fills the caches. Each run then times a steady state of this fn alone.
            settle = time.perf_counter() + min_time / 2
            while time.perf_counter() < settle:
                fn()
            calls = 0
            start = time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            best[name] = min(best[name], elapsed / calls)
    return best


def result(bench: str, case: str, threads: int, seconds: float, *, flops: float, nbytes: float,
           baselines: dict[str, float | None], note: str = "") -> dict:
    """One benchmark row: absolute rates plus ratios against each baseline (None: not measured)."""
    return {
        "bench": bench,
        "case": case,
        "threads": threads,
        "seconds": seconds,
        "gflops": flops / seconds / 1e9,
        "gbps": nbytes / seconds / 1e9,
        "baseline_seconds": baselines,
        "speedup_vs": {k: (v / seconds if v is not None else None) for k, v in baselines.items()},
        "note": note,
    }
