"""offq.heap.trim_heap: freed heap memory leaves the resident set (glibc), a no-op elsewhere."""
import ctypes.util
import os
import sys

import numpy as np
import pytest

from offq.heap import trim_heap


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc_trim only")
def test_trim_returns_freed_heap_blocks():
    """Blocks below glibc's adaptive mmap threshold live on the heap; with a live block above
    them, freeing them keeps their pages resident until the trim (what a quantization run's
    Hessians and weights did between layers)."""
    big = np.ones(3 << 20)  # 24 MB, mmapped; freeing it raises the mmap threshold to 24 MB
    del big
    blocks = [np.ones(1 << 20) for _ in range(48)]  # 8 MB each: now on the heap
    keep = np.ones(1 << 17)  # a live block above them: the heap's top cannot shrink by itself
    del blocks
    before = resident_bytes()
    released = trim_heap()
    after = resident_bytes()
    assert released
    assert before - after > 200 << 20, (before, after)
    assert keep.sum() == 1 << 17
