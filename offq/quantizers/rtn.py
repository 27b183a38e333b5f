"""Round-to-nearest weight quantization on the shared grid (the GPTQ-free baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import check_bits, dequantize_codes, group_params, quantize_codes


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix on the grid: ``w_hat = scale * (codes - zero)`` per group of the in axis.

    codes: uint8 [N, K] (unpacked); scale, zero: float32 [N, G]; dequantized: float32 [N, K].
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int
    symmetric: bool
    dequantized: np.ndarray

    def to_qtensor(self):
        """Pack into the kernels' QTensor (``QTensor.from_codes``)."""
        from offq.kernels import QTensor

        return QTensor.from_codes(self.codes, self.scale, self.zero, bits=self.bits,
                                  group_size=self.group_size, symmetric=self.symmetric)


def expand_groups(p: np.ndarray, group_size: int) -> np.ndarray:
    """Repeat per-group parameters [N, G] to per-element [N, G * group_size]."""
    return np.repeat(p, group_size, axis=-1)


def rtn_quantize(w: np.ndarray, *, bits: int = 4, group_size: int = -1, symmetric: bool = True,
                 clip_search: bool = True) -> QuantizedWeight:
    """Quantize ``w`` [N, K] by rounding each element to its group's grid."""
    check_bits(bits)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight [out, in], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w: contains NaN or Inf")
    k = w.shape[1]
    g = k if group_size in (-1, k) else group_size
    scale, zero = group_params(w, bits, g, symmetric, clip_search)
    s, z = expand_groups(scale, g), expand_groups(zero, g)
    codes = quantize_codes(w, s, z, bits)
    return QuantizedWeight(codes, scale, zero, bits, g, symmetric, dequantize_codes(codes, s, z))
