"""How glibc's malloc treats freed memory while offq works: :func:`freed_memory_held` for the
length of a job (``offq.quantize`` takes it by default from its rotations to its write), or
:func:`hold_freed_memory` for the rest of the process (``offq quantize --hold-freed-memory``; a
notebook or script that wants it calls the function itself).

Why: a layer's forward over a calibration batch allocates its activations afresh for every
product (``x @ W.T`` gives a new [tokens, out] array: 294 MB for Qwen2.5-1.5B's gate/up at 4 x
2048 tokens), and the recipe adds Hessians (640 MB at K = 8960), GPTQ's float64 copies and the
SwiGLU output. glibc serves blocks over 32 MB with ``mmap`` and returns them with ``munmap``, so
every such block is page-faulted in again and each page zeroed first (a profile of ``offq
quantize`` on Qwen2.5-1.5B: 9.6% of the samples in the kernel's ``clear_page_erms``). On this
project's 2-vCPU Firecracker VMs a fresh page costs far more, ~11 s per GB (a 294 MB copy into
fresh pages took 3.2 s, into pages freed a moment before 0.06 s; likely the host taking freed
guest pages back, not verified). Kept in the heap, freed blocks are reused without faults:
OffQ + GPTQ on Qwen2.5-1.5B spent 36 s instead of 59 s per layer calibrating, 8 s instead of 13 s
in GPTQ (benchmarks/results_quantize_time.md). The price: the heap's fragmentation can raise
the peak, and memory freed inside the hold stays with the process until it ends (the scoped
form gives it back on exit).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import threading
from typing import Iterator

__all__ = ["freed_memory_held", "hold_freed_memory"]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: the largest trim threshold mallopt takes (an int): only a free heap top over 2 GiB is returned
_TRIM_THRESHOLD = 2**31 - 1
#: glibc's DEFAULT_MMAP_MAX (malloc/malloc.c), restored when a scoped hold ends
_DEFAULT_MMAP_MAX = 65536
#: What a scoped hold leaves behind. Any mallopt switches off glibc's adaptive mmap threshold
#: (which rises to each freed mapped block's size, up to DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on
#: 64-bit, with the trim threshold at twice it), so on leaving the threshold is set where that
#: adaptation ends in a process that has freed a large array: left at its 128 KiB start, every
#: later temporary over 128 KiB was mapped and faulted in afresh (an FP32 SmolLM2 prefill after
#: an in-process quantization: 45k faults and ~15% of its time).
_ADAPTED_MMAP_THRESHOLD = 32 * 1024 * 1024
_ADAPTED_TRIM_THRESHOLD = 2 * _ADAPTED_MMAP_THRESHOLD


class _MallocPolicy:
    """The process's malloc setting: held for good, held by ``depth`` open scopes, or glibc's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._libc = _glibc()
        self.permanent = False
        self.depth = 0

    def _set(self, mmap_max: int, trim_threshold: int, mmap_threshold: int | None = None) -> bool:
        ok = (self._libc.mallopt(_M_MMAP_MAX, mmap_max) == 1
              and self._libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
              and (mmap_threshold is None
                   or self._libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1))
        if not ok:
            logger.warning("mallopt refused M_MMAP_MAX=%d / M_TRIM_THRESHOLD=%d / "
                           "M_MMAP_THRESHOLD=%s", mmap_max, trim_threshold, mmap_threshold)
        return ok

    def hold_for_good(self) -> bool:
        if self._libc is None:
            return False
        with self._lock:
            self.permanent = self.permanent or self._set(0, _TRIM_THRESHOLD)
            return self.permanent

    def enter(self) -> bool:
        if self._libc is None:
            return False
        with self._lock:
            if self.depth == 0 and not self.permanent and not self._set(0, _TRIM_THRESHOLD):
                return False
            self.depth += 1
            return True

    def exit(self) -> None:
        with self._lock:
            self.depth -= 1
            if self.depth == 0 and not self.permanent:
                self._set(_DEFAULT_MMAP_MAX, _ADAPTED_TRIM_THRESHOLD, _ADAPTED_MMAP_THRESHOLD)
                self._libc.malloc_trim(0)  # the freed heap goes back now, not at the next free


def _glibc() -> ctypes.CDLL | None:
    """glibc through ctypes (mallopt, malloc_trim typed), or None where the C library is another."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@functools.lru_cache(maxsize=1)
def _policy() -> _MallocPolicy:
    return _MallocPolicy()


def hold_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap (no ``mmap``) and keep freed heap
    memory (it returns only a free top over 2 GiB) for the rest of the process, so that large
    temporaries reuse pages the process already has instead of faulting in fresh zeroed ones.
    Freed memory then stays with the process, and the heap's fragmentation can raise the peak
    (+0.22 GB on a 4.95 GB quantization of Qwen2.5-1.5B). A :func:`freed_memory_held` scope
    ending later leaves this setting in place.

    Returns True when applied, False where the C library is not glibc (nothing changes)."""
    ok = _policy().hold_for_good()
    logger.debug("hold_freed_memory: %s", "applied" if ok else "not applied")
    return ok


@contextlib.contextmanager
def freed_memory_held() -> Iterator[bool]:
    """:func:`hold_freed_memory` inside the block only: on leaving the outermost such block
    (unless the process holds freed memory for good) blocks over 32 MiB are mapped again, a free
    heap top over 64 MiB is returned, and ``malloc_trim`` returns the freed heap now. Those are
    the thresholds glibc's own adaptation reaches once a process has freed a large array; the
    adaptation itself stays off (any mallopt ends it), so they stay put.

    Yields whether the hold is in force (False where the C library is not glibc). Thread-safe;
    scopes nest."""
    policy = _policy()
    held = policy.enter()
    try:
        yield held
    finally:
        if held:
            policy.exit()
