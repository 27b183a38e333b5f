"""Key/value cache for incremental decoding, with an optional codec (KV quantization).

Shapes: keys and values enter the cache as float32 ``[batch, n_kv_heads, tokens, head_dim]``,
after RoPE and after the layer's ``qk_transform`` (so a KV4 codec sees K in the rotated basis).
All sequences of a batch have the same length (no padding).

A :class:`KVCodec` decides what is stored: ``encode`` turns a float32 block into any object
(packed 4-bit codes + scales, say) and ``decode`` turns it back into float32 of the same shape.
Per-token codecs (quantization groups inside one token's head vector) give the same result
whether tokens arrive all at once (prefill) or one by one (decode), which is what makes
incremental decoding equal to a full prefill. Without a codec the cache keeps float32 buffers
that grow geometrically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["KVCodec", "FakeQuantKVCodec", "LayerKVCache", "KVCache"]


@runtime_checkable
class KVCodec(Protocol):
    """Storage format of K and V. ``decode(encode(x))`` is what attention reads."""

    def encode(self, x: np.ndarray, *, kind: str) -> Any:
        """Encode float32 ``x[batch, kv_heads, tokens, head_dim]``; ``kind`` is "k" or "v"."""
        ...

    def decode(self, enc: Any, *, kind: str) -> np.ndarray:
        """Return float32 ``[batch, kv_heads, tokens, head_dim]``."""
        ...


@dataclass
class FakeQuantKVCodec:
    """Codec from a round-trip function ``fn(x, kind) -> x_hat`` (simulated quantization).

    The stored object is the float32 round-tripped array itself.
    """

    fn: Any

    def encode(self, x: np.ndarray, *, kind: str) -> np.ndarray:
        return np.ascontiguousarray(self.fn(x, kind), dtype=np.float32)

    def decode(self, enc: np.ndarray, *, kind: str) -> np.ndarray:
        return enc


def _grow(buf: np.ndarray | None, used: int, need: int, like: np.ndarray) -> np.ndarray:
    """Return a float32 buffer with room for ``need`` tokens on axis 2, keeping ``used`` ones."""
    if buf is not None and buf.shape[2] >= need:
        return buf
    cap = max(need, 2 * (0 if buf is None else buf.shape[2]), 16)
    new = np.empty(like.shape[:2] + (cap,) + like.shape[3:], dtype=np.float32)
    if buf is not None and used:
        new[:, :, :used] = buf[:, :, :used]
    return new


@dataclass
class LayerKVCache:
    """The cache of one decoder layer."""

    codec: KVCodec | None = None
    length: int = 0
    _k: np.ndarray | None = None
    _v: np.ndarray | None = None
    _chunks: list[tuple[Any, Any]] = field(default_factory=list)

    def append(self, k: np.ndarray, v: np.ndarray,
               codec: KVCodec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Store new ``k, v`` ``[B, Hkv, t, hd]``; return all keys and values so far (float32).

        ``codec`` is the layer's codec; it is fixed by the first call (a cache cannot change format
        half way).
        """
        if self.length == 0:
            self.codec = codec
        elif codec is not self.codec:
            raise ValueError("codec: the layer's kv_codec changed while its cache was in use")
        if self._k is not None and (k.shape[:2] != self._k.shape[:2]
                                    or k.shape[3:] != self._k.shape[3:]):
            raise ValueError(f"k: shape {k.shape} does not match the cache {self._k.shape}")
        t = k.shape[2]
        if self.codec is None:
            self._k = _grow(self._k, self.length, self.length + t, k)
            self._v = _grow(self._v, self.length, self.length + t, v)
            self._k[:, :, self.length:self.length + t] = k
            self._v[:, :, self.length:self.length + t] = v
            self.length += t
            return self._k[:, :, :self.length], self._v[:, :, :self.length]
        self._chunks.append((self.codec.encode(k, kind="k"), self.codec.encode(v, kind="v")))
        self.length += t
        ks = [self.codec.decode(ek, kind="k") for ek, _ in self._chunks]
        vs = [self.codec.decode(ev, kind="v") for _, ev in self._chunks]
        if len(ks) == 1:
            return ks[0], vs[0]
        return np.concatenate(ks, axis=2), np.concatenate(vs, axis=2)

    @property
    def nbytes(self) -> int:
        """Bytes held (float buffers, or the encoded chunks where they expose ``nbytes``)."""
        if self.codec is None:
            return sum(a.nbytes for a in (self._k, self._v) if a is not None)
        return sum(int(getattr(e, "nbytes", 0)) for pair in self._chunks for e in pair)


class KVCache:
    """Per-layer caches of a whole model; ``length`` is the number of positions already seen."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
