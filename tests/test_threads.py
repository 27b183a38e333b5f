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


@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_peer_programs_get_the_users_omp_wait_policy(user_policy, tmp_path):
    """offq defaults OMP_WAIT_POLICY to PASSIVE for itself; a peer it runs (llama-bench in `offq
    bench`) must see the environment as the user set it (PASSIVE made llama.cpp's token generation
    ~4x slower in the e2e table)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import offq

    # the child imports this process's offq build (installed, in place or CI's ASan copy), from
    # outside the source tree (whose offq/ has no compiled extension when offq is installed)
    root = str(Path(offq.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    code = ("import os, offq; from offq.bench.e2e import peer_environment; "
            "print(os.environ.get('OMP_WAIT_POLICY'), peer_environment().get('OMP_WAIT_POLICY'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split()
    assert out == ([user_policy, user_policy] if user_policy else ["PASSIVE", "None"])
