"""The activation quantizer: dynamic, per token, per group (min/max with an optional clip about
the range's midpoint), applied to every linear input at run time (docs/METHODS.md, "OffQ",
activations)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import OFF, QuantConfig
from ..kernels import dequantize, quantize

__all__ = ["ActQuant", "activation_quantizer"]


@dataclass(frozen=True)
class ActQuant:
    """Dynamic per-token, per-group activation quantizer (min/max, optional clip)."""

    bits: int
    group_size: int
    symmetric: bool
    clip: float = 1.0

    def quantize(self, x2d: np.ndarray):
        """QTensor of float32 ``x2d[M, K]`` (C-contiguous)."""
        return quantize(x2d, bits=self.bits, group_size=self.group_size,
                        symmetric=self.symmetric, clip=self.clip)

    def fake(self, x: np.ndarray) -> np.ndarray:
        """Round trip of ``x[..., K]`` (float32, same shape)."""
        k = x.shape[-1]
        x2d = np.ascontiguousarray(x.reshape(-1, k), dtype=np.float32)
        return dequantize(self.quantize(x2d)).reshape(x.shape)


def activation_quantizer(cfg: QuantConfig, k: int) -> ActQuant | None:
    """The run-time quantizer of a linear input of dimension ``k`` (None when activations stay
    in float)."""
    if cfg.a_bits == OFF:
        return None
    return ActQuant(cfg.a_bits, cfg.activation_group(k), cfg.a_symmetric, float(cfg.a_clip))
