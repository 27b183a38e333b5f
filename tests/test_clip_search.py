"""The MSE clip search of the weight grids in C (offq.kernels.mse_clip_search, behind
offq.quant.grid.mse_clip_search) against the NumPy search it replaced, on random, adversarial
and real-shaped rows, and its argument checks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offq.kernels import mse_clip_search as c_search
from offq.kernels import threads
from offq.quant.grid import _params_of_range, _row_range, mse_clip_search


def numpy_search(x, bits, symmetric, grid=100, max_shrink=0.8):
    """The NumPy search (offq <= this commit): 25 whole-matrix round trips, float32 grids, the
    squared errors summed by einsum in float64."""
    x = np.asarray(x, dtype=np.float32)
    top = int(max_shrink * grid)
    lead = x.shape[:-1]
    best_i = np.zeros(lead, dtype=np.int64)
    best_err = np.full(lead, np.inf)
    rng = _row_range(x, symmetric)

    def consider(i):
        nonlocal best_i, best_err
        i = np.broadcast_to(np.clip(i, 0, top), lead)
        scale, zero = _params_of_range(rng, bits, symmetric, (1.0 - i / grid).astype(np.float32))
        s, z = scale[..., None], zero[..., None]
        q = np.rint(x / s) + z
        q = (np.clip(q, 0, 2 ** bits - 1) - z) * s - x
        err = np.einsum("...i,...i->...", q, q, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_i = np.where(better, i, best_i)

    for i in range(0, top + 1, 5):
        consider(np.asarray(i))
    coarse = best_i.copy()
    for delta in range(-4, 5):
        if delta:
            consider(coarse + delta)
    return _params_of_range(rng, bits, symmetric, (1.0 - best_i / grid).astype(np.float32))


def assert_same(x, bits, symmetric, **kw):
    want = numpy_search(x, bits, symmetric, **kw)
    got = mse_clip_search(x, bits, symmetric, **kw)
    for g, w in zip(got, want):  # bit for bit, the sign of a zero zero-point included
        np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 128), (40, 3, 64), (300, 1536)])
def test_matches_numpy(bits, symmetric, shape):
    rng = np.random.default_rng(bits + 10 * len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 2, shape[:-1] + (1,))).astype(np.float32)
    x[..., :3] *= 8  # a few outliers per row: the search clips them
    for n in (1, 2):
        with threads(n):
            assert_same(x, bits, symmetric)


@pytest.mark.parametrize("g", [2, 3, 4, 5, 8, 9, 12, 15, 16, 255, 259, 263])
def test_every_tail_of_the_row_loop(g):
    """Rows whose length leaves 0-7 elements after the 8-wide steps of the AVX2 variant (and
    0-3 after the generic one's 4-wide sums, across its 256-element chunks)."""
    rng = np.random.default_rng(g)
    x = (rng.standard_t(3, (40, g)) * 0.05).astype(np.float32)
    for bits, symmetric in [(2, False), (3, True), (4, False), (8, True)]:
        assert_same(x, bits, symmetric)


@pytest.mark.skipif(os.environ.get("OFFQ_DISABLE_SIMD") == "1", reason="already generic")
def test_generic_dispatch_in_subprocess(tmp_path):
    """This file again with the SIMD row error disabled at dispatch (OFFQ_DISABLE_SIMD=1, a fresh
    process): the generic and the AVX2 loops both match the NumPy search."""
    import offq

    root = str(Path(offq.__file__).resolve().parents[1])
    env = dict(os.environ, OFFQ_DISABLE_SIMD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "1 skipped" in r.stdout, r.stdout[-500:]


@pytest.mark.parametrize("symmetric", [True, False])
def test_adversarial_rows(symmetric):
    """Constant, zero, one-element and huge rows; values on round-half ties; a row of +-3e38
    (symmetric only: its max - min overflows, which the asymmetric grid refuses, below); tiny
    subnormal rows; heavy-tailed rows; rows so far from zero that x / scale lies in [2^23, 2^24),
    where floats are integers but adding 2^23 would round odd ones; a small positive minimum."""
    rng = np.random.default_rng(5)
    g = 33
    rows = [np.zeros(g), np.full(g, 3.5), np.full(g, -2.0), np.r_[1.0, np.zeros(g - 1)],
            (np.arange(g) - 16) * 0.5, np.linspace(-3e38, 3e38, g), np.full(g, 1e-42),
            rng.standard_cauchy(g), rng.standard_normal(g) * 1e30, np.r_[-1e6, np.ones(g - 1)],
            2e7 + 2 * np.arange(g), -2e7 - 6 * np.arange(g),
            np.linspace(0.01, 1.0, g)]  # -lo / scale rounds to -0: the zero-point must be +0
    if not symmetric:
        rows = [r for r in rows if np.ptp(np.asarray(r, np.float64)) < 3e38]
        assert len(rows) == 12
    x = np.array(rows, dtype=np.float32)
    with np.errstate(all="ignore"):
        for bits in (2, 4, 8):
            assert_same(x, bits, symmetric)


def test_an_asymmetric_range_that_overflows_is_refused():
    """As the quantizer refuses it (the NumPy search returned an Inf or NaN grid silently)."""
    x = np.ones((3, 8), np.float32)
    x[1, :2] = [-3e38, 3e38]
    with pytest.raises(ValueError, match="x: a group's range max - min overflows float32"):
        mse_clip_search(x, 4, False)
    s, _ = mse_clip_search(x, 4, True)  # the symmetric grid needs only max |x|
    assert np.isfinite(s).all()


def test_other_grids():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 96)).astype(np.float32)
    for grid, shrink in [(10, 0.5), (100, 0.0), (37, 0.9), (1, 0.0)]:
        assert_same(x, 3, False, grid=grid, max_shrink=shrink)


def test_real_shaped_weight_rows():
    """A Qwen2.5-like o_proj-shaped matrix with heavy-tailed rows, per channel and in groups."""
    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, (256, 1536)) * 0.02).astype(np.float32)
    assert_same(w, 4, True)
    assert_same(w.reshape(256, 12, 128), 4, False)
    assert_same(w.reshape(256, 24, 64), 2, False)


@pytest.mark.parametrize("args, error, match", [
    ((np.ones((2, 3), np.float64), 4, True, 100, 80), TypeError, "x: expected dtype float32"),
    ((np.ones((2, 6), np.float32)[:, ::2], 4, True, 100, 80), ValueError, "x: expected a C-cont"),
    ((np.ones((2, 0), np.float32), 4, True, 100, 80), ValueError, "x: expected a last axis"),
    ((np.array([[1, np.nan]], np.float32), 4, True, 100, 80), ValueError, "x: contains NaN"),
    ((np.array([[1, np.inf]], np.float32), 4, False, 100, 80), ValueError, "x: contains NaN"),
    ((np.ones(3, np.float32), 1, True, 100, 80), ValueError, "bits: expected one of 2, 3, 4, 8"),
    ((np.ones(3, np.float32), 5, True, 100, 80), ValueError, "bits: expected one of 2, 3, 4, 8"),
    ((np.ones(3, np.float32), 4, True, 0, 0), ValueError, "grid: expected 1 to 1000"),
    ((np.ones(3, np.float32), 4, True, 1001, 0), ValueError, "grid: expected 1 to 1000"),
    ((np.ones(3, np.float32), 4, True, 100, 100), ValueError, "top: expected 0 <= top < grid"),
    ((np.ones(3, np.float32), 4, True, 100, -1), ValueError, "top: expected"),
    ((np.ones(3, np.float32), 4.0, True, 100, 80), TypeError, "bits"),
])
def test_bad_arguments_are_named(args, error, match):
    x, bits, symmetric, grid, top = args
    with pytest.raises(error, match=match):
        c_search(x, bits=bits, symmetric=symmetric, grid=grid, top=top)


def test_one_dimensional_input_gives_scalars():
    s, z = c_search(np.array([1.0, -2.0, 0.5], np.float32), bits=4, symmetric=False, grid=100,
                    top=80)
    assert s.shape == () and z.shape == ()
    ws, wz = numpy_search(np.array([[1.0, -2.0, 0.5]], np.float32), 4, False)
    assert s == ws[0] and z == wz[0]


def test_symmetric_takes_any_truth_value():
    x = np.array([[1.0, -3.0, 0.5]], np.float32)
    a = c_search(x, bits=4, symmetric=np.True_, grid=100, top=80)
    b = c_search(x, bits=4, symmetric=True, grid=100, top=80)
    assert a == b


def test_a_scalar_is_not_a_row():
    with pytest.raises(ValueError, match="x: expected at least one axis"):
        mse_clip_search(np.float32(3), 4, True)


def test_max_shrink_is_checked():
    with pytest.raises(ValueError, match="max_shrink"):
        mse_clip_search(np.ones((2, 4), np.float32), 4, True, max_shrink=1.0)
