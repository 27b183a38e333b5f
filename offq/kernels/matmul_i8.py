"""The int8-weight matmul (C kernel ``offq._C.matmul_i8``): float32 activations times int8 weights
with one float32 scale per group of inputs, what an 8-bit LM head multiplies.

``w_hat[n, i] = scale[n, i // group] * w[n, i]``; ``matmul_i8(x, w, scale, group) ==
x_hat @ w_hat.T`` up to float32 summation order, where ``x_hat`` is ``x`` rounded to 16 bits per
group of the same inputs: ``xs = max|x_group| / 32767``, ``x_hat = xs * clip(rint(x / xs), -32767,
32767)`` (0 where ``xs`` is 0), an error of at most 2^-16 of each group's largest activation.
The rounding lets a few rows (decoding) multiply integers, 16 weights per instruction instead of
8 widened to float (AVX2 where the CPU has it; bit-identical to the generic C kernel); many rows
use sgemm on ``x_hat`` and blocks of dequantized weight rows.
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["matmul_i8", "quantize_i8"]


def quantize_i8(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``w[N, K]`` per group of ``group`` inputs:
    ``scale = max|w_group| / 127`` (1 for an all-zero group), ``q = rint(w / scale)`` in
    [-127, 127]. Returns ``(q int8 [N, K], scale float32 [N, K / group])``."""
    try:
        w = np.ascontiguousarray(w, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"w: expected a real [N, K] array, got {type(w).__name__} ({e})") from None
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D [N, K] array, got shape {w.shape}")
    n, k = w.shape
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise TypeError(f"group: expected an int, got {type(group).__name__}")
    if group <= 0 or k % group:
        raise ValueError(f"group: expected a positive group size dividing {k}, got {group}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w: contains NaN or Inf")
    g = w.reshape(n, k // group, group)
    amax = np.abs(g).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(g / scale[..., None]), -127, 127).astype(np.int8)
    return q.reshape(n, k), scale


def matmul_i8(x: np.ndarray, w: np.ndarray, scale: np.ndarray, group: int, *,
              out: np.ndarray | None = None, kernel: str = "auto") -> np.ndarray:
    """``x_hat @ (scale * w).T`` for float32 ``x[M, K]`` (rounded to 16 bits per group, see the
    module docstring), int8 ``w[N, K]`` and float32 ``scale[N, K / group]`` -> float32
    ``[M, N]``. ``kernel``: "auto" or "generic" (the C reference). The binding validates every
    argument (TypeError/ValueError naming it; NaN or Inf in ``x`` is a ValueError)."""
    return _C.matmul_i8(x, w, scale, group, out, kernel)
