"""KV cache stores (float and packed 4-bit, token-major growing buffers) and the batched
small-query attention used while decoding."""
import numpy as np
import pytest

from offq.model import FakeQuantKVCodec, KVCache, LayerKVCache
from offq.model import ops
from offq.model.kv_cache import FloatKVStore
from offq.quant.kv_codec import PackedKVCodec, PackedKVStore


def kv(rng, t, b=2, h=3, hd=64):
    return rng.standard_normal((b, h, t, hd)).astype(np.float32)


@pytest.mark.parametrize("codec", [None, PackedKVCodec(4, 64, False), PackedKVCodec(4, 32, True),
                                   FakeQuantKVCodec(lambda x, kind: np.round(x, 1))])
def test_appends_in_pieces_equal_one_round_trip(codec):
    rng = np.random.default_rng(0)
    pieces = [kv(rng, t) for t in (5, 1, 1, 300, 2)]  # capacity grows several times
    cache = LayerKVCache()
    for p in pieces:
        k, v = cache.append(p, 2 * p, codec)
    full = np.concatenate(pieces, axis=2)
    want = full if codec is None else codec.decode(codec.encode(full, kind="k"), kind="k")
    assert cache.length == full.shape[2] and k.shape == full.shape
    np.testing.assert_array_equal(k, want)
    want_v = 2 * full if codec is None else codec.decode(codec.encode(2 * full, kind="v"), kind="v")
    np.testing.assert_array_equal(v, want_v)
    assert isinstance(cache.store,
                      PackedKVStore if isinstance(codec, PackedKVCodec) else FloatKVStore)


@pytest.mark.parametrize("codec", [None, PackedKVCodec(4, 64, False),
                                   FakeQuantKVCodec(lambda x, kind: np.round(x, 1))])
def test_truncated_cache_equals_one_filled_with_the_prefix(codec):
    """Cut back to a prefix and continued, a cache holds what one filled with those tokens
    holds; at 0 it starts afresh and may take another codec; lengths outside it are refused."""
    rng = np.random.default_rng(1)
    a, b, c = kv(rng, 40), kv(rng, 300), kv(rng, 7)
    cache = LayerKVCache()
    cache.append(a, -a, codec)
    cache.append(b, -b, codec)  # grows past the first capacity
    cache.truncate(43)
    assert cache.length == 43
    k, v = cache.append(c, -c, codec)
    ref = LayerKVCache()
    ref.append(np.concatenate([a, b[:, :, :3], c], axis=2),
               -np.concatenate([a, b[:, :, :3], c], axis=2), codec)
    k_ref, v_ref = ref.store.read()
    np.testing.assert_array_equal(k, k_ref)
    np.testing.assert_array_equal(v, v_ref)
    assert cache.nbytes == ref.nbytes
    for bad, err in ((51, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="length"):
            cache.truncate(bad)
    cache.truncate(0)
    assert cache.length == 0 and cache.store is None
    other = PackedKVCodec(4, 32, True)
    k, _ = cache.append(c, c, other)
    np.testing.assert_array_equal(k, other.decode(other.encode(c, kind="k"), kind="k"))
    whole = KVCache(3)
    for layer in whole.layers:
        layer.append(a, a, codec)
    whole.truncate(5)
    assert whole.length == 5 and all(layer.store.length == 5 for layer in whole.layers)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_packed_store_is_compact_and_reads_large_caches(nthreads):
    from offq.kernels import threads

    rng = np.random.default_rng(1)
    codec = PackedKVCodec(4, 64, False)
    store = codec.new_store()
    x = kv(rng, 700, b=1)  # 2 * 700 * 3 * 64 elements: several dequantize calls with 2 threads
    store.append(x, -x)
    with threads(nthreads):
        k, v = store.read()
    np.testing.assert_array_equal(k, codec.decode(codec.encode(x, kind="k"), kind="k"))
    np.testing.assert_array_equal(v, codec.decode(codec.encode(-x, kind="v"), kind="v"))
    assert store.nbytes == 2 * 700 * 3 * (32 + 4 + 4)  # codes + one scale and zero per head
    assert store.nbytes * 6 < 2 * x.nbytes


def test_cache_rejects_format_or_shape_changes():
    rng = np.random.default_rng(2)
    for codec in (None, PackedKVCodec(4, 64, False)):
        cache = LayerKVCache()
        cache.append(kv(rng, 3), kv(rng, 3), codec)
        with pytest.raises(ValueError, match="codec"):
            cache.append(kv(rng, 1), kv(rng, 1), FakeQuantKVCodec(lambda x, kind: x))
        with pytest.raises(ValueError, match="does not match the cache"):
            cache.append(kv(rng, 1, h=2), kv(rng, 1, h=2), codec)
    with pytest.raises(ValueError, match="shapes differ"):
        LayerKVCache().append(kv(rng, 2), kv(rng, 3))
    whole = KVCache(2)
    whole[0].append(kv(rng, 4), kv(rng, 4), PackedKVCodec(4, 64, False))
    assert whole.length == 4 and whole.nbytes == whole[0].nbytes > 0


@pytest.mark.parametrize("t,start", [(1, 0), (1, 37), (3, 0), (5, 20), (8, 129)])
def test_small_query_attention_equals_blocked_path(monkeypatch, t, start):
    rng = np.random.default_rng(t + start)
    q = rng.standard_normal((2, 6, t, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, start + t, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, start + t, 16)).astype(np.float32)
    small = ops.causal_attention(q, k.transpose(2, 0, 1, 3).copy().transpose(1, 2, 0, 3),
                                  v, start)  # strided keys, as a token-major cache returns them
    monkeypatch.setattr(ops, "SMALL_T", 0)
    blocked = ops.causal_attention(q, k, v, start)
    np.testing.assert_allclose(small, blocked, rtol=1e-5, atol=1e-6)
    # float64 reference
    rep = 3
    ref = np.empty((2, t, 6, 16))
    for b in range(2):
        for h in range(6):
            s = q[b, h].astype(np.float64) @ k[b, h // rep].T.astype(np.float64) / 4.0
            s[np.arange(t)[:, None] + start < np.arange(start + t)[None, :]] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, h // rep]
    np.testing.assert_allclose(small, ref.reshape(2, t, 96), rtol=1e-4, atol=1e-5)


def test_packed_read_covers_a_last_token_on_its_own():
    """The packed store decodes its tokens in steps split over the threads: with 2 threads and
    128 tokens the step is 127, so token 127 is a step alone (a loop that stopped one short
    left that row as np.empty had it)."""
    from offq.kernels import threads

    codec = PackedKVCodec(4, 32, False)
    k, v = np.random.default_rng(0).standard_normal((2, 1, 2, 128, 64), dtype=np.float32)
    with threads(2):
        store = codec.new_store()
        store.append(k, v)
        rk, rv = store.read()
    np.testing.assert_array_equal(rk, codec.decode(codec.encode(k, kind="k"), kind="k"))
    np.testing.assert_array_equal(rv, codec.decode(codec.encode(v, kind="v"), kind="v"))
