"""One thread setting governs offq's OpenMP kernels, its OpenBLAS and NumPy's BLAS."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from offq.kernels import fwht, get_num_threads, set_num_threads, threads


def blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_context_manager_sets_and_restores():
    before = get_num_threads()
    blas_before = blas_threads()
    with threads(1):
        assert get_num_threads() == 1
        assert all(n == 1 for n in blas_threads())
        x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
        y1 = fwht(x)
    assert get_num_threads() == before
    assert blas_threads() == blas_before
    with threads(2):
        assert get_num_threads() == 2
        np.testing.assert_array_equal(fwht(x), y1)  # rows are independent: same bits


def test_set_num_threads_process_wide():
    before = get_num_threads()
    try:
        set_num_threads(1)
        assert get_num_threads() == 1
        assert all(n == 1 for n in blas_threads())
    finally:
        set_num_threads(before)
    assert get_num_threads() == before


def test_restored_after_exception():
    before = get_num_threads()
    with pytest.raises(RuntimeError):
        with threads(1):
            raise RuntimeError("boom")
    assert get_num_threads() == before


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                     (True, TypeError), ("2", TypeError)])
def test_validation(bad, exc):
    with pytest.raises(exc, match="n: expected"):
        set_num_threads(bad)
    with pytest.raises(exc, match="n: expected"):
        with threads(bad):
            pass
