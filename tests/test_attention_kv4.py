"""Attention over the packed 4-bit KV cache (``offq._C.attention_kv4``): the float kernel the
W4A4KV4 decoder step runs by default and the opt-in 8-bit one (``csrc/attention_i8.c``), each
against a NumPy reference written from the steps in that file's header, on random and
adversarial caches; the SIMD variants against each other (an AVX2-capped process)."""
import numpy as np
import pytest

from offq import _C
from simd_cap import outputs_by_cap

SIMD = _C.simd_info()
TILE = 64  # OFFQ_ATTN_TILE_ROWS: the 8-bit values are summed per tile of cached rows


def random_cache(rng, npos, hd, group, *, spread=1.0):
    """Codes [npos, 2, hd/2], scale and integer zero-points [npos, 2, hd/group] as offq's 4-bit
    KV grids make them (asymmetric: zero = round(-lo / scale) in 0..15)."""
    codes = rng.integers(0, 256, (npos, 2, hd // 2), dtype=np.uint8)
    ng = hd // group
    scale = (rng.uniform(0.02, 0.3, (npos, 2, ng)) * spread).astype(np.float32)
    zero = rng.integers(0, 16, (npos, 2, ng)).astype(np.float32)
    return codes, scale, zero


def unpacked(codes):
    """[npos, 2, hd] codes as int32 (the even dim in the low nibble)."""
    lo, hi = codes & 15, codes >> 4
    return np.stack([lo, hi], -1).reshape(*codes.shape[:-1], -1).astype(np.int32)


def reference_float(q, codes, scale, zero, n):
    """softmax(q K^T) V over the dequantized cache, float64."""
    c = unpacked(codes).astype(np.float64)
    g = c.shape[-1] // scale.shape[-1]
    deq = (c - np.repeat(zero, g, -1)) * np.repeat(scale, g, -1)
    out = np.empty(q.shape, np.float64)
    for t in range(q.shape[0]):
        k, v = deq[:n[t], 0], deq[:n[t], 1]
        s = k @ q[t].astype(np.float64)
        e = np.exp(s - s.max())
        out[t] = e @ v / e.sum()
    return out


def reference_int8(q, codes, scale, zero, n):
    """The 8-bit attention step by step (csrc/attention_i8.c), float32 where the kernel is."""
    f32 = np.float32
    c = unpacked(codes)
    nq, hd = q.shape
    ng = scale.shape[-1]
    g = hd // ng
    out = np.zeros(q.shape, f32)
    for t in range(nq):
        qg = q[t].reshape(ng, g)
        sq = (np.abs(qg).max(1) / f32(127)).astype(f32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q8 = np.where(sq[:, None] > 0, np.rint(qg / sq[:, None]), 0)
        q8 = np.clip(q8, -127, 127).astype(np.int32)
        qsum = q8.sum(1)
        m = n[t]
        kc = c[:m, 0].reshape(m, ng, g)
        dot = np.einsum("jgi,gi->jg", kc, q8) - zero[:m, 0].astype(np.int32) * qsum
        terms = (sq[None, :] * scale[:m, 0]).astype(f32) * dot.astype(f32)
        s = terms[:, 0].copy()
        for gi in range(1, ng):
            s = (s + terms[:, gi]).astype(f32)
        e = np.exp(s - s.max()).astype(f32)
        w = (e[:, None] * scale[:m, 1]).astype(f32)
        vc = c[:m, 1].reshape(m, ng, g)
        for j0 in range(0, m, TILE):  # a weight grid per tile
            sl = slice(j0, min(m, j0 + TILE))
            wmax = w[sl].max(0)
            winv = np.where(wmax > 0, f32(255) / np.where(wmax > 0, wmax, 1), 0).astype(f32)
            w8 = np.clip(np.rint((w[sl] * winv).astype(f32)), 0, 255).astype(np.int32)
            wstep = (wmax / f32(255)).astype(f32)
            acc = np.einsum("jg,jgi->gi", w8, vc[sl])
            zs = (w8 * zero[sl, 1].astype(np.int32)).sum(0)
            out[t] = (out[t] + (wstep[:, None] * (acc - zs[:, None]).astype(f32)).reshape(hd)
                      ).astype(f32)
        out[t] = out[t] / e.sum(dtype=np.float64).astype(f32)
    return out


CASES = [  # (npos, hd, group, nq)
    (1, 64, 64, 3), (5, 64, 64, 4), (70, 64, 64, 9), (200, 64, 32, 5), (131, 128, 128, 6),
    (97, 128, 16, 7), (64, 128, 64, 2), (300, 64, 16, 11),
]


def queries(rng, nq, hd, npos, scale=0.5):
    q = (rng.standard_normal((nq, hd)) * scale).astype(np.float32)
    n = rng.integers(1, npos + 1, nq).astype(np.int64)
    n[0] = npos
    return q, n


@pytest.mark.parametrize("kernel", ["auto", "generic"])
@pytest.mark.parametrize("case", CASES)
def test_float_kernel_matches_numpy(case, kernel):
    npos, hd, group, nq = case
    rng = np.random.default_rng(npos * hd + group)
    codes, scale, zero = random_cache(rng, npos, hd, group)
    q, n = queries(rng, nq, hd, npos)
    got = _C.attention_kv4(q, codes, scale, zero, n, mode="float", kernel=kernel)
    ref = reference_float(q, codes, scale, zero, n)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kernel", ["auto", "generic"])
@pytest.mark.parametrize("case", CASES)
def test_int8_kernel_follows_its_steps(case, kernel):
    """Against the step-by-step NumPy reference: the same integers and float32 steps; only
    the softmax's exp differs (a polynomial in the SIMD variants), which can move a weight's
    8-bit code by one step."""
    npos, hd, group, nq = case
    rng = np.random.default_rng(npos * hd + group + 1)
    codes, scale, zero = random_cache(rng, npos, hd, group)
    q, n = queries(rng, nq, hd, npos, scale=1.5)
    got = _C.attention_kv4(q, codes, scale, zero, n, mode="int8", kernel=kernel)
    ref = reference_int8(q, codes, scale, zero, n)
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5 * np.abs(ref).max())


@pytest.mark.parametrize("case", CASES)
def test_int8_kernel_stays_close_to_the_float_attention(case):
    """What 8-bit queries and weights cost on random caches (value scales 15x apart row to row,
    harder than a model's): RMS error under 4% of the outputs' RMS and the largest under 8% of
    the largest output (measured: RMS 0.2-2.7%, largest 0.3-6.4%)."""
    npos, hd, group, nq = case
    rng = np.random.default_rng(npos * hd + group + 2)
    codes, scale, zero = random_cache(rng, npos, hd, group)
    q, n = queries(rng, nq, hd, npos, scale=1.5)
    got = _C.attention_kv4(q, codes, scale, zero, n, mode="int8")
    ref = reference_float(q, codes, scale, zero, n)
    rms = np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean())
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert rms < 0.04 and err < 0.08, (rms, err)


@pytest.mark.parametrize("mode", ["float", "int8"])
def test_adversarial_caches(mode):
    """A zero query (uniform weights), a query whose scores saturate one position, scales six
    decades apart, zero-points at both ends of the grid, every code 15."""
    rng = np.random.default_rng(7)
    npos, hd, group = 150, 64, 16
    codes, scale, zero = random_cache(rng, npos, hd, group)
    scale[::7] *= 1e3
    scale[1::5] *= 1e-3
    zero[::3] = 0
    zero[1::3] = 15
    codes[40:60] = 255
    q = np.zeros((4, hd), np.float32)
    q[1] = 40.0
    q[2, :16] = rng.standard_normal(16).astype(np.float32) * 1e-30  # subnormal query scale
    q[3] = rng.standard_normal(hd).astype(np.float32)
    n = np.array([npos, npos, 77, 3], np.int64)
    got = _C.attention_kv4(q, codes, scale, zero, n, mode=mode)
    assert np.isfinite(got).all()
    ref = reference_float(q, codes, scale, zero, n)
    tol = 2e-5 if mode == "float" else 2e-2
    for t in range(4):
        np.testing.assert_allclose(got[t], ref[t], rtol=0, atol=tol * np.abs(ref[t]).max())
    if mode == "int8":  # the generic reference: the same integers, expf for the exp
        ref8 = _C.attention_kv4(q, codes, scale, zero, n, mode=mode, kernel="generic")
        np.testing.assert_allclose(got, ref8, rtol=0, atol=1e-5 * np.abs(ref8).max())


#: positions of the dominant score: every lane, chain and tail of both softmaxes' vector maxima
#: (the float one: four chains of 8 scores over blocks of 32, then 8-wide, then scalar)
_DOMINANT_AT = (0, 5, 9, 21, 37, 45, 53, 63, 64, 70, 101, 127, 130, 159, 191, 192, 199, 202)


def dominant_score_cases() -> list[tuple[np.ndarray, ...]]:
    """(q, codes, scale, zero, n) with one score ~190 above the rest (exp of the gap overflows
    float32) at each of _DOMINANT_AT: a maximum that missed it would turn its weight into inf."""
    rng = np.random.default_rng(11)
    npos, hd = 203, 64
    cases = []
    for p in _DOMINANT_AT:
        codes, scale, zero = random_cache(rng, npos, hd, hd)
        scale[:, 0] = 1e-3  # keys: scores within +-1
        codes[p, 0] = 255  # key p: every code 15, zero-point 0, scale 0.2: score 64 * 15 * 0.2
        zero[p, 0] = 0
        scale[p, 0] = 0.2
        cases.append((np.ones((1, hd), np.float32), codes, scale, zero,
                      np.array([npos], np.int64)))
    return cases


def check_dominant_outputs(outputs: list[np.ndarray]) -> None:
    """Each output is the dominant position's value row (the float reference's output)."""
    for p, got, case in zip(_DOMINANT_AT, outputs, dominant_score_cases()):
        ref = reference_float(*case)
        assert np.isfinite(got).all(), p
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-2 * np.abs(ref).max(), err_msg=str(p))


@pytest.mark.parametrize("mode", ["int8", "float"])
@pytest.mark.parametrize("kernel", ["auto", "generic"])
def test_softmax_finds_a_dominant_score_anywhere(kernel, mode):
    """One score far above the rest at positions in every lane, chain and tail of the softmax's
    vector maximum (dropping one of the float maximum's four chains fails this)."""
    check_dominant_outputs([_C.attention_kv4(*case, mode=mode, kernel=kernel)
                            for case in dominant_score_cases()])


def test_avx2_softmax_finds_a_dominant_score_anywhere(tmp_path):
    """The same cases on the AVX2 kernels (OFFQ_SIMD_MAX=avx2 in a fresh process)."""
    code = ("import sys, numpy as np\n"
            "from offq import _C\n"
            "from test_attention_kv4 import dominant_score_cases\n"
            "out = {f'{m}{i}': _C.attention_kv4(*c, mode=m)\n"
            "       for i, c in enumerate(dominant_score_cases()) for m in ('float', 'int8')}\n"
            "np.savez(sys.argv[1], **out)\n")
    got = outputs_by_cap(code, tmp_path, caps=("avx2",))["avx2"]
    for mode in ("float", "int8"):
        check_dominant_outputs([got[f"{mode}{i}"] for i in range(len(_DOMINANT_AT))])


_LIMIT_VALUES = [(15, 0), (0, 15)]  # (value code, value zero-point): +-15 from the zero-point


def int8_limit_case(v_code: int, v_zero: int) -> tuple[np.ndarray, ...]:
    """Every product of the int8 mode at its largest magnitude: key codes 15 against 8-bit query
    codes of +-127 over a 128-wide group, and weights of 255 against value codes +-15 from their
    zero-point over a whole tile. (q, codes, scale, zero, n) for attention_kv4."""
    npos, hd = 64, 128
    codes = np.zeros((npos, 2, hd // 2), np.uint8)
    codes[:, 0] = 255  # two codes of 15 a byte
    codes[:, 1] = v_code * 17
    scale = np.full((npos, 2, 1), 0.05, np.float32)
    zero = np.zeros((npos, 2, 1), np.float32)
    zero[:, 1] = v_zero
    q = np.zeros((4, hd), np.float32)
    q[0], q[1], q[3, ::2] = 3.0, -3.0, 3.0
    return q, codes, scale, zero, np.array([64, 64, 64, 33], np.int64)


@pytest.mark.parametrize("v_code, v_zero", _LIMIT_VALUES)
def test_int8_sums_at_their_limits(v_code, v_zero):
    """The limit case on this CPU's kernels (the AVX2 kernel keeps 8 blocks of pair sums <= 3810
    of the scores and 4 blocks of pair sums <= 7650 of the values in int16 lanes; a longer span
    would wrap the 16-bit sums and fail this)."""
    case = int8_limit_case(v_code, v_zero)
    got = _C.attention_kv4(*case, mode="int8")
    np.testing.assert_allclose(got, reference_int8(*case), rtol=1e-6, atol=1e-6)


def test_avx2_int8_sums_at_their_limits(tmp_path):
    """The same cases on the AVX2 kernels (OFFQ_SIMD_MAX=avx2 in a fresh process): on an
    AVX-512 VNNI CPU the in-process test above never runs the AVX2 spans (doubling the values'
    span passed it and failed this)."""
    code = ("import sys, numpy as np\n"
            "from offq import _C\n"
            "from test_attention_kv4 import _LIMIT_VALUES, int8_limit_case\n"
            "out = {f'v{i}': _C.attention_kv4(*int8_limit_case(*v), mode='int8')\n"
            "       for i, v in enumerate(_LIMIT_VALUES)}\n"
            "np.savez(sys.argv[1], **out)\n")
    got = outputs_by_cap(code, tmp_path, caps=("avx2",))["avx2"]
    for i, v in enumerate(_LIMIT_VALUES):
        case = int8_limit_case(*v)
        np.testing.assert_allclose(got[f"v{i}"], reference_int8(*case), rtol=1e-6, atol=1e-6)


def test_int8_query_alone_equals_query_in_a_block():
    """Each query's numbers depend on it alone (prefill = decode): a block of 9 queries with
    different lengths gives every query what it gets alone."""
    rng = np.random.default_rng(3)
    codes, scale, zero = random_cache(rng, 190, 64, 64)
    q, n = queries(rng, 9, 64, 190, scale=1.0)
    block = _C.attention_kv4(q, codes, scale, zero, n, mode="int8")
    for t in range(9):
        alone = _C.attention_kv4(q[t:t + 1], codes, scale, zero, n[t:t + 1], mode="int8")
        np.testing.assert_array_equal(alone[0], block[t])


_RUN = (
    "import sys, numpy as np\n"
    "from offq import _C\n"
    "d = np.load(sys.argv[1])\n"
    "np.savez(sys.argv[2], f=_C.attention_kv4(d['q'], d['codes'], d['scale'], d['zero'], d['n'],"
    " mode='float'), i=_C.attention_kv4(d['q'], d['codes'], d['scale'], d['zero'], d['n'],"
    " mode='int8'))\n"
)


@pytest.mark.skipif(not SIMD["avx512_vnni"], reason="the CPU has no AVX-512 VNNI")
def test_vnni_int8_attention_is_bit_identical_to_avx2(tmp_path):
    """The VNNI dot products and the AVX2 emulation sum the same int32s and round the same
    float32 steps lane by lane: identical outputs (OFFQ_SIMD_MAX=avx2 in a fresh process)."""
    rng = np.random.default_rng(5)
    codes, scale, zero = random_cache(rng, 333, 128, 32)
    q, n = queries(rng, 12, 128, 333, scale=1.5)
    np.savez(tmp_path / "in.npz", q=q, codes=codes, scale=scale, zero=zero, n=n)
    got = outputs_by_cap(_RUN, tmp_path, (str(tmp_path / "in.npz"),))
    np.testing.assert_array_equal(got[""]["i"], got["avx2"]["i"])
    np.testing.assert_array_equal(got[""]["f"], got["avx2"]["f"])


@pytest.mark.parametrize("args, match", [
    (dict(mode="int4"), "mode: expected 'float' or 'int8'"),
    (dict(kernel="avx2"), "kernel"),
    (dict(n=np.array([0], np.int64)), "n: entry 0 is 0"),
    (dict(n=np.array([9], np.int64)), "n: entry 0 is 9"),
    (dict(n=np.array([1, 1], np.int64)), "n: expected 1 entries"),
    (dict(zero=np.full((8, 2, 1), 2.5, np.float32), mode="int8"), "zero: mode 'int8' needs"),
    (dict(zero=np.full((8, 2, 1), 16, np.float32), mode="int8"), "zero: mode 'int8' needs"),
    (dict(scale=np.full((8, 2, 3), 0.1, np.float32)), "scale: expected shape"),
    (dict(codes=np.zeros((8, 2, 31), np.uint8)), "codes: expected shape"),
    # groups of one dimension: the kernels read their codes a byte (two dimensions) at a time
    (dict(scale=np.full((8, 2, 64), 0.1, np.float32), zero=np.zeros((8, 2, 64), np.float32)),
     "head_dim / groups an even integer"),
    (dict(q=np.full((1, 64), np.nan, np.float32)), "q"),
    # past ~1.1e6 dimensions the int8 mode's int32 sums wrapped silently
    (dict(q=np.ones((1, (1 << 20) + 2), np.float32), mode="int8"),
     r"q: head_dim 1048578 exceeds the limit 2\^20"),
    (dict(mode=None), "mode: expected a str"),
    (dict(mode="int8\0"), "mode: contains a null character"),
    (dict(kernel="\udcff"), "kernel: "),
])
def test_arguments_are_validated(args, match):
    base = dict(q=np.ones((1, 64), np.float32), codes=np.zeros((8, 2, 32), np.uint8),
                scale=np.full((8, 2, 1), 0.1, np.float32), zero=np.full((8, 2, 1), 8, np.float32),
                n=np.array([8], np.int64))
    base.update(args)
    with pytest.raises((ValueError, TypeError), match=match):
        _C.attention_kv4(base["q"], base["codes"], base["scale"], base["zero"], base["n"],
                         **{k: v for k, v in base.items() if k in ("mode", "kernel")})


@pytest.mark.parametrize("zero, scale, fits", [
    (0.0, 0.1, True), (15.0, 0.1, True), (7.0, 0.0, True), (-0.0, 0.1, True),
    (3.0, -0.0, True), (3.0, 1e-45, True), (3.0, 3e38, True),
    (15.5, 0.1, False), (16.0, 0.1, False), (-1.0, 0.1, False), (7.0000005, 0.1, False),
    (1e-45, 0.1, False), (-150.0, 0.1, False), (1e9, 0.1, False),
    (3.0, -1e-30, False), (3.0, -1.0, False),
])
def test_int8_mode_takes_exactly_the_grids_it_can_sum(zero, scale, fits):
    """offq_attn_i8_fits (the rule the decoder step uses to pick the 8-bit attention per layer,
    on bit patterns) through the binding: integer zero-points in [0, 15] and scales >= 0, each
    edge on both sides, at the last of 8 x 2 grids."""
    z = np.full((8, 2, 1), 8.0, np.float32)
    s = np.full((8, 2, 1), 0.1, np.float32)
    z[7, 1, 0], s[7, 1, 0] = zero, scale
    args = (np.ones((1, 64), np.float32), np.zeros((8, 2, 32), np.uint8), s, z,
            np.array([8], np.int64))
    if fits:
        _C.attention_kv4(*args, mode="int8")
    else:
        what = "zero" if not (0 <= zero <= 15 and zero == int(zero)) else "scale"
        with pytest.raises(ValueError, match=f"^{what}: mode 'int8' needs .* at flat index 15$"):
            _C.attention_kv4(*args, mode="int8")
