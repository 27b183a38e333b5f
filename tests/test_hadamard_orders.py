"""Every tabulated Hadamard order, in particular the Williamson ones (92, 116, 156, 172), checked
from first principles: the matrix hadamard_matrix(n) is orthogonal with +-1 entries and an all-ones
first row and column, and fwht(x) == x @ H for n = m * 2^k (k = 0, 1, 6; 11008 = 172 x 64 is
Llama-2-7B's MLP width), on the default dispatch path and on the generic one (OFFQ_DISABLE_SIMD=1
in a fresh process: tests/test_fwht.py::test_generic_path_matches runs this file too)."""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels import SUPPORTED_ORDERS, fwht, hadamard_factor, hadamard_matrix, is_supported

WILLIAMSON_ORDERS = (92, 116, 156, 172)
TOL = {np.float32: 1e-5, np.float64: 1e-10}  # max error relative to max |reference|


def test_williamson_orders_supported():
    for m in WILLIAMSON_ORDERS:
        assert m in SUPPORTED_ORDERS, m
        assert is_supported(m) and hadamard_factor(m) == m
        assert hadamard_factor(m * 64) == m
    assert is_supported(11008) and hadamard_factor(11008) == 172
    assert list(SUPPORTED_ORDERS) == sorted(SUPPORTED_ORDERS)


@pytest.mark.parametrize("m", SUPPORTED_ORDERS)
def test_matrix_is_normalised_hadamard(m):
    h = hadamard_matrix(m, normalize=False)
    assert h.shape == (m, m)
    assert np.all(np.abs(h) == 1.0), "entries must be +-1"
    assert np.array_equal(h @ h.T, m * np.eye(m)), "H H^T must be m I"
    assert np.all(h[0] == 1) and np.all(h[:, 0] == 1), "row 0 and column 0 must be all ones"
    hn = hadamard_matrix(m)  # the default normalised matrix is orthogonal
    np.testing.assert_allclose(hn @ hn.T, np.eye(m), atol=1e-12)


def _cases():
    for m in SUPPORTED_ORDERS:
        ks = (0, 1, 6) if m in WILLIAMSON_ORDERS else (0, 1)
        for k in ks:
            yield m * 2**k


def _x_at_h(x: np.ndarray, n: int) -> np.ndarray:
    """x @ H_n in float64 (unnormalised). Small n: with the full matrix hadamard_matrix(n). Large
    n = m * 2^k: through H_n = H_m (x) H_{2^k} (documented in offq.kernels.hadamard), with both
    factors from hadamard_matrix, y[c, d] = sum_ab H_m[a, c] X[a, b] H_p[b, d], X = x as [m, p]; the
    Kronecker structure itself is checked row by row in test_large_matrix_is_kronecker."""
    if n <= 2048:
        return x.astype(np.float64) @ hadamard_matrix(n, normalize=False)
    m = hadamard_factor(n)
    p = n // m
    hm = hadamard_matrix(m, normalize=False)
    hp = hadamard_matrix(p, normalize=False)
    xs = x.astype(np.float64).reshape(-1, m, p)
    return np.einsum("ac,rab->rcb", hm, xs @ hp).reshape(x.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", list(_cases()))
def test_fwht_equals_x_at_h(n, dtype):
    rng = np.random.default_rng(n)
    rows = 40 if n == 11008 else 3  # 40 x 11008 is enough work for the threaded path
    x = rng.standard_normal((rows, n)).astype(dtype)
    x0 = x.copy()
    ref = _x_at_h(x, n)
    for normalize, scale in ((False, 1.0), (True, 1 / np.sqrt(n))):
        y = fwht(x, normalize=normalize)
        assert y.dtype == dtype and y.shape == x.shape
        err = np.abs(y.astype(np.float64) - ref * scale).max() / (np.abs(ref).max() * scale)
        assert err <= TOL[dtype], (n, normalize, err)
    assert np.array_equal(x, x0)


@pytest.mark.parametrize("n", [m * 64 for m in WILLIAMSON_ORDERS])
def test_large_matrix_is_kronecker(n):
    """Rows of H_n (fwht of unit vectors, as hadamard_matrix builds it) for n = m * 64, including
    11008 = 172 x 64, against rows of H_m (x) H_64 (so H_n H_n^T = n I since H_m, H_64 are
    Hadamard), without forming the n x n matrix."""
    m = n // 64
    hm, h64 = hadamard_matrix(m, normalize=False), hadamard_matrix(64, normalize=False)
    rows = np.unique(np.concatenate([np.arange(256), np.random.default_rng(m).integers(0, n, 256)]))
    kron_rows = np.stack([np.kron(hm[i // 64], h64[i % 64]) for i in rows])
    e = np.zeros((len(rows), n))
    e[np.arange(len(rows)), rows] = 1.0
    h_rows = fwht(e, normalize=False)  # row i of H_n is fwht(e_i)
    assert np.array_equal(h_rows, kron_rows)
    assert np.all(np.abs(h_rows) == 1.0) and np.all(h_rows[:, 0] == 1) and np.all(h_rows[0] == 1)
    assert np.array_equal(h_rows @ h_rows.T, n * np.eye(len(rows)))  # these rows are orthogonal
