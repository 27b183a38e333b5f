"""`QuantizedWeight`: offq's one type for a linear's quantized weight.

Every weight quantizer (RTN, GPTQ, with or without OSAQ) returns one; the quantize loop builds
the calibration layer from it directly; the checkpoint stores it (``packed_codes``, ``scale``,
``zero``) and reads it back (``from_stored``); the runtime packs it into the W4A4 kernel's operand
(``qtensor``). The grid is :mod:`offq.quant.grid`'s: ``w_hat = scale * (codes - zero)`` per group
of ``group_size`` consecutive inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from .grid import dequantize_codes, pack_codes, unpack_codes

__all__ = ["QuantizedWeight"]


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight ``[N, K]`` on the grid, plus the linear's bias.

    Attributes:
        codes: uint8 ``[N, K]``, one code per byte, each < 2**bits.
        scale, zero: float32 ``[N, K / group_size]`` (zero integer-valued).
        bits: 2, 3, 4 or 8.
        group_size: inputs per group (K for one group per row).
        symmetric: whether the symmetric grid was used (zero = 2**(bits-1)).
        bias: float32 ``[N]`` or None.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int
    symmetric: bool
    bias: np.ndarray | None = None

    @functools.cached_property
    def dequantized(self) -> np.ndarray:
        """float32 ``[N, K]`` weight ``scale * (codes - zero)`` (computed once)."""
        g = self.group_size
        return dequantize_codes(self.codes, np.repeat(self.scale, g, axis=1),
                                np.repeat(self.zero, g, axis=1))

    def qtensor(self):
        """The packed :class:`offq.kernels.QTensor` of the codes (the W4A4 kernel's operand)."""
        from ..kernels import QTensor

        return QTensor.from_codes(self.codes, self.scale, self.zero, bits=self.bits,
                                  group_size=self.group_size, symmetric=self.symmetric)

    def packed_codes(self) -> np.ndarray:
        """The stored layout of the codes (:func:`offq.quant.grid.pack_codes`)."""
        return pack_codes(self.codes, self.bits)

    def with_bias(self, bias: np.ndarray | None) -> "QuantizedWeight":
        return dataclasses.replace(
            self, bias=None if bias is None else np.ascontiguousarray(bias, dtype=np.float32))

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``[start, stop)`` (a linear cut from a stacked quantization)."""
        return QuantizedWeight(np.ascontiguousarray(self.codes[start:stop]),
                               np.ascontiguousarray(self.scale[start:stop]),
                               np.ascontiguousarray(self.zero[start:stop]),
                               self.bits, self.group_size, self.symmetric,
                               None if self.bias is None else self.bias[start:stop])

    @classmethod
    def from_stored(cls, packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, bits: int,
                    group_size: int, symmetric: bool, in_features: int,
                    bias: np.ndarray | None = None) -> "QuantizedWeight":
        """Inverse of (``packed_codes``, ``scale``, ``zero``) as a checkpoint stores them."""
        return cls(unpack_codes(packed, bits, in_features),
                   np.ascontiguousarray(scale, dtype=np.float32),
                   np.ascontiguousarray(zero, dtype=np.float32), bits, group_size, symmetric,
                   None if bias is None else np.ascontiguousarray(bias, dtype=np.float32))

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Linears with the same inputs and grid as one, output rows concatenated in order; a
        missing bias is zeros when another part has one."""
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.symmetric) != (first.bits, first.group_size, first.symmetric) \
                    or p.codes.shape[1] != first.codes.shape[1]:
                raise ValueError("parts: linears of different input size or grid cannot be fused")
        bias = None
        if any(p.bias is not None for p in parts):
            bias = np.concatenate([p.bias if p.bias is not None
                                   else np.zeros(p.codes.shape[0], np.float32) for p in parts])
        return cls(np.concatenate([p.codes for p in parts]),
                   np.concatenate([p.scale for p in parts]),
                   np.concatenate([p.zero for p in parts]),
                   first.bits, first.group_size, first.symmetric, bias)
