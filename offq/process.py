"""Process-wide settings that only a process offq owns may take: ``offq quantize
--hold-freed-memory`` applies :func:`hold_freed_memory` at start; a notebook or script that wants
it calls the function itself.

Why: a layer's forward over a calibration batch allocates its activations afresh for every
product (``x @ W.T`` gives a new [tokens, out] array: 294 MB for Qwen2.5-1.5B's gate/up at 4 x
2048 tokens). glibc serves blocks over 32 MB with ``mmap`` and returns them with ``munmap``, so
every product page-faults its output in again and the kernel zeroes each page first (a profile
of ``offq quantize`` on Qwen2.5-1.5B: 9.6% of the samples in the kernel's ``clear_page_erms``,
most of them under OpenBLAS zeroing a fresh ``sgemm`` output). Kept in the heap, freed blocks
are reused without faults: the same quantization took 1,131 s instead of 1,277 s, with a peak
RSS of 5.17 GB instead of 4.95 GB. Not the default: freed memory then stays with the process,
and the heap's fragmentation raised the peak there (README, "Quantization time").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["hold_freed_memory"]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: the largest trim threshold mallopt takes (an int): only a free heap top over 2 GiB is returned
_TRIM_THRESHOLD = 2**31 - 1


def hold_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap (no ``mmap``) and keep freed heap
    memory (it returns only a free top over 2 GiB), so that large temporaries reuse pages the
    process already has instead of faulting in fresh zeroed ones. Freed memory then stays with
    the process, and the heap's fragmentation can raise the peak (+0.22 GB on a 4.95 GB
    quantization of Qwen2.5-1.5B).

    Returns True when applied, False where the C library is not glibc (nothing changes)."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    logger.debug("hold_freed_memory: %s", "applied" if ok else "mallopt refused")
    return ok
