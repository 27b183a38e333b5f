"""upper_cholesky_of_inverse (C: LAPACK potrf + trtri of the reversed matrix) against NumPy's
inverse, udu_factor (the same potrf without trtri: H = S diag(d) S^T) against H itself, their
failure signal (None) for matrices that are not positive definite, argument checks
(those of h shared with smallest_eigenpairs, whose own tests are in test_eigenpairs.py),
and GPTQ's factor_hessian (udu_factor: NumPy's factor to rounding, the inverse of the old one)."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import (smallest_eigenpairs, tail_eigenpairs, tail_subspace, threads,
                          udu_factor, upper_cholesky_of_inverse)
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


def udu_s(h: np.ndarray, add: float = 0.0, **kw) -> np.ndarray | None:
    """udu_factor's unit upper factor (None when it returns None)."""
    out = udu_factor(h, add, **kw)
    return None if out is None else out[0]


#: the two factorizations of the damped (permuted) matrix: same arguments, same checks
FACTORIZATIONS = {"upper_cholesky_of_inverse": upper_cholesky_of_inverse, "udu_factor": udu_s}


@pytest.mark.parametrize("k", [1, 2, 7, 128, 1000])
@pytest.mark.parametrize("rel_add", [0.0, 0.01])
def test_udu_factor_reproduces_the_matrix(k: int, rel_add: float) -> None:
    """s diag(d) s^T = h + add I to rounding, s unit upper triangular (exact ones and zeros),
    and s diag(sqrt d) is the inverse of upper_cholesky_of_inverse's factor (GPTQ's old one)."""
    h = random_spd(k, seed=k)
    add = rel_add * float(np.mean(np.diag(h)))
    h_before = h.copy()
    s, d = udu_factor(h, add)
    np.testing.assert_array_equal(h, h_before)  # input untouched
    assert s.dtype == d.dtype == np.float64 and s.shape == (k, k) and d.shape == (k,)
    assert s.flags.c_contiguous and np.all(d > 0) and np.all(np.isfinite(s))
    np.testing.assert_array_equal(np.diag(s), 1.0)
    np.testing.assert_array_equal(np.tril(s, -1), 0.0)
    m = h + add * np.eye(k)
    assert np.abs((s * d) @ s.T - m).max() / np.abs(m).max() < 1e-13
    u = upper_cholesky_of_inverse(h, add)
    r = s * np.sqrt(d)
    assert np.abs(r @ u - np.eye(k)).max() < 1e-9


@pytest.mark.parametrize("k", [1, 7, 128, 1000])
@pytest.mark.parametrize("permuted", [False, True])
def test_udu_factor_in_float32_is_the_float64_factor_to_float32_rounding(k: int,
                                                                        permuted: bool) -> None:
    """single=True: the same structure (exact unit diagonal, zero lower part), s float32 and d
    float64, the same factor to float32's rounding times a modest growth, and really computed in
    float32 (the differences from the float64 factor are far above float64's rounding)."""
    h = random_spd(k, seed=k + 1)
    rng = np.random.default_rng(k)
    perm = rng.permutation(k).astype(np.int64) if permuted else None
    diag = np.diag(h) * rng.uniform(1.0, 2.0, size=k) if permuted else None  # stays SPD
    add = 0.01 * float(np.mean(np.diag(h)))
    s64, d64 = udu_factor(h, add, perm=perm, diag=diag)
    s32, d32 = udu_factor(h, add, perm=perm, diag=diag, single=True)
    assert s32.dtype == np.float32 and d32.dtype == np.float64 and s32.flags.c_contiguous
    np.testing.assert_array_equal(np.diag(s32), 1.0)
    np.testing.assert_array_equal(np.tril(s32, -1), 0.0)
    assert np.all(d32 > 0) and np.all(np.isfinite(s32))
    m = (s64 * d64) @ s64.T  # the damped, permuted matrix (float64 factor: exact to 1e-13)
    s32 = s32.astype(np.float64)
    err = np.abs((s32 * d32) @ s32.T - m).max() / np.abs(m).max()
    assert err < 2e-6, err
    assert np.abs(d32 / d64 - 1).max() < 1e-4
    if k > 1:
        assert np.abs(s32 - s64).max() > 1e-10  # float32 arithmetic, not float64's


def test_a_factor_float32_cannot_take_falls_back_to_float64() -> None:
    """All-ones plus 1e-9 I is positive definite in float64 but rounds to the singular all-ones
    matrix in float32: udu_factor(single=True) says None, and GPTQ's factor_hessian with
    dtype='float32' takes the float64 factor at the same damping (no retry, no warning)."""
    k = 40
    h = np.ones((k, k)) + 1e-9 * np.eye(k)
    assert udu_factor(h, 0.0, single=True) is None
    s64, d64 = udu_factor(h, 0.0)
    f = factor_hessian(h, damp=0.0, act_order=False, dtype="float32")
    assert f.damp == 0.0
    np.testing.assert_array_equal(f.s, s64)
    np.testing.assert_array_equal(f.d, d64)
    with pytest.raises(ValueError, match="dtype: expected 'float64', 'float32' or 'auto'"):
        factor_hessian(h, dtype="float16")
    with pytest.raises(TypeError, match="single: expected a bool"):
        udu_factor(h, 0.0, single=np.array([True, False]))


def test_udu_factor_of_a_diagonal_matrix_is_exact() -> None:
    d = np.array([4.0, 1.0, 0.25, 16.0, 9.0])
    s, got = udu_factor(np.diag(d), 0.5)
    np.testing.assert_array_equal(s, np.eye(5))
    np.testing.assert_allclose(got, d + 0.5, rtol=1e-15)  # sqrt, then squared


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


@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_only_the_upper_triangle_is_read(factorize_name: str) -> None:
    factorize = FACTORIZATIONS[factorize_name]
    h = random_spd(40, seed=3)
    garbage = h.copy()
    garbage[np.tril_indices(40, -1)] = np.random.default_rng(4).standard_normal(40 * 39 // 2)
    np.testing.assert_array_equal(factorize(garbage, 0.5),
                                  factorize(h, 0.5))


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


@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_not_positive_definite_returns_none(factorize_name: str) -> None:
    factorize = FACTORIZATIONS[factorize_name]
    k = 50
    v = np.ones(k) / np.sqrt(k)
    indefinite = np.eye(k) - 3.0 * np.outer(v, v)  # one eigenvalue -2
    assert factorize(indefinite, 0.0) is None
    assert factorize(indefinite, 1.0) is None  # still -1
    assert factorize(indefinite, 2.5) is not None  # smallest eigenvalue 0.5
    assert factorize(np.zeros((5, 5)), 0.0) is None
    assert factorize(-np.eye(3), 0.0) is None
    # the first pivot LAPACK sees (h's last diagonal entry, after the reversal) and the last one
    for bad in (0, k - 1):
        h = random_spd(k, seed=6)
        h[bad, bad] = -1.0
        assert factorize(h, 0.0) is None


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


#: every entry point of bind_linalg.c, each called with only h varying (the others valid)
H_CALLS = {"upper_cholesky_of_inverse": lambda h: upper_cholesky_of_inverse(h, 0.0),
           "udu_factor": lambda h: udu_factor(h, 0.0),
           "smallest_eigenpairs": lambda h: smallest_eigenpairs(h, 1),
           "tail_eigenpairs": lambda h: tail_eigenpairs(h, 1.0),
           "tail_subspace": lambda h: tail_subspace(h, 1.0, block=1)}


@pytest.mark.parametrize("name", sorted(H_CALLS))
def test_bad_h_names_h(name: str) -> None:
    """The binding's checks of h, shared by every dense-factorization entry point."""
    call = H_CALLS[name]
    h = random_spd(6)
    with pytest.raises(TypeError, match=r"^h: .*float64.*float32"):
        call(h.astype(np.float32))
    with pytest.raises(TypeError, match=r"^h: expected a numpy.ndarray"):
        call(h.tolist())
    with pytest.raises(ValueError, match=r"^h: expected 2 dimensions"):
        call(np.ones(6))
    with pytest.raises(ValueError, match=r"^h: expected a square"):
        call(np.ones((6, 5)))
    with pytest.raises(ValueError, match=r"^h: expected a square"):
        call(np.ones((0, 0)))
    with pytest.raises(ValueError, match=r"^h: expected a C-contiguous"):
        call(np.asfortranarray(h + np.triu(h, 1)))
    with pytest.raises(ValueError, match=r"^h: expected a C-contiguous"):
        call(random_spd(12)[::2, ::2])
    with pytest.raises(TypeError, match=r"^h: expected native byte order"):
        call(h.astype(">f8"))
    nan = h.copy()
    nan[1, 4] = np.nan  # in the upper triangle, which both read
    with pytest.raises(ValueError, match=r"^h: contains NaN or Inf"):
        call(nan)


@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_bad_add_names_add(factorize_name: str) -> None:
    factorize = FACTORIZATIONS[factorize_name]
    h = random_spd(6)
    for bad, text in ((-1e-3, "-0.001"), (np.nan, "nan"), (np.inf, "inf")):
        with pytest.raises(ValueError, match=rf"^add: expected a finite number >= 0, got {text}$"):
            factorize(h, bad)
    with pytest.raises(TypeError, match=r"^add: expected a number"):
        factorize(h, "0.1")  # type: ignore[arg-type]


def numpy_udu(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy's route to m = s diag(d) s^T: the lower Cholesky factor of the reversed matrix."""
    lower = np.linalg.cholesky(m[::-1, ::-1])
    r = lower[::-1, ::-1]  # upper, m = r r^T
    d = np.diag(r).copy()
    return r / d, d * d


def test_factor_hessian_matches_numpy() -> None:
    k = 160
    rng = np.random.default_rng(9)
    x = rng.standard_normal((400, k)) * np.exp(rng.uniform(-2, 1.5, size=k))
    h = 2 * x.T @ x / x.shape[0]
    f = factor_hessian(h, damp=0.01, act_order=True)
    hp = h[np.ix_(f.perm, f.perm)]
    s, d = numpy_udu(hp + 0.01 * float(np.mean(np.diag(hp))) * np.eye(k))
    assert np.abs(f.s - s).max() < 1e-11
    np.testing.assert_allclose(f.d, d, rtol=1e-12)
    # and the factor GPTQ used before (upper Cholesky of the inverse) is its inverse
    old = old_factor(hp, 0.01 * float(np.mean(np.diag(hp))))
    assert np.abs((f.s * np.sqrt(f.d)) @ old - np.eye(k)).max() < 1e-10
    with pytest.raises(ValueError, match="damp"):
        factor_hessian(h, damp=-0.01)


def test_gptq_codes_with_kernel_and_numpy_factor() -> None:
    """The kernel's factor and NumPy's differ by rounding only, so GPTQ's codes agree up to rare
    ties."""
    k, n_out = 256, 128
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1024, k)) * np.exp(rng.uniform(-2, 1.5, size=k))
    h = 2 * x.T @ x / x.shape[0]
    w = (rng.standard_normal((n_out, k)) * 0.05).astype(np.float32)
    new = factor_hessian(h, damp=0.01, act_order=True)
    hp = h[np.ix_(new.perm, new.perm)]
    s, d = numpy_udu(hp + 0.01 * float(np.mean(np.diag(hp))) * np.eye(k))
    ref = type(new)(new.dead, new.perm, s, d)
    a = gptq_quantize(w, factor=new, bits=4, group_size=128)
    b = gptq_quantize(w, factor=ref, bits=4, group_size=128)
    differ = int(np.count_nonzero(a.codes != b.codes))
    assert differ <= a.codes.size // 1000, differ  # at most 0.1 % (a handful of ties)


@pytest.mark.parametrize("k", [1, 7, 130, 600])  # 600: the kernel's OpenMP branch
@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_perm_and_diag_give_the_permuted_copys_factor(k: int, factorize_name: str) -> None:
    """perm and diag make the kernel factor ``h[perm][:, perm]`` with its diagonal replaced, bit
    for bit what the explicit permuted copy gives (GPTQ's act-order without that copy)."""
    factorize = FACTORIZATIONS[factorize_name]
    rng = np.random.default_rng(k)
    h = random_spd(k, seed=k)
    perm = rng.permutation(k).astype(np.int64)
    diag = np.diag(h).copy()
    diag[rng.random(k) < 0.2] *= 1.5  # replaced entries (kept positive definite)
    hp = h[np.ix_(perm, perm)]
    hp[np.diag_indices(k)] = diag[perm]
    add = 0.01 * float(np.mean(diag))
    want = factorize(np.ascontiguousarray(hp), add)
    got = factorize(h, add, perm=perm, diag=diag)
    check_structure(got, k)
    np.testing.assert_array_equal(got, want)
    # each one alone
    np.testing.assert_array_equal(factorize(h, add, perm=perm),
                                  factorize(np.ascontiguousarray(h[np.ix_(perm, perm)]), add))
    hd = h.copy()
    hd[np.diag_indices(k)] = diag
    np.testing.assert_array_equal(factorize(h, add, diag=diag),
                                  factorize(hd, add))


@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_diag_replaces_the_diagonal_unread(factorize_name: str) -> None:
    """With diag given, h's own diagonal is never read (NaN there is no error)."""
    factorize = FACTORIZATIONS[factorize_name]
    h = random_spd(40)
    d = np.diag(h).copy()
    bad = h.copy()
    bad[np.diag_indices(40)] = np.nan
    np.testing.assert_array_equal(factorize(bad, 0.0, diag=d),
                                  factorize(h, 0.0))
    with pytest.raises(ValueError, match=r"^h: contains NaN or Inf"):
        factorize(bad, 0.0)


@pytest.mark.parametrize("factorize_name", sorted(FACTORIZATIONS))
def test_bad_perm_and_diag_name_the_argument(factorize_name: str) -> None:
    factorize = FACTORIZATIONS[factorize_name]
    h = random_spd(6)
    ok = np.arange(6, dtype=np.int64)
    with pytest.raises(TypeError, match=r"^perm: .*int64.*int32"):
        factorize(h, 0.0, perm=ok.astype(np.int32))
    with pytest.raises(ValueError, match=r"^perm: expected length 6"):
        factorize(h, 0.0, perm=ok[:5].copy())
    with pytest.raises(ValueError, match=r"^perm: expected 1 dimensions"):
        factorize(h, 0.0, perm=ok.reshape(2, 3))
    for bad, why in (([0, 1, 2, 3, 4, 6], "out of range"), ([0, 1, 2, 3, 4, -1], "out of range"),
                     ([0, 1, 2, 3, 4, 4], "repeated")):
        with pytest.raises(ValueError, match=rf"^perm: expected a permutation of 0..5.*{why}"):
            factorize(h, 0.0, perm=np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match=r"^perm: expected a C-contiguous"):
        factorize(h, 0.0, perm=np.arange(12, dtype=np.int64)[::2])
    with pytest.raises(TypeError, match=r"^diag: .*float64.*float32"):
        factorize(h, 0.0, diag=np.ones(6, np.float32))
    with pytest.raises(ValueError, match=r"^diag: expected length 6"):
        factorize(h, 0.0, diag=np.ones(7))
    with pytest.raises(ValueError, match=r"^diag: contains NaN or Inf"):
        factorize(h, 0.0, diag=np.array([1, 1, np.inf, 1, 1, 1.0]))


def test_factor_hessian_makes_no_permuted_copy() -> None:
    """factor_hessian's only K x K allocation is the factor itself: the act-order permutation is
    gathered inside the kernel (at K = 8960 a permuted copy was 640 MB, a Qwen2.5-1.5B layer's
    memory peak). NumPy reports its allocations to tracemalloc, the factor's included."""
    import tracemalloc

    k = 700
    h = random_spd(k, seed=4)
    h[5, 5] = 0.0  # a dead input: the diagonal is replaced, still without a copy
    h[5, :] = h[:, 5] = 0.0
    tracemalloc.start()
    try:
        factor = factor_hessian(h, damp=0.01, act_order=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not np.array_equal(factor.perm, np.arange(k))
    assert peak < 1.25 * k * k * 8, f"{peak / (k * k * 8):.2f} K x K float64 arrays allocated"
