"""OSAQ: dW = B N moves W X only along the Hessian tail, and row maxima drop."""
import numpy as np
import pytest

from offq.quantizers.gptq import HessianAccumulator, gptq_quantize, layer_output_error
from offq.quantizers.osaq import (MAX_BYTES, _row_chunk, _softmax_weights, _solve_rows,
                                  _weighted_grams, hessian_tail, osaq_absorb)


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


@pytest.fixture(scope="module")
def heavy_layer():
    """A full-rank input spectrum dominated by two massive directions (as LLM activations are),
    so the Hessian's "tail" is small but not null, plus held-out inputs of the same law and a
    weight with one planted outlier per row. The original fixture's tail (eigenvalues 1e-3 next
    to 0.5-3) hid the bug: there any move along the tail was free."""
    rng = np.random.default_rng(0)
    k, n_out, n = 128, 64, 8192
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    spectrum = np.concatenate([[100.0, 30.0], np.geomspace(1.0, 0.03, k - 2)])

    def draw() -> np.ndarray:
        return ((rng.standard_normal((n, k)) * spectrum) @ basis.T).astype(np.float32)

    x, held_out = draw(), draw()
    w = (rng.standard_normal((n_out, k)) * 0.05).astype(np.float32)
    cols = rng.integers(0, k, size=n_out)
    w[np.arange(n_out), cols] += rng.choice([-1.0, 1.0], n_out) * 0.3
    acc = HessianAccumulator(k)
    acc.update(x)
    return x, held_out, w, acc.hessian


def test_output_change_within_bound_and_no_row_max_grows(heavy_layer):
    """The bound OSAQ promises: ||dW X|| <= sqrt(gamma) ||W X|| on the calibration data, and no
    row's max |W| grows. The landed code moved W X by 1.3% here (25-90% on SmolLM2 layers)."""
    x, _, w, h = heavy_layer
    gamma = 1e-4
    new, rep = osaq_absorb(w, h, gamma=gamma)
    assert layer_output_error(x, w, new) <= np.sqrt(gamma) * 1.01
    assert np.all(np.abs(new).max(axis=1) <= np.abs(w).max(axis=1) + 1e-7)
    assert rep.row_max_after < 0.7 * rep.row_max_before  # and it still does its job


@pytest.mark.parametrize("bits,group", [(3, -1), (2, 32)])
def test_osaq_then_gptq_not_worse_than_gptq_on_held_out(heavy_layer, bits, group):
    """GPTQ + OSAQ output error <= GPTQ's on held-out inputs of the planted-outlier layer
    (measured: W3 0.0114 -> 0.0092, W2 g32 0.0174 -> 0.0157 at tau_rel 0.03, the default since the
    grid of benchmarks/bench_osaq_grid.py; 0.0099 and 0.0138 at 0.1; the landed code: 0.0148,
    0.0181)."""
    _, held_out, w, h = heavy_layer
    new, _ = osaq_absorb(w, h)
    plain = gptq_quantize(w, h, bits=bits, group_size=group, symmetric=False)
    absorbed = gptq_quantize(new, h, bits=bits, group_size=group, symmetric=False)
    assert (layer_output_error(held_out, w, absorbed.dequantized)
            <= layer_output_error(held_out, w, plain.dequantized))


def test_chunked_solve_is_the_same_and_bounded(heavy_layer):
    """The per-row systems are formed in chunks whose temporaries fit ``max_bytes``: a tiny
    bound (one row, a few index pairs per GEMM) gives the same weights."""
    _, _, w, h = heavy_layer
    big, _ = osaq_absorb(w, h)
    small, _ = osaq_absorb(w, h, max_bytes=64 * 1024)
    # the float32 Gram GEMMs sum in a different order per block size (and per BLAS thread
    # count): the weights agree to ~1e-5, 6e-5 at worst on 1 thread; the steps themselves are
    # ~1e-2, so a chunking or unpacking error moves them twenty times past the tolerance
    np.testing.assert_allclose(small, big, rtol=0, atol=5e-4)
    # the stated bound at Llama-2-7B's down_proj input (K = 11008) with a 2048-dim tail
    per_row = 4 * 2048 * 2049 // 2 + 4 * 6 * 11008
    assert _row_chunk(11008, 2048, 11008, MAX_BYTES) * per_row <= MAX_BYTES \
        or _row_chunk(11008, 2048, 11008, MAX_BYTES) == 1


@pytest.mark.parametrize("m,max_bytes", [(1, MAX_BYTES), (7, MAX_BYTES), (40, 64 * 1024),
                                         (40, 4096)])
def test_weighted_grams_match_float64_reference(m, max_bytes):
    """The packed float32 Gram matrices ``N diag(s_i) N^T`` against a float64 einsum, to 1e-5 of
    each row's largest entry, with blocks of pairs both whole and split (small ``max_bytes``;
    4096 bytes hold 10 pairs of K = 96, fewer than one lead index's 40: the buffer grows);
    the solve on them against numpy's on the float64 matrices."""
    rng = np.random.default_rng(m)
    k = 96
    basis = np.linalg.qr(rng.standard_normal((k, m)))[0].T
    s = rng.random((5, k)) ** 8  # softmax-like: a few large weights
    ref = np.einsum("ak,ck,bk->cab", basis, s, basis)
    packed = _weighted_grams(s, basis, max_bytes)
    assert packed.dtype == np.float32 and packed.shape == (5, m * (m + 1) // 2)
    iu = np.triu_indices(m)
    got = packed.astype(np.float64)
    scale = np.abs(ref).max(axis=(1, 2))[:, None] + 1e-300
    assert np.all(np.abs(got - ref[:, iu[0], iu[1]]) <= 1e-5 * scale)
    v = basis.sum(axis=1)
    rho = rng.standard_normal((5, m))
    mu1, mu2 = 1e-2, 100.0
    b = _solve_rows(packed, rho, np.outer(v, v), mu1, mu2, max_bytes)
    full = ref.copy()
    full[:, iu[1], iu[0]] = got  # the float32 values, both triangles
    full[:, iu[0], iu[1]] = got
    tr = np.trace(full, axis1=1, axis2=2) / m
    a = full + (mu1 * tr)[:, None, None] * np.eye(m) + (mu2 * tr)[:, None, None] * np.outer(v, v)
    want = np.linalg.solve(a, -rho[:, :, None])[:, :, 0]
    np.testing.assert_allclose(b, want, rtol=1e-9, atol=1e-12)


def test_safe_steps_match_a_float64_search():
    """The float32 step search picks, per row, the grid step of smallest row max among those the
    output bound allows (a float64 brute force), including rows where no step or every step is
    allowed and a row whose step would grow the max."""
    from offq.quantizers.osaq import STEP_GRID, _safe_steps
    rng = np.random.default_rng(3)
    c, k, gamma = 40, 257, 1e-4
    rows = rng.standard_normal((c, k)).astype(np.float32)
    d = (-rows * rng.random((c, 1)) * 1.5).astype(np.float32)  # past t = 1/1.5 the max grows back
    d[0] = -d[0]  # every step grows this row's max: t = 0
    change = rng.random(c) * 1e-4
    energy = rng.random(c)
    change[1], energy[1] = 1.0, 0.0  # no step allowed
    change[2] = 0.0  # every step allowed
    t = _safe_steps(rows, d, change, energy, gamma)
    for i in range(c):
        ok = STEP_GRID ** 2 * change[i] <= gamma * energy[i]
        costs = np.abs(rows[i].astype(np.float64) + STEP_GRID[:, None] * d[i]).max(axis=1)
        costs[~ok] = np.inf
        assert costs[np.searchsorted(STEP_GRID, t[i])] == pytest.approx(costs.min(), rel=1e-6)
    assert t[0] == 0 and t[1] == 0 and t[2] > 0


def test_energies_from_the_tail_factor_give_the_same_absorption():
    """With the subspace tail, each row's energy w H w^T comes from the iteration's float32
    Cholesky factor (a triangular product) instead of a float32 GEMM with H: the same steps,
    the same weights to float32 rounding, the same report."""
    import dataclasses

    from offq.quantizers.osaq import prepare_tail

    rng = np.random.default_rng(21)
    k, n_out, n = 600, 48, 3000
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    spectrum = np.concatenate([np.linspace(3, 0.5, k - 40), np.full(40, 1e-3)])  # a tail
    x = ((rng.standard_normal((n, k)) * spectrum) @ basis.T).astype(np.float32)
    w = (rng.standard_normal((n_out, k)) * 0.05).astype(np.float32)
    w[np.arange(n_out), rng.integers(0, k, size=n_out)] += 0.5
    acc = HessianAccumulator(k)
    acc.update(x)
    h = acc.hessian
    tail = prepare_tail(h, 1e-4, "subspace")
    assert tail.factor is not None and len(tail.basis) > 0
    with_factor, rep = osaq_absorb(w, h, tail=tail)
    plain, rep_plain = osaq_absorb(w, h, tail=dataclasses.replace(tail, factor=None))
    np.testing.assert_allclose(with_factor, plain, rtol=0, atol=1e-6)
    assert rep.rel_change_wx == pytest.approx(rep_plain.rel_change_wx, rel=1e-5)
    assert rep.rows_moved == rep_plain.rows_moved > 0
    # a fraction of the rows: the share whose weights the absorption changed
    changed = np.any(with_factor != w, axis=1).mean()
    assert 0 < rep.rows_moved <= 1 and rep.rows_moved == pytest.approx(changed)
    assert layer_output_error(x, w, with_factor) <= np.sqrt(1e-4) * 1.01
    # a column-major weight (a transposed view) takes the same path
    np.testing.assert_array_equal(osaq_absorb(np.asfortranarray(w), h, tail=tail)[0], with_factor)


def test_softmax_temperature_is_relative_to_each_row_s_largest_weight():
    """tau_rel scales with the row's max |W|: a row and the same row times 0.01 get the same
    weights (an absolute temperature made rows of LLM-sized weights, max 0.1-1, near uniform)."""
    w = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_softmax_weights(0.01 * w, 0.03), _softmax_weights(w, 0.03),
                               rtol=0, atol=1e-6)
    assert _softmax_weights(0.01 * w, 0.03).max() > 0.5
