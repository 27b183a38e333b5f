"""The weight-only matmul (``offq.kernels.matmul_wq``: float32 x packed 2/3/4/8-bit weights) against a
plain NumPy reference (dequantize, then multiply in float64), on every kernel variant the CPU
offers; its packing; its argument checks; and ``PackedWeightLinear`` on the real path of a
weight-only checkpoint."""
import gc
import zlib

import numpy as np
import pytest

from offq import _C
from offq.config import QuantConfig
from offq.kernels import pack_codes
from offq.kernels.matmul_wq import WQ_BITS, matmul_wq, pack_wq, unpack_wq, wq_row_bytes
from offq.quant.assemble import load_quantized
from offq.quant.linears import FakeQuantLinear, PackedWeightLinear
from offq.quant.weight import QuantizedWeight
from offq.recipe import pipeline
from simd_cap import outputs_by_cap, outputs_by_env
from tiny_models import calibration, tiny_checkpoint, token_ids

SIMD = _C.simd_info()
KERNELS = (["auto", "generic"] + (["avx2"] if SIMD["avx2"] else [])
           + (["avx512"] if SIMD["avx512_bw"] else []))
RTOL = 1e-5  # relative to sum_i |x_i| |w_hat_i| (float32 summation order only)


def dequant(q, s, z, group):
    """float32 w_hat = scale * (q - zero), the formula of offq.quant.grid.dequantize_codes."""
    return (np.repeat(s, group, axis=1) * (q.astype(np.float32) - np.repeat(z, group, axis=1))
            ).astype(np.float32)


def check(x, q, s, z, bits, group, kernel):
    w = dequant(q, s, z, group)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    out = matmul_wq(x, pack_wq(q, bits), s, z, bits, group, kernel=kernel)
    assert out.dtype == np.float32 and out.shape == (x.shape[0], q.shape[0])
    err = np.abs(out - ref)
    assert np.all(err <= RTOL * bound + 1e-30), f"max rel err {np.max(err / (bound + 1e-30)):.3g}"
    return out


def operands(rng, m, k, n, bits, group, symmetric):
    q = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    g = k // group
    s = rng.uniform(0.01, 2.0, (n, g)).astype(np.float32)
    if symmetric:
        z = np.full((n, g), 1 << (bits - 1), np.float32)
    else:  # zero-points inside and outside the code range (OffQ's offset groups)
        z = rng.integers(-40, (1 << bits) + 40, (n, g)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, q, s, z


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", WQ_BITS)
@pytest.mark.parametrize("m", [1, 7, 32, 33, 64])
@pytest.mark.parametrize("k, group", [(512, 32), (512, 64), (384, 128), (576, 576),
                                      (100, 25), (37, 37), (96, 96)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_numpy(kernel, bits, m, k, group, symmetric):
    rng = np.random.default_rng(zlib.crc32(repr((kernel, bits, m, k, group, symmetric)).encode()))
    n = 45  # not a multiple of the column blocks
    x, q, s, z = operands(rng, m, k, n, bits, group, symmetric)
    check(x, q, s, z, bits, group, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", WQ_BITS)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_adversarial(kernel, bits, m):
    """Extreme codes, all-zero rows of x and of codes, huge and tiny scales, huge zero-points,
    large-magnitude activations."""
    rng = np.random.default_rng(bits * 100 + m)
    k, group, n = 256, 64, 24
    x, q, s, z = operands(rng, m, k, n, bits, group, False)
    q[0] = (1 << bits) - 1
    q[1] = 0
    z[1] = 0.0  # an all-zero weight row
    s[2] = 1e15
    s[3] = 1e-20
    z[4] = 3e5  # a zero-point far outside the codes
    z[5] = -(1 << bits) * 1000
    s[6] = 0.0
    x[0] = 0.0
    if m > 1:
        x[1] *= np.float32(1e15)
        x[-1] = np.float32(3e-20) * x[-1]
    out = check(x, q, s, z, bits, group, kernel)
    assert np.all(out[0] == 0.0) and np.all(out[:, 1] == 0.0) and np.all(out[:, 6] == 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", WQ_BITS)
def test_many_rows_with_blas_single_threaded(kernel, bits):
    """Inside offq's forward BLAS is held to one thread; the many-rows path then gives each
    OpenMP thread whole panels (its own buffer, its own sgemm), which must still be the product."""
    from offq.kernels import threads
    from offq.model.parallel import blas_single_threaded

    rng = np.random.default_rng(bits)
    x, q, s, z = operands(rng, 70, 384, 203, bits, 64, False)
    with threads(2), blas_single_threaded():
        check(x, q, s, z, bits, 64, kernel)
    with threads(2):  # and with OpenBLAS's own threads
        check(x, q, s, z, bits, 64, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [576, 1605])
def test_decode_shape_and_out(kernel, n):
    """Decode-size products of model-like shapes, written into a given ``out``, with 2 threads:
    1536 x 576 runs on one thread (below the small path's parallel threshold, ~2M multiply-adds),
    1536 x 1605 on the team."""
    from offq.kernels import threads

    rng = np.random.default_rng(7)
    x, q, s, z = operands(rng, 1, 1536, n, 4, 128, False)
    out = np.full((1, n), np.nan, np.float32)
    with threads(2):
        res = matmul_wq(x, pack_wq(q, 4), s, z, 4, 128, out=out, kernel=kernel)
        assert res is out
        np.testing.assert_allclose(out, check(x, q, s, z, 4, 128, kernel), rtol=0, atol=0)


@pytest.mark.parametrize("bits", WQ_BITS)
@pytest.mark.parametrize("k", [1, 3, 8, 31, 32, 37, 96, 1000])
def test_pack_round_trip(bits, k):
    rng = np.random.default_rng(k * 10 + bits)
    q = rng.integers(0, 1 << bits, (5, k)).astype(np.uint8)
    p = pack_wq(q, bits)
    assert p.dtype == np.uint8 and p.shape == (5, wq_row_bytes(k, bits)) == (5, -(-k * bits // 8))
    np.testing.assert_array_equal(unpack_wq(p, bits, k), q)
    # the bit stream: code i at bits [bits*i, bits*(i+1)) of the row, little-endian
    row = int.from_bytes(p[2].tobytes(), "little")
    assert [(row >> (bits * i)) & ((1 << bits) - 1) for i in range(k)] == q[2].tolist()
    if bits == 4:  # offq's nibble layout (QTensor.codes)
        np.testing.assert_array_equal(p, pack_codes(q, bits=4)[0])


@pytest.mark.parametrize("bits", [b for b in WQ_BITS if b < 8])  # uint8 holds every 8-bit code
def test_pack_rejects_large_codes(bits):
    q = np.zeros((2, 8), np.uint8)
    q[1, 3] = 1 << bits
    with pytest.raises(ValueError, match=rf"codes: expected values in \[0, {(1 << bits) - 1}\]"):
        pack_wq(q, bits)


def _args(**over):
    args = dict(x=np.ones((2, 64), np.float32), packed=np.zeros((3, 32), np.uint8),
                scale=np.ones((3, 2), np.float32), zero=np.zeros((3, 2), np.float32), bits=4,
                group=32)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=np.ones((2, 64), np.float64)), TypeError, "x: expected dtype float32"),
    (dict(x=[[1.0] * 64]), TypeError, "x: expected a numpy.ndarray"),
    (dict(x=np.ones((64, 2), np.float32).T), ValueError, "x: expected a C-contiguous"),
    (dict(x=np.ones((2, 2, 64), np.float32)), ValueError, "x: expected 2 dimensions"),
    (dict(x=np.ones((2, 0), np.float32)), ValueError, "x: expected at least one column"),
    (dict(packed=np.zeros((3, 32), np.int8)), TypeError, "packed: expected dtype uint8"),
    (dict(packed=np.zeros((3, 33), np.uint8)), ValueError, "packed: expected 32 bytes a row"),
    (dict(packed=np.zeros((3, 64), np.uint8)[:, ::2]), ValueError,
     "packed: expected a C-contiguous"),
    (dict(scale=np.ones((3, 2), np.float64)), TypeError, "scale: expected dtype float32"),
    (dict(scale=np.ones((3, 4), np.float32)), ValueError, "scale: expected shape"),
    (dict(scale=np.ones((4, 2), np.float32)), ValueError, "scale: expected shape"),
    (dict(zero=np.ones((3, 1), np.float32)), ValueError, "zero: expected shape"),
    (dict(zero=np.ones((2, 3), np.float32).T), ValueError, "zero: expected a C-contiguous"),
    (dict(bits=5), ValueError, "bits: expected 2, 3, 4 or 8, got 5"),
    (dict(bits=16), ValueError, "bits: expected 2, 3, 4 or 8"),
    (dict(bits=4.0), TypeError, "bits: expected an int"),
    (dict(group=0), ValueError, "group: expected a positive group size"),
    (dict(group=24), ValueError, "group: expected a positive group size dividing K=64"),
    (dict(group=-1), ValueError, "group"),
    (dict(kernel="vnni"), ValueError, "kernel: matmul_wq has no 'vnni' variant .*'avx512'"),
    (dict(kernel="fast"), ValueError,
     "kernel: expected one of 'auto', 'generic', 'avx2', 'avx512'"),
    (dict(out=np.ones((2, 4), np.float32)), ValueError, "out: expected shape"),
    (dict(out=np.ones((2, 3), np.float64)), TypeError, "out: expected dtype float32"),
])
def test_validates_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        matmul_wq(**_args(**over))


def test_out_must_not_share_memory_with_an_input():
    buf = np.ones(200, np.float32)
    x = buf[:128].reshape(2, 64)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        matmul_wq(**_args(x=x, out=buf[127:133].reshape(2, 3)))  # starts at x's last float
    scale = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with scale"):
        matmul_wq(**_args(scale=scale, out=scale.reshape(2, 3)))
    zero = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with zero"):
        matmul_wq(**_args(zero=zero, out=zero.reshape(2, 3)))
    out = buf[128:134].reshape(2, 3)  # x's neighbour: allowed
    np.testing.assert_array_equal(matmul_wq(**_args(x=x, out=out)), matmul_wq(**_args(x=x)))


def test_validates_out_writeable_and_pack_args():
    out = np.ones((2, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable"):
        matmul_wq(**_args(out=out))
    with pytest.raises(TypeError, match="codes: expected dtype uint8"):
        pack_wq(np.zeros((2, 8), np.int32), 4)
    with pytest.raises(ValueError, match="bits: expected 2, 3, 4 or 8"):
        pack_wq(np.zeros((2, 8), np.uint8), 1)
    with pytest.raises(ValueError, match="packed: expected 3 bytes a row"):
        unpack_wq(np.zeros((2, 4), np.uint8), 3, 8)


@pytest.mark.skipif(SIMD["avx2"], reason="the CPU has AVX2")
def test_avx2_unavailable_is_an_error():
    with pytest.raises(ValueError, match="kernel: 'avx2' is not available"):
        matmul_wq(**_args(kernel="avx2"))


@pytest.mark.skipif(not SIMD["avx512_bw"], reason="the CPU has no AVX-512 BW")
def test_avx512_capped_away_and_auto_steps_down(tmp_path):
    """Under OFFQ_SIMD_MAX=avx2 (a fresh process: what an AVX2-only CPU runs) 'avx512' is
    unavailable and auto equals 'avx2' bit for bit; uncapped, auto runs 'avx512' for groups of a
    multiple of 64 and steps down to 'avx2' (not to the generic kernel) for groups of 32 and 96."""
    code = (
        "import sys, numpy as np; from offq import _C; "
        "from offq.kernels.matmul_wq import matmul_wq, pack_wq\n"
        "rng = np.random.default_rng(3); out = {}\n"
        "for g in (32, 64, 96, 128):\n"
        "    q = rng.integers(0, 16, (40, 384)).astype(np.uint8)\n"
        "    s = rng.uniform(0.1, 1, (40, 384 // g)).astype(np.float32); z = 8 * s / s\n"
        "    x = rng.standard_normal((3, 384)).astype(np.float32); p = pack_wq(q, 4)\n"
        "    for kern in ('auto', 'avx2', 'avx512'):\n"
        "        try:\n"
        "            out[f'{kern}{g}'] = matmul_wq(x, p, s, z, 4, g, kernel=kern)\n"
        "        except ValueError as e:\n"
        "            assert 'avx512' in str(e) and 'not available' in str(e), e\n"
        "np.savez(sys.argv[1], **out)"
    )
    res = outputs_by_cap(code, tmp_path)
    assert not any(key.startswith("avx512") for key in res["avx2"].files)
    for g in (32, 64, 96, 128):
        np.testing.assert_array_equal(res["avx2"][f"auto{g}"], res["avx2"][f"avx2{g}"])
        wide = "avx512" if g % 64 == 0 else "avx2"
        np.testing.assert_array_equal(res[""][f"auto{g}"], res[""][f"{wide}{g}"], err_msg=str(g))
    # the two variants sum in different orders: they differ somewhere (so the test can tell them)
    assert not np.array_equal(res[""]["avx51264"], res[""]["avx264"])


@pytest.mark.skipif(not SIMD["avx512_vbmi"], reason="the CPU has no AVX-512 VBMI")
def test_avx512_3bit_lanes_with_and_without_vbmi(tmp_path):
    """The AVX-512 rows decode 3-bit chunks by one VBMI byte permute where the CPU has it, else by
    a dword permute and a byte shuffle (OFFQ_SIMD_MAX=avx512, a fresh process): the same lanes,
    so the same bits. The weights end the packed array at a chunk boundary (the last chunk is read
    with a masked load: ASan builds check that nothing after it is touched)."""
    code = (
        "import sys, numpy as np; from offq.kernels.matmul_wq import matmul_wq, pack_wq\n"
        "rng = np.random.default_rng(9); out = {}\n"
        "for g, k in ((64, 192), (128, 384), (192, 576)):\n"
        "    q = rng.integers(0, 8, (21, k)).astype(np.uint8); p = pack_wq(q, 3)\n"
        "    s = rng.uniform(0.1, 1, (21, k // g)).astype(np.float32)\n"
        "    z = rng.integers(-9, 17, (21, k // g)).astype(np.float32)\n"
        "    for m in (1, 2, 3):\n"
        "        x = rng.standard_normal((m, k)).astype(np.float32)\n"
        "        out[f'{g}_{m}'] = matmul_wq(x, p, s, z, 3, g, kernel='avx512')\n"
        "np.savez(sys.argv[1], **out)"
    )
    res = outputs_by_cap(code, tmp_path, caps=("", "avx512"))
    assert len(res[""].files) == 9
    for key in res[""].files:
        np.testing.assert_array_equal(res[""][key], res["avx512"][key], err_msg=key)


_DECODES = (
    "import sys, numpy as np; from offq import _C; "
    "from offq.kernels.matmul_wq import matmul_wq, pack_wq\n"
    "info = _C.simd_info(); rng = np.random.default_rng(5)\n"
    "out = {'flag': np.array(info['wq_subnormal_decode'])}\n"
    "kernels = ['avx2'] + (['avx512'] if info['avx512_bw'] else [])\n"
    "for bits in (2, 3, 4, 8):\n"
    "    for g, k in ((64, 384), (128, 512), (192, 384)):\n"
    "        q = rng.integers(0, 1 << bits, (37, k)).astype(np.uint8)\n"
    "        s = rng.uniform(0.01, 2, (37, k // g)).astype(np.float32)\n"
    "        z = rng.integers(-20, 40, (37, k // g)).astype(np.float32)\n"
    "        x = rng.standard_normal((6, k)).astype(np.float32)\n"
    "        # row maxima across the subnormal decode's range [2^-40, 2^100) and outside it\n"
    "        x *= np.array([1, 3e-11, 1e25, 1e-13, 4e30, 2.0 ** -30], np.float32)[:, None]\n"
    "        for m in (1, 2, 3, 6):\n"
    "            for kern in kernels:\n"
    "                if g % 64 == 0 or kern == 'avx2':\n"
    "                    out[f'{kern}_{bits}_{g}_{m}'] = matmul_wq(x[:m], pack_wq(q, bits), s, z,\n"
    "                                                              bits, g, kernel=kern)\n"
    "np.savez(sys.argv[1], **out)"
)


@pytest.mark.skipif(not SIMD["avx2"], reason="the CPU has no AVX2")
def test_subnormal_decode_equals_convert_bit_for_bit(tmp_path):
    """The subnormal decode (codes read as subnormal floats, activations scaled by 2^(149 - E))
    gives the conversion decode's bits, for every SIMD variant, bit width, unrolled (64, 128) and
    run-time (192) group, 1-6 rows, and rows whose largest |x| spans 2^-43 .. 2^102 (those outside
    [2^-40, 2^100) convert; entries far below float32's precision of the row, such as |x| <
    2^-110 at 8 bits, may round differently: csrc/matmul_wq.c says when). Each run forces its decode with OFFQ_WQ_DECODE (a fresh process)."""
    res = outputs_by_env(_DECODES, tmp_path, {"convert": {"OFFQ_WQ_DECODE": "convert"},
                                              "subnormal": {"OFFQ_WQ_DECODE": "subnormal"}})
    assert not res["convert"]["flag"] and res["subnormal"]["flag"]
    keys = [key for key in res["convert"].files if key != "flag"]
    assert len(keys) >= 36
    for key in keys:
        np.testing.assert_array_equal(res["subnormal"][key], res["convert"][key], err_msg=key)
        assert np.all(np.isfinite(res["convert"][key][:4])), key


class _MXCSR:
    """Set MXCSR's denormals-are-zero bit of this thread (through glibc's fenv_t, whose
    x86-64 layout ends in the 32-bit MXCSR at byte 28), as code built with -ffast-math does."""
    DAZ = 0x40

    def __init__(self):
        import ctypes

        self.libm = ctypes.CDLL(None)
        self.buf = ctypes.create_string_buffer(64)

    def get(self) -> int:
        assert self.libm.fegetenv(self.buf) == 0
        return int.from_bytes(self.buf.raw[28:32], "little")

    def set(self, csr: int) -> None:
        self.libm.fegetenv(self.buf)
        raw = bytearray(self.buf.raw)
        raw[28:32] = csr.to_bytes(4, "little")
        self.buf.raw = bytes(raw)
        assert self.libm.fesetenv(self.buf) == 0


@pytest.mark.skipif(not SIMD["wq_subnormal_decode"], reason="the subnormal decode is not used here")
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k not in ("generic",)])
def test_subnormal_decode_under_daz(kernel):
    """A process with DAZ set (subnormal inputs read as zero) still gets the product: the rows
    clear DAZ for themselves and restore it. A small product, so it runs on this thread."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("MXCSR is x86's")
    rng = np.random.default_rng(11)
    x, q, s, z = operands(rng, 2, 256, 24, 4, 64, False)
    ref = check(x, q, s, z, 4, 64, kernel)
    mxcsr = _MXCSR()
    before = mxcsr.get()
    try:
        mxcsr.set(before | _MXCSR.DAZ)
        got = matmul_wq(x, pack_wq(q, 4), s, z, 4, 64, kernel=kernel)
        after = mxcsr.get()
    finally:
        mxcsr.set(before)
    assert after == before | _MXCSR.DAZ
    np.testing.assert_array_equal(got, ref)


def test_empty_products():
    assert matmul_wq(**_args(x=np.ones((0, 64), np.float32))).shape == (0, 3)
    args = _args(packed=np.zeros((0, 32), np.uint8), scale=np.ones((0, 2), np.float32),
                 zero=np.ones((0, 2), np.float32))
    assert matmul_wq(**args).shape == (2, 0)


@pytest.mark.parametrize("bits", WQ_BITS)
def test_packed_weight_linear(bits):
    """PackedWeightLinear == the dequantized float linear (the fake path) to float32 rounding, at
    ~bits/32 of its memory (plus 8 bytes a group)."""
    rng = np.random.default_rng(bits)
    n, k, group = 96, 256, 64
    _, q, s, z = operands(rng, 1, k, n, bits, group, False)
    bias = rng.standard_normal(n).astype(np.float32)
    stored = QuantizedWeight(q, s, z, bits, group, False, bias)
    lin = PackedWeightLinear(stored)
    dense = FakeQuantLinear(stored.dequantized, bias, None)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    y, ref = lin(x), dense(x)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    bound = np.abs(x) @ np.abs(stored.dequantized).T + np.abs(bias)
    assert np.all(np.abs(y - ref) <= RTOL * bound)
    assert lin.nbytes == n * (k * bits // 8) + 2 * s.nbytes + bias.nbytes
    assert lin.nbytes < dense.nbytes * (bits + 1.5) / 32
    with pytest.raises(ValueError, match="x: expected last axis 256"):
        lin(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="stored: expected"):
        PackedWeightLinear(QuantizedWeight(q, s, z, 16, group, False))


@pytest.mark.parametrize("w_bits", [3, 4, 8])
def test_weight_only_checkpoint_runs_packed(tmp_path, w_bits):
    """A weight-only checkpoint's real path uses PackedWeightLinear for every quantized linear
    (q/k/v and gate/up fused) and matches the float32 simulation (the dequantized weights, the
    former real path)."""
    ckpt = tiny_checkpoint(2, arch="qwen2")  # q/k/v biases
    calib = calibration(ckpt, 4, 32, 1)
    cfg = QuantConfig(method="gptq", a_bits=16, kv_bits=16, w_bits=w_bits, w_group_size=32,
                      w_symmetric=False)
    pipeline.quantize(ckpt, cfg, calib, out_dir=tmp_path, progress=False)
    real, _, _ = load_quantized(tmp_path, mode="real")
    fake, _, _ = load_quantized(tmp_path, mode="fake")
    for layer in real.layers:  # q/k/v and gate/up as one packed product per input
        assert set(layer.fused) == {"qkv", "gate_up"}
        for lin in list(layer.fused.values()) + list(layer.linears.values()):
            assert isinstance(getattr(lin, "parent", lin), PackedWeightLinear)
    ids = token_ids(ckpt.config.vocab_size, 2, 17, 3)
    a, b = real.forward(ids), fake.forward(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("bits", WQ_BITS)
def test_packed_rows_start_on_a_cache_line(bits):
    """pack_wq's result starts on a 64-byte boundary (an unaligned W8 array made the AVX-512 decode
    product ~20% slower: every 64-byte chunk load straddled two cache lines); it stays readable
    after its owner, the larger array it views, has no other reference."""
    for k in (64, 100, 576):
        p = pack_wq(np.ones((3, k), np.uint8), bits)
        assert p.ctypes.data % 64 == 0 and p.flags.c_contiguous and p.flags.writeable
        gc.collect()
        np.testing.assert_array_equal(unpack_wq(p, bits, k), np.ones((3, k), np.uint8))
