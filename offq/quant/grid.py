"""The uniform quantization grid shared by every quantizer in offq (one format everywhere).

A group of ``g`` consecutive values along the last axis is stored as unsigned codes ``q`` in
``[0, 2^bits - 1]`` plus a float32 ``scale`` and an integer-valued float32 ``zero``:

    x_hat = scale * (q - zero)

All arithmetic is float32 with round-half-to-even (``np.rint``), exactly as
``offq.kernels.quantize`` computes it, so codes produced here and by the C kernel agree bit for bit
(for the same clip ratio):

    asymmetric: d = (0.5 (1 - clip)) (max(g) - min(g)), lo = min(g) + d, hi = max(g) - d
                (the range shrunk about its midpoint; clip 1: min and max exactly);
                scale = (hi - lo) / (2^b - 1)
                (scale == 0: |hi| if hi != 0 else 1); zero = round(-lo / scale)
    symmetric:  scale = clip * max|g| / (2^(b-1) - 1) (0: 1); zero = 2^(b-1)
    both:       q = clamp(round(x / scale) + zero, 0, 2^b - 1)

The zero-point may lie outside the code range: a group that is all offset keeps its resolution.
A clip ratio below 1 shrinks the range about its midpoint (docs/METHODS.md, "Quantization
grid"), never towards zero, so the offset groups OffQ creates are not clamped.

Storage: :func:`pack_codes` / :func:`unpack_codes` (through the C core) put two 4-bit codes in a
byte, element ``2i`` in the low nibble; other widths keep one code per byte.
:func:`mse_clip_search` picks, per group, the clip ratio (1.0 down to ``1 - max_shrink``) that
minimises the squared error of the round trip (GPTQ's grid search, with the L2 norm).
"""
from __future__ import annotations

import numpy as np

from .. import kernels

CLIP_GRID = 100  # candidate ratios are 1 - i / CLIP_GRID
MAX_SHRINK = 0.8  # smallest ratio tried: 1 - MAX_SHRINK


#: The bit widths of the grid (16 in a QuantConfig means "not quantized"); the kernels' list.
SUPPORTED_BITS = kernels.SUPPORTED_BITS


def check_bits(bits: int) -> None:
    """ValueError naming ``bits`` unless it is one of `SUPPORTED_BITS` (the one such check)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of 2, 3, 4, 8, got {bits!r}")


def resolve_group(group_size: int, k: int, what: str = "group_size") -> int:
    """The actual group size over an axis of ``k``: ``k`` for -1 (one group per row) or for a
    size >= k, else ``group_size``, which must divide ``k`` (the one place -1 -> K happens)."""
    g = int(group_size)
    if g == -1 or g >= k:
        return k
    if g < 1 or k % g:
        raise ValueError(f"{what}: expected -1 or a divisor of {k}, got {group_size}")
    return g


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Storage layout of one-per-byte uint8 codes ``[..., K]`` (``offq.kernels.pack_codes``):
    4-bit codes two per byte (element 2i in the low nibble) -> ``[..., ceil(K/2)]``; other
    widths unchanged."""
    return kernels.pack_codes(np.ascontiguousarray(codes, dtype=np.uint8), bits=int(bits))[0]


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` -> uint8 ``[..., k]``."""
    return kernels.unpack_codes(np.ascontiguousarray(packed, dtype=np.uint8), bits=int(bits),
                                k=int(k))


def grid_params(x: np.ndarray, bits: int, symmetric: bool,
                clip: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of each row of ``x`` ([..., g]) -> two float32 arrays of shape [...].

    ``clip`` is a scalar or an array broadcastable to ``x.shape[:-1]``.
    """
    check_bits(bits)
    return _params_of_range(_row_range(np.asarray(x, dtype=np.float32), symmetric), bits,
                            symmetric, clip)


def _row_range(x: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """What the grid of a row depends on: (max |x|,) or (min, max)."""
    if symmetric:
        return (np.abs(x).max(axis=-1),)
    return x.min(axis=-1), x.max(axis=-1)


def _params_of_range(rng: tuple[np.ndarray, ...], bits: int, symmetric: bool,
                     clip: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grid_params` from the rows' :func:`_row_range` (float32 throughout)."""
    clip = np.asarray(clip, dtype=np.float32)
    if symmetric:
        amax = clip * rng[0]
        scale = (amax / np.float32(2 ** (bits - 1) - 1)).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        zero = np.full(scale.shape, 2 ** (bits - 1), dtype=np.float32)
        return scale, zero
    mn, mx = rng
    # about the midpoint, in the kernel's float32 steps: d = (0.5 (1 - clip)) (max - min),
    # [min + d, max - d] (clip 1: d = 0, min and max exactly)
    d = ((np.float32(0.5) * (np.float32(1) - clip)).astype(np.float32) * (mx - mn)).astype(np.float32)
    lo = (mn + d).astype(np.float32)
    hi = (mx - d).astype(np.float32)
    scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float32)
    fallback = np.where(hi != 0, np.abs(hi), np.float32(1)).astype(np.float32)
    scale = np.where(scale == 0, fallback, scale).astype(np.float32)
    zero = (np.rint(-lo / scale) + np.float32(0)).astype(np.float32)  # + 0: no -0, as in C
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


def mse_clip_search(x: np.ndarray, bits: int, symmetric: bool, *, grid: int = CLIP_GRID,
                    max_shrink: float = MAX_SHRINK) -> tuple[np.ndarray, np.ndarray]:
    """Per-row grid with the clip ratio minimising ``sum((x_hat - x)^2)`` over the row.

    ``x`` is [..., g]; returns (scale, zero) of shape [...]. Candidate ratios are
    ``1 - i / grid`` for ``i = 0 .. max_shrink * grid``, searched coarse to fine: every 5th
    candidate first, then the 8 neighbours of each row's best coarse ratio (25 evaluations instead
    of 81 for the defaults). The ratio 1.0 (plain min/max) is always a candidate, so the result is
    never worse than no clipping. In C (:func:`offq.kernels.mse_clip_search`: each row's 25
    round trips in cache, rows over offq's threads), with this module's float32 grid
    arithmetic; ``tests/test_clip_search.py`` holds the NumPy search it replaced.
    """
    check_bits(bits)
    if not (0.0 <= max_shrink < 1.0):
        raise ValueError(f"max_shrink: expected 0 <= max_shrink < 1, got {max_shrink}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("x: expected at least one axis (the row), got a scalar")
    x = np.ascontiguousarray(x)
    return kernels.mse_clip_search(x, bits=int(bits), symmetric=bool(symmetric), grid=int(grid),
                                   top=int(max_shrink * grid))


def group_params(w: np.ndarray, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of every group of a matrix ``w`` [N, K] -> two float32 arrays [N, G].

    ``group_size`` -1 (or K) means one group per row; otherwise it must divide K.
    """
    n, k = w.shape
    g = resolve_group(group_size, k)
    groups = np.ascontiguousarray(w, dtype=np.float32).reshape(n, k // g, g)
    if clip_search:
        return mse_clip_search(groups, bits, symmetric)
    return grid_params(groups, bits, symmetric)
