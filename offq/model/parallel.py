"""Thread-level parallelism of the NumPy forward pass.

Why not just let OpenBLAS thread every product? Because most products of a decoder are small
(a decode step multiplies one row by each weight; attention works on blocks), and OpenBLAS's
threads synchronise by spinning: for small products the threading costs more than it saves,
and on a loaded machine a descheduled spinner turns a 0.3 ms product into 5-10 ms. So inside a
forward pass BLAS runs single-threaded, and offq splits the work itself into independent pieces
(row blocks of a product, attention blocks, row chunks of elementwise work) that run on a small
thread pool. NumPy releases the GIL inside BLAS calls and large ufuncs, so the pieces really run
in parallel. The pool size is offq's one thread setting (``offq.kernels.get_num_threads``).
User callbacks invoked from inside the forward (calibration captures) run with BLAS threading
restored (`blas_unrestricted`).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


__all__ = ["num_threads", "blas_single_threaded", "blas_unrestricted", "run_tasks", "row_chunks"]

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PREFIX = "offq-model"
_LOCK = threading.Lock()
_CONTROLLER: Any = None
_LIMITER: Any = None
_DEPTH = 0


_GET_THREADS: Callable[[], int] | None = None


def num_threads() -> int:
    """offq's thread setting (the OpenMP thread count of its kernels)."""
    global _GET_THREADS
    if _GET_THREADS is None:
        try:
            from ..kernels.threads import get_num_threads
            _GET_THREADS = get_num_threads
        except Exception:  # pragma: no cover - kernels not importable: use the CPU count
            n = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else (os.cpu_count() or 1))
            _GET_THREADS = lambda: n  # noqa: E731
    return max(1, int(_GET_THREADS()))


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Limit every loaded BLAS to one thread inside the block (re-entrant; restored on exit)."""
    global _CONTROLLER, _LIMITER, _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            if _CONTROLLER is None:
                from threadpoolctl import ThreadpoolController
                _CONTROLLER = ThreadpoolController()
            _LIMITER = _CONTROLLER.limit(limits=1, user_api="blas")
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0 and _LIMITER is not None:
                _LIMITER.restore_original_limits()
                _LIMITER = None


@contextlib.contextmanager
def blas_unrestricted() -> Iterator[None]:
    """Lift `blas_single_threaded` inside the block (for user callbacks such as calibration
    captures, which may run large BLAS products of their own); re-applied on exit."""
    global _LIMITER
    with _LOCK:
        lifted = _LIMITER is not None
        if lifted:
            _LIMITER.restore_original_limits()
            _LIMITER = None
    try:
        yield
    finally:
        with _LOCK:
            if lifted and _DEPTH > 0 and _LIMITER is None:
                _LIMITER = _CONTROLLER.limit(limits=1, user_api="blas")


def _in_worker() -> bool:
    return threading.current_thread().name.startswith(_POOL_PREFIX)


def run_tasks(fn: Callable[[Any], None], tasks: list[Any]) -> None:
    """Run ``fn(task)`` for every task on the pool (serially when one thread, one task, or when
    called from a pool worker), with BLAS single-threaded inside. Exceptions propagate."""
    global _POOL, _POOL_SIZE
    n = min(num_threads(), len(tasks))
    with blas_single_threaded():
        if n <= 1 or _in_worker():
            for t in tasks:
                fn(t)
            return
        with _LOCK:
            if _POOL is None or _POOL_SIZE < n:
                if _POOL is not None:
                    _POOL.shutdown(wait=True)
                _POOL, _POOL_SIZE = ThreadPoolExecutor(n, thread_name_prefix=_POOL_PREFIX), n
            pool = _POOL
        list(pool.map(fn, tasks))


def row_chunks(n_rows: int, min_rows: int = 64) -> list[slice]:
    """Split ``range(n_rows)`` into about one contiguous slice per thread (each >= min_rows)."""
    parts = max(1, min(num_threads(), n_rows // max(1, min_rows)))
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
