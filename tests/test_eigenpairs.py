"""smallest_eigenpairs and tail_eigenpairs (C: one LAPACK tridiagonal reduction, then only the
wanted pairs) against numpy.linalg.eigh on random and adversarial symmetric matrices, their
argument checks, and OSAQ's Hessian tail built on them (the same tail as a full
eigendecomposition gives)."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import smallest_eigenpairs, tail_eigenpairs, threads
from offq.quantizers.osaq import hessian_tail


def heavy_hessian(k: int, n: int, seed: int = 0) -> np.ndarray:
    """2 X^T X / n of inputs with a few massive channels and lognormal scales (an LLM site)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) * np.exp(rng.standard_normal(k))
    x[:, :3] *= 40.0
    return 2.0 * x.T @ x / n


def eigh_tail(h: np.ndarray, gamma: float) -> np.ndarray:
    """The tail as the full eigendecomposition defines it (the implementation before the kernel)."""
    vals, vecs = np.linalg.eigh((h + h.T) / 2)
    order = np.argsort(np.abs(vals), kind="stable")
    mass = np.cumsum(np.abs(vals[order]))
    m = int(np.searchsorted(mass, gamma * np.trace(h), side="right"))
    return vecs[:, order[:m]].T


def check_pairs(h: np.ndarray, count: int) -> None:
    vals, vecs = smallest_eigenpairs(h, count)
    ref = np.linalg.eigvalsh(h)[:count]
    scale = np.abs(np.linalg.eigvalsh(h)).max()
    assert vals.shape == (count,) and vecs.shape == (count, h.shape[0])
    assert vals.dtype == vecs.dtype == np.float64 and vecs.flags.c_contiguous
    np.testing.assert_allclose(vals, ref, rtol=0, atol=1e-12 * scale)
    assert np.all(np.diff(vals) >= 0)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(count), atol=1e-10)
    residual = h @ vecs.T - vecs.T * vals  # columns h v_i - lambda_i v_i
    assert np.abs(residual).max() <= 1e-10 * scale


@pytest.mark.parametrize("k,count", [(1, 1), (2, 1), (7, 7), (64, 5), (300, 32), (576, 40)])
def test_matches_eigh(k: int, count: int) -> None:
    check_pairs(heavy_hessian(k, 4 * k + 8, seed=k), count)


def test_adversarial_spectra() -> None:
    rng = np.random.default_rng(3)
    # repeated eigenvalues (identity plus a rank-2 bump): only the subspace is defined
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    h = q @ np.diag(np.r_[np.ones(38), 50.0, 90.0]) @ q.T
    check_pairs(np.ascontiguousarray((h + h.T) / 2), 38)
    # singular (rank 10 of 60) and indefinite with tiny negatives, as float64 sums leave them
    x = rng.standard_normal((10, 60))
    check_pairs(x.T @ x, 55)
    check_pairs(np.diag(np.r_[-1e-17, 0.0, 1e-300, np.arange(1.0, 30.0)]), 5)
    # a dead channel (zero row and column) and a huge dynamic range
    h = heavy_hessian(50, 400)
    h[7, :] = h[:, 7] = 0.0
    check_pairs(h * 1e8, 3)


@pytest.mark.parametrize("diag", [[1.0, 3.0, 0.5], [3.0, 2.0, 1.0], [5.0, 0.1, 4.0, 0.2, 3.0]])
def test_split_matrices_come_out_sorted(diag: list[float]) -> None:
    """A diagonal (or block-diagonal) matrix splits the tridiagonal form, and LAPACK lists the
    values block by block: the smallest must still come first, the last listed value included
    (a sort that never looked at it returned [1.0, 0.5] for the first)."""
    h = np.diag(diag)
    for count in range(1, len(diag) + 1):
        check_pairs(h, count)
    rng = np.random.default_rng(len(diag))
    blocks = [rng.standard_normal((3, 3)) for _ in diag]
    big = np.zeros((3 * len(diag), 3 * len(diag)))
    for i, (b, d) in enumerate(zip(blocks, diag)):
        big[3 * i:3 * i + 3, 3 * i:3 * i + 3] = b @ b.T + d * np.eye(3)
    check_pairs(big, len(diag))


def test_only_the_upper_triangle_is_read() -> None:
    h = heavy_hessian(30, 200)
    garbage = np.triu(h) + np.tril(np.full_like(h, np.nan), -1)
    a, b = smallest_eigenpairs(h, 4)
    c, d = smallest_eigenpairs(garbage, 4)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)


def test_two_threads_same_pairs() -> None:
    # distinct eigenvalues 3.5% apart, so each eigenvector is well defined under rounding
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((400, 400)))
    h = np.ascontiguousarray((q * np.logspace(0, 6, 400)) @ q.T)
    h = (h + h.T) / 2
    with threads(1):
        a = smallest_eigenpairs(h, 20)
    with threads(2):
        b = smallest_eigenpairs(h, 20)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-12 * np.abs(h).max())
    np.testing.assert_allclose(np.abs(a[1] @ b[1].T), np.eye(20), atol=1e-6)


def test_bad_count_names_count() -> None:
    """(The checks of h are test_linalg.py's test_bad_h_names_h, run on both entry points.)"""
    h = heavy_hessian(6, 40)
    for bad in (0, -1, 7):
        with pytest.raises(ValueError, match=r"^count: expected 1 <= count <= 6"):
            smallest_eigenpairs(h, bad)
    with pytest.raises(TypeError, match=r"^count: "):
        smallest_eigenpairs(h, 2.5)  # type: ignore[arg-type]


def budget_count(h: np.ndarray, budget: float) -> int:
    """How many of the smallest eigenvalues (ascending) fit the budget, by magnitude (eigh)."""
    return int(np.searchsorted(np.cumsum(np.abs(np.linalg.eigvalsh(h))), budget, side="right"))


@pytest.mark.parametrize("k,n", [(1, 4), (40, 400), (300, 400), (576, 4096), (96, 60)])
def test_tail_pairs_fit_the_budget_and_are_the_smallest(k: int, n: int) -> None:
    h = heavy_hessian(k, n, seed=k + n)
    vals = np.linalg.eigvalsh(h)
    # budgets just below and above each of a few cumulative masses: the count must step there
    # (not inside an exactly null space, whose eigenvalues are rounding noise, ~1e-13 here)
    first = k - n + 1 if n < k else 1
    for m in sorted({0, first, max(first, k // 3), k - 1, k}):
        mass = float(np.cumsum(np.abs(vals))[m - 1]) if m else 0.0
        for budget in (mass * (1 - 1e-6), mass * (1 + 1e-6)):
            got_vals, got_vecs = tail_eigenpairs(h, budget)
            assert len(got_vals) == budget_count(h, budget), (m, budget)
            assert got_vecs.shape == (len(got_vals), k) and got_vecs.flags.c_contiguous
            if len(got_vals):  # the very pairs of smallest_eigenpairs: the same reduction
                ref_vals, ref_vecs = smallest_eigenpairs(h, len(got_vals))
                np.testing.assert_array_equal(got_vals, ref_vals)
                np.testing.assert_array_equal(got_vecs, ref_vecs)
                assert np.sum(np.abs(got_vals)) <= budget
    # inside a null space LAPACK's bisection and the count's eigenvalues differ by rounding: the
    # pairs returned must still fit the budget
    for m in range(1, first, 4):
        budget = float(np.cumsum(np.abs(vals))[m - 1])
        assert np.sum(np.abs(tail_eigenpairs(h, budget)[0])) <= budget, m


def test_tail_counts_negative_eigenvalues_by_magnitude() -> None:
    h = np.diag(np.r_[-1e-3, 0.0, 2e-3, np.arange(1.0, 30.0)])
    vals, _ = tail_eigenpairs(h, 1.5e-3)
    # by magnitude 1e-3 + 0 fits and + 2e-3 does not; summed algebraically all three would fit
    np.testing.assert_allclose(vals, [-1e-3, 0.0], rtol=0, atol=1e-14)
    assert tail_eigenpairs(h, 0.0)[0].shape == (0,)  # -1e-3 alone exceeds a zero budget
    assert tail_eigenpairs(np.zeros((5, 5)), 0.0)[0].shape == (5,)  # zeros fit any budget


def test_bad_budget_names_budget() -> None:
    h = heavy_hessian(6, 40)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^budget: expected a finite number >= 0"):
            tail_eigenpairs(h, bad)
    with pytest.raises(TypeError, match=r"^budget: "):
        tail_eigenpairs(h, "1")  # type: ignore[arg-type]


@pytest.mark.parametrize("k,n,gamma", [
    (64, 4096, 1e-4),  # a tail of 26
    (300, 400, 1e-2),  # 254
    (576, 4096, 1e-4),  # SmolLM2's width, 78
    (96, 60, 1e-4),    # fewer samples than channels: 46, an exactly null space of 36
])
def test_tail_is_the_full_decompositions_tail(k: int, n: int, gamma: float) -> None:
    h = heavy_hessian(k, n, seed=n)
    tail, ref = hessian_tail(h, gamma), eigh_tail(h, gamma)
    assert tail.shape == ref.shape
    if tail.shape[0]:
        np.testing.assert_allclose(tail @ tail.T, np.eye(tail.shape[0]), atol=1e-10)
        # the same subspace (up to the eigenvectors' order inside clusters): energies agree
        energy = np.trace(tail @ h @ tail.T)
        assert energy <= gamma * np.trace(h) * (1 + 1e-9)
        np.testing.assert_allclose(energy, np.trace(ref @ h @ ref.T), rtol=1e-6,
                                   atol=1e-12 * np.trace(h))


def test_tail_of_a_zero_or_full_rank_hessian() -> None:
    assert hessian_tail(np.zeros((8, 8)), 1e-4).shape == (0, 8)
    assert hessian_tail(np.eye(8) * 2.0, 1e-4).shape == (0, 8)
    assert hessian_tail(np.eye(8) * 2.0, 0.3).shape == (2, 8)  # 2 of 8 equal eigenvalues: 0.25
