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
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


__all__ = ["ThreadRuntime", "thread_runtime", "num_threads", "blas_single_threaded",
           "blas_unrestricted", "run_tasks", "row_chunks"]

_POOL_PREFIX = "offq-model"


class ThreadRuntime:
    """offq's thread settings and the state they need, in one object: the thread count (the C
    core's OpenMP setting, read from it), the task pool of the forward pass, and the BLAS limiter
    that keeps BLAS single-threaded inside it (re-entrant). One instance per process
    (:func:`thread_runtime`), since OpenMP and BLAS thread counts are process-wide."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._controller: Any = None
        self._limiter: Any = None
        self._depth = 0

    @staticmethod
    def num_threads() -> int:
        """offq's thread setting (the OpenMP thread count of its kernels)."""
        from ..kernels.threads import get_num_threads

        return max(1, int(get_num_threads()))

    @contextlib.contextmanager
    def blas_single_threaded(self) -> Iterator[None]:
        """Limit every loaded BLAS to one thread inside the block (re-entrant)."""
        with self._lock:
            if self._depth == 0:
                if self._controller is None:
                    from threadpoolctl import ThreadpoolController
                    self._controller = ThreadpoolController()
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._limiter is not None:
                    self._limiter.restore_original_limits()
                    self._limiter = None

    @contextlib.contextmanager
    def blas_unrestricted(self) -> Iterator[None]:
        """Lift :meth:`blas_single_threaded` inside the block (user callbacks such as calibration
        captures, which may run large BLAS products of their own); re-applied on exit."""
        with self._lock:
            lifted = self._limiter is not None
            if lifted:
                self._limiter.restore_original_limits()
                self._limiter = None
        try:
            yield
        finally:
            with self._lock:
                if lifted and self._depth > 0 and self._limiter is None:
                    self._limiter = self._controller.limit(limits=1, user_api="blas")

    def run_tasks(self, fn: Callable[[Any], None], tasks: list[Any]) -> None:
        """Run ``fn(task)`` for every task on the pool (serially when one thread, one task, or
        when called from a pool worker), with BLAS single-threaded inside."""
        n = min(self.num_threads(), len(tasks))
        with self.blas_single_threaded():
            if n <= 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
                for t in tasks:
                    fn(t)
                return
            with self._lock:
                if self._pool is None or self._pool_size < n:
                    if self._pool is not None:
                        self._pool.shutdown(wait=True)
                    self._pool = ThreadPoolExecutor(n, thread_name_prefix=_POOL_PREFIX)
                    self._pool_size = n
                pool = self._pool
            list(pool.map(fn, tasks))


@functools.lru_cache(maxsize=1)
def thread_runtime() -> ThreadRuntime:
    """The process's :class:`ThreadRuntime` (created on first use)."""
    return ThreadRuntime()


def num_threads() -> int:
    """offq's thread setting (the OpenMP thread count of its kernels)."""
    return thread_runtime().num_threads()


def blas_single_threaded():
    """:meth:`ThreadRuntime.blas_single_threaded` of the process runtime."""
    return thread_runtime().blas_single_threaded()


def blas_unrestricted():
    """:meth:`ThreadRuntime.blas_unrestricted` of the process runtime."""
    return thread_runtime().blas_unrestricted()


def run_tasks(fn: Callable[[Any], None], tasks: list[Any]) -> None:
    """:meth:`ThreadRuntime.run_tasks` of the process runtime."""
    thread_runtime().run_tasks(fn, tasks)


def row_chunks(n_rows: int, min_rows: int = 64) -> list[slice]:
    """Split ``range(n_rows)`` into about one contiguous slice per thread (each >= min_rows)."""
    parts = max(1, min(num_threads(), n_rows // max(1, min_rows)))
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
