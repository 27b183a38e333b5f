"""One thread setting for everything offq runs: its OpenMP kernels, the OpenBLAS it links
(scipy-openblas32) and NumPy's own BLAS (through threadpoolctl).

    from offq.kernels import threads, set_num_threads
    set_num_threads(2)          # process-wide
    with threads(1):            # temporarily, restored on exit
        ...
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

from .. import _C

__all__ = ["set_num_threads", "get_num_threads", "threads"]


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in offq's kernels, its OpenBLAS, and NumPy's BLAS.

    The BLAS libraries take ``n`` process-wide; offq's OpenMP kernels take it in the calling
    Python thread (OpenMP keeps the setting per thread), so call this in the thread that runs
    the model: another thread's kernels use OpenMP's default (``OMP_NUM_THREADS``, else every
    core). ``n`` may be at most 8 per core (at least 64): OpenMP ends the process when it cannot
    create a team's threads.
    """
    _C.set_num_threads(n)  # validates n (TypeError / ValueError naming it)
    threadpool_limits(limits=int(n))  # every BLAS and OpenMP runtime loaded in the process


def get_num_threads() -> int:
    """The number of threads offq's OpenMP kernels use."""
    return int(_C.get_num_threads())


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Context manager: ``n`` threads for offq and NumPy's BLAS inside the block, restored after."""
    previous = get_num_threads()
    _C.set_num_threads(n)  # validates n before anything else changes
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        _C.set_num_threads(previous)
