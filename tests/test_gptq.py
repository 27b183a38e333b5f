"""GPTQ and RTN on the shared grid: codes match the docs/METHODS.md formulas, GPTQ beats RTN on the
layer-output error with correlated inputs, options (bits, groups, act-order, static groups)."""
import numpy as np
import pytest

from offq.quantizers.gptq import HessianAccumulator, gptq_quantize, layer_output_error
from offq.quant.grid import grid_params, mse_clip_search, quantize_codes
from offq.quantizers.rtn import rtn_quantize


def reference_quantize(x, bits, group, symmetric):
    """Plain NumPy restatement of the docs/METHODS.md grid (float32, round half to even)."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    g = k if group == -1 else group
    out = np.empty_like(x)
    for r in range(n):
        for s in range(0, k, g):
            v = x[r, s:s + g]
            if symmetric:
                scale = np.float32(np.abs(v).max() / np.float32(2 ** (bits - 1) - 1))
                scale = np.float32(1) if scale == 0 else scale
                zero = np.float32(2 ** (bits - 1))
            else:
                lo, hi = v.min(), v.max()
                scale = np.float32((hi - lo) / np.float32(2 ** bits - 1))
                if scale == 0:
                    scale = np.float32(abs(hi)) if hi != 0 else np.float32(1)
                zero = np.float32(np.rint(-lo / scale))
            q = np.clip(np.rint(v / scale) + zero, 0, 2 ** bits - 1)
            out[r, s:s + g] = scale * (q - zero)
    return out


def correlated_inputs(rng, n, k):
    """Tokens with a strongly non-isotropic covariance and a few large channels (LLM-like)."""
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scales = np.exp(rng.uniform(-2, 1.5, size=k))
    x = (rng.standard_normal((n, k)) * scales) @ mix + 0.3 * rng.standard_normal((n, k))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    k, n_out = 96, 48
    x = correlated_inputs(rng, 2048, k)
    w = rng.standard_normal((n_out, k)).astype(np.float32) * 0.05
    acc = HessianAccumulator(k)
    for chunk in np.split(x, 4):
        acc.update(chunk)
    return x, w, acc.hessian


def test_hessian_accumulator_matches_formula(layer):
    x, _, h = layer
    ref = 2 * x.astype(np.float64).T @ x.astype(np.float64) / x.shape[0]
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert np.array_equal(h, h.T)  # updates fill the upper triangle; reading mirrors it


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [-1, 32])
def test_rtn_matches_reference_grid(bits, symmetric, group):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((7, 64)).astype(np.float32)
    w[0] = 3.0  # constant row
    w[1] = 0.0  # all-zero row
    w[2] += 40.0  # all offset: zero-point outside the code range
    qw = rtn_quantize(w, bits=bits, group_size=group, symmetric=symmetric, clip_search=False)
    np.testing.assert_array_equal(qw.dequantized, reference_quantize(w, bits, group, symmetric))
    assert qw.codes.dtype == np.uint8 and qw.codes.max() <= 2 ** bits - 1
    if not symmetric:
        np.testing.assert_array_equal(qw.dequantized[:2], w[:2])  # constant groups exact
    assert np.all(qw.zero == np.rint(qw.zero))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_search_never_worse(symmetric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    x[:, 0] *= 8  # an outlier per row makes clipping worthwhile
    for search in (False, True):
        if search:
            s, z = mse_clip_search(x, 4, symmetric)
        else:
            s, z = grid_params(x, 4, symmetric)
        q = quantize_codes(x, s[:, None], z[:, None], 4)
        err = ((s[:, None] * (q.astype(np.float32) - z[:, None]) - x) ** 2).sum(1)
        if search:
            assert np.all(err <= base + 1e-6) and err.sum() < 0.95 * base.sum()
        else:
            base = err


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(layer, bits, group, act_order):
    x, w, h = layer
    for symmetric in (True, False):
        rtn = rtn_quantize(w, bits=bits, group_size=group, symmetric=symmetric)
        gq = gptq_quantize(w, h, bits=bits, group_size=group, symmetric=symmetric,
                           act_order=act_order)
        e_rtn = layer_output_error(x, w, rtn.dequantized)
        e_gptq = layer_output_error(x, w, gq.dequantized)
        assert e_gptq < 0.8 * e_rtn, (bits, group, act_order, symmetric, e_gptq, e_rtn)


def test_gptq_output_is_on_the_grid(layer):
    """The returned dequantized weight is exactly scale * (codes - zero), groups contiguous in
    the original column order, even with act-order (static groups)."""
    _, w, h = layer
    for group, act_order, static in [(-1, True, False), (32, True, False), (32, False, False),
                                     (32, False, True), (48, False, False)]:
        gq = gptq_quantize(w, h, bits=4, group_size=group, symmetric=False, act_order=act_order,
                           static_groups=static, block_size=40)
        g = gq.group_size
        s = np.repeat(gq.scale, g, axis=1)
        z = np.repeat(gq.zero, g, axis=1)
        np.testing.assert_array_equal(gq.dequantized, s * (gq.codes.astype(np.float32) - z))
        assert gq.codes.max() <= 15 and gq.scale.shape == (w.shape[0], w.shape[1] // g)


def test_gptq_8bit_nearly_exact(layer):
    x, w, h = layer
    gq = gptq_quantize(w, h, bits=8, group_size=-1, symmetric=True)
    assert layer_output_error(x, w, gq.dequantized) < 5e-3
    assert np.abs(gq.dequantized - w).max() < 2 * np.abs(w).max() / 127


def test_gptq_dead_columns_and_identity_hessian():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x[:, 5] = 0  # dead input
    acc = HessianAccumulator(32)
    acc.update(x)
    w_given = w.copy()
    gq = gptq_quantize(w, acc.hessian, bits=4, symmetric=False, clip_search=False)
    assert np.all(np.isfinite(gq.dequantized))
    assert np.all(gq.dequantized[:, 5] == 0)  # the dead input's weights are zeroed...
    np.testing.assert_array_equal(w, w_given)  # ...in GPTQ's copy, not in the caller's weight
    # an identity Hessian decouples the columns: GPTQ reduces to RTN on the same grid
    gi = gptq_quantize(w, np.eye(32), bits=4, symmetric=False, clip_search=False, damp=0.0,
                       act_order=False)
    np.testing.assert_array_equal(gi.dequantized,
                                  rtn_quantize(w, bits=4, symmetric=False, clip_search=False).dequantized)


def test_hessian_finish_is_in_place_and_final():
    """finish() scales the running sum in place (no K x K copy) to what .hessian returns, and
    ends the accumulation; the dead input gets a unit diagonal in the factor, as before."""
    from offq.quantizers.gptq import factor_hessian

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    x[:, 3] = 0
    acc = HessianAccumulator(24)
    acc.update(x[:100])
    first = acc.hessian  # read mid-stream: mirrored, and later updates still count
    assert np.array_equal(first, first.T)
    acc.update(x[100:])
    want = acc.hessian
    got = acc.finish()
    assert np.array_equal(got, got.T) and not np.array_equal(first, want)
    assert got is acc.sum
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(acc.finish(), want)  # idempotent
    np.testing.assert_array_equal(acc.hessian, want)
    with pytest.raises(ValueError, match="finish"):
        acc.update(x)
    f = factor_hessian(got, damp=0.01)
    assert f.dead[3] and not f.dead[[0, 1, 2, 4]].any()
    np.testing.assert_array_equal(got, want)  # the factor left the Hessian untouched
    hp = want[np.ix_(f.perm, f.perm)].copy()
    hp[np.diag_indices(24)] = np.where(f.dead[f.perm], 1.0, np.diag(hp))
    hp[np.diag_indices(24)] += 0.01 * np.mean(np.diag(hp))
    np.testing.assert_allclose((f.s * f.d) @ f.s.T, hp, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.diag(f.s), 1.0)
    np.testing.assert_array_equal(np.tril(f.s, -1), 0.0)


def test_shared_factor_equals_direct(layer):
    from offq.quantizers.gptq import factor_hessian

    _, w, h = layer
    f = factor_hessian(h, damp=0.01, act_order=True)
    a = gptq_quantize(w, h, bits=3, group_size=32, symmetric=False)
    b = gptq_quantize(w, factor=f, bits=3, group_size=32, symmetric=False)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.dequantized, b.dequantized)


def reference_gptq(w, h, *, bits, group, symmetric, act_order, static, damp=0.01):
    """Unblocked GPTQ (every column updates all later columns at once), float64, as docs/METHODS.md
    section 2 states it; group grids from the current weights unless static."""
    from offq.quant.grid import dequantize_codes, group_params

    n, k = w.shape
    g = k if group == -1 else group
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    W = w.astype(np.float64)
    W[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    fixed = g == k or static or act_order
    if fixed:
        scale, zero = group_params(W.astype(np.float32), bits, g, symmetric, True)
    else:
        scale = np.zeros((n, k // g), np.float32)
        zero = np.zeros((n, k // g), np.float32)
    W = W[:, perm]
    deq = np.zeros((n, k), np.float32)
    for i in range(k):
        col = perm[i]
        if not fixed and col % g == 0:
            s, z = group_params(W[:, i:i + g].astype(np.float32), bits, g, symmetric, True)
            scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
        x = W[:, i].astype(np.float32)
        qx = dequantize_codes(quantize_codes(x, scale[:, col // g], zero[:, col // g], bits),
                              scale[:, col // g], zero[:, col // g])
        deq[:, col] = qx
        W[:, i:] -= np.outer((W[:, i] - qx) / u[i, i], u[i, i:])
    return deq


@pytest.mark.parametrize("group, act_order, static, block", [
    (-1, True, False, 128), (-1, False, False, 40), (32, False, False, 40),
    (24, False, False, 40), (48, False, False, 20), (32, True, False, 128),
    (32, False, True, 50)])
def test_gptq_blocked_equals_unblocked_reference(layer, group, act_order, static, block):
    """The lazy (blocked, sub-blocked) updates compute the same thing as the plain algorithm,
    including dynamic groups whose columns straddle sub-blocks and blocks."""
    _, w, h = layer
    for symmetric in (True, False):
        got = gptq_quantize(w, h, bits=3, group_size=group, symmetric=symmetric,
                            act_order=act_order, static_groups=static, block_size=block)
        ref = reference_gptq(w, h, bits=3, group=group, symmetric=symmetric,
                             act_order=act_order, static=static)
        np.testing.assert_array_equal(got.dequantized, ref)


@pytest.mark.parametrize("group, act_order", [(-1, True), (32, False), (24, False), (32, True)])
def test_gptq_in_float32_is_gptq_to_float32_rounding(layer, group, act_order):
    """dtype="float32" (factor, errors and updates in float32, dynamic groups included): nearly
    every weight lands on the float64 reference's grid point (one moves only where float32's
    rounding carries it across a rounding boundary) and the layer-output error is the same to
    1%."""
    from offq.quantizers.gptq import factor_hessian

    x, w, h = layer
    f32 = factor_hessian(h, damp=0.01, act_order=act_order, dtype="float32")
    assert f32.s.dtype == np.float32
    for symmetric in (True, False):
        got = gptq_quantize(w, factor=f32, bits=3, group_size=group, symmetric=symmetric)
        ref = reference_gptq(w, h, bits=3, group=group, symmetric=symmetric,
                             act_order=act_order, static=False)
        # a dynamic group's grid can move by float32's rounding: compare the values, not bits
        assert np.mean(np.abs(got.dequantized - ref) > 1e-4) < 0.01
        e32 = layer_output_error(x, w, got.dequantized)
        e64 = layer_output_error(x, w, ref)
        assert abs(e32 / e64 - 1) < 0.01, (e32, e64)


def test_gptq_validation():
    w = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, np.eye(7))
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, np.eye(8), bits=5)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, np.eye(8), group_size=3)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(np.full((4, 8), np.nan, np.float32), np.eye(8))


def test_to_qtensor_round_trip(layer):
    kernels = pytest.importorskip("offq.kernels")
    if not hasattr(kernels, "QTensor"):
        pytest.skip("offq.kernels.QTensor not available yet")
    _, w, h = layer
    for bits in (4, 3):
        gq = gptq_quantize(w, h, bits=bits, group_size=32, symmetric=False)
        qt = gq.qtensor()
        np.testing.assert_array_equal(kernels.dequantize(qt), gq.dequantized)
