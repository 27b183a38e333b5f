"""Attention over a float32 KV cache (C kernel ``offq._C.attention_f32``): what the weight-only
decoder step (:mod:`.decoder_wq`) runs per layer, exposed on its own for tests and experiments.

``attention_f32(q, kv)[t] == softmax(q[t] @ K_h.T) @ V_h`` with ``h = t // (nq // kv_heads)``,
``K_h = kv[:, 0, h]``, ``V_h = kv[:, 1, h]``, to float32 rounding. The positions are split into
fixed chunks of 128 (each chunk's max score, softmax sum and weighted V sum, then the chunks
merged: a decode step's threads share the chunks of a long context); the AVX2 variant uses a
polynomial exp about an ulp from libm's.
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["attention_f32"]


def attention_f32(q: np.ndarray, kv: np.ndarray, *, kernel: str = "auto") -> np.ndarray:
    """Softmax attention of float32 ``q[nq, hd]`` (already scaled by ``1/sqrt(hd)``; ``nq`` a
    multiple of the KV heads) over float32 ``kv[n, 2, kv_heads, hd]`` (K then V per position,
    ``n >= 1``) -> float32 ``[nq, hd]``. ``kernel``: "auto", "generic" (the C reference) or
    "avx2" (ValueError where the CPU lacks it). The binding validates every argument
    (TypeError/ValueError naming it; NaN or Inf in either input is refused)."""
    return _C.attention_f32(q, kv, kernel)
