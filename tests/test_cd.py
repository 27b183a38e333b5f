"""Coordinate-descent sweeps after GPTQ (offq/quantizers/cd.py, OSAQ's +CD variant): the lazy
blocked sweep equals a plain one that recomputes H r at every column, never increases GPTQ's
objective, reaches a fixed point, and is wired through QuantConfig/GPTQ."""
import numpy as np
import pytest

from offq.config import QuantConfig
from offq.quant.grid import dequantize_codes, quantize_codes
from offq.quantizers.cd import coordinate_descent, damped_hessian, objective
from offq.quantizers.gptq import GPTQ, HessianAccumulator, gptq_quantize
from offq.quantizers.registry import build_weight_quantizer


def problem(seed, n=24, k=96, tokens=400, dead=()):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((tokens, k)) * np.exp(rng.uniform(-2, 1.5, k))) @ mix
    x[:, list(dead)] = 0.0
    acc = HessianAccumulator(k)
    acc.update(x.astype(np.float32))
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w, acc.finish()


def plain_sweeps(w, q, hessian, damp, sweeps):
    """The definition, column by column: g = H (w - w_hat) recomputed from scratch each time."""
    h = damped_hessian(hessian, damp)
    w = np.asarray(w, np.float64).copy()
    w[:, np.diag(hessian) == 0] = 0.0
    g = q.group_size
    scale, zero = np.repeat(q.scale, g, axis=1), np.repeat(q.zero, g, axis=1)
    codes = q.codes.copy()
    for _ in range(sweeps):
        for j in range(w.shape[1]):
            w_hat = dequantize_codes(codes, scale, zero).astype(np.float64)
            grad = ((w - w_hat) @ h)[:, j]
            target = (w_hat[:, j] + grad / h[j, j]).astype(np.float32)
            codes[:, j] = quantize_codes(target, scale[:, j], zero[:, j], q.bits)
    return codes


@pytest.mark.parametrize("bits,group,symmetric", [(2, 32, False), (3, -1, True), (4, 16, False)])
def test_blocked_sweep_equals_the_plain_one(bits, group, symmetric):
    w, hess = problem(bits, dead=(5,))
    q = gptq_quantize(w, hess, bits=bits, group_size=group, symmetric=symmetric)
    got, report = coordinate_descent(w, q, hess, sweeps=2, block=16)
    np.testing.assert_array_equal(got.codes, plain_sweeps(w, q, hess, 0.01, 2))
    assert report["codes_changed"] > 0  # the problem is one where CD has work to do
    np.testing.assert_array_equal(got.scale, q.scale)  # the grid is held fixed
    np.testing.assert_array_equal(got.zero, q.zero)


@pytest.mark.parametrize("seed", range(4))
def test_objective_never_increases_and_converges(seed):
    w, hess = problem(10 + seed, n=16, k=64)
    h = damped_hessian(hess, 0.01)
    q = gptq_quantize(w, hess, bits=2, group_size=16, symmetric=False)
    last = objective(w, q.dequantized, h)
    for sweeps in (1, 2, 3):
        got, report = coordinate_descent(w, q, hess, sweeps=sweeps)
        now = objective(w, got.dequantized, h)
        assert now <= last * (1 + 1e-12)
        assert report["objective_after"] == pytest.approx(now, rel=1e-9)
        last = now
    assert report["relative_drop"] > 0
    # a fixed point: a converged result changes nothing on another sweep
    done, rep = coordinate_descent(w, q, hess, sweeps=50)
    again, rep2 = coordinate_descent(w, done, hess, sweeps=1)
    assert rep2["codes_changed"] == 0
    np.testing.assert_array_equal(again.codes, done.codes)
    # and each column's code is the best single-code change from there (brute force)
    w64 = w.astype(np.float64)
    base = objective(w64, done.dequantized, h)
    g = done.group_size
    for j in (0, 17, 63):
        for code in range(4):
            trial = done.codes.copy()
            trial[:, j] = code
            hat = dequantize_codes(trial, np.repeat(done.scale, g, 1), np.repeat(done.zero, g, 1))
            rows = ((w64 - hat) @ h * (w64 - hat)).sum(axis=1)
            best = ((w64 - done.dequantized) @ h * (w64 - done.dequantized)).sum(axis=1)
            assert np.all(rows >= best - 1e-9 * base)


def test_zero_sweeps_is_gptq_and_bad_arguments():
    w, hess = problem(3)
    q = gptq_quantize(w, hess, bits=3)
    same, report = coordinate_descent(w, q, hess, sweeps=0)
    np.testing.assert_array_equal(same.codes, q.codes)
    assert report["sweeps"] == 0
    with pytest.raises(ValueError, match="hessian"):
        coordinate_descent(w, q, hess[:-1, :-1])
    with pytest.raises(ValueError, match="codes"):
        coordinate_descent(w[:-1], q, hess)


def test_config_wires_the_sweeps_into_gptq():
    cfg = QuantConfig(method="gptq", w_bits=2, w_group_size=16, a_bits=16, kv_bits=16,
                      gptq_cd_sweeps=2)
    _, quantizer = build_weight_quantizer(cfg)
    assert isinstance(quantizer, GPTQ) and quantizer.cd_sweeps == 2
    assert "+cd2" in cfg.describe()
    w, hess = problem(7)
    plain = GPTQ(bits=2, group_size=16, symmetric=True)
    with_cd = GPTQ(bits=2, group_size=16, symmetric=True, cd_sweeps=2)
    h = damped_hessian(hess, 0.01)
    q0 = plain.quantize(w, plain.prepare(hess, "t"))
    q1 = with_cd.quantize(w, with_cd.prepare(hess, "t"))
    assert objective(w, q1.dequantized, h) < objective(w, q0.dequantized, h)
    with pytest.raises(ValueError, match="gptq_cd_sweeps"):
        QuantConfig(method="rtn", gptq_cd_sweeps=1)
    with pytest.raises(ValueError, match="gptq_cd_sweeps"):
        QuantConfig(method="gptq", gptq_cd_sweeps=-1)


def test_the_quantizer_runs_the_configured_number_of_sweeps():
    """GPTQ(cd_sweeps=n) is GPTQ then coordinate_descent(..., sweeps=n): the count reaches the
    sweeps (a quantizer that always ran one passed the test above)."""
    w, hess = problem(7)
    for n in (1, 3):
        quantizer = GPTQ(bits=2, group_size=16, symmetric=True, cd_sweeps=n)
        prepared = quantizer.prepare(hess, "t")
        got = quantizer.quantize(w, prepared)
        plain = gptq_quantize(w, factor=prepared, bits=2, group_size=16, symmetric=True)
        want, report = coordinate_descent(w, plain, prepared.hessian, damp=prepared.damp,
                                          sweeps=n)
        np.testing.assert_array_equal(got.dequantized, want.dequantized)
    one = GPTQ(bits=2, group_size=16, symmetric=True, cd_sweeps=1)
    three = GPTQ(bits=2, group_size=16, symmetric=True, cd_sweeps=3)
    assert not np.array_equal(one.quantize(w, one.prepare(hess, "t")).dequantized,
                              three.quantize(w, three.prepare(hess, "t")).dequantized)


def test_the_quantizer_passes_static_groups_on():
    """GPTQ(static_groups=True) is gptq_quantize(..., static_groups=True): grids from the
    weights before any update (a quantizer that dropped the flag took them as GPTQ went).
    Without act-order: with it, groups are static anyway."""
    w, hess = problem(3)
    for static in (False, True):
        quantizer = GPTQ(bits=4, group_size=16, symmetric=False, act_order=False,
                         static_groups=static)
        prepared = quantizer.prepare(hess, "t")
        want = gptq_quantize(w, factor=prepared, bits=4, group_size=16, symmetric=False,
                             act_order=False, static_groups=static)
        np.testing.assert_array_equal(quantizer.quantize(w, prepared).dequantized,
                                      want.dequantized)
    q = {s: GPTQ(bits=4, group_size=16, symmetric=False, act_order=False, static_groups=s)
         for s in (False, True)}
    assert not np.array_equal(*(g.quantize(w, g.prepare(hess, "t")).dequantized
                                for g in q.values()))
