"""The key offset of a layer (``QuantConfig.kv_centre_keys``; docs/METHODS.md, "KV cache").

Attention scores of one query against all cached keys are ``q . k_j``; subtracting one vector
``mu`` from every key of a head changes them all by the same ``q . mu``, which softmax ignores. So
the K cache may store ``k - mu`` at no cost in float. It matters for 4 bits: some models give
every key of a head a large common part (Qwen2.5's k_proj biases reach ~190 in layer 0, against a
per-token spread of ~1.4). A per-token asymmetric 4-bit group cannot absorb it (after R3 it is
spread over head_dim with mixed signs), its range goes to the constant and the token's own
information rounds away: on Qwen2.5-Coder-1.5B a 4-bit K cache alone takes WikiText-2 perplexity
from 13.3 to 3856, and 13.5 with the keys centred (1 window x 512 tokens).

``mu`` is the mean key of each KV head in the cache's basis (after RoPE and R3) over the
calibration tokens, measured on the layer's float weights with the earlier layers already
quantized. Without calibration (RTN) it is estimated from the k_proj bias alone: the mean of
``R3(RoPE_p(b))`` over the calibration positions ``p``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import fwht
from ..model.ops import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["KeyMean", "key_offset_from_bias"]


class KeyMean:
    """Running mean of keys ``[B, Hkv, T, hd]`` per KV head, as a ``qk_transform`` wrapper:
    ``KeyMean(inner)`` applies ``inner`` (R3 or None) and records the keys it returns."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.sum: np.ndarray | None = None
        self.count = 0

    def __call__(self, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.inner is not None:
            q, k = self.inner(q, k)
        part = k.sum(axis=(0, 2), dtype=np.float64)
        self.sum = part if self.sum is None else self.sum + part
        self.count += k.shape[0] * k.shape[2]
        return q, k

    def mean(self) -> np.ndarray:
        """float32 ``[Hkv, hd]``: the mean key of each head (ValueError before any key)."""
        if self.sum is None or self.count == 0:
            raise ValueError("KeyMean: no keys recorded (the calibration pass did not run)")
        mu = self.sum / self.count
        if not np.all(np.isfinite(mu)):
            raise ValueError("KeyMean: the calibration keys contain NaN or Inf")
        return mu.astype(np.float32)


def key_offset_from_bias(bias: np.ndarray | None, mc: Any, positions: int,
                         r3: bool) -> np.ndarray:
    """Data-free key offset ``[Hkv, hd]``: the mean over positions ``0..positions-1`` of the
    k_proj bias after RoPE (and R3 when ``r3``); zeros for a model without k_proj bias."""
    hkv, hd = mc.num_key_value_heads, mc.head_dim
    if bias is None:
        return np.zeros((hkv, hd), np.float32)
    b = np.asarray(bias, np.float32).reshape(1, hkv, 1, hd)
    inv = rope_inv_freq(hd, float(mc.rope_theta), getattr(mc, "rope_scaling", None))
    cos, sin = rope_cos_sin(inv, 0, positions)
    k = apply_rope(np.broadcast_to(b, (1, hkv, positions, hd)), cos, sin)
    if r3:
        k = fwht(np.ascontiguousarray(k))
    return k.mean(axis=(0, 2), dtype=np.float64).astype(np.float32)
