"""Round-to-nearest weight quantization on the shared grid (the GPTQ-free baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..quant.grid import check_bits, group_params, quantize_codes, resolve_group
from ..quant.weight import QuantizedWeight
from .base import WeightQuantizer


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
    g = resolve_group(group_size, w.shape[1])
    scale, zero = group_params(w, bits, g, symmetric, clip_search)
    codes = quantize_codes(w, expand_groups(scale, g), expand_groups(zero, g), bits)
    return QuantizedWeight(codes, scale, zero, bits, g, symmetric)


@dataclass(frozen=True)
class RTN(WeightQuantizer):
    """Round to nearest: needs no calibration inputs."""

    needs_hessian = False

    def quantize(self, w: np.ndarray, prepared: Any = None) -> QuantizedWeight:
        return rtn_quantize(w, bits=self.bits, group_size=self.group_size,
                            symmetric=self.symmetric, clip_search=self.clip_search)
