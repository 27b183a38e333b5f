"""Arguments at the edges of what the C bindings accept (a review of every entry point found
each of these passing the checks): sizes past int32 for a BLAS path, integer arguments given as
arrays, code values outside their bit width, and matrices whose magnitude the eigen-solvers cannot
take. Each test fails when its check is removed from the binding."""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from offq import _C


def _untouched_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A C-contiguous writeable array backed by anonymous memory that is never touched, so its
    size costs no RAM (the binding refuses it before reading); skips where the kernel refuses the
    mapping."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | getattr(mmap, "MAP_NORESERVE", 0))
    except (OSError, OverflowError, ValueError) as e:
        pytest.skip(f"no {nbytes}-byte anonymous mapping here: {e}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def test_matmul_i8_refuses_rows_past_int32():
    # the product hands M, N, K to sgemm as int: 2^31 + 9 rows wrapped to 9, and only those
    # were computed
    x = _untouched_array((2**31 + 9, 1), np.float32)
    out = _untouched_array((2**31 + 9, 1), np.float32)
    with pytest.raises(ValueError, match=r"^x: dimensions above 2\^31 - 1"):
        _C.matmul_i8(x, np.ones((1, 1), np.int8), np.ones((1, 1), np.float32), 1, out=out)


@pytest.mark.parametrize("call", [
    lambda bad: _C.quantize(np.zeros((1, 64), np.float32), bad, 32),
    lambda bad: _C.set_num_threads(bad),
    lambda bad: _C.hadamard_factor(bad),
])
def test_an_int_given_as_a_one_element_array_is_named(call):
    with pytest.raises(TypeError, match=r"^\w+: expected an int, got numpy.ndarray"):
        call(np.array([4]))


@pytest.mark.parametrize("bits", [2, 3])
def test_codes_above_the_bit_width_are_refused(bits: int):
    codes = np.zeros((2, 64), np.uint8)
    codes[1, 5] = 1 << bits  # one past the largest code
    ones, zeros = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=f"^codes: a code exceeds {(1 << bits) - 1}"):
        _C.dequantize(codes, ones, zeros, bits, 32, 64)
    with pytest.raises(ValueError, match=f"^packed: a code exceeds {(1 << bits) - 1}"):
        _C.unpack_codes(codes, bits, 64)
    codes[1, 5] = (1 << bits) - 1  # the largest code is fine
    np.testing.assert_array_equal(_C.dequantize(codes, ones, zeros, bits, 32, 64),
                                  codes.astype(np.float32))


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_eigen_solvers_refuse_magnitudes_they_cannot_take(scale: float):
    # at 1e308 LAPACK refused the matrix with an "unsupported" error; at 1e-320 Lanczos returned
    # Inf and NaN vectors without an error
    h = np.eye(16) * scale + np.full((16, 16), scale / 32)
    msg = r"its largest \|entry\| is .*outside \[1e-150, 1e150\]"
    with pytest.raises(ValueError, match=f"^h: {msg}"):
        _C.smallest_eigenpairs(h, 2)
    with pytest.raises(ValueError, match=f"^h: {msg}"):
        _C.tail_eigenpairs(h, 1e-3 * scale)
    with pytest.raises(ValueError, match=f"^h: {msg}"):
        _C.tail_subspace(h, 1e-3 * scale, 4, 10, 0, True)
    with pytest.raises(ValueError, match=f"^cov: {msg}"):
        _C.top_eigenpairs(h, 2, 1e-6, 0)


def test_eigen_solvers_take_magnitudes_inside_the_range():
    for scale in (1e140, 1e-140, 0.0):
        h = np.eye(16) * scale
        values, _ = _C.smallest_eigenpairs(h, 2)
        np.testing.assert_allclose(values, [scale, scale], rtol=1e-12)
        values, vectors = _C.top_eigenpairs(h + np.diag(np.arange(16) * scale / 16), 1, 1e-6, 0)
        assert np.all(np.isfinite(vectors))


_H = np.eye(4)
_LAYER = (None, None) + tuple(
    (np.zeros((n, k // 2), np.uint8), np.zeros((n, 1), np.float32), np.zeros((n, 1), np.float32),
     k, None, k) for n, k in ((8, 4), (4, 4), (8, 4), (4, 4))) + (None,)


@pytest.mark.parametrize("name,call", [
    ("normalize", lambda bad: _C.fwht(np.ones((1, 4)), None, bad, None)),
    ("normalize", lambda bad: _C.hadamard_matrix(4, bad, np.float64)),
    ("top1", lambda bad: _C.cov_update(np.zeros((4, 4)), np.ones((1, 1, 4)), bad, True)),
    ("mirror", lambda bad: _C.cov_update(np.zeros((4, 4)), np.ones((1, 4)), False, bad)),
    ("symmetric", lambda bad: _C.quantize(np.ones((1, 4), np.float32), 4, 4, bad)),
    ("symmetric", lambda bad: _C.mse_clip_search(np.ones((1, 4), np.float32), 4, bad, 10, 1)),
    ("keep_factor", lambda bad: _C.tail_subspace(_H, 1.0, 1, 5, 0, bad)),
    ("a_symmetric", lambda bad: _C.decoder_plan((_LAYER,), 4, 4, 2, 1, 2, 1e-6, bad, 1.0,
                                                False, 2, False, False)),
    ("r4", lambda bad: _C.decoder_plan((_LAYER,), 4, 4, 2, 1, 2, 1e-6, False, 1.0, False, 2,
                                       False, bad)),
])
def test_a_flag_whose_truth_value_fails_is_named(name, call):
    # the bindings parsed flags with "p", which let NumPy's "The truth value of an array with
    # more than one element is ambiguous" through without the argument's name
    with pytest.raises(TypeError, match=rf"^{name}: expected a bool, got numpy.ndarray$"):
        call(np.array([True, False]))
    call(np.bool_(True))  # bools, NumPy bools and the integers 0 / 1 are flags
    call(0)
    call(np.int64(1))
    # a flag is never read by its truth value: "false" would have meant True
    for bad, err in [("false", TypeError), (None, TypeError), (0.0, TypeError), (2, ValueError),
                     (-1, ValueError)]:
        with pytest.raises(err, match=rf"^{name}: expected a bool"):
            call(bad)


def _w4a4_operands(rows: int, k: int = 256):
    """4-bit codes, scales and zero-points of a [rows, k] matrix (groups of 64)."""
    codes, scale, zero, _ = _C.quantize(np.ones((rows, k), np.float32), 4, 64, False, 1.0)
    return codes, scale, zero


def test_matmul_w4a4_with_an_empty_weight_and_decode_layout_reads_nothing():
    # the layout check sampled rows 0..7 of a weight with none: it read past the (empty)
    # layout and refused it for a reason made of stray bytes
    k = 256
    ac, asc, az = _w4a4_operands(3, k)
    none = np.zeros((0, k // 64), np.float32)
    out = _C.matmul_w4a4(ac, asc, az, 64, np.zeros((0, k // 2), np.uint8), none, none.copy(), 64,
                         k, None, "auto", np.zeros((0, k // 8, 32), np.uint8))
    assert out.shape == (3, 0)


@pytest.mark.parametrize("bad, error, match", [
    (None, TypeError, r"^kernel: expected a str such as 'auto', got NoneType$"),
    (5, TypeError, r"^kernel: expected a str such as 'auto', got int$"),
    (b"auto", TypeError, r"^kernel: expected a str such as 'auto', got bytes$"),
    ("auto\0x", ValueError, r"^kernel: contains a null character$"),
])
def test_every_kernel_argument_is_named(bad, error, match):
    k = 256
    ac, asc, az = _w4a4_operands(1, k)
    x = np.ones((1, k), np.float32)
    wq = _C.pack_wq(np.zeros((4, k), np.uint8), 4)
    g = np.ones((4, 2), np.float32)
    calls = [
        lambda: _C.matmul_w4a4(ac, asc, az, 64, ac, asc, az, 64, k, None, bad),
        lambda: _C.matmul_wq(x, wq, g, g.copy(), 4, 128, None, bad),
        lambda: _C.matmul_i8(x, np.ones((4, k), np.int8), np.ones((4, 1), np.float32), k, None,
                             bad),
        lambda: _C.attention_f32(np.zeros((1, 2, 4, 8), np.float32),
                                 np.zeros((1, 2, 2, 8), np.float32), bad),
    ]
    for call in calls:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("where", ["a_scale", "a_zero", "w_scale", "w_zero"])
def test_matmul_w4a4_refuses_a_non_finite_grid(where: str):
    k = 256
    a = dict(zip(("codes", "scale", "zero"), _w4a4_operands(2, k)))
    w = dict(zip(("codes", "scale", "zero"), _w4a4_operands(3, k)))
    side, part = where.split("_")
    bad = {"a": a, "w": w}[side]
    bad[part] = bad[part].copy()
    bad[part][-1, -1] = np.nan
    with pytest.raises(ValueError, match=f"^{where}: contains NaN or Inf"):
        _C.matmul_w4a4(a["codes"], a["scale"], a["zero"], 64, w["codes"], w["scale"], w["zero"],
                       64, k)


def test_dequantize_and_matmul_wq_refuse_a_non_finite_grid():
    codes = np.zeros((4, 256), np.uint8)
    good, bad = np.ones((4, 2), np.float32), np.ones((4, 2), np.float32)
    bad[3, 1] = np.inf
    two_a_byte = np.zeros((4, 128), np.uint8)  # dequantize reads packed codes
    with pytest.raises(ValueError, match="^scale: contains NaN or Inf"):
        _C.dequantize(two_a_byte, bad, good, 4, 128, 256)
    with pytest.raises(ValueError, match="^zero: contains NaN or Inf"):
        _C.dequantize(two_a_byte, good, bad, 4, 128, 256)
    packed = _C.pack_wq(codes, 4)
    x = np.ones((1, 256), np.float32)
    with pytest.raises(ValueError, match="^scale: contains NaN or Inf"):
        _C.matmul_wq(x, packed, bad, good, 4, 128)
    with pytest.raises(ValueError, match="^zero: contains NaN or Inf"):
        _C.matmul_wq(x, packed, good, bad, 4, 128)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_matmul_i8_refuses_a_non_finite_scale(value):
    # it returned NaN in that output column without a word, where every other product refuses
    scale = np.ones((3, 1), np.float32)
    scale[1, 0] = value
    with pytest.raises(ValueError, match="^scale: contains NaN or Inf"):
        _C.matmul_i8(np.ones((1, 8), np.float32), np.ones((3, 8), np.int8), scale, 8)


def test_attention_kv4_int8_refuses_negative_scales():
    # its 8-bit softmax weights e_j * scale_j are unsigned: a negative value scale came back as
    # zeros, where the float mode computes it
    npos, hd = 8, 16
    codes = np.full((npos, 2, hd // 2), 0x53, np.uint8)
    scale = np.ones((npos, 2, 1), np.float32)
    zero = np.full((npos, 2, 1), 8.0, np.float32)
    scale[2, 1, 0] = -1.0
    args = (np.ones((1, hd), np.float32), codes, scale, zero, np.array([npos]))
    assert np.abs(_C.attention_kv4(*args, mode="float")).max() > 0
    with pytest.raises(ValueError, match=r"^scale: mode 'int8' needs scales >= 0, got -1\.0 at "
                                         r"flat index 5$"):
        _C.attention_kv4(*args, mode="int8")


def test_a_rotary_table_error_prints_its_numbers():
    # PyErr_Format has no %g: Python 3.11 printed "%g" literally (3.12 raises SystemError)
    from offq.kernels.decoder import decoder_plan
    d = hd = 16

    def lin(n, k):
        return (np.zeros((n, k // 2), np.uint8), np.ones((n, 1), np.float32),
                np.zeros((n, 1), np.float32), k, None, k)

    layer = (None, None, lin(3 * hd, d), lin(d, hd), lin(2 * d, d), lin(d, d), None)
    plan = decoder_plan((layer,), hidden_size=d, intermediate_size=d, num_heads=1, num_kv_heads=1,
                        head_dim=hd, eps=1e-6, a_symmetric=False, a_clip=1.0, kv_symmetric=False,
                        kv_group=hd, r3=False, r4=False)
    cos = np.full((1, hd // 2), 9.5, np.float32)
    kv = (np.zeros((1, 4, 2, 1, hd // 2), np.uint8), np.zeros((1, 4, 2, 1, 1), np.float32),
          np.zeros((1, 4, 2, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"^cos: a rotary table needs finite values of magnitude "
                                         r"at most 8, got 9\.5 at flat index 0$"):
        _C.decoder_forward(plan, np.ones((1, d), np.float32), 0, cos, cos * 0, *kv,
                           np.empty(1 << 20, np.uint8))


def test_code_row_sizes_of_huge_k_do_not_wrap():
    # (k + 1) / 2 wrapped at k = 2^63 - 1: "expected last axis -4611686018427387904"
    with pytest.raises(ValueError, match=r"^packed: expected last axis 4611686018427387904 "):
        _C.unpack_codes(np.zeros((2, 2), np.uint8), 4, 2**63 - 1)


@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("flat", [0, 1023, 1024, 4095, 4096, 8191, 8192, 130 * 64 - 1])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, "payload-nan"])
def test_the_finiteness_check_sees_every_block(m: int, flat: int, value):
    """matmul_wq checks scales and zero points as its blocks read them (16 weight rows a block at
    M = 1 and 3, one pass before the panels at M = 40), and the binding then names the array in
    blocks of 4096 values: a non-finite value at either edge of a block, or in the short last
    one, is refused, and the extremes of the finite range (largest, smallest subnormal, -0) are
    not."""
    n, k, group = 130, 8192, 128  # 130 x 64 = 8320 scales: blocks of 16 x 64, of 4096, short ones
    packed = _C.pack_wq(np.zeros((n, k), np.uint8), 4)
    x = np.ones((m, k), np.float32)
    extremes = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).smallest_subnormal, -0.0], np.float32)
    good = np.resize(extremes, (n, k // group)).astype(np.float32)
    _C.matmul_wq(x, packed, good, good, 4, group)  # finite extremes pass
    bad = good.copy()
    if value == "payload-nan":  # a NaN whose mantissa is not the default one
        bad.reshape(-1).view(np.uint32)[flat] = 0xFF800001
    else:
        bad.reshape(-1)[flat] = value
    with pytest.raises(ValueError, match="^scale: contains NaN or Inf"):
        _C.matmul_wq(x, packed, bad, good, 4, group)
    with pytest.raises(ValueError, match="^zero: contains NaN or Inf"):
        _C.matmul_wq(x, packed, good, bad, 4, group)


def test_thread_counts_far_above_the_cores_are_refused():
    # OpenMP ends the process (no exception) when it cannot create a team's threads
    before = _C.get_num_threads()
    try:
        with pytest.raises(ValueError, match=r"^n: expected a thread count in \[1, \d+\]"):
            _C.set_num_threads(4096)
        _C.set_num_threads(64)  # oversubscription within the bound is the user's call
    finally:
        _C.set_num_threads(before)


@pytest.mark.parametrize("n", [46001, 2**31, 2**40])
def test_hadamard_matrix_orders_are_bounded_before_allocating(n: int):
    with pytest.raises(ValueError, match=r"^n: expected a length in \[1, 46000\]"):
        _C.hadamard_matrix(n, True, np.float32)
