"""OSAQ: dW = B N moves W X only along the Hessian tail, and row maxima drop."""
import numpy as np
import pytest

from offq.quantizers.gptq import HessianAccumulator, gptq_quantize, layer_output_error
from offq.quantizers.osaq import hessian_tail, osaq_absorb


@pytest.fixture(scope="module")
def layer():
    """Inputs with a decaying spectrum (a tail of tiny directions) and a weight with outliers."""
    rng = np.random.default_rng(0)
    k, n_out, n = 64, 32, 4096
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    spectrum = np.concatenate([np.linspace(3, 0.5, 40), np.full(k - 40, 1e-3)])
    x = ((rng.standard_normal((n, k)) * spectrum) @ basis.T).astype(np.float32)
    w = (rng.standard_normal((n_out, k)) * 0.05).astype(np.float32)
    cols = rng.integers(0, k, size=n_out)
    w[np.arange(n_out), cols] += rng.choice([-1.0, 1.0], n_out) * 0.8  # one outlier per row
    acc = HessianAccumulator(k)
    acc.update(x)
    return x, w, acc.hessian


def test_tail_is_orthonormal_and_small(layer):
    _, _, h = layer
    n = hessian_tail(h, 1e-4)
    assert 0 < n.shape[0] < h.shape[0]
    np.testing.assert_allclose(n @ n.T, np.eye(n.shape[0]), atol=1e-10)
    assert np.trace(n @ h @ n.T) <= 1e-4 * np.trace(h) * (1 + 1e-9)


def test_absorption_keeps_output_and_drops_row_max(layer):
    x, w, h = layer
    new, rep = osaq_absorb(w, h)
    # the change of W X, measured directly on the calibration data, matches the report
    direct = layer_output_error(x, w, new)
    assert rep.rel_change_wx < 1e-2
    assert direct == pytest.approx(rep.rel_change_wx, rel=1e-2, abs=1e-6)  # H has float32 sums
    assert rep.row_max_after < 0.7 * rep.row_max_before
    assert rep.max_row_sum_change < 1e-2 * np.abs(w).sum(axis=1).max()
    np.testing.assert_allclose(np.abs(new).max(axis=1).mean(), rep.row_max_after, rtol=1e-6)


def test_absorption_helps_low_bit_gptq(layer):
    x, w, h = layer
    new, _ = osaq_absorb(w, h)
    plain = gptq_quantize(w, h, bits=2, group_size=-1, symmetric=True)
    absorbed = gptq_quantize(new, h, bits=2, group_size=-1, symmetric=True)
    assert layer_output_error(x, w, absorbed.dequantized) < layer_output_error(x, w, plain.dequantized)


def test_full_rank_hessian_changes_nothing():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    new, rep = osaq_absorb(w, np.eye(16) * 2.0, gamma=1e-4)
    assert rep.tail_dim == 0
    np.testing.assert_array_equal(new, w)


def test_validation():
    with pytest.raises(ValueError, match="hessian"):
        osaq_absorb(np.zeros((4, 8), np.float32), np.eye(7))
    with pytest.raises(ValueError, match="gamma"):
        hessian_tail(np.eye(4), 1.5)
