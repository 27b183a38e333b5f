"""quantize / dequantize / QTensor against a plain NumPy reference of offq's format.

The reference evaluates the format's formulas (offq/kernels/quant.py docstring) in float32 with
np.rint, so codes, scales and zero-points must match bit for bit; random and adversarial inputs
(odd shapes, one group per row, constant and all-zero groups, 1e30 magnitudes, NaN/Inf) and
argument validation (errors name the argument).
"""
from __future__ import annotations

import numpy as np
import pytest

from offq import _C
from offq.kernels.quant import QTensor, dequantize, quantize
from simd_cap import outputs_by_cap


def ref_quantize(x: np.ndarray, bits: int, group: int, symmetric: bool, clip: float = 1.0):
    """Codes (one per byte, shape of x), scale, zero exactly as the format states (float32)."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    g = k if group == -1 else group
    xg = x.reshape(-1, k // g, g)
    f = np.float32
    maxq = f(2**bits - 1)
    c = f(clip)
    if symmetric:
        scale = (c * np.abs(xg).max(-1)) / f(2 ** (bits - 1) - 1)
        scale = np.where(scale == 0, f(1), scale).astype(f)
        zero = np.full_like(scale, f(2 ** (bits - 1)))
    else:
        # clip shrinks [min, max] about its midpoint (clip = 1: lo = min, hi = max exactly)
        mn, mx = xg.min(-1), xg.max(-1)
        d = (f(0.5) * (f(1) - c)) * (mx - mn)
        lo = mn + d
        hi = mx - d
        scale = (hi - lo) / maxq
        scale = np.where(scale == 0, np.where(hi != 0, np.abs(hi), f(1)), scale).astype(f)
        zero = np.rint(-lo / scale).astype(f)
    q = np.rint(xg / scale[..., None]).astype(f) + zero[..., None]
    q = np.clip(q, f(0), maxq).astype(np.uint8)
    lead = x.shape[:-1]
    return q.reshape(x.shape), scale.reshape(lead + (k // g,)), zero.reshape(lead + (k // g,))


def ref_pack4(q: np.ndarray) -> np.ndarray:
    k = q.shape[-1]
    qq = np.zeros(q.shape[:-1] + (k + (k & 1),), np.uint8)
    qq[..., :k] = q
    return (qq[..., 0::2] | (qq[..., 1::2] << 4)).astype(np.uint8)


def check_against_reference(x, bits, group, symmetric, clip=1.0):
    qt = quantize(x, bits=bits, group_size=group, symmetric=symmetric, clip=clip)
    q, scale, zero = ref_quantize(x, bits, group, symmetric, clip)
    np.testing.assert_array_equal(qt.scale, scale)
    np.testing.assert_array_equal(qt.zero, zero)
    np.testing.assert_array_equal(qt.unpacked_codes(), q)
    g = x.shape[-1] if group == -1 else group
    sums = q.reshape(q.shape[:-1] + (-1, g)).astype(np.int64).sum(-1)
    np.testing.assert_array_equal(qt.code_sums, sums)
    if bits == 4:
        np.testing.assert_array_equal(qt.codes, ref_pack4(q))
    else:
        np.testing.assert_array_equal(qt.codes, q)
    deq = (scale.repeat(g, -1) * (q.astype(np.float32) - zero.repeat(g, -1))).astype(np.float32)
    np.testing.assert_array_equal(qt.dequantize(), deq)
    assert qt.shape == x.shape and qt.group_size == g and qt.bits == bits
    return qt


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group", [((5, 256), 128), ((3, 256), -1), ((1, 128), 128),
                                         ((7, 96), 32), ((2, 3, 64), 16), ((4, 7), 7),
                                         ((3, 9), 3), ((6, 33), 11), ((130,), 65)])
def test_matches_reference(bits, symmetric, shape, group):
    rng = np.random.default_rng(hash((bits, symmetric, shape, group)) % 2**32)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)
         + rng.uniform(-5, 5)).astype(np.float32)
    check_against_reference(x, bits, group, symmetric)


@pytest.mark.parametrize("clip", [0.5, 0.9, 1.0])
def test_clip(clip):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    for sym in (False, True):
        check_against_reference(x, 4, 64, sym, clip)


@pytest.mark.parametrize("clip", [0.5, 0.9])
def test_clip_shrinks_about_the_midpoint(clip):
    """A group of a large offset plus small noise (an OffQ outlier group) keeps its offset under
    clip < 1: the error stays at the noise scale (shrinking towards zero would clamp every value
    to about clip * 100, an error of ~10)."""
    rng = np.random.default_rng(11)
    x = (100.0 + 0.01 * rng.standard_normal((4, 128))).astype(np.float32)
    x[1] -= 200.0  # a negative offset too
    qt = check_against_reference(x, 4, 64, False, clip)
    spread = (x.reshape(4, 2, 64).max(-1) - x.reshape(4, 2, 64).min(-1)).max()
    err = np.abs(qt.dequantize() - x).max()
    assert err <= spread, (err, spread)
    # the clipped range is [mid - clip * half, mid + clip * half] of each group
    xg = x.reshape(4, 2, 64)
    mid = (xg.max(-1) + xg.min(-1)) / 2
    half = (xg.max(-1) - xg.min(-1)) / 2 * clip
    y = qt.dequantize().reshape(4, 2, 64)
    tol = qt.scale[..., None]
    assert np.all(y >= (mid - half)[..., None] - tol) and np.all(y <= (mid + half)[..., None] + tol)
    # constant and all-zero groups still round-trip exactly, without NaN
    c = np.zeros((3, 64), np.float32)
    c[1] = 3.25
    c[2] = -7.0
    y = check_against_reference(c, 4, 32, False, clip).dequantize()
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, c)


def test_rounding_half_to_even():
    # x / scale lands exactly on .5: ties go to the even integer
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.5, 15.0]], np.float32)  # scale = 1, zero = 0
    qt = quantize(x, bits=4, group_size=-1)
    assert qt.scale[0, 0] == 1.0 and qt.zero[0, 0] == 0.0
    np.testing.assert_array_equal(qt.unpacked_codes()[0], [0, 0, 2, 2, 4, 15])


def test_nibble_order_and_odd_k():
    codes = np.array([[1, 2, 3, 4, 5]], np.uint8)
    qt = QTensor.from_codes(codes, np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32),
                            bits=4, group_size=-1, symmetric=False)
    np.testing.assert_array_equal(qt.codes, [[0x21, 0x43, 0x05]])
    np.testing.assert_array_equal(qt.unpacked_codes(), codes)
    np.testing.assert_array_equal(qt.code_sums, [[15]])


@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_and_zero_groups_exact(symmetric):
    x = np.zeros((4, 64), np.float32)
    x[1, :32] = 3.25
    x[1, 32:] = -0.125
    x[2, :32] = -7.0
    x[3, 32:] = 1e-20
    qt = quantize(x, bits=4, group_size=32, symmetric=symmetric)
    y = qt.dequantize()
    assert np.all(np.isfinite(y))
    if not symmetric:
        np.testing.assert_array_equal(y, x)
    else:  # all-zero groups are exact on the symmetric grid too
        np.testing.assert_array_equal(y[0], 0.0)
        np.testing.assert_array_equal(y[2, 32:], 0.0)
    check_against_reference(x, 4, 32, symmetric)


def test_huge_and_tiny_magnitudes():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((4, 128)).astype(np.float32)
    for mag in (1e30, 1e-30):
        x = (base * np.float32(mag)).astype(np.float32)
        for sym in (False, True):
            qt = check_against_reference(x, 4, 64, sym)
            y = qt.dequantize()
            assert np.all(np.isfinite(y))
            err = np.abs(y - x).max() / np.abs(x).max()
            assert err < 0.15
    # an outlier group: large common offset, small spread -> zero-point far outside [0, 15]
    x = (1000.0 + rng.standard_normal((2, 128))).astype(np.float32)
    qt = check_against_reference(x, 4, 128, False)
    assert np.all(qt.zero < -1000)
    spread = x.max(-1) - x.min(-1)
    assert np.all(np.abs(qt.dequantize() - x) <= (spread / 15 * 0.5 + 1e-3)[:, None])


def test_error_bound_asymmetric():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    qt = quantize(x, bits=4, group_size=128)
    err = np.abs(qt.dequantize() - x).reshape(16, 2, 128)
    assert np.all(err <= qt.scale[..., None] * 0.5001)


def nonfinite_cases() -> list[tuple[np.ndarray, int, bool]]:
    """(x, group_size, symmetric) with one NaN, Inf or -Inf in the last row: at the first, a
    middle and the last position of a group read by vectors only (64), and of one whose last
    4 values are a scalar tail (20 = 16 + 4 on either SIMD width)."""
    cases = []
    for group, where in ((64, (0, 17, 63)), (20, (0, 9, 16, 19))):
        for at in where:
            for bad in (np.nan, np.inf, -np.inf):
                for sym in (False, True):
                    x = np.ones((3, 2 * group), np.float32)
                    x[2, group + at] = bad
                    cases.append((x, group, sym))
    return cases


def nonfinite_messages() -> list[str]:
    """What quantize says of each of nonfinite_cases()."""
    out = []
    for x, group, sym in nonfinite_cases():
        try:
            quantize(x, group_size=group, symmetric=sym)
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out


def test_nonfinite_raises():
    for msg in nonfinite_messages():
        assert msg.startswith("x: contains NaN or Inf"), msg


def test_nonfinite_raises_on_every_dispatch(tmp_path):
    """The same cases on the generic C quantizer and the AVX2 one (OFFQ_SIMD_MAX in a fresh
    process): each checks every value of a group, its first and its scalar tail included
    (skipping the tail's check, or the generic loop's first value, fails this)."""
    code = ("import sys, numpy as np\n"
            "from test_quant import nonfinite_messages\n"
            "np.savez(sys.argv[1], m=np.array(nonfinite_messages()))\n")
    got = outputs_by_cap(code, tmp_path, caps=("generic", "avx2"))
    for cap, out in got.items():
        for msg in out["m"]:
            assert str(msg).startswith("x: contains NaN or Inf"), (cap, msg)


def test_range_overflow_raises():
    x = np.array([[-3e38, 3e38, 0.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="x: .*overflows"):
        quantize(x, group_size=-1)


def test_validation_names_arguments():
    x = np.ones((4, 64), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize(x.astype(np.float64))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        quantize([[1.0, 2.0]])
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        quantize(np.ones((64, 4), np.float32).T, group_size=-1)
    with pytest.raises(ValueError, match="x: expected at least 1"):
        quantize(np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="x: the last axis must not be empty"):
        quantize(np.ones((3, 0), np.float32), group_size=-1)
    with pytest.raises(ValueError, match="group_size: the group size 48 must divide"):
        quantize(x, group_size=48)
    with pytest.raises(ValueError, match="group_size: expected a positive"):
        quantize(x, group_size=0)
    for bits in (1, 5, 16):
        with pytest.raises(ValueError, match="bits: expected one of"):
            quantize(x, bits=bits, group_size=32)
    for clip in (0.0, -0.5, 1.5, float("nan"), 1e-50):  # 1e-50 is 0 as the kernel's float32
        with pytest.raises(ValueError, match="clip: expected a ratio in"):
            quantize(x, group_size=32, clip=clip)


def test_from_codes_round_trip_and_validation():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    for bits in (2, 3, 4, 8):
        qt = quantize(x, bits=bits, group_size=32)
        qt2 = QTensor.from_codes(qt.unpacked_codes(), qt.scale, qt.zero, bits=bits, group_size=32,
                                 symmetric=False)
        np.testing.assert_array_equal(qt2.codes, qt.codes)
        np.testing.assert_array_equal(qt2.code_sums, qt.code_sums)
        np.testing.assert_array_equal(dequantize(qt2), dequantize(qt))
        assert qt2.shape == (2, 3, 128) and qt.dequantize().shape == (2, 3, 128)
    codes = np.full((2, 8), 16, np.uint8)
    one = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 15\]"):
        QTensor.from_codes(codes, one, one, bits=4, group_size=-1, symmetric=False)
    with pytest.raises(TypeError, match="codes: expected dtype"):
        QTensor.from_codes(codes.astype(np.int32), one, one, bits=4, group_size=-1,
                           symmetric=False)
    with pytest.raises(ValueError, match="scale: expected shape"):
        QTensor.from_codes(codes % 4, np.ones((2, 2), np.float32), one, bits=2, group_size=-1,
                           symmetric=False)
    with pytest.raises(TypeError, match="zero: expected dtype"):
        QTensor.from_codes(codes % 4, one, one.astype(np.float64), bits=2, group_size=-1,
                           symmetric=False)


def test_qtensor_nbytes_and_frozen():
    x = np.ones((4, 256), np.float32)
    qt = quantize(x, bits=4, group_size=128)
    assert qt.nbytes == 4 * 128 + 3 * 4 * 2 * 4
    assert qt.groups == 2
    with pytest.raises(AttributeError):
        qt.bits = 8  # type: ignore[misc]


def test_binding_validation():
    codes = np.zeros((2, 32), np.uint8)
    s = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="codes: expected last axis 32"):
        _C.dequantize(np.zeros((2, 31), np.uint8), s, s, 4, 32, 64)
    with pytest.raises(ValueError, match="scale: expected the leading shape"):
        _C.dequantize(codes, np.ones((2, 3), np.float32), s, 4, 32, 64)
    with pytest.raises(TypeError, match="zero: expected dtype"):
        _C.dequantize(codes, s, s.astype(np.float64), 4, 32, 64)
    with pytest.raises(ValueError, match="k: expected a positive"):
        _C.unpack_codes(codes, 4, 0)
    with pytest.raises(ValueError, match="bits: expected one of"):
        _C.unpack_codes(codes, 6, 64)


def test_parallel_rows_match_reference_and_raise():
    """Enough rows for a thread team: same codes, and a NaN in one thread's share still raises."""
    from offq.kernels.threads import threads

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((257, 256)) * 3 + 1).astype(np.float32)
    with threads(2):
        for bits in (3, 4):
            qt = check_against_reference(x, bits, 64, False)
            qt2 = QTensor.from_codes(qt.unpacked_codes(), qt.scale, qt.zero, bits=bits,
                                     group_size=64, symmetric=False)
            np.testing.assert_array_equal(qt2.codes, qt.codes)
        x[200, 5] = np.nan
        with pytest.raises(ValueError, match="x: contains NaN or Inf"):
            quantize(x, group_size=64)


_QUANT_EVERY_WIDTH = """
import sys
import numpy as np
from offq.kernels.quant import quantize
rng = np.random.default_rng(11)
out = {}
for i, (shape, group) in enumerate(CASES):
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 4) + rng.uniform(-5, 5)).astype(np.float32)
    x[0, :group] = 7.0                     # a constant group
    x[-1, group:2 * group] = 0.0           # an all-zero group
    x[1 % shape[0], 3] = 1e30              # one huge value (asymmetric: a wide scale)
    for sym in (0, 1):
        qt = quantize(x, bits=4, group_size=group, symmetric=bool(sym))
        out[f"x{i}"] = x
        out[f"c{i}{sym}"] = qt.unpacked_codes()
        out[f"s{i}{sym}"] = qt.scale
        out[f"z{i}{sym}"] = qt.zero
        out[f"m{i}{sym}"] = qt.code_sums
np.savez(sys.argv[-1], **out)
"""


def test_every_simd_width_matches_the_reference(tmp_path):
    """The quantizer as each dispatch runs it (this CPU's widest, AVX2-capped, generic) against the
    reference, in groups that fill whole 16- and 8-lane vectors and groups that leave a scalar
    tail for each (20, 24, 40)."""
    from simd_cap import outputs_by_cap

    cases = [((9, 576), 64), ((5, 256), 128), ((3, 100), 20), ((4, 72), 24), ((3, 80), 40)]
    got = outputs_by_cap(_QUANT_EVERY_WIDTH.replace("CASES", repr(cases)), tmp_path,
                         caps=("", "avx2", "generic"))
    for cap, out in got.items():
        for i, (_, group) in enumerate(cases):
            for sym in (0, 1):
                q, scale, zero = ref_quantize(out[f"x{i}"], 4, group, bool(sym))
                msg = f"cap {cap!r}, case {i}, symmetric {sym}"
                np.testing.assert_array_equal(out[f"c{i}{sym}"], q, err_msg=msg)
                np.testing.assert_array_equal(out[f"s{i}{sym}"], scale, err_msg=msg)
                np.testing.assert_array_equal(out[f"z{i}{sym}"], zero, err_msg=msg)
                sums = q.reshape(q.shape[:-1] + (-1, group)).astype(np.int64).sum(-1)
                np.testing.assert_array_equal(out[f"m{i}{sym}"], sums, err_msg=msg)
