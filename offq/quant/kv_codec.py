"""The KV-cache codec: keys and values quantized per token and head (groups along head_dim),
stored packed on the real path (docs/METHODS.md, "OffQ", KV cache)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import OFF, QuantConfig
from ..kernels import QTensor, dequantize, quantize
from ..model.kv_cache import FakeQuantKVCodec, checked_truncation, grow_token_major
from ..model.parallel import num_threads

__all__ = ["PackedKVCodec", "PackedKVStore", "kv_codec"]


#: Elements per dequantize call when reading a packed cache: the kernels start an OpenMP team at
#: 2^15 elements, and for a few microseconds of work a team start can cost milliseconds on a busy
#: machine, so reads are cut into calls below that size.
_KV_READ_ELEMS = (1 << 15) - 1


@dataclass(frozen=True)
class PackedKVCodec:
    """K/V quantizer ``[B, Hkv, T, hd]`` -> QTensor (per token and head, groups along head_dim);
    its :meth:`new_store` keeps the cache packed (:class:`PackedKVStore`)."""

    bits: int
    group_size: int
    symmetric: bool

    def encode(self, x: np.ndarray, *, kind: str):
        """QTensor of ``x[..., head_dim]``."""
        return quantize(np.ascontiguousarray(x, dtype=np.float32), bits=self.bits,
                        group_size=self.group_size, symmetric=self.symmetric)

    def decode(self, enc: Any, *, kind: str) -> np.ndarray:
        """float32 values of an encoded block."""
        return dequantize(enc)

    def new_store(self) -> "PackedKVStore":
        """An empty packed store for a layer's keys and values."""
        return PackedKVStore(self)


class PackedKVStore:
    """One layer's K and V as packed codes, scales and zero-points in token-major buffers
    (``[capacity, 2, B, Hkv, ...]``, K then V, grown geometrically). ``append`` quantizes the new
    keys and values with one call; ``read`` dequantizes the ``length`` cached tokens (a
    contiguous prefix) and returns ``[B, Hkv, length, hd]`` views. The values are exactly
    ``codec.decode(codec.encode(x))`` of what was appended (groups lie inside one token's head
    vector, so encoding K and V together changes nothing)."""

    def __init__(self, codec: PackedKVCodec) -> None:
        self.codec = codec
        self.length = 0
        self._codes = self._scale = self._zero = self._sums = None
        self._hd = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Quantize and store ``k, v[B, Hkv, t, hd]`` after the cached tokens."""
        B, H, t, hd = k.shape
        if self._codes is not None and (self._codes.shape[2:4] != (B, H) or hd != self._hd):
            raise ValueError(f"k: shape {k.shape} does not match the cache "
                             f"[{self._codes.shape[2]}, {self._codes.shape[3]}, *, {self._hd}]")
        self._hd = hd
        x = np.empty((t, 2, B, H, hd), dtype=np.float32)
        x[:, 0] = k.transpose(2, 0, 1, 3)
        x[:, 1] = v.transpose(2, 0, 1, 3)
        c = self.codec
        q = quantize(x, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)
        codes, scale, zero, sums = q.codes, q.scale, q.zero, q.code_sums
        end = self.length + t
        self._codes = grow_token_major(self._codes, self.length, end, codes.shape[1:], np.uint8)
        self._scale = grow_token_major(self._scale, self.length, end, scale.shape[1:],
                                       np.float32)
        self._zero = grow_token_major(self._zero, self.length, end, zero.shape[1:], np.float32)
        self._sums = grow_token_major(self._sums, self.length, end, sums.shape[1:], np.int32)
        self._sums[self.length:end] = sums
        self._codes[self.length:end] = codes
        self._scale[self.length:end] = scale
        self._zero[self.length:end] = zero
        self.length = end

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Dequantized keys and values ``[B, Hkv, length, hd]`` (views of one fresh array)."""
        n = self.length
        per_token = int(np.prod(self._codes.shape[1:4])) * self._hd
        step = n if num_threads() == 1 else max(1, _KV_READ_ELEMS // per_token)
        if step >= n:
            kv = dequantize(self._tokens(0, n))
        else:
            kv = np.empty((n,) + self._codes.shape[1:4] + (self._hd,), dtype=np.float32)
            for s in range(0, n, step):
                e = min(n, s + step)
                kv[s:e] = dequantize(self._tokens(s, e))
        return kv[:, 0].transpose(1, 2, 0, 3), kv[:, 1].transpose(1, 2, 0, 3)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the buffers are token-major prefixes)."""
        self.length = checked_truncation(length, self.length)

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the cached tokens' codes ``[length, 2, B, Hkv, ceil(hd/2)]``, scales and
        zero-points ``[length, 2, B, Hkv, hd / group]`` (K then V)."""
        n = self.length
        return self._codes[:n], self._scale[:n], self._zero[:n]

    def _tokens(self, s: int, e: int) -> QTensor:
        """Cached tokens ``s..e-1`` as a QTensor (views of the store)."""
        c = self.codec
        return QTensor(self._codes[s:e], self._scale[s:e], self._zero[s:e], self._sums[s:e],
                       (e - s,) + self._codes.shape[1:4] + (self._hd,), c.bits, c.group_size,
                       c.symmetric)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens' codes, scales and zero-points."""
        if self._codes is None:
            return 0
        n = self.length
        return int(self._codes[:n].nbytes + self._scale[:n].nbytes + self._zero[:n].nbytes)


def kv_codec(cfg: QuantConfig, head_dim: int, mode: str):
    """The layer's KV codec: packed (:class:`PackedKVCodec`, a packed cache) on the real path, a
    float round trip through the same quantizer on the fake path, None without KV quantization."""
    if cfg.kv_bits == OFF:
        return None
    packed = PackedKVCodec(cfg.kv_bits, cfg.kv_group(head_dim), cfg.kv_symmetric)
    if mode == "real":
        return packed
    return FakeQuantKVCodec(lambda x, kind: packed.decode(packed.encode(x, kind=kind), kind=kind))
