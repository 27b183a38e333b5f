"""tail_subspace (C: OSAQ's Hessian tail by inverse subspace iteration on a Cholesky factor)
against the exact tail of tail_eigenpairs / numpy.linalg.eigh: the budget always holds, the basis
is orthonormal with the returned values as its exact Rayleigh values, the count never exceeds
the exact one and the span matches it; the fallbacks, the argument checks, and OSAQ's solver
switch."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import tail_eigenpairs, tail_subspace, threads
from offq.quantizers.osaq import SUBSPACE_MIN_ORDER, hessian_tail


def site_hessian(k: int, n: int, seed: int = 0) -> np.ndarray:
    """2 X^T X / n of inputs with a few massive channels and lognormal scales (an LLM site)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) * np.exp(rng.standard_normal(k))
    x[:, :3] *= 40.0
    return np.ascontiguousarray(2.0 * x.T @ x / n)


def check_basis(h: np.ndarray, budget: float, vals: np.ndarray, vecs: np.ndarray) -> None:
    m, k = vecs.shape
    assert vals.shape == (m,) and vecs.dtype == vals.dtype == np.float64 and vecs.flags.c_contiguous
    assert np.sum(np.abs(vals)) <= budget
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(m), rtol=0, atol=1e-10)
    scale = max(float(np.abs(vals).max(initial=0.0)), 1e-300)
    # the values are the basis' exact Rayleigh matrix, diagonal: its energy is sum(values)
    np.testing.assert_allclose(vecs @ h @ vecs.T, np.diag(vals), rtol=0, atol=1e-8 * scale)
    assert np.all(np.diff(vals) >= 0)


def span_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the row spaces of a and b."""
    return np.linalg.svd(a @ b.T, compute_uv=False)


@pytest.mark.parametrize("k,n,gamma", [(600, 4000, 1e-4), (600, 4000, 1e-3), (800, 6000, 3e-3)])
def test_same_tail_as_the_exact_reduction(k: int, n: int, gamma: float) -> None:
    h = site_hessian(k, n, seed=k + n)
    budget = gamma * float(np.trace(h))
    vals, vecs, steps = tail_subspace(h, budget, block=32)
    exact_vals, exact_vecs = tail_eigenpairs(h, budget)
    assert steps > 0  # the iteration ran (no fallback)
    check_basis(h, budget, vals, vecs)
    m, exact = len(vals), len(exact_vals)
    assert exact >= m >= exact - max(2, exact // 20), (m, exact)
    # Ritz values bound the eigenvalues from above (to rounding, relative to ||h||)
    assert np.all(vals >= exact_vals[:m] - 1e-12 * np.abs(h).sum(axis=1).max())
    assert span_cosines(vecs, exact_vecs).min() > 0.9  # the same span, to convergence
    assert span_cosines(vecs, exact_vecs).mean() > 0.99


def test_rank_deficient_hessian_takes_its_null_space() -> None:
    """Fewer tokens than channels: an exact null space of dimension k - n, which the Cholesky
    shift makes factor; the tail must contain it."""
    k, n = 500, 420
    h = site_hessian(k, n, seed=1)
    budget = 1e-4 * float(np.trace(h))
    vals, vecs, steps = tail_subspace(h, budget, block=16)
    assert steps > 0
    check_basis(h, budget, vals, vecs)
    exact_vals, exact_vecs = tail_eigenpairs(h, budget)
    assert len(vals) >= k - n
    null = np.linalg.eigh(h)[1][:, :k - n].T
    assert span_cosines(null, vecs).min() > 1 - 1e-8


def test_one_step_still_keeps_the_budget() -> None:
    """However unconverged the basis, its returned energy fits the budget (the final exact
    Rayleigh step), and the count can only be smaller than the exact one."""
    h = site_hessian(600, 4000, seed=5)
    budget = 1e-3 * float(np.trace(h))
    vals, vecs, steps = tail_subspace(h, budget, block=32, max_iter=1)
    assert steps == 1
    check_basis(h, budget, vals, vecs)
    assert len(vals) <= len(tail_eigenpairs(h, budget)[0])


def test_grows_the_block_to_a_long_tail() -> None:
    h = site_hessian(900, 6000, seed=2)
    budget = 2e-3 * float(np.trace(h))
    exact = len(tail_eigenpairs(h, budget)[0])
    assert exact > 24  # longer than the start block
    vals, vecs, _ = tail_subspace(h, budget, block=8)
    check_basis(h, budget, vals, vecs)
    assert len(vals) >= exact - max(2, exact // 20)


def test_fallbacks_give_the_exact_pairs() -> None:
    # a block past k / 2, no positive trace, and an indefinite matrix that no shift makes factor
    h = site_hessian(60, 400, seed=3)
    indefinite = np.diag(np.r_[-1.0, np.arange(1.0, 40.0)])
    for mat, block, budget in ((h, 31, 1e-3 * np.trace(h)), (np.zeros((8, 8)), 1, 0.0),
                               (indefinite, 2, 5.0)):
        vals, vecs, steps = tail_subspace(np.ascontiguousarray(mat), float(budget), block=block)
        ref_vals, ref_vecs = tail_eigenpairs(np.ascontiguousarray(mat), float(budget))
        assert steps == 0
        np.testing.assert_array_equal(vals, ref_vals)
        np.testing.assert_array_equal(vecs, ref_vecs)


def test_deterministic_for_a_seed() -> None:
    h = site_hessian(400, 3000, seed=6)
    budget = 1e-3 * float(np.trace(h))
    with threads(1):
        a = tail_subspace(h, budget, block=16, seed=7)
        b = tail_subspace(h, budget, block=16, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_arguments_name_themselves() -> None:
    """(The checks of h are test_linalg.py's test_bad_h_names_h.)"""
    h = site_hessian(10, 100)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"^block: expected an integer >= 1, got {bad}$"):
            tail_subspace(h, 1.0, block=bad)
    assert tail_subspace(h, 1.0, block=11)[2] == 0  # over k: the fallback (the docstring)
    with pytest.raises(ValueError, match=r"^max_iter: expected 1 <= max_iter"):
        tail_subspace(h, 1.0, block=2, max_iter=0)
    with pytest.raises(ValueError, match=r"^seed: expected a non-negative integer"):
        tail_subspace(h, 1.0, block=2, seed=-1)
    with pytest.raises(TypeError, match=r"^block: "):
        tail_subspace(h, 1.0, block=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^budget: expected a finite number >= 0"):
        tail_subspace(h, float("nan"), block=2)


def test_osaq_solver_switch() -> None:
    """hessian_tail: "exact" is tail_eigenpairs' basis, "subspace" the iteration's, and "auto"
    picks by width (exact below SUBSPACE_MIN_ORDER)."""
    h = site_hessian(600, 4000, seed=9)
    exact = hessian_tail(h, 1e-3, "exact")
    np.testing.assert_array_equal(exact, tail_eigenpairs(h, 1e-3 * float(np.trace(h)))[1])
    np.testing.assert_array_equal(hessian_tail(h, 1e-3, "auto"), exact)
    sub = hessian_tail(h, 1e-3, "subspace")
    assert 0 < len(sub) <= len(exact) and span_cosines(sub, exact).mean() > 0.99
    assert SUBSPACE_MIN_ORDER > 600
    with pytest.raises(ValueError, match=r"^solver: expected one of auto, exact, subspace"):
        hessian_tail(h, 1e-3, "lanczos")


def test_prepared_tail_gram_is_the_basis_rayleigh_matrix() -> None:
    """OSAQ's prepared tail takes N H N^T from the subspace kernel's values instead of forming it
    again: the same matrix, to rounding."""
    from offq.quantizers.osaq import prepare_tail

    h = site_hessian(600, 4000, seed=10)
    for solver in ("subspace", "exact"):
        tail = prepare_tail(h, 1e-3, solver)
        direct = tail.basis @ h @ tail.basis.T
        scale = np.abs(direct).max()
        np.testing.assert_allclose(tail.tail_gram, direct, rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("magnitude", [1e-36, 1.0, 1e36])
def test_float32_solves_keep_the_tail_at_any_scale(magnitude: float) -> None:
    """The iteration factors and solves in float32, on h / (trace / k): a Hessian of any
    magnitude gives the same count and span as at magnitude 1, with the budget kept. Unscaled,
    h's entries at magnitude 1e-36 are below float32's range (and its squares at 1e36 above),
    and with an exact null space the solves reach 1 / delta, up to ~1e7 k / trace."""
    k, n = 500, 420
    h = site_hessian(k, n, seed=5)
    budget = 1e-4 * float(np.trace(h))
    ref_vals, ref_vecs, _ = tail_subspace(h, budget, block=32)
    vals, vecs, steps = tail_subspace(h * magnitude, budget * magnitude, block=32)
    assert steps > 0 and len(vals) == len(ref_vals)
    check_basis(h * magnitude, budget * magnitude, vals, vecs)
    assert span_cosines(vecs, ref_vecs).mean() > 0.999


def test_a_slightly_indefinite_hessian_factors_after_the_shift_grows() -> None:
    """An eigenvalue of -3e-6 of the mean (rounding in a real accumulation) fails the first
    float32 factorization (shift ~1e-6 of the mean); the shift grows tenfold and the iteration
    runs instead of falling back to the reduction."""
    rng = np.random.default_rng(11)
    k = 300
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    lam = np.exp(rng.standard_normal(k))
    lam[0] = -3e-6 * lam.mean()
    h = np.ascontiguousarray((q * lam) @ q.T)
    h = 0.5 * (h + h.T)
    budget = 1e-3 * float(np.trace(h))
    vals, vecs, steps, factor = tail_subspace(h, budget, block=16, keep_factor=True)
    assert steps > 0 and factor is not None
    assert factor.shift > 3e-6  # grown past the negative eigenvalue
    check_basis(h, budget, vals, vecs)
    assert span_cosines(vecs[:1], q[:, :1].T).min() > 1 - 1e-8


def test_kept_factor_is_the_iterated_cholesky_factor() -> None:
    h = site_hessian(400, 3000, seed=12)
    budget = 1e-3 * float(np.trace(h))
    vals, vecs, steps, factor = tail_subspace(h, budget, block=16, keep_factor=True)
    plain = tail_subspace(h, budget, block=16)
    np.testing.assert_array_equal(vals, plain[0])  # keeping the factor changes nothing
    assert steps == plain[2] > 0
    u = factor.u
    assert u.dtype == np.float32 and u.shape == (400, 400) and u.flags.c_contiguous
    assert np.all(np.tril(u, -1) == 0)
    assert factor.scale == pytest.approx(np.trace(h) / 400, rel=1e-12)
    assert 0 < factor.shift < 1e-4
    target = h / factor.scale + factor.shift * np.eye(400)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, target, rtol=0,
                               atol=1e-5 * np.abs(target).max())
    # a fallback keeps no factor
    indefinite = np.ascontiguousarray(np.diag(np.r_[-1.0, np.arange(1.0, 40.0)]))
    assert tail_subspace(indefinite, 5.0, block=2, keep_factor=True)[3] is None


def test_factor_energies_are_w_h_wT() -> None:
    """``scale (|u w|^2 - shift |w|^2) = w h w^T`` against float64, with a shift large enough
    that leaving its term out fails, over more rows than one triangular product takes (512),
    with zero, tiny and huge rows."""
    from offq.kernels import TailFactor

    k = 300
    h = site_hessian(k, 2000, seed=13)
    scale, shift = 3.7, 0.25
    u = np.ascontiguousarray(np.linalg.cholesky(h / scale + shift * np.eye(k)).T, np.float32)
    # the reference through the float32 factor itself (its rounding is not under test)
    h_of_u = scale * (u.T.astype(np.float64) @ u - shift * np.eye(k))
    rng = np.random.default_rng(14)
    w = rng.standard_normal((1100, k)).astype(np.float32)
    w[3] = 0.0
    w[5] *= np.float32(1e-20)
    w[700] *= np.float32(1e15)
    w[1099] = np.eye(k, dtype=np.float32)[k - 1]
    got = TailFactor(u, scale, shift).energies(w)
    w64 = w.astype(np.float64)
    ref = np.einsum("ij,jk,ik->i", w64, h_of_u, w64)
    assert got.dtype == np.float64 and got.shape == (1100,)
    assert got[3] == 0.0
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=0)


def test_factor_energies_bad_arguments_name_themselves() -> None:
    from offq import _C

    u = np.eye(4, dtype=np.float32)
    w = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match=r"^u: expected dtype float32"):
        _C.factor_energies(u.astype(np.float64), 1.0, 0.0, w)
    with pytest.raises(ValueError, match=r"^u: expected a square array"):
        _C.factor_energies(np.ones((4, 3), np.float32), 1.0, 0.0, w)
    with pytest.raises(ValueError, match=r"^w: expected rows of length 4"):
        _C.factor_energies(u, 1.0, 0.0, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"^w: expected a C-contiguous"):
        _C.factor_energies(u, 1.0, 0.0, np.ones((4, 3), np.float32).T)
    with pytest.raises(TypeError, match=r"^w: expected dtype float32"):
        _C.factor_energies(u, 1.0, 0.0, w.astype(np.float64))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^scale: expected a finite number > 0"):
            _C.factor_energies(u, bad, 0.0, w)
    with pytest.raises(ValueError, match=r"^shift: expected a finite number >= 0"):
        _C.factor_energies(u, 1.0, -1e-3, w)
    assert _C.factor_energies(u, 1.0, 0.0, np.ones((0, 4), np.float32)).shape == (0,)
    # non-finite entries came back as NaN energies
    u_nan, w_inf = u.copy(), w.copy()
    u_nan[2, 3], w_inf[1, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"^u: contains NaN or Inf"):
        _C.factor_energies(u_nan, 1.0, 0.0, w)
    with pytest.raises(ValueError, match=r"^w: contains NaN or Inf"):
        _C.factor_energies(u, 1.0, 0.0, w_inf)


@pytest.mark.parametrize("k", [1, 16, 100])
def test_a_hessian_narrower_than_the_default_block_falls_back(k):
    """The default block (128) over a small ``h`` is the documented fallback, not an error."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((4 * k, k))
    x[:, 0] *= 1e-4  # one tiny direction, so the tail is not empty
    h = x.T @ x
    budget = 1e-3 * float(np.trace(h))
    vals, vecs, steps = tail_subspace(h, budget)
    exact_vals, exact_vecs = tail_eigenpairs(h, budget)
    assert steps == 0 and vals.shape == exact_vals.shape and vecs.shape == exact_vecs.shape
    np.testing.assert_allclose(vals, exact_vals)
