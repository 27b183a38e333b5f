"""The OffQ mechanism check (docs/METHODS.md section 1) on offq's real quantizer.

A 128-vector of N(0, 1) noise plus one outlier of magnitude 60, transformed by the normalised
Sylvester Hadamard H (x -> x @ H), then 4-bit min/max asymmetric quantization of the whole vector:

- outlier at index 0 (row 0 of H is all ones): the outlier becomes the same constant added to every
  element, which the asymmetric zero-point absorbs -> MSE ~0.0101, the no-outlier value;
- outlier at any other index: +-60/sqrt(128) on a +-1 pattern -> MSE ~0.087;
- no Hadamard: one element dominates the range -> MSE ~0.9;
- symmetric quantization cannot absorb the offset -> MSE ~0.106 even at index 0.

MSE is measured in the rotated domain (H is orthogonal, so it equals the error of the inverse-
transformed vector), averaged over 2000 seeded trials.
"""
from __future__ import annotations

import numpy as np
import pytest

from offq.kernels.quant import quantize

TRIALS = 2000
OUTLIER = 60.0


def sylvester(n: int) -> np.ndarray:
    """Normalised Sylvester Hadamard matrix of order n = 2^k (scipy.linalg.hadamard order)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def mse(y: np.ndarray, symmetric: bool = False) -> float:
    y = np.ascontiguousarray(y, dtype=np.float32)
    qt = quantize(y, bits=4, group_size=-1, symmetric=symmetric)
    return float(np.mean((qt.dequantize().astype(np.float64) - y) ** 2))


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(2606).standard_normal((TRIALS, 128)).astype(np.float32)


def with_outlier(x: np.ndarray, index: int | None) -> np.ndarray:
    x = x.copy()
    if index is not None:
        x[:, index] += OUTLIER
    return x


def test_outlier_on_all_ones_row_is_free(noise):
    h = sylvester(128)
    base = mse(noise @ h)
    at_ones = mse(with_outlier(noise, 0) @ h)
    assert base == pytest.approx(0.0101, rel=0.05)
    assert at_ones == pytest.approx(0.0101, rel=0.05)
    assert at_ones == pytest.approx(base, rel=0.02)


@pytest.mark.parametrize("index", [1, 5, 64, 127])
def test_outlier_elsewhere_costs(noise, index):
    assert mse(with_outlier(noise, index) @ sylvester(128)) == pytest.approx(0.087, rel=0.06)


def test_without_hadamard(noise):
    assert mse(with_outlier(noise, 0)) == pytest.approx(0.9, rel=0.05)
    assert mse(with_outlier(noise, 77)) == pytest.approx(0.9, rel=0.05)


def test_symmetric_gets_no_benefit(noise):
    assert mse(with_outlier(noise, 0) @ sylvester(128), symmetric=True) == pytest.approx(
        0.106, rel=0.05)


def test_same_with_offq_fwht_if_available(noise):
    """The same check through the FWHT kernel (x @ H for the Sylvester matrix)."""
    hadamard = pytest.importorskip("offq.kernels.hadamard")
    x = np.ascontiguousarray(with_outlier(noise, 0))
    y = hadamard.fwht(x)
    np.testing.assert_allclose(y, x @ sylvester(128), rtol=1e-4, atol=1e-4)
    assert mse(y) == pytest.approx(0.0101, rel=0.05)
