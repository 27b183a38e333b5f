"""The uniform quantization grid shared by every quantizer in offq (one format everywhere).

A group of ``g`` consecutive values along the last axis is stored as unsigned codes ``q`` in
``[0, 2^bits - 1]`` plus a float32 ``scale`` and an integer-valued float32 ``zero``:

    x_hat = scale * (q - zero)

All arithmetic is float32 with round-half-to-even (``np.rint``), exactly as
``offq.kernels.quantize`` computes it, so codes produced here and by the C kernel agree bit for bit
(for the same clip ratio):

    asymmetric: lo = clip * min(g), hi = clip * max(g); scale = (hi - lo) / (2^b - 1)
                (scale == 0: |hi| if hi != 0 else 1); zero = round(-lo / scale)
    symmetric:  scale = clip * max|g| / (2^(b-1) - 1) (0: 1); zero = 2^(b-1)
    both:       q = clamp(round(x / scale) + zero, 0, 2^b - 1)

The zero-point may lie outside the code range: a group that is all offset keeps its resolution.
:func:`mse_clip_search` picks, per group, the clip ratio (1.0 down to ``1 - max_shrink``) that
minimises the squared error of the round trip (GPTQ's grid search, with the L2 norm).
"""
from __future__ import annotations

import numpy as np

CLIP_GRID = 100  # candidate ratios are 1 - i / CLIP_GRID
MAX_SHRINK = 0.8  # smallest ratio tried: 1 - MAX_SHRINK


def check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits: expected one of 2, 3, 4, 8, got {bits!r}")


def grid_params(x: np.ndarray, bits: int, symmetric: bool,
                clip: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of each row of ``x`` ([..., g]) -> two float32 arrays of shape [...].

    ``clip`` is a scalar or an array broadcastable to ``x.shape[:-1]``.
    """
    check_bits(bits)
    x = np.asarray(x, dtype=np.float32)
    clip = np.asarray(clip, dtype=np.float32)
    if symmetric:
        amax = clip * np.abs(x).max(axis=-1)
        scale = (amax / np.float32(2 ** (bits - 1) - 1)).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        zero = np.full(scale.shape, 2 ** (bits - 1), dtype=np.float32)
        return scale, zero
    lo = (clip * x.min(axis=-1)).astype(np.float32)
    hi = (clip * x.max(axis=-1)).astype(np.float32)
    scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float32)
    fallback = np.where(hi != 0, np.abs(hi), np.float32(1)).astype(np.float32)
    scale = np.where(scale == 0, fallback, scale).astype(np.float32)
    zero = np.rint(-lo / scale).astype(np.float32)
    return scale, zero


def quantize_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``x`` on the grid (scale, zero broadcast against x): uint8 in [0, 2^bits - 1]."""
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / scale.astype(np.float32)) + zero.astype(np.float32)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """``scale * (codes - zero)`` in float32 (the single dequantization formula)."""
    return (scale.astype(np.float32) * (codes.astype(np.float32) - zero.astype(np.float32))
            ).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Round trip through the grid (quantize then dequantize), float32."""
    return dequantize_codes(quantize_codes(x, scale, zero, bits), scale, zero)


def mse_clip_search(x: np.ndarray, bits: int, symmetric: bool, *, grid: int = CLIP_GRID,
                    max_shrink: float = MAX_SHRINK) -> tuple[np.ndarray, np.ndarray]:
    """Per-row grid with the clip ratio minimising ``sum((x_hat - x)^2)`` over the row.

    ``x`` is [..., g]; returns (scale, zero) of shape [...]. The ratio 1.0 (plain min/max) is
    always a candidate, so the result is never worse than no clipping.
    """
    x = np.asarray(x, dtype=np.float32)
    best_scale, best_zero = grid_params(x, bits, symmetric, 1.0)
    best_err = _row_error(x, best_scale, best_zero, bits)
    for i in range(1, int(max_shrink * grid) + 1):
        ratio = 1.0 - i / grid
        scale, zero = grid_params(x, bits, symmetric, ratio)
        err = _row_error(x, scale, zero, bits)
        better = err < best_err
        if np.any(better):
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.float32)


def _row_error(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    d = fake_quantize(x, scale[..., None], zero[..., None], bits) - x
    return np.einsum("...i,...i->...", d, d, dtype=np.float64)


def group_params(w: np.ndarray, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of every group of a matrix ``w`` [N, K] -> two float32 arrays [N, G].

    ``group_size`` -1 (or K) means one group per row; otherwise it must divide K.
    """
    n, k = w.shape
    g = k if group_size in (-1, k) else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size: expected -1 or a divisor of {k}, got {group_size}")
    groups = np.ascontiguousarray(w, dtype=np.float32).reshape(n, k // g, g)
    if clip_search:
        return mse_clip_search(groups, bits, symmetric)
    return grid_params(groups, bits, symmetric)
