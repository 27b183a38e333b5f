"""cov_update and top_eigenpairs against NumPy (x.T @ x in float64, numpy.linalg.eigh)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offq import _C
from offq.kernels import cov_mirror, cov_update, top_eigenpairs


def top1_reference(x: np.ndarray) -> np.ndarray:
    """Rows of x[batch, tokens, d] with the largest max |.| per sequence (first on ties)."""
    idx = np.abs(x).max(axis=-1).argmax(axis=-1)
    return x[np.arange(x.shape[0]), idx]


@pytest.mark.parametrize("acc_dtype,x_dtype", [(np.float64, np.float32), (np.float32, np.float32),
                                               (np.float64, np.float64)])
def test_cov_update_matches_numpy(acc_dtype, x_dtype):
    rng = np.random.default_rng(0)
    d = 67  # odd size
    acc = np.zeros((d, d), acc_dtype)
    ref = np.zeros((d, d))
    for rows in [1, 130, 33, 300]:  # 300 > 256: the float32-scratch path of a float64 acc
        x = (rng.standard_normal((rows, d)) * 3 + 1).astype(x_dtype)
        assert cov_update(acc, x) is acc
        ref += x.astype(np.float64).T @ x.astype(np.float64)
    tol = 1e-12 if x_dtype == np.float64 else 2e-6
    np.testing.assert_allclose(acc, ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert np.array_equal(acc, acc.T)


@pytest.mark.parametrize("acc_dtype,x_dtype", [(np.float64, np.float32), (np.float32, np.float32),
                                               (np.float64, np.float64)])
def test_cov_update_without_mirror_leaves_the_lower_triangle_until_cov_mirror(acc_dtype, x_dtype):
    # a stream that mirrors once at its end: the upper triangle gets the same numbers, bit for
    # bit, as updates that mirror every time; the lower one keeps what it held (a sentinel)
    rng = np.random.default_rng(2)
    d = 300  # >= 256: the threaded add and mirror; rows > 256: the float32-scratch path
    mirrored = np.zeros((d, d), acc_dtype)
    lazy = np.zeros((d, d), acc_dtype)
    below = np.tril_indices(d, -1)
    lazy[below] = -7.0
    for rows in [1, 400, 33, 300]:
        x = (rng.standard_normal((rows, d)) * 3 + 1).astype(x_dtype)
        cov_update(mirrored, x)
        assert cov_update(lazy, x, mirror=False) is lazy
    upper = np.triu_indices(d)
    np.testing.assert_array_equal(lazy[upper], mirrored[upper])
    assert np.all(lazy[below] == -7.0)
    assert cov_mirror(lazy) is lazy
    np.testing.assert_array_equal(lazy, mirrored)
    with pytest.raises(ValueError, match="acc: expected a square"):
        cov_mirror(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="acc: expected dtype float32 or float64"):
        cov_mirror(np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="acc: expected a C-contiguous"):
        cov_mirror(np.zeros((8, 4))[::2])


def test_cov_update_leading_shapes_and_empty():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 16)).astype(np.float32)
    acc = np.zeros((16, 16))
    cov_update(acc, x)
    flat = x.reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(acc, flat.T @ flat, rtol=1e-5, atol=1e-5)
    before = acc.copy()
    cov_update(acc, np.zeros((0, 16), np.float32))
    np.testing.assert_array_equal(acc, before)
    acc1 = np.zeros((16, 16))
    cov_update(acc1, x[0, 0, 0])  # a single 1-D token
    np.testing.assert_allclose(acc1, np.outer(x[0, 0, 0], x[0, 0, 0]), rtol=1e-6)


@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
def test_top1_selects_largest_linf_token(x_dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 9, 24)).astype(x_dtype)
    x[2, 4, 7] = -50.0  # negative outlier: L-inf uses |.|
    x[3, :, :] = 1.0  # ties: the first token wins
    x[3, 0, 0] = -1.0
    acc = np.zeros((24, 24))
    cov_update(acc, x, top1=True)
    t = top1_reference(x).astype(np.float64)
    np.testing.assert_allclose(acc, t.T @ t, rtol=1e-6, atol=1e-6)
    acc32 = np.zeros((24, 24), np.float32)
    if x_dtype == np.float32:
        cov_update(acc32, x, top1=True)
        np.testing.assert_allclose(acc32, t.T @ t, rtol=1e-5, atol=1e-4)


def test_huge_magnitudes_and_nan_propagation():
    x = np.zeros((3, 4, 8), np.float32)
    x[:, 0, 0] = 1e18
    acc = np.zeros((8, 8))
    cov_update(acc, x, top1=True)
    assert acc[0, 0] == pytest.approx(3e36, rel=1e-6) and np.isfinite(acc).all()
    x = np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)
    x[1, 3, 2] = np.nan  # the NaN token is selected and the NaN propagates
    acc = np.zeros((8, 8))
    cov_update(acc, x, top1=True)
    assert np.isnan(acc[2, :]).all() and np.isnan(acc[:, 2]).all()
    x = np.ones((4, 8), np.float32)
    x[0, 5] = np.inf
    acc = np.zeros((8, 8), np.float32)
    cov_update(acc, x)
    assert np.isinf(acc[5, 5]) and np.isfinite(acc[0, 1])


def test_cov_update_validation():
    acc = np.zeros((8, 8))
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(TypeError, match="acc: expected dtype float32 or float64"):
        cov_update(acc.astype(np.int64), x)
    with pytest.raises(ValueError, match="acc: expected a square"):
        cov_update(np.zeros((8, 7)), x)
    with pytest.raises(ValueError, match="acc: expected 2 dimensions"):
        cov_update(np.zeros(8), x)
    with pytest.raises(ValueError, match="acc: expected a C-contiguous"):
        cov_update(np.zeros((16, 8))[::2], x)
    ro = np.zeros((8, 8))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="acc: expected a writeable"):
        cov_update(ro, x)
    with pytest.raises(TypeError, match="x: expected dtype float32 .acc is float32"):
        cov_update(np.zeros((8, 8), np.float32), x.astype(np.float64))
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        cov_update(acc, x.astype(np.float16))
    with pytest.raises(ValueError, match="x: expected a last axis of length d=8"):
        cov_update(acc, np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        cov_update(acc, np.zeros((8, 3), np.float32).T)
    with pytest.raises(ValueError, match=r"x: top1=True expects \[batch, tokens, d\]"):
        cov_update(acc, x, top1=True)
    with pytest.raises(ValueError, match="x: top1=True needs at least one token"):
        cov_update(acc, np.zeros((2, 0, 8), np.float32), top1=True)
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        cov_update(acc, [[0.0] * 8])
    with pytest.raises(TypeError, match="x: expected native byte order"):
        cov_update(acc, x.astype(">f4"))
    with pytest.raises(TypeError, match="acc: expected native byte order"):
        cov_update(acc.astype(">f8"), x)
    buf = np.zeros(8 * 8 + 16)
    with pytest.raises(ValueError, match="x: must not share memory with acc"):
        cov_update(buf[:64].reshape(8, 8), buf[48:].reshape(4, 8))


def random_spd(d: int, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = np.exp(-spread * np.arange(d) / d * 8)
    return (q * w) @ q.T


@pytest.mark.parametrize("d,k", [(1, 1), (2, 2), (16, 3), (64, 1), (100, 8), (257, 5), (40, 40)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_top_eigenpairs_matches_eigh(d, k, dtype):
    rng = np.random.default_rng(d * 7 + k)
    c = random_spd(d, rng)
    c = (c + c.T) / 2
    c = c.astype(dtype)
    w, v = top_eigenpairs(c, k)
    c64 = c.astype(np.float64)
    wr, vr = np.linalg.eigh(c64)
    wr, vr = wr[::-1][:k], vr[:, ::-1][:, :k]
    assert w.shape == (k,) and v.shape == (d, k) and w.dtype == np.float64
    np.testing.assert_allclose(w, wr, rtol=1e-9, atol=1e-9 * wr[0])
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(np.abs((v * vr).sum(axis=0)), 1.0, atol=1e-6)  # simple spectrum
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(c64 @ v, v * w, atol=1e-8 * wr[0])
    big = np.abs(v).argmax(axis=0)
    assert np.all(v[big, np.arange(k)] > 0)  # sign convention


def test_top_eigenpairs_degenerate_and_low_rank():
    w, v = top_eigenpairs(np.eye(10), 3)
    np.testing.assert_allclose(w, 1.0)
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
    c = np.zeros((12, 12))
    c[3, 3] = 5.0
    w, v = top_eigenpairs(c, 4)
    np.testing.assert_allclose(w, [5, 0, 0, 0], atol=1e-12)
    assert abs(v[3, 0]) == pytest.approx(1.0)
    # the OffQ use: one massive direction on top of noise, from top-1 tokens
    rng = np.random.default_rng(5)
    u = rng.standard_normal(64)
    u /= np.linalg.norm(u)
    x = rng.standard_normal((32, 10, 64)).astype(np.float32)
    x[:, 0, :] += (300 * u).astype(np.float32)
    acc = np.zeros((64, 64))
    cov_update(acc, x, top1=True)
    w, v = top_eigenpairs(acc, 1)
    assert abs(v[:, 0] @ u) > 0.999
    # a repeated top eigenvalue with a gap below
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    lam = np.r_[[4.0, 4.0, 4.0], np.linspace(1, 0, 27)]
    c = (q * lam) @ q.T
    w, v = top_eigenpairs(c, 3)
    np.testing.assert_allclose(w, 4.0, rtol=1e-9)
    p_ref = q[:, :3] @ q[:, :3].T
    np.testing.assert_allclose(v @ v.T, p_ref, atol=1e-7)  # same eigenspace


def test_top_eigenpairs_validation():
    c = np.eye(4)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= d=4"):
        top_eigenpairs(c, 5)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= d=4"):
        top_eigenpairs(c, 0)
    with pytest.raises(TypeError, match="k: expected an int"):
        top_eigenpairs(c, 1.5)
    with pytest.raises(ValueError, match="cov: expected a square"):
        top_eigenpairs(np.eye(4)[:3], 1)
    with pytest.raises(TypeError, match="cov: expected dtype"):
        top_eigenpairs(np.eye(4, dtype=np.int32), 1)
    with pytest.raises(ValueError, match="cov: expected a C-contiguous"):
        top_eigenpairs(np.eye(8)[::2, ::2], 1)
    bad = np.eye(4)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="cov: contains NaN or Inf"):
        top_eigenpairs(bad, 1)
    with pytest.raises(TypeError, match="cov: expected native byte order"):
        top_eigenpairs(c.astype(">f8"), 1)
    with pytest.raises(ValueError, match=r"^tol: expected 0 < tol < 1, got 1\.5$"):
        top_eigenpairs(c, 1, tol=1.5)
    # an array's own __index__ error used to pass through without naming the argument
    for seed in (np.array([1, 2]), -1, 1.0, True):
        with pytest.raises(TypeError, match="^seed: expected a non-negative int"):
            _C.top_eigenpairs(c, 1, 1e-6, seed)

    class NoMemory:  # an error that is not the argument's type stays what it is
        def __index__(self):
            raise MemoryError("out of memory")

    with pytest.raises(MemoryError, match="out of memory"):
        _C.top_eigenpairs(c, 1, 1e-6, NoMemory())


def test_generic_path_runs_cov(tmp_path):
    """cov has no SIMD variants of its own; still run it with dispatch forced off."""
    import offq

    root = str(Path(offq.__file__).resolve().parents[1])
    env = dict(os.environ, OFFQ_DISABLE_SIMD="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', "
            "'matches_numpy or top1', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cov_accumulator_is_a_zeroed_square_that_cov_update_takes(dtype):
    from offq.kernels import cov_accumulator

    acc = cov_accumulator(37, dtype)
    assert acc.shape == (37, 37) and acc.dtype == dtype and acc.flags.c_contiguous
    assert acc.flags.writeable and not np.any(acc)
    x = np.random.default_rng(0).standard_normal((300, 37)).astype(np.float32)
    if dtype is np.float64:
        cov_update(acc, x)
        np.testing.assert_allclose(acc, x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-4)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="^d: expected a positive integer"):
            cov_accumulator(bad)


def test_hessian_and_statistics_accumulators_start_from_cov_accumulator(monkeypatch):
    """Both streaming accumulators take their d x d sum from cov_accumulator (pages faulted in
    order; see its docstring), not from np.zeros."""
    import offq.quantizers.gptq as gptq
    import offq.recipe.statistics as statistics

    made = []

    def spy(d, dtype=np.float64):
        made.append(d)
        out = np.empty((d, d), dtype)
        out.fill(0)
        return out

    monkeypatch.setattr(gptq, "cov_accumulator", spy)
    monkeypatch.setattr(statistics, "cov_accumulator", spy)
    gptq.HessianAccumulator(11)
    statistics.SecondMoment(13, centred=False)
    assert made == [11, 13]


# ---------------------------------------------------------------------- found by mutation
def test_top1_moment_is_the_largest_token_s_outer_product():
    """The top-1 statistic of R2's PCA: the token of largest magnitude, not the smallest."""
    from offq.recipe.statistics import _top1_moment

    x = np.array([[[1.0, 0.0], [5.0, 0.0], [0.0, 0.1]]])
    np.testing.assert_allclose(_top1_moment(x), [[25.0, 0.0], [0.0, 0.0]])


def test_centred_second_moment_is_the_centred_scatter():
    """sum (x - mean)(x - mean)^T over every token, from the streamed sums (x^T x - n m m^T:
    dropping the n leaves an error of ~95 here)."""
    from offq.recipe.statistics import SecondMoment

    x = (np.random.default_rng(0).standard_normal((2, 5, 4)) + 3).astype(np.float32)
    m = SecondMoment(4, centred=True)
    m.add(x, top1=False)
    r = x.reshape(-1, 4).astype(np.float64)
    r -= r.mean(0)
    np.testing.assert_allclose(m.matrix(), r.T @ r, rtol=0, atol=1e-9)
