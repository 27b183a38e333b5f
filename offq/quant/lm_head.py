"""The LM head stored in 8 bits (``QuantConfig.lm_head_bits = 8``): symmetric int8 weights with one
scale per group of inputs (the largest power of two dividing the hidden size, at most 128), applied
by ``offq.kernels.matmul_i8``. The embedding table (the LM head's tied twin in the source model)
stays float32 for the lookup: offq unties them before fusing the final norm and R1 into the head.
"""
from __future__ import annotations

import numpy as np

from ..config import largest_pow2_divisor_at_most
from ..kernels.matmul_i8 import matmul_i8, quantize_i8

__all__ = ["Int8Linear", "lm_head_group", "lm_head_names", "quantize_lm_head", "store_lm_head"]


def lm_head_names(head: str) -> tuple[str, str]:
    """The stored names of an 8-bit head ``<prefix>.weight``: ``<prefix>.qweight`` (int8) and
    ``<prefix>.scales`` (float32)."""
    prefix = head[:-len(".weight")] if head.endswith(".weight") else head
    return prefix + ".qweight", prefix + ".scales"


def store_lm_head(glob: dict, head: str) -> None:
    """Replace the float head ``glob[head]`` by its int8 codes and scales (in place)."""
    q, s = quantize_lm_head(np.asarray(glob.pop(head), np.float32))
    qname, sname = lm_head_names(head)
    glob[qname], glob[sname] = q, s


def lm_head_group(hidden_size: int) -> int:
    """The scale group of an 8-bit LM head."""
    return largest_pow2_divisor_at_most(hidden_size, 128)


def quantize_lm_head(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 [V, d], float32 scales [V, d / group])`` of a float LM head ``[V, d]``."""
    return quantize_i8(weight, lm_head_group(weight.shape[1]))


class Int8Linear:
    """``y = x @ (scale * w).T`` with int8 ``w [out, in]`` (a Linear, see offq.model.linear)."""

    def __init__(self, qweight: np.ndarray, scales: np.ndarray) -> None:
        self.qweight = np.ascontiguousarray(qweight, dtype=np.int8)
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)
        self.out_features, self.in_features = self.qweight.shape
        self.group = self.in_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales."""
        return int(self.qweight.nbytes + self.scales.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last axis {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        return matmul_i8(x2, self.qweight, self.scales, self.group).reshape(
            *lead, self.out_features)
