"""matmul_w4a4 against NumPy: the integer part exactly, the float result within float32
accumulation error of dequantize(a) @ dequantize(w).T, every SIMD variant equal to the generic C
reference bit for bit, adversarial shapes and zero-points, and argument validation. The whole
file (and test_quant.py) runs again in a subprocess with OFFQ_DISABLE_SIMD=1 so the generic
dispatch path is always exercised.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import offq
from offq import _C
from offq.kernels.quant import QTensor, matmul_w4a4, pack_w4_decode, quantize
from offq.kernels.threads import threads

SIMD = _C.simd_info()
KERNELS = ["auto", "generic"] + [k for k, flag in (("avx2", "avx2"), ("vnni", "avx512_vnni"))
                                  if SIMD[flag]]
EPS = np.finfo(np.float32).eps


def from_int_codes(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> QTensor:
    return QTensor.from_codes(q.astype(np.uint8), scale.astype(np.float32),
                              zero.astype(np.float32), bits=4, group_size=group, symmetric=False)


def reference(a: QTensor, w: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 product of the dequantized operands and the bound sum |a_hat| |w_hat|."""
    ad = a.dequantize().reshape(-1, a.shape[-1]).astype(np.float64)
    wd = w.dequantize().astype(np.float64)
    return ad @ wd.T, np.abs(ad) @ np.abs(wd).T


def assert_close(out: np.ndarray, a: QTensor, w: QTensor) -> None:
    ref, mag = reference(a, w)
    out = out.reshape(ref.shape)
    blocks = a.shape[-1] // min(a.group_size, w.group_size)
    # float32 error of per-block scaling + summation over blocks, plus the rounding of the
    # dequantized operands themselves (the reference rounds them to float32 once each)
    tol = (4 * blocks + 8) * EPS * mag + 1e-30
    bad = np.abs(out - ref) > tol
    assert not bad.any(), f"max excess {np.max(np.abs(out - ref) - tol)} at {np.argwhere(bad)[:3]}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n,ga,gw", [
    (1, 256, 40, 128, 128), (3, 512, 24, 128, -1), (8, 256, 16, 64, 64), (9, 384, 70, 128, 64),
    (17, 256, 33, 32, 128), (5, 7, 5, 7, -1), (4, 30, 9, 10, -1), (2, 6, 3, 2, 6),
    (13, 1024, 48, -1, -1), (40, 640, 100, 128, -1), (1, 4096, 8, 128, -1)])
def test_integer_part_exact(kernel, m, k, n, ga, gw):
    """scale 1 and integer zero-points: the result is an integer matrix, computed exactly."""
    rng = np.random.default_rng(m * 1000 + k + n)
    qa = rng.integers(0, 16, (m, k))
    qw = rng.integers(0, 16, (n, k))
    ga_, gw_ = (k if ga == -1 else ga), (k if gw == -1 else gw)
    a = from_int_codes(qa, np.ones((m, k // ga_)), np.zeros((m, k // ga_)), ga)
    w = from_int_codes(qw, np.ones((n, k // gw_)), np.zeros((n, k // gw_)), gw)
    out = matmul_w4a4(a, w, kernel=kernel)
    np.testing.assert_array_equal(out, (qa @ qw.T).astype(np.float32))
    # integer zero-points, still unit scales: (qa - za) @ (qw - zw)^T exactly
    za = rng.integers(-3, 19, (m, k // ga_))
    zw = rng.integers(0, 16, (n, k // gw_))
    a = from_int_codes(qa, np.ones((m, k // ga_)), za, ga)
    w = from_int_codes(qw, np.ones((n, k // gw_)), zw, gw)
    expect = (qa - np.repeat(za, ga_, 1)) @ (qw - np.repeat(zw, gw_, 1)).T
    np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel), expect.astype(np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n,ga,gw,wsym", [
    (1, 512, 64, 128, -1, True), (2, 256, 31, 128, 128, False), (7, 256, 40, 64, 128, True),
    (8, 1024, 17, 128, 64, False), (12, 128, 24, 128, 128, True), (33, 768, 50, 128, -1, True),
    (6, 45, 10, 15, 45, False), (1, 4, 3, 4, 4, False)])
def test_matches_dequantized_reference(kernel, m, k, n, ga, gw, wsym):
    rng = np.random.default_rng(m + 7 * k + 13 * n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0] += 40.0  # a massive-activation row: zero-points far outside [0, 15]
    if m > 2:
        x[1, : min(k, ga if ga > 0 else k)] = 2.5  # a constant group
        x[2] = 0.0  # an all-zero row
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    a = quantize(x, bits=4, group_size=ga)
    wq = quantize(w, bits=4, group_size=gw, symmetric=wsym)
    out = matmul_w4a4(a, wq, kernel=kernel)
    assert out.shape == (m, n) and out.dtype == np.float32
    assert_close(out, a, wq)
    if m > 2:
        np.testing.assert_array_equal(out[2], 0.0)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 23])
def test_simd_variants_equal_generic(m):
    """Every variant forms the same integers and the same float operations in the same order."""
    rng = np.random.default_rng(m)
    for k, ga, gw in ((512, 128, -1), (384, 64, 128), (256, 256, 32), (96, 24, 48)):
        x = (rng.standard_normal((m, k)) + rng.uniform(-30, 30, (m, 1))).astype(np.float32)
        w = rng.standard_normal((37, k)).astype(np.float32)
        a, wq = quantize(x, group_size=ga), quantize(w, group_size=gw, symmetric=bool(m % 2))
        ref = matmul_w4a4(a, wq, kernel="generic")
        for kernel in KERNELS:
            np.testing.assert_array_equal(matmul_w4a4(a, wq, kernel=kernel), ref, err_msg=kernel)


@pytest.mark.parametrize("m", [1, 2, 4, 7])
@pytest.mark.parametrize("za", [0, 15, -112, 127, -113, 128, 7.5, -1e5])
def test_small_m_zero_point_paths(m, za):
    """Decode-size M: activation zero-points that fit int8 next to the codes are folded into them,
    others (outlier tokens, non-integer zero-points from from_codes) take the general path; both
    must give the generic result exactly."""
    rng = np.random.default_rng(m)
    k, n = 512, 24
    qa = rng.integers(0, 16, (m, k))
    zeros = np.full((m, k // 128), za, np.float32)
    a = from_int_codes(qa, rng.uniform(0.5, 2, (m, k // 128)), zeros, 128)
    w = quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=-1, symmetric=True)
    ref = matmul_w4a4(a, w, kernel="generic")
    for kernel in KERNELS:
        np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel), ref, err_msg=kernel)
    assert_close(ref, a, w)


@pytest.mark.parametrize("m,k,n", [(1, 2048, 1032), (5, 1024, 520), (64, 1024, 264),
                                   (300, 256, 40)])
def test_parallel_paths(m, k, n):
    """Sizes large enough for a thread team: column groups (small M), column tiles, and row
    chunks when there are few tiles (n = 40); every variant equals the generic result."""
    rng = np.random.default_rng(m + n)
    x = (rng.standard_normal((m, k)) + rng.uniform(-2, 2, (m, 1))).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    a, wq = quantize(x), quantize(w, group_size=-1, symmetric=True)
    with threads(2):
        ref = matmul_w4a4(a, wq, kernel="generic")
        for kernel in KERNELS:
            np.testing.assert_array_equal(matmul_w4a4(a, wq, kernel=kernel), ref, err_msg=kernel)
    assert_close(ref, a, wq)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("decode", [False, True])
def test_small_m_threads_share_the_columns(m, decode):
    """The small-M path hands out runs of 8-column groups to the threads as they come (a run
    count that does not divide the 129 groups here): two threads give one thread's bits, every
    column written, with the row-major and the decode layout."""
    rng = np.random.default_rng(7 + m)
    k, n = 2048, 1032
    a = quantize(rng.standard_normal((m, k)).astype(np.float32))
    wq = quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=-1, symmetric=True)
    dec = pack_w4_decode(wq) if decode else None
    with threads(1):
        one = matmul_w4a4(a, wq, w_decode=dec)
    with threads(2):
        for _ in range(5):  # the threads take the runs in a different order each time
            np.testing.assert_array_equal(matmul_w4a4(a, wq, w_decode=dec), one)
    assert_close(one, a, wq)


def test_huge_magnitudes_and_offsets():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 256)) * 1e30).astype(np.float32)
    w = (rng.standard_normal((20, 256)) * 1e-6).astype(np.float32)
    a, wq = quantize(x), quantize(w, group_size=-1)
    for kernel in KERNELS:
        out = matmul_w4a4(a, wq, kernel=kernel)
        assert np.all(np.isfinite(out))
        assert_close(out, a, wq)
    # rows that are all offset: 1e4 + small noise, zero-points ~ -1e5
    x = (1e4 + rng.standard_normal((5, 256))).astype(np.float32)
    a = quantize(x)
    assert np.all(a.zero < -1e4)
    for kernel in KERNELS:
        assert_close(matmul_w4a4(a, wq, kernel=kernel), a, wq)


@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_offset_weights(m):
    """Asymmetric weight groups that are all offset (zero-points far outside [0, 15])."""
    rng = np.random.default_rng(10 + m)
    x = rng.standard_normal((m, 512)).astype(np.float32)
    w = (rng.standard_normal((24, 512)) * 0.01 + rng.uniform(-3, 3, (24, 1))).astype(np.float32)
    a, wq = quantize(x), quantize(w, group_size=128)
    assert np.abs(wq.zero).max() > 100
    for kernel in KERNELS:
        assert_close(matmul_w4a4(a, wq, kernel=kernel), a, wq)


def test_leading_dims_and_out():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    w = rng.standard_normal((10, 256)).astype(np.float32)
    a, wq = quantize(x), quantize(w, group_size=-1, symmetric=True)
    out = matmul_w4a4(a, wq)
    assert out.shape == (2, 3, 10)
    assert_close(out, a, wq)
    a2 = a.reshape_rows()
    buf = np.full((6, 10), np.nan, np.float32)
    res = matmul_w4a4(a2, wq, out=buf)
    assert res is buf
    np.testing.assert_array_equal(buf, out.reshape(6, 10))


def test_out_must_not_share_memory_with_an_operand():
    rng = np.random.default_rng(8)
    a = quantize(rng.standard_normal((4, 128)).astype(np.float32), group_size=64)
    w = quantize(rng.standard_normal((8, 128)).astype(np.float32), group_size=64)
    for name in ("a_scale", "a_zero", "w_scale", "w_zero", "a_codes", "w_codes"):
        side, field = name.split("_")
        src = getattr(a if side == "a" else w, field)
        big = np.zeros(32 + src.nbytes // 4 + 1, np.float32)  # room for out, then the operand
        view = big.view(np.uint8)[128: 128 + src.nbytes].view(src.dtype).reshape(src.shape)
        view[...] = src
        op = QTensor(**{**vars(a if side == "a" else w), field: view})
        args = (op, w) if side == "a" else (a, op)
        with pytest.raises(ValueError, match=f"out: must not share memory with {name}"):
            matmul_w4a4(*args, out=big[1:33].reshape(4, 8))  # its last float is the operand's first
    np.testing.assert_array_equal(matmul_w4a4(a, w, out=np.empty((4, 8), np.float32)),
                                  matmul_w4a4(a, w))


def test_group_sizes_whose_sums_overflow_int32_are_refused():
    codes = np.zeros((1, 2**20 + 2**19), np.uint8)  # one byte a code: the check comes first
    with pytest.raises(ValueError, match=r"group_size: the group size 1572864 exceeds 1048576"):
        _C.pack_codes(codes, 8, -1)
    x = np.zeros((1, 2**21), np.float32)
    with pytest.raises(ValueError, match=r"group_size: the group size 2097152 exceeds"):
        _C.quantize(x, 4, -1)
    # a group of 2^21 4-bit codes: at 15 * 127 a term (the small-M path folds the activations'
    # integer zero-point into their codes) its int32 sums would wrap
    k = 2**21
    a = np.full((1, k // 2), 0xFF, np.uint8)
    w = np.full((8, k // 2), 0xFF, np.uint8)
    with pytest.raises(ValueError, match=r"a_group: the group size 2097152 exceeds 1048576"):
        _C.matmul_w4a4(a, np.ones((1, 1), np.float32), np.full((1, 1), -112, np.float32), k,
                       w, np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32), k, k)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_largest_group_folds_its_zero_point_without_wrapping(kernel: str) -> None:
    # every code 15, the activations' zero-point -112 (folded: 127 a code): the largest sums a
    # group of 2^20 can reach, 15 * 127 * 2^20 < 2^31, on the small-M path and the tile path
    k = 2**20
    for m in (1, 9):
        a = np.full((m, k // 2), 0xFF, np.uint8)
        w = np.full((8, k // 2), 0xFF, np.uint8)
        out = _C.matmul_w4a4(a, np.ones((m, 1), np.float32), np.full((m, 1), -112, np.float32), k,
                             w, np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32), k, k,
                             kernel=kernel)
        np.testing.assert_array_equal(out, np.float32(15 * 127 * k))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qa,za", [(15, -112), (0, 127), (15, -53), (0, 68), (15, -54), (0, 69),
                                   (15, 0), (0, 15)])
@pytest.mark.parametrize("wzero", [0, 8])
@pytest.mark.parametrize("ga", [512, 64])
def test_folded_tile_sums_at_their_limits(kernel: str, qa: int, za: int, wzero: int,
                                          ga: int) -> None:
    """The GEMM tile folds the activations' zero-point into their codes (qa - za as int8) when
    the weight has one integer zero-point: AVX2 sums the folded products in 16-bit lanes and
    widens every 32767 // (30 * max |qa - za|) steps of 4 k, so all-15 weights against codes at
    the edges of each span (|qa - za| = 127, 68 and 69 around the 16-step span, 15) must give the
    exact integer sum; a longer span wraps. Groups of 512 take several spans a block; groups of
    64 one (AVX2's one-chunk copy) where the span holds the 64 k (|qa - za| <= 68), else several."""
    k, m, n = 1024, 9, 40  # 9 rows: the tile path on every variant
    w = from_int_codes(np.full((n, k), 15), np.ones((n, 1)), np.full((n, 1), wzero), k)
    a = from_int_codes(np.full((m, k), qa), np.ones((m, k // ga)), np.full((m, k // ga), za), ga)
    np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel),
                                  np.full((m, n), (15 - wzero) * (qa - za) * k, np.float32))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ga", [1024, 512, 256, 64])
def test_unfolded_tile_sums_at_their_limits(kernel: str, ga: int) -> None:
    """The unfolded tile (weight zero-points differ by row, so nothing folds) sums raw codes:
    AVX2 keeps pairs of 15 * 15 products in 16-bit lanes for 256 k (64 steps of 2 * 225 = 28800 <
    32767) and then widens; all-15 codes on both sides must give the exact integer sum. A chunk
    of 512 k wraps (-31744 for 230400 at groups of 512 and 1024)."""
    k, m, n = 1024, 9, 40  # 9 rows: the tile path on every variant
    wzero = np.arange(n)[:, None] % 2  # 0, 1, 0, 1, ...: no single zero-point to fold
    w = from_int_codes(np.full((n, k), 15), np.ones((n, 1)), wzero, k)
    a = from_int_codes(np.full((m, k), 15), np.ones((m, k // ga)), np.zeros((m, k // ga)), ga)
    expect = np.broadcast_to((15 * (15 - wzero[:, 0]) * k).astype(np.float32), (m, n))
    np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel), expect)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k,ga,gw", [(576, 64, -1), (512, 128, 64), (96, 24, 48), (45, 15, 45)])
def test_folded_and_unfolded_tiles_give_the_same_bits(kernel: str, k: int, ga: int,
                                                      gw: int) -> None:
    """A strip of 8 rows folds only when every zero-point of its rows does: rows 1-7 share
    strip 0 with a massive-activation row (zero-points far outside int8: the unfolded tile) and
    are repeated as rows 9-15 of strip 1 (the folded tile); both must give the same bits."""
    rng = np.random.default_rng(k + ga)
    x = rng.standard_normal((16, k)).astype(np.float32)
    x[0] += 1e4
    x[9:16] = x[1:8]
    a = quantize(x, group_size=ga)
    w = quantize(rng.standard_normal((40, k)).astype(np.float32), group_size=gw, symmetric=True)
    assert np.all(np.abs(a.zero[0]) > 127)
    out = matmul_w4a4(a, w, kernel=kernel)
    np.testing.assert_array_equal(out[9:16], out[1:8])
    assert_close(out, a, w)


def test_validation_names_arguments():
    rng = np.random.default_rng(7)
    a = quantize(rng.standard_normal((4, 192)).astype(np.float32), group_size=48)
    w = quantize(rng.standard_normal((8, 192)).astype(np.float32), group_size=64)
    with pytest.raises(ValueError, match="w_group: the group sizes of a .48. and w .64."):
        matmul_w4a4(a, w)
    w = quantize(rng.standard_normal((8, 192)).astype(np.float32), group_size=-1)
    with pytest.raises(ValueError, match="a: expected a 4-bit"):
        matmul_w4a4(quantize(rng.standard_normal((4, 192)).astype(np.float32), bits=8,
                             group_size=48), w)
    with pytest.raises(ValueError, match="w: K mismatch"):
        matmul_w4a4(a, quantize(rng.standard_normal((8, 96)).astype(np.float32), group_size=-1))
    with pytest.raises(ValueError, match="w: expected a 2-D"):
        matmul_w4a4(a, quantize(rng.standard_normal((2, 4, 192)).astype(np.float32),
                                group_size=-1))
    with pytest.raises(TypeError, match="w: expected a QTensor"):
        matmul_w4a4(a, np.ones((8, 192), np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 8\)"):
        matmul_w4a4(a, w, out=np.empty((4, 9), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype"):
        matmul_w4a4(a, w, out=np.empty((4, 8), np.float64))
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        matmul_w4a4(a, w, out=np.empty((8, 4), np.float32).T)
    with pytest.raises(ValueError, match="out: expected a writeable"):
        ro = np.empty((4, 8), np.float32)
        ro.flags.writeable = False
        matmul_w4a4(a, w, out=ro)
    with pytest.raises(ValueError, match="kernel: expected one of 'auto', 'generic', 'avx2', 'vnni'"):
        matmul_w4a4(a, w, kernel="sse9")
    with pytest.raises(ValueError, match="kernel: matmul_w4a4 has no 'avx512' variant"):
        matmul_w4a4(a, w, kernel="avx512")
    # the raw binding validates every array itself
    args = [a.codes, a.scale, a.zero, 48, w.codes, w.scale, w.zero, 192, 192]
    bad = list(args)
    bad[0] = a.codes.astype(np.int8)
    with pytest.raises(TypeError, match="a_codes: expected dtype"):
        _C.matmul_w4a4(*bad)
    bad = list(args)
    bad[5] = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="w_scale: expected the leading shape"):
        _C.matmul_w4a4(*bad)
    bad = list(args)
    bad[4] = np.ascontiguousarray(np.zeros((96, 8), np.uint8).T)[:, :95]
    with pytest.raises(ValueError, match="w_codes"):
        _C.matmul_w4a4(*bad)
    bad = list(args)
    bad[3] = 50
    with pytest.raises(ValueError, match="a_group: the group size 50 must divide"):
        _C.matmul_w4a4(*bad)
    bad = list(args)
    bad[3] = -1
    bad[8] = 190
    with pytest.raises(ValueError, match="a_codes: expected last axis 95"):
        _C.matmul_w4a4(*bad)


def test_unavailable_kernel_is_an_error_not_a_crash():
    if SIMD["disabled_by_env"]:
        a = quantize(np.ones((1, 128), np.float32))
        for kernel in ("avx2", "vnni"):
            with pytest.raises(ValueError, match=f"kernel: '{kernel}' is not available"):
                matmul_w4a4(a, a, kernel=kernel)


@pytest.mark.skipif(os.environ.get("OFFQ_DISABLE_SIMD") == "1",
                    reason="already running the generic path")
def test_generic_dispatch_path_in_subprocess(tmp_path):
    """Re-run the quant and matmul tests with SIMD dispatch forced off (OFFQ_DISABLE_SIMD=1).

    The child imports the same offq build as this process (installed, in-place or CI's ASan copy):
    its directory goes first on PYTHONPATH and the child runs outside the source tree."""
    here = Path(__file__).resolve().parent
    offq_root = str(Path(offq.__file__).resolve().parents[1])
    env = dict(os.environ, OFFQ_DISABLE_SIMD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [offq_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(here / "test_quant.py"), str(here / "test_matmul_w4a4.py")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "-c", "from offq import _C; print(_C.simd_info()['disabled_by_env'])"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "True", check.stderr


@pytest.mark.parametrize("k, a_group, w_group", [(576, 64, 576), (576, 64, 64), (1536, 64, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_small_m_blocks_of_64_equal_generic(k, a_group, w_group, m):
    """Blocks of 64 (activation groups of 64, d = 576) on every small-M path the CPU offers
    (AVX2 gemv; 256-bit VNNI gemv), folded (ordinary rows) and general (a massive-outlier row)."""
    rng = np.random.default_rng(k + m)
    w = quantize(rng.standard_normal((200, k)).astype(np.float32), bits=4, group_size=w_group,
                 symmetric=True)
    for massive in (False, True):
        x = rng.standard_normal((m, k)).astype(np.float32)
        if massive:
            x[0, :64] += 300.0  # zero-points far outside [-112, 127]: the general path
        a = quantize(x, bits=4, group_size=a_group)
        ref = matmul_w4a4(a, w, kernel="generic")
        for kernel in [kk for kk, ok in (("avx2", SIMD["avx2"]), ("vnni", SIMD["avx512_vnni"]))
                       if ok]:
            np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel), ref, err_msg=kernel)


# ---- the decode layout (offq.h; pack_w4_decode) and the small-M kernels that read it ----------

SIMD_KERNELS = [kk for kk, ok in (("avx2", SIMD["avx2"]), ("vnni", SIMD["avx512_vnni"])) if ok]


def decode_layout_reference(codes: np.ndarray, n: int, k: int) -> np.ndarray:
    """The decode layout written from its definition in offq.h, in NumPy: rows in groups of 8
    (zero-padded), k in chunks of 8, byte i of row j = element 8c + i | element 8c + 4 + i << 4."""
    q = np.empty((n, k), np.uint8)
    q[:, 0::2], q[:, 1::2] = codes & 15, codes >> 4  # stored format: even element in the low nibble
    rows = (n + 7) // 8 * 8
    q = np.concatenate([q, np.zeros((rows - n, k), np.uint8)])
    q = q.reshape(rows // 8, 8, k // 8, 2, 4)  # group, row j, chunk c, half, i
    packed = q[:, :, :, 0, :] | (q[:, :, :, 1, :] << 4)  # [group, j, c, i]
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(rows // 8, k // 8, 32)


@pytest.mark.parametrize("n,k", [(1, 8), (8, 64), (13, 576), (200, 40), (960, 576)])
def test_decode_layout_matches_its_definition(n, k):
    rng = np.random.default_rng(n * k)
    w = quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=-1)
    np.testing.assert_array_equal(pack_w4_decode(w), decode_layout_reference(w.codes, n, k))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,k,ga,gw", [(24, 64, 64, -1), (13, 576, 64, -1), (200, 40, 8, 8),
                                       (37, 40, 8, 40), (64, 1536, 128, 128), (9, 256, 32, 64),
                                       (960, 576, 64, 64)])
def test_decode_layout_kernels_equal_generic(m, n, k, ga, gw):
    """Every SIMD small-M kernel on the decode layout gives the generic result bit for bit: folded
    rows, massive-outlier rows (the general path), symmetric and asymmetric weights, grouped and
    per-channel weights, N not a multiple of 8, blocks of 8 to 128 (5 rows: the GEMM, unchanged)."""
    rng = np.random.default_rng(m * n + k)
    for wsym in (True, False):
        w = quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=gw, symmetric=wsym)
        dec = pack_w4_decode(w)
        for massive in (False, True):
            x = (rng.standard_normal((m, k)) + rng.uniform(-3, 3, (m, 1))).astype(np.float32)
            if massive:  # the last row's first group far from 0: zero-point outside
                x[-1, :ga] += 400.0  # [-112, 127], so its rows take the unfolded path
            a = quantize(x, group_size=ga)
            assert (a.zero[-1, 0] < -112) == massive
            ref = matmul_w4a4(a, w, kernel="generic")
            for kernel in SIMD_KERNELS + ["generic"]:
                got = matmul_w4a4(a, w, kernel=kernel, w_decode=dec)
                np.testing.assert_array_equal(got, ref, err_msg=f"{kernel} massive={massive}")


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("za", [0, 15, -112, 127, -113, 128, 7.5, -1e5])
def test_decode_layout_zero_point_paths(za, m):
    """The folding condition of the decode-layout kernels is the one of the other small-M paths."""
    rng = np.random.default_rng(3)
    k, n = 512, 24
    a = from_int_codes(rng.integers(0, 16, (m, k)), rng.uniform(0.5, 2, (m, k // 128)),
                       np.full((m, k // 128), za, np.float32), 128)
    w = quantize(rng.standard_normal((n, k)).astype(np.float32), group_size=-1, symmetric=True)
    ref = matmul_w4a4(a, w, kernel="generic")
    for kernel in SIMD_KERNELS:
        np.testing.assert_array_equal(matmul_w4a4(a, w, kernel=kernel, w_decode=pack_w4_decode(w)),
                                      ref, err_msg=kernel)


def test_decode_layout_extreme_codes():
    """All-15 weights against folded activations at both ends of int8 (|qa - za| = 127): the
    16-bit sums of the AVX2 kernel reach 4 x 7620 = 30480 and must not saturate."""
    k, n = 1024, 16
    w = from_int_codes(np.full((n, k), 15), np.ones((n, 1)), np.zeros((n, 1)), k)
    for qa, za in ((15, -112), (0, 127)):
        a = from_int_codes(np.full((1, k), qa), np.ones((1, k // 128)),
                           np.full((1, k // 128), za, np.float32), 128)
        ref = matmul_w4a4(a, w, kernel="generic")
        np.testing.assert_array_equal(ref, np.full((1, n), 15.0 * (qa - za) * k, np.float32))
        for kernel in SIMD_KERNELS:
            np.testing.assert_array_equal(
                matmul_w4a4(a, w, kernel=kernel, w_decode=pack_w4_decode(w)), ref, err_msg=kernel)


@pytest.mark.parametrize("n", [1, 8, 13, 40])
def test_decode_layout_of_another_weight_is_refused(n):
    """Any bytes are valid codes, so a w_decode packed from another weight of the same shape
    would silently give another product: its first and last row groups are checked."""
    rng = np.random.default_rng(n)
    a = quantize(rng.standard_normal((1, 256)).astype(np.float32), group_size=128)
    w, other = (quantize(rng.standard_normal((n, 256)).astype(np.float32), group_size=-1,
                         symmetric=True) for _ in range(2))
    np.testing.assert_array_equal(matmul_w4a4(a, w, w_decode=pack_w4_decode(w)),
                                  matmul_w4a4(a, w))
    with pytest.raises(ValueError, match="w_decode: not pack_w4_decode"):
        matmul_w4a4(a, w, w_decode=pack_w4_decode(other))


def test_decode_layout_validation():
    rng = np.random.default_rng(0)
    w = quantize(rng.standard_normal((10, 64)).astype(np.float32), group_size=-1)
    a = quantize(rng.standard_normal((1, 64)).astype(np.float32), group_size=64)
    dec = pack_w4_decode(w)
    assert dec.shape == (2, 8, 32) and dec.dtype == np.uint8
    with pytest.raises(ValueError, match="w_decode: expected shape"):
        matmul_w4a4(a, w, w_decode=dec[:1].copy())
    with pytest.raises(TypeError, match="w_decode"):
        matmul_w4a4(a, w, w_decode=dec.astype(np.int16))
    with pytest.raises(ValueError, match="w_decode"):
        matmul_w4a4(a, w, w_decode=np.asfortranarray(dec.reshape(16, 32)).reshape(2, 8, 32)[:, ::-1])
    w40 = quantize(rng.standard_normal((3, 36)).astype(np.float32), group_size=-1)
    with pytest.raises(ValueError, match="multiple of 8"):
        _C.pack_w4_decode(w40.codes, 36)
    with pytest.raises(ValueError, match="codes"):
        _C.pack_w4_decode(w.codes[:, :5].copy(), 64)
    with pytest.raises(TypeError, match="QTensor"):
        pack_w4_decode(np.zeros((8, 32), np.uint8))
