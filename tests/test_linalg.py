"""upper_cholesky_of_inverse (C: LAPACK potrf + trtri of the reversed matrix) against NumPy's
inverse, its failure signal (None) for matrices that are not positive definite, argument checks,
and its use by GPTQ's factor_hessian (same factor as the inverse-then-Cholesky it replaced)."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import threads, upper_cholesky_of_inverse
from offq.quantizers.gptq import factor_hessian, gptq_quantize


def random_spd(k: int, seed: int = 0, extra_rows: int = 16) -> np.ndarray:
    """x^T x / n for Gaussian x [k + extra_rows, k] with uneven column scales: SPD, cond ~1e3."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k + extra_rows, k)) * np.exp(rng.uniform(-1.5, 1.5, size=k))
    return x.T @ x / x.shape[0]


def old_factor(h: np.ndarray, add: float) -> np.ndarray:
    """The factor GPTQ used before: upper Cholesky factor of the explicit inverse."""
    hinv = np.linalg.inv(h + add * np.eye(h.shape[0]))
    return np.linalg.cholesky((hinv + hinv.T) / 2).T


def check_structure(u: np.ndarray, k: int) -> None:
    assert isinstance(u, np.ndarray) and u.dtype == np.float64 and u.shape == (k, k)
    assert u.flags.c_contiguous
    assert np.all(np.tril(u, -1) == 0.0), "the strictly lower triangle must be exactly zero"
    assert np.all(np.diag(u) > 0) and np.all(np.isfinite(u))


@pytest.mark.parametrize("k", [1, 2, 7, 128, 1000])
@pytest.mark.parametrize("rel_add", [0.0, 0.01])
def test_matches_numpy_inverse(k: int, rel_add: float) -> None:
    h = random_spd(k, seed=k)
    add = rel_add * float(np.mean(np.diag(h)))
    h_before = h.copy()
    u = upper_cholesky_of_inverse(h, add)
    check_structure(u, k)
    np.testing.assert_array_equal(h, h_before)  # input untouched
    ref = np.linalg.inv(h + add * np.eye(k))
    err = np.abs(u.T @ u - ref).max() / np.abs(ref).max()
    assert err < 1e-11, err
    # the upper Cholesky factor of a matrix with a positive diagonal is unique: it is the old one
    old = old_factor(h, add)
    assert np.abs(u - old).max() / np.abs(old).max() < 1e-10


def test_one_by_one_is_exact() -> None:
    u = upper_cholesky_of_inverse(np.array([[4.0]]), 12.0)
    assert u.shape == (1, 1) and u[0, 0] == 0.25


def test_diagonal_matrix_is_exact() -> None:
    d = np.array([4.0, 1.0, 0.25, 16.0, 9.0])
    u = upper_cholesky_of_inverse(np.diag(d), 0.0)
    np.testing.assert_array_equal(u, np.diag(1.0 / np.sqrt(d)))


def test_only_the_upper_triangle_is_read() -> None:
    h = random_spd(40, seed=3)
    garbage = h.copy()
    garbage[np.tril_indices(40, -1)] = np.random.default_rng(4).standard_normal(40 * 39 // 2)
    np.testing.assert_array_equal(upper_cholesky_of_inverse(garbage, 0.5),
                                  upper_cholesky_of_inverse(h, 0.5))


def test_ill_conditioned() -> None:
    """cond(H) = 1e10: u reproduces H (backward stable) and inv(H) to ~cond * eps."""
    k = 200
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((k, k)))
    h = (q * np.logspace(0, -10, k)) @ q.T
    h = (h + h.T) / 2
    u = upper_cholesky_of_inverse(h, 0.0)
    check_structure(u, k)
    r = np.linalg.inv(u)  # = the reversed Cholesky factor: H = r r^T
    assert np.abs(r @ r.T - h).max() / np.abs(h).max() < 1e-13
    ref = np.linalg.inv(h)
    assert np.abs(u.T @ u - ref).max() / np.abs(ref).max() < 1e-4


def test_not_positive_definite_returns_none() -> None:
    k = 50
    v = np.ones(k) / np.sqrt(k)
    indefinite = np.eye(k) - 3.0 * np.outer(v, v)  # one eigenvalue -2
    assert upper_cholesky_of_inverse(indefinite, 0.0) is None
    assert upper_cholesky_of_inverse(indefinite, 1.0) is None  # still -1
    assert upper_cholesky_of_inverse(indefinite, 2.5) is not None  # smallest eigenvalue 0.5
    assert upper_cholesky_of_inverse(np.zeros((5, 5)), 0.0) is None
    assert upper_cholesky_of_inverse(-np.eye(3), 0.0) is None
    # the first pivot LAPACK sees (h's last diagonal entry, after the reversal) and the last one
    for bad in (0, k - 1):
        h = random_spd(k, seed=6)
        h[bad, bad] = -1.0
        assert upper_cholesky_of_inverse(h, 0.0) is None


def test_singular_with_damping_succeeds() -> None:
    x = np.random.default_rng(7).standard_normal((10, 30))
    h = x.T @ x  # rank 10
    u = upper_cholesky_of_inverse(h, 1e-2)
    check_structure(u, 30)
    ref = np.linalg.inv(h + 1e-2 * np.eye(30))
    assert np.abs(u.T @ u - ref).max() / np.abs(ref).max() < 1e-10


def test_two_threads_same_factor() -> None:
    h = random_spd(300, seed=8)
    u1 = upper_cholesky_of_inverse(h, 0.1)
    with threads(2):
        u2 = upper_cholesky_of_inverse(h, 0.1)
    assert np.abs(u1 - u2).max() / np.abs(u1).max() < 1e-12


def test_bad_arguments_name_the_argument() -> None:
    h = random_spd(6)
    with pytest.raises(TypeError, match=r"^h: .*float64.*float32"):
        upper_cholesky_of_inverse(h.astype(np.float32), 0.0)
    with pytest.raises(TypeError, match=r"^h: expected a numpy.ndarray"):
        upper_cholesky_of_inverse(h.tolist(), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^h: expected 2 dimensions"):
        upper_cholesky_of_inverse(np.ones(6), 0.0)
    with pytest.raises(ValueError, match=r"^h: expected a square"):
        upper_cholesky_of_inverse(np.ones((6, 5)), 0.0)
    with pytest.raises(ValueError, match=r"^h: expected a square"):
        upper_cholesky_of_inverse(np.ones((0, 0)), 0.0)
    with pytest.raises(ValueError, match=r"^h: expected a C-contiguous"):
        upper_cholesky_of_inverse(np.asfortranarray(h + np.triu(h, 1)), 0.0)
    with pytest.raises(ValueError, match=r"^h: expected a C-contiguous"):
        upper_cholesky_of_inverse(random_spd(12)[::2, ::2], 0.0)
    with pytest.raises(TypeError, match=r"^h: expected native byte order"):
        upper_cholesky_of_inverse(h.astype(">f8"), 0.0)
    nan = h.copy()
    nan[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"^h: contains NaN or Inf"):
        upper_cholesky_of_inverse(nan, 0.0)
    for bad in (-1e-3, np.nan, np.inf):
        with pytest.raises(ValueError, match=r"^add: expected a finite number >= 0"):
            upper_cholesky_of_inverse(h, bad)
    with pytest.raises(TypeError, match=r"^add: expected a number"):
        upper_cholesky_of_inverse(h, "0.1")  # type: ignore[arg-type]


def test_factor_hessian_matches_the_old_factor() -> None:
    k = 160
    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, k)) * np.exp(rng.uniform(-2, 1.5, size=k))
    h = 2 * x.T @ x / x.shape[0]
    f = factor_hessian(h, damp=0.01, act_order=True)
    hp = h[np.ix_(f.perm, f.perm)]
    old = old_factor(hp, 0.01 * float(np.mean(np.diag(hp))))
    assert np.abs(f.u - old).max() / np.abs(old).max() < 1e-12
    with pytest.raises(ValueError, match="damp"):
        factor_hessian(h, damp=-0.01)


def test_gptq_codes_with_old_and_new_factor() -> None:
    """The two factors differ by rounding only, so GPTQ's codes agree up to rare ties."""
    k, n_out = 256, 128
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1024, k)) * np.exp(rng.uniform(-2, 1.5, size=k))
    h = 2 * x.T @ x / x.shape[0]
    w = (rng.standard_normal((n_out, k)) * 0.05).astype(np.float32)
    new = factor_hessian(h, damp=0.01, act_order=True)
    hp = h[np.ix_(new.perm, new.perm)]
    old = type(new)(new.dead, new.perm, old_factor(hp, 0.01 * float(np.mean(np.diag(hp)))))
    a = gptq_quantize(w, factor=new, bits=4, group_size=128)
    b = gptq_quantize(w, factor=old, bits=4, group_size=128)
    differ = int(np.count_nonzero(a.codes != b.codes))
    assert differ <= a.codes.size // 1000, differ  # at most 0.1 % (a handful of ties)
