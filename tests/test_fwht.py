"""fwht / hadamard_matrix against plain NumPy references (Sylvester by doubling, Kronecker with the
tabulated H_m), on random and adversarial inputs, on both dispatch paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offq.kernels import SUPPORTED_ORDERS, fwht, hadamard_factor, hadamard_matrix, is_supported
from offq import _C
from simd_cap import outputs_by_cap

REPO = Path(__file__).resolve().parents[1]
TOL = {np.float32: 2e-6, np.float64: 1e-13}  # relative to max |y|, times log2(n)


def sylvester(n: int) -> np.ndarray:
    """Reference Sylvester matrix (the order of scipy.linalg.hadamard), by repeated doubling."""
    assert n >= 1 and n & (n - 1) == 0
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def butterfly(x: np.ndarray) -> np.ndarray:
    """Unnormalised x @ sylvester(n) by NumPy butterflies (for sizes where the matrix is big)."""
    n = x.shape[-1]
    y = x.astype(np.float64).reshape(-1, n)
    h = 1
    while h < n:
        v = y.reshape(-1, n // (2 * h), 2, h)
        y = np.stack([v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]], axis=2).reshape(-1, n)
        h *= 2
    return y.reshape(x.shape)


def test_butterfly_reference_matches_sylvester():
    x = np.random.default_rng(9).standard_normal((3, 256))
    np.testing.assert_allclose(butterfly(x), x @ sylvester(256), atol=1e-11)


def reference_matrix(n: int) -> np.ndarray:
    """H_m (x) H_{2^k}, unnormalised, float64."""
    m = hadamard_factor(n)
    assert m > 0
    if m == 1:
        return sylvester(n)
    return np.kron(_C.hadamard_base(m), sylvester(n // m))


def reference(x: np.ndarray, n: int, normalize: bool = True) -> np.ndarray:
    """x @ (H_m (x) H_p) in float64 without forming the n x n matrix: y[c, d] = sum Hm[a, c]
    X[a, b] Hp[b, d] over X = x viewed as [m, p]."""
    m = hadamard_factor(n)
    p = n // m
    hm = _C.hadamard_base(m) if m > 1 else np.ones((1, 1))
    xs = x.astype(np.float64).reshape(-1, m, p)
    xs = xs @ sylvester(p) if p <= 1024 else butterfly(xs)
    y = np.einsum("ac,rab->rcb", hm, xs)
    return y.reshape(x.shape) / (np.sqrt(n) if normalize else 1.0)


def assert_close(y: np.ndarray, ref: np.ndarray, dtype, n: int) -> None:
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(y.astype(np.float64) - ref).max() / scale
    assert err <= TOL[dtype] * max(1, np.log2(n)), err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
def test_power_of_two_matches_sylvester(n, dtype):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)).astype(dtype)
    x0 = x.copy()
    y = fwht(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert np.array_equal(x, x0), "x must not change without out="
    assert_close(y, reference(x, n), dtype, n)
    assert_close(fwht(x, normalize=False), reference(x, n, normalize=False), dtype, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [12, 20, 40, 28 * 2, 36 * 16, 44, 52 * 4, 60, 108, 140 * 2, 148,
                               1536, 14336, 18944])
def test_m_times_power_of_two(n, dtype):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n)).astype(dtype)
    assert_close(fwht(x), reference(x, n), dtype, n)


def test_project_sizes_supported():
    for n in [64, 128, 576, 1536, 4096, 14336, 18944]:
        assert is_supported(n), n
    assert hadamard_factor(576) == 36 and hadamard_factor(1536) == 12
    assert hadamard_factor(14336) == 28 and hadamard_factor(18944) == 148
    for m in [12, 20, 28, 36, 44, 52, 60, 108, 140, 148]:
        assert m in SUPPORTED_ORDERS


@pytest.mark.parametrize("m", SUPPORTED_ORDERS)
def test_tables_are_hadamard(m):
    h = _C.hadamard_base(m)
    assert set(np.unique(h)) == {-1.0, 1.0}
    assert np.array_equal(h @ h.T, m * np.eye(m))
    assert np.all(h[0] == 1) and np.all(h[:, 0] == 1)  # sign-normalised


def test_committed_table_matches_generator(tmp_path):
    out = tmp_path / "tables.h"
    subprocess.run([sys.executable, str(REPO / "csrc" / "gen_hadamard_tables.py"), str(out)],
                   check=True, capture_output=True)
    assert out.read_text() == (REPO / "csrc" / "hadamard_tables.h").read_text()


@pytest.mark.parametrize("n", [8, 12, 64, 576, 1536])
def test_hadamard_matrix(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == np.float64
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(h, reference_matrix(n) / np.sqrt(n), atol=1e-15)
    np.testing.assert_allclose(h[0], np.full(n, 1 / np.sqrt(n)))  # all-ones row 0
    x = np.random.default_rng(0).standard_normal((5, n))
    np.testing.assert_allclose(fwht(x), x @ h, atol=1e-12)
    hu = hadamard_matrix(n, normalize=False, dtype=np.float32)
    assert hu.dtype == np.float32 and np.array_equal(hu, reference_matrix(n))
    if n & (n - 1) == 0:
        assert np.array_equal(h, h.T)  # Sylvester is symmetric


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leading_shapes_block_and_out(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 2, 96)).astype(dtype)  # odd leading shape, 96 = 12 * 8
    assert_close(fwht(x), reference(x, 96), dtype, 96)
    y = fwht(x, block=32)
    ref = reference(x.reshape(3, 5, 2, 3, 32), 32).reshape(x.shape)
    assert_close(y, ref, dtype, 32)
    y = fwht(x, block=12)
    assert_close(y, reference(x.reshape(-1, 12), 12).reshape(x.shape), dtype, 12)
    out = np.empty_like(x)
    r = fwht(x, out=out)
    assert r is out
    assert_close(out, reference(x, 96), dtype, 96)
    z = x.copy()
    assert fwht(z, out=z) is z  # in place
    np.testing.assert_array_equal(z, out)
    one = rng.standard_normal(64).astype(dtype)  # 1-D
    assert_close(fwht(one), reference(one[None], 64)[0], dtype, 64)
    empty = np.zeros((0, 64), dtype)
    assert fwht(empty).shape == (0, 64)


def test_involution_and_small_sizes():
    x = np.random.default_rng(2).standard_normal((4, 1024))
    np.testing.assert_allclose(fwht(fwht(x)), x, atol=1e-12)  # normalised Sylvester: H @ H = I
    np.testing.assert_array_equal(fwht(np.array([[3.0]])), [[3.0]])
    np.testing.assert_allclose(fwht(np.array([[1.0, 2.0]]), normalize=False), [[3.0, -1.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adversarial_values(dtype):
    big = np.finfo(dtype).max / 8
    x = np.zeros((2, 16), dtype)
    x[0, 0] = big
    x[1, 3] = -big
    y = fwht(x, normalize=False)
    assert np.all(np.abs(y[0]) == big) and np.all(np.abs(y[1]) == big)
    x = np.ones((1, 4096), dtype) * 1e30
    y = fwht(x)
    assert np.isfinite(y).all() and np.isclose(y[0, 0], 1e30 * 64, rtol=1e-5)
    x = np.random.default_rng(3).standard_normal((3, 128)).astype(dtype)
    x[1, 7] = np.nan
    x[2, 5] = np.inf
    y = fwht(x)
    assert np.isfinite(y[0]).all()
    assert np.isnan(y[1]).all()  # NaN propagates to every output of its row
    assert not np.isfinite(y[2]).any()  # +Inf lands on every output of its row (+-Inf)


def test_validation_errors():
    good = np.zeros((2, 16), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        fwht(good.astype(np.int32))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        fwht([[1.0, 2.0]])
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        fwht(np.zeros((16, 4), np.float32).T)
    with pytest.raises(ValueError, match="x: expected at least 1 dimensions"):
        fwht(np.array(1.0, np.float32))
    with pytest.raises(ValueError, match="x: the last axis must have length >= 1"):
        fwht(np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError, match="block: expected a positive divisor"):
        fwht(good, block=3)
    with pytest.raises(ValueError, match="block: expected a positive divisor"):
        fwht(good, block=0)
    with pytest.raises(TypeError, match="block: expected an int or None"):
        fwht(good, block=2.0)
    with pytest.raises(ValueError, match="block: .* is out of range"):
        fwht(good, block=10**30)
    with pytest.raises(ValueError, match="block: no Hadamard construction .* length 188 .*block=4"):
        fwht(np.zeros((1, 376), np.float32), block=188)
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        fwht(good, out=np.zeros((2, 16), np.float64))
    with pytest.raises(ValueError, match="out: expected the shape of x"):
        fwht(good, out=np.zeros((2, 8), np.float32))
    ro = np.zeros((2, 16), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable"):
        fwht(good, out=ro)
    buf = np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="out: overlaps x"):
        fwht(buf[:32].reshape(2, 16), out=buf[8:40].reshape(2, 16))
    with pytest.raises(TypeError, match="x: expected native byte order"):
        fwht(good.astype(">f4"))
    with pytest.raises(TypeError, match="out: expected native byte order"):
        fwht(good, out=np.zeros((2, 16), ">f4"))
    with pytest.raises(ValueError, match=r"n: expected a length in \[1, 46000\], got 0"):
        hadamard_matrix(0)
    with pytest.raises(TypeError, match="dtype: expected float32 or float64"):
        hadamard_matrix(4, dtype=np.int64)


def test_unsupported_sizes_name_a_block():
    with pytest.raises(ValueError) as e:
        fwht(np.zeros((1, 12032), np.float32))  # 188 * 64: no construction here
    msg = str(e.value)
    assert "12032" in msg and "no Hadamard construction" in msg and "block=256" in msg
    assert not is_supported(12032) and is_supported(11008)  # 11008 = 172 * 64 (Williamson)
    np.testing.assert_allclose(
        fwht(np.ones((1, 12032), np.float32), block=256)[0, ::256], np.full(47, 16.0))
    for n, b in [(3, 1), (188 * 4, 16), (188, 4), (7 * 3, 1)]:
        with pytest.raises(ValueError, match=f"block={b}"):
            fwht(np.zeros((1, n)))
        with pytest.raises(ValueError, match="no Hadamard construction"):
            hadamard_matrix(n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_rows_parallel_path(dtype):
    rng = np.random.default_rng(4)
    for rows, n in [(257, 576), (65, 4096)]:  # above the kernel's threshold for a thread team
        x = rng.standard_normal((rows, n)).astype(dtype)
        assert_close(fwht(x), reference(x, n), dtype, n)


def test_generic_path_matches(tmp_path):
    """The same checks with SIMD dispatch forced off (OFFQ_DISABLE_SIMD=1) in a fresh process,
    for this file and for tests/test_hadamard_orders.py (one process start for both)."""
    import offq

    root = str(Path(offq.__file__).resolve().parents[1])  # import the same build as this process
    env = dict(os.environ, OFFQ_DISABLE_SIMD="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = (
        "import offq._C as C, sys; "
        "assert C.simd_info()['disabled_by_env'] and not C.simd_info()['avx2']; "
        "import pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', "
        "'power_of_two or m_times or leading or adversarial or parallel or normalised_hadamard "
        "or fwht_equals or kronecker', *__import__('sys').argv[1:]]))"
    )
    orders = str(Path(__file__).with_name("test_hadamard_orders.py"))
    r = subprocess.run([sys.executable, "-c", code, __file__, orders], env=env, capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(not _C.simd_info()["avx512"], reason="the CPU has no AVX-512 F")
def test_avx512_mix_is_bit_identical_to_avx2(tmp_path):
    """The 16-lane mix (x86/hadamard_avx512.c) against the 8-lane one (OFFQ_SIMD_MAX=avx2, a fresh
    process): every output element is the same FMA chain, so the transforms are equal bit for bit
    in float32 and float64, over orders whose mix takes the wide path (p >= 32), falls back to the
    AVX2 mix (p = 16) or has none (powers of two)."""
    sizes = (8960, 1536, 640, 28 * 64, 12 * 16, 576, 4096)
    code = (
        "import numpy as np, sys; from offq.kernels import fwht; "
        "rng = np.random.default_rng(5); out = {}\n"
        f"for n in {sizes!r}:\n"
        "    out['f%d' % n] = fwht(rng.standard_normal((3, n)).astype(np.float32))\n"
        "    out['d%d' % n] = fwht(rng.standard_normal((2, n)))\n"
        "np.savez(sys.argv[1], **out)"
    )
    results = outputs_by_cap(code, tmp_path)
    for key in results[""].files:
        np.testing.assert_array_equal(results[""][key], results["avx2"][key], err_msg=key)
