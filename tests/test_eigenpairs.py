"""smallest_eigenpairs (C: LAPACK dsyevr by index range) against numpy.linalg.eigh on random and
adversarial symmetric matrices, its argument checks, and OSAQ's Hessian tail built on it (the
same tail as a full eigendecomposition gives)."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import smallest_eigenpairs, threads
from offq.quantizers import osaq
from offq.quantizers.osaq import TAIL_FIRST, hessian_tail


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


@pytest.mark.parametrize("k,n,gamma,grows", [
    (64, 4096, 1e-4, False),  # a tail of 26: inside the first TAIL_FIRST pairs
    (300, 400, 1e-2, True),   # 254: a second call, sized by the budget
    (576, 4096, 1e-4, True),  # SmolLM2's width, 78
    (96, 60, 1e-4, True),     # fewer samples than channels: 46, an exactly null space of 36
])
def test_tail_is_the_full_decompositions_tail(k: int, n: int, gamma: float, grows: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    h = heavy_hessian(k, n, seed=n)
    calls = []

    def counted(hh: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(count)
        return smallest_eigenpairs(hh, count)

    monkeypatch.setattr(osaq, "smallest_eigenpairs", counted)
    tail, ref = hessian_tail(h, gamma), eigh_tail(h, gamma)
    assert tail.shape == ref.shape and (ref.shape[0] >= TAIL_FIRST) == grows
    assert len(calls) == (2 if grows else 1), calls  # the budget bounds the second count
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
