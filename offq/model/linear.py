"""Linear layers as swappable callables.

A decoder layer does not own matrices; it owns a dict of *Linear callables*
``x[..., in] -> y[..., out]`` keyed by the HF module name (``q_proj`` ... ``down_proj``).
The float32 reference is :class:`DenseLinear`; quantization replaces entries of that dict with
fake-quant or real W4A4 implementations without touching the forward pass.

Layout follows HF/torch: a weight is stored ``[out, in]`` and ``y = x @ W.T (+ b)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Linear", "DenseLinear", "LINEAR_NAMES", "ATTN_LINEARS", "MLP_LINEARS"]

#: Every linear of a Llama/Qwen2 decoder layer, in execution order.
ATTN_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES: tuple[str, ...] = ATTN_LINEARS + MLP_LINEARS


@runtime_checkable
class Linear(Protocol):
    """Anything that maps float32 ``x[..., in_features]`` to float32 ``y[..., out_features]``."""

    in_features: int
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class DenseLinear:
    """Float32 ``y = x @ W.T + b`` through NumPy's BLAS (sgemm).

    Attributes:
        weight: float32 ``[out, in]``, C-contiguous (BLAS reads the transpose without a copy).
        bias: optional float32 ``[out]`` (Qwen2's q/k/v biases).
    """

    weight: np.ndarray
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"weight: expected a 2-D [out, in] array, got shape {w.shape}")
        self.weight = w
        if self.bias is not None:
            b = np.ascontiguousarray(self.bias, dtype=np.float32)
            if b.shape != (w.shape[0],):
                raise ValueError(f"bias: expected shape ({w.shape[0]},), got {b.shape}")
            self.bias = b

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected last axis {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        y = np.matmul(x.reshape(-1, self.in_features), self.weight.T)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)
