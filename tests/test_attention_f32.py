"""The attention over a float32 KV cache (``offq.kernels.attention_f32``, ``csrc/attention_f32.c``,
``csrc/x86/attention_f32_avx2.c``) against a NumPy softmax, on random and adversarial inputs.

The kernel splits the positions into chunks of 128 and merges the chunks' partial softmaxes; the
lengths below straddle the chunk edges, and the adversarial cases put the largest score in one
chunk with the others far below it (a merge that forgot to rescale would be off by e^100)."""
import numpy as np
import pytest

from offq import _C
from offq.kernels.attention_f32 import attention_f32

KERNELS = ["generic"] + (["avx2"] if _C.simd_info()["avx2"] else [])
CHUNK = 128


def reference(q, kv):
    """float64 softmax(q K^T) V per query, query t on KV head t // (nq // kv_heads)."""
    nq, hkv = q.shape[0], kv.shape[2]
    rep = nq // hkv
    out = np.empty(q.shape, np.float64)
    for t in range(nq):
        k, v = kv[:, 0, t // rep].astype(np.float64), kv[:, 1, t // rep].astype(np.float64)
        s = k @ q[t].astype(np.float64)
        p = np.exp(s - s.max())
        out[t] = p @ v / p.sum()
    return out


def close(got, ref, tol=2e-5):
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, 1000])
@pytest.mark.parametrize("shape", [(9, 3, 64), (12, 2, 128), (2, 2, 8), (6, 1, 20), (4, 4, 72)])
def test_matches_numpy_softmax(kernel, n, shape):
    """Random queries and cache: lengths around the chunk edges, 1-9 queries per KV head, head
    sizes a multiple of 8 and not (20: the AVX2 kernel hands those to the generic one; 72: a
    block of 64 outputs and one of 8)."""
    nq, hkv, hd = shape
    rng = np.random.default_rng(n * 31 + hd)
    q = (rng.standard_normal((nq, hd)) / np.sqrt(hd)).astype(np.float32)
    kv = rng.standard_normal((n, 2, hkv, hd)).astype(np.float32)
    close(attention_f32(q, kv, kernel=kernel), reference(q, kv))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hd", range(8, 136, 8))
def test_every_head_size_of_whole_vectors(kernel, hd):
    """The AVX2 kernel's value loop takes a head in blocks of 64 outputs, the last block 1-8
    vectors of 8: each count has its own copy (a copy that stops a vector short left 8 outputs
    unwritten at head size 24 and passed the shapes above). Inputs differ by kernel, so a stale
    output buffer holding another kernel's result cannot pass for this one's."""
    rng = np.random.default_rng(hd + 1000 * KERNELS.index(kernel))
    for n in (5, CHUNK + 3):
        q = (rng.standard_normal((2, hd)) / np.sqrt(hd)).astype(np.float32)
        kv = rng.standard_normal((n, 2, 1, hd)).astype(np.float32)
        close(attention_f32(q, kv, kernel=kernel), reference(q, kv))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spike", [0, CHUNK - 1, CHUNK, 3 * CHUNK + 5, 499])
def test_one_dominant_position_in_any_chunk(kernel, spike):
    """One key aligned with the query at scores ~100 above the rest: the output is that position's
    V row, whichever chunk holds it (the merge rescales every other chunk by ~e^-100)."""
    rng = np.random.default_rng(spike)
    hd, n = 64, 500
    q = rng.standard_normal((2, hd)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kv = (0.01 * rng.standard_normal((n, 2, 1, hd))).astype(np.float32)
    kv[spike, 0, 0] = 100 * q[0]
    ref = reference(q, kv)
    got = attention_f32(q, kv, kernel=kernel)
    close(got, ref)
    np.testing.assert_allclose(got[0], kv[spike, 1, 0], atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_and_tied_scores(kernel):
    """Scores in the thousands (exp overflows unless the max is subtracted), equal scores
    everywhere (a plain mean of V), and an all-zero cache (zeros)."""
    rng = np.random.default_rng(7)
    hd, n = 32, 300
    q = np.full((3, hd), 10.0, np.float32)
    kv = rng.standard_normal((n, 2, 1, hd)).astype(np.float32) * 30
    close(attention_f32(q, kv, kernel=kernel), reference(q, kv))
    flat = np.zeros((n, 2, 1, hd), np.float32)
    flat[:, 1] = rng.standard_normal((n, 1, hd))
    close(attention_f32(q, flat, kernel=kernel), np.broadcast_to(flat[:, 1, 0].mean(0), (3, hd)))
    assert not attention_f32(q, np.zeros((n, 2, 1, hd), np.float32), kernel=kernel).any()


def test_variants_agree_to_rounding():
    """The AVX2 kernel's vector sums and polynomial exp stay within float32 rounding of the
    generic one's libm exp."""
    if "avx2" not in KERNELS:
        pytest.skip("no AVX2 on this CPU")
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((9, 64)) / 8).astype(np.float32)
    kv = rng.standard_normal((700, 2, 3, 64)).astype(np.float32)
    close(attention_f32(q, kv, kernel="avx2"), attention_f32(q, kv, kernel="generic"), 2e-6)


@pytest.mark.parametrize("q, kv, exc, match", [
    (np.zeros((2, 8), np.float64), np.zeros((4, 2, 1, 8), np.float32), TypeError, "q"),
    (np.zeros((2, 8), np.float32), np.zeros((4, 2, 1, 8), np.float16), TypeError, "kv"),
    (np.zeros((2, 8), np.float32), np.zeros((4, 3, 1, 8), np.float32), ValueError, "kv"),
    (np.zeros((2, 8), np.float32), np.zeros((4, 2, 1, 9), np.float32), ValueError, "kv"),
    (np.zeros((3, 8), np.float32), np.zeros((4, 2, 2, 8), np.float32), ValueError, "q"),
    (np.zeros((2, 8), np.float32), np.zeros((0, 2, 1, 8), np.float32), ValueError, "kv"),
    (np.zeros((0, 8), np.float32), np.zeros((4, 2, 1, 8), np.float32), ValueError, "q"),
    (np.full((2, 8), np.nan, np.float32), np.zeros((4, 2, 1, 8), np.float32), ValueError, "q"),
    (np.zeros((2, 8), np.float32), np.full((4, 2, 1, 8), np.inf, np.float32), ValueError, "kv"),
    (np.zeros((2, 8), np.float32), np.zeros((4, 2, 1, 16), np.float32)[:, :, :, ::2], ValueError,
     "kv"),
    (np.zeros(8, np.float32), np.zeros((4, 2, 1, 8), np.float32), ValueError, "q"),
])
def test_bad_arguments_raise_naming_them(q, kv, exc, match):
    with pytest.raises(exc, match=match):
        attention_f32(q, kv)


def test_unknown_kernel_is_refused():
    q, kv = np.zeros((1, 8), np.float32), np.zeros((2, 2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="kernel"):
        attention_f32(q, kv, kernel="vnni")
