"""The C decoders' residual add + RMSNorm (csrc/norm.c, x86/norm_avx2.c) against a NumPy
reference that adds in the kernel's documented order, under every SIMD dispatch this CPU offers:
rows that fill whole 16- and 8-lane vectors, rows that fall back to a narrower width (24, 20),
and adversarial magnitudes."""
import numpy as np
import pytest

from offq import _C
from simd_cap import outputs_by_cap


def ref_residual_rms_norm(h: np.ndarray, y: np.ndarray | None, w: np.ndarray | None,
                          eps: float) -> tuple[np.ndarray, np.ndarray]:
    """s = h + y; out = s / sqrt(ss / d + eps) * w, ss the float64 sum of squares as eight running
    sums (element i into sum i % 8, in order) joined by ((0+4)+(2+6))+((1+5)+(3+7))."""
    s = h if y is None else (h + y).astype(np.float32)
    rows, d = s.shape
    part = np.zeros((rows, 8), np.float64)
    for i in range(d):
        part[:, i % 8] += s[:, i].astype(np.float64) ** 2
    ss = ((part[:, 0] + part[:, 4]) + (part[:, 2] + part[:, 6])) + \
         ((part[:, 1] + part[:, 5]) + (part[:, 3] + part[:, 7]))
    with np.errstate(over="ignore"):  # a sum past float32's range: r = inf, out = 0
        r = np.sqrt(ss.astype(np.float32) / np.float32(d) + np.float32(eps)).astype(np.float32)
    out = (s / r[:, None]).astype(np.float32)
    if w is not None:
        out = (out * w).astype(np.float32)
    return s, out


def norm_cases() -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(h, y, w) over widths and magnitudes a model rarely produces."""
    rng = np.random.default_rng(7)
    cases = []
    for d in (576, 1536, 64, 24, 20, 8, 3):
        h = rng.standard_normal((5, d)).astype(np.float32)
        h[1] *= np.float32(1e-30)            # subnormal-adjacent squares
        h[2] *= np.float32(1e18)             # squares past float32's range (float64 holds them)
        h[3, : d // 2] = 0.0                 # half zeros
        h[4] = 0.0                           # all zeros: the divisor is sqrt(eps)
        y = rng.standard_normal((5, d)).astype(np.float32) * np.float32(3.0)
        w = rng.uniform(-2, 2, d).astype(np.float32)
        cases += [(h, y, w), (h, None, w), (h, y, None)]
    return cases


def test_residual_rms_norm_matches_the_reference_bit_for_bit():
    for h, y, w in norm_cases():
        s, out = _C.residual_rms_norm(h, y, w, 1e-5)
        rs, rout = ref_residual_rms_norm(h, y, w, 1e-5)
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(out, rout)


_EVERY_WIDTH = (
    "import sys, numpy as np\n"
    "from offq import _C\n"
    "from test_norm import norm_cases\n"
    "res = {}\n"
    "for i, (h, y, w) in enumerate(norm_cases()):\n"
    "    res[f's{i}'], res[f'o{i}'] = _C.residual_rms_norm(h, y, w, 1e-5)\n"
    "np.savez(sys.argv[1], **res)\n"
)


def test_every_simd_width_matches_the_reference(tmp_path):
    """The widest dispatch, AVX2-capped and generic, each against the reference."""
    got = outputs_by_cap(_EVERY_WIDTH, tmp_path, caps=("", "avx2", "generic"))
    for cap, res in got.items():
        for i, (h, y, w) in enumerate(norm_cases()):
            rs, rout = ref_residual_rms_norm(h, y, w, 1e-5)
            np.testing.assert_array_equal(res[f"s{i}"], rs, err_msg=f"cap {cap!r}, case {i}")
            np.testing.assert_array_equal(res[f"o{i}"], rout, err_msg=f"cap {cap!r}, case {i}")


def test_inputs_are_left_alone_and_bad_arguments_named():
    h = np.ones((2, 16), np.float32)
    y = np.full((2, 16), 2.0, np.float32)
    s, out = _C.residual_rms_norm(h, y, None, 1e-30)
    np.testing.assert_array_equal(h, 1.0)
    np.testing.assert_array_equal(s, 3.0)
    np.testing.assert_array_equal(out, 1.0)
    with pytest.raises(TypeError, match="^h: expected dtype float32"):
        _C.residual_rms_norm(h.astype(np.float64), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"^y: expected shape \(2, 16\)"):
        _C.residual_rms_norm(h, y[:1], None, 1e-5)
    with pytest.raises(ValueError, match=r"^weight: expected shape \(16,\)"):
        _C.residual_rms_norm(h, None, np.ones(15, np.float32), 1e-5)
    with pytest.raises(ValueError, match="^h: expected a C-contiguous"):
        _C.residual_rms_norm(np.ones((16, 2), np.float32).T, None, None, 1e-5)
    for eps in (float("nan"), 0.0, 1e-50, -1e-6, 1.5):  # 0 (or 0 in float32): a zero row's 0 / 0
        with pytest.raises(ValueError, match=r"^eps: expected a finite value in \(0, 1\]"):
            _C.residual_rms_norm(h, None, None, eps)
    with pytest.raises(ValueError, match="^h: expected at least one column"):
        _C.residual_rms_norm(np.ones((2, 0), np.float32), None, None, 1e-5)
