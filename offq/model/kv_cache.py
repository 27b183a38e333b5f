"""Key/value cache for incremental decoding, with an optional codec (KV quantization).

Shapes: keys and values enter the cache as float32 ``[batch, n_kv_heads, tokens, head_dim]``,
after RoPE and after the layer's ``qk_transform`` (so a KV4 codec sees K in the rotated basis).
All sequences of a batch have the same length (no padding).

A :class:`KVCodec` decides what is stored: ``encode`` turns a float32 block into any object
(packed 4-bit codes + scales, say) and ``decode`` turns it back into float32 of the same shape.
Per-token codecs (quantization groups inside one token's head vector) give the same result
whether tokens arrive all at once (prefill) or one by one (decode), which is what makes
incremental decoding equal to a full prefill.

Storage. K and V live in one :class:`KVStore`: contiguous buffers that grow
geometrically along the token axis, so appending a token costs O(1) work and reading the cache is
one pass over it (no per-chunk Python calls). Buffers are *token-major* (``[capacity, batch,
kv_heads, ...]``): the first ``length`` tokens are then a contiguous prefix, which a packed store
decodes with one kernel call; reads return a strided ``[batch, kv_heads, length, head_dim]``
view. Without a codec (or with a codec that has no store of its own) the store keeps float32
values, ``decode(encode(x))`` for a codec. A codec with a compact format provides its own store
through ``new_store()`` (``offq.quant.kv_codec.PackedKVCodec`` keeps 4-bit codes, scales and
zero-points and dequantizes on read). K and V share one store, so a decode step appends and reads
them with one call each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["KVCodec", "KVStore", "FakeQuantKVCodec", "FloatKVStore", "LayerKVCache", "KVCache",
           "grow_token_major", "checked_truncation"]


@runtime_checkable
class KVCodec(Protocol):
    """Storage format of K and V. ``decode(encode(x))`` is what attention reads.

    A codec may also define ``new_store() -> KVStore`` to keep its encoded form in the cache.
    """

    def encode(self, x: np.ndarray, *, kind: str) -> Any:
        """Encode float32 ``x[batch, kv_heads, tokens, head_dim]``; ``kind`` is "k" or "v"."""
        ...

    def decode(self, enc: Any, *, kind: str) -> np.ndarray:
        """Return float32 ``[batch, kv_heads, tokens, head_dim]``."""
        ...


@runtime_checkable
class KVStore(Protocol):
    """The cached keys and values of one layer."""

    length: int

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Store float32 ``k, v[batch, kv_heads, t, head_dim]`` after the cached tokens."""
        ...

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All cached keys and values, float32 ``[batch, kv_heads, length, head_dim]`` each
        (possibly strided views, valid until the next append)."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens only (a conversation that continues from an
        earlier point; the tokens kept are exactly as stored)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        ...


@dataclass
class FakeQuantKVCodec:
    """Codec from a round-trip function ``fn(x, kind) -> x_hat`` (simulated quantization).

    The stored object is the float32 round-tripped array itself.
    """

    fn: Any

    def encode(self, x: np.ndarray, *, kind: str) -> np.ndarray:
        """The round-tripped float32 array."""
        return np.ascontiguousarray(self.fn(x, kind), dtype=np.float32)

    def decode(self, enc: np.ndarray, *, kind: str) -> np.ndarray:
        """``enc`` itself (already float32 values)."""
        return enc


def grow_token_major(buf: np.ndarray | None, used: int, need: int, row_shape: tuple[int, ...],
                     dtype: Any) -> np.ndarray:
    """A ``[capacity, *row_shape]`` buffer with room for ``need`` tokens, keeping the first
    ``used`` (capacity at least doubles, so appends are amortised O(1))."""
    if buf is not None and buf.shape[0] >= need:
        return buf
    cap = max(need, 2 * (0 if buf is None else buf.shape[0]), 16)
    new = np.empty((cap,) + tuple(row_shape), dtype=dtype)
    if buf is not None and used:
        new[:used] = buf[:used]
    return new


class FloatKVStore:
    """float32 store of K and V in one token-major buffer ``[capacity, 2, B, Hkv, hd]``,
    holding ``codec.decode(codec.encode(x))`` when a codec is given."""

    def __init__(self, codec: KVCodec | None = None) -> None:
        self.codec = codec
        self.length = 0
        self._buf: np.ndarray | None = None

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Store ``k, v[B, Hkv, t, hd]`` (round-tripped through the codec) after the cache."""
        if self.codec is not None:
            k = self.codec.decode(self.codec.encode(k, kind="k"), kind="k")
            v = self.codec.decode(self.codec.encode(v, kind="v"), kind="v")
        B, H, t, d = k.shape
        if self._buf is not None and self._buf.shape[2:] != (B, H, d):
            raise ValueError(f"k: shape {k.shape} does not match the cache "
                             f"[{B}, {H}, *, {d}] expected {list(self._buf.shape[2:])}")
        self._buf = grow_token_major(self._buf, self.length, self.length + t, (2, B, H, d),
                                     np.float32)
        new = self._buf[self.length:self.length + t]
        new[:, 0] = k.transpose(2, 0, 1, 3)
        new[:, 1] = v.transpose(2, 0, 1, 3)
        self.length += t

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the buffer is a token-major prefix)."""
        self.length = checked_truncation(length, self.length)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Views ``[B, Hkv, length, hd]`` of the cached keys and values."""
        kv = self._buf[:self.length]
        return kv[:, 0].transpose(1, 2, 0, 3), kv[:, 1].transpose(1, 2, 0, 3)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens."""
        return 0 if self._buf is None else self._buf[:self.length].nbytes


class LayerKVCache:
    """The cache of one decoder layer: one :class:`KVStore` holding its keys and values."""

    def __init__(self) -> None:
        self.codec: KVCodec | None = None
        self.length = 0
        self.store: KVStore | None = None

    def append(self, k: np.ndarray, v: np.ndarray,
               codec: KVCodec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Store new ``k, v`` ``[B, Hkv, t, hd]``; return all keys and values so far (float32
        ``[B, Hkv, length, hd]``, possibly strided views valid until the next append).

        ``codec`` is the layer's codec; it is fixed by the first call (a cache cannot change format
        half way). A codec with ``new_store()`` provides the store, else a float32 one is used.
        """
        if self.length == 0:
            self.codec = codec
            make = getattr(codec, "new_store", None)
            self.store = make() if make is not None else FloatKVStore(codec)
        elif codec is not self.codec:
            raise ValueError("codec: the layer's kv_codec changed while its cache was in use")
        if k.shape != v.shape:
            raise ValueError(f"k, v: shapes differ ({k.shape} vs {v.shape})")
        self.store.append(k, v)
        self.length += k.shape[2]
        return self.store.read()

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions; at 0 the layer starts afresh (its codec may
        be set again by the next append)."""
        length = checked_truncation(length, self.length)
        if length == 0:
            self.codec, self.store = None, None
        elif length < self.length:
            self.store.truncate(length)
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes held by the store."""
        return 0 if self.store is None else int(self.store.nbytes)


class KVCache:
    """Per-layer caches of a whole model; ``length`` is the number of positions already seen."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer (``0 <= length <= self.length``):
        the next forward continues from there. Per-token codecs make the kept positions
        independent of what followed them, so this equals a cache filled with those positions
        only."""
        length = checked_truncation(length, self.length)
        for layer in self.layers:
            layer.truncate(length)

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's cache."""
        return sum(layer.nbytes for layer in self.layers)

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


def checked_truncation(length: object, cached: int) -> int:
    """``length`` as an int when a cache of ``cached`` positions can be cut to it, else
    ValueError / TypeError naming ``length``."""
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool):
        raise TypeError(f"length: expected an integer, got {type(length).__name__}")
    if not 0 <= length <= cached:
        raise ValueError(f"length: {length} outside 0..{cached} (the positions cached)")
    return int(length)
