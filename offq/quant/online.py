"""The online transforms a rotated model applies at run time (docs/METHODS.md, "OffQ", step 8):
R3, the normalised Hadamard of head_dim on Q and K after RoPE (it cancels in ``Q K^T``, and the K
cache is quantized in the rotated basis), and R4's online half, the Hadamard of the intermediate
size on the down_proj input (its inverse is fused into down_proj's weight offline by
``offq.recipe.rotations.rotate_layer``)."""
from __future__ import annotations

import numpy as np

from ..kernels import fwht

__all__ = ["HadamardQK", "HadamardInput", "r3_qk_transform", "r4_input_transform"]


class HadamardQK:
    """R3 at run time: ``(q, k) -> (q H, k H)`` with the normalised Hadamard over head_dim
    (after RoPE); ``(q H)(k H)^T = q k^T``, and the K cache is stored in the rotated basis. A
    class (not a closure) so that a runtime can recognise it (``offq.quant.fused``)."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = int(head_dim)

    def __call__(self, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"qk_transform: expected last axis {self.head_dim}, got {q.shape}, "
                             f"{k.shape}")
        return (fwht(np.ascontiguousarray(q, dtype=np.float32)),
                fwht(np.ascontiguousarray(k, dtype=np.float32)))


class HadamardInput:
    """R4's online half: ``x -> x H`` (full Hadamard of the intermediate size) on the down_proj
    input, the inverse of the ``W_down <- W_down H`` fused by ``rotate_layer``."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.size:
            raise ValueError(f"down_input_transform: expected last axis {self.size}, "
                             f"got {x.shape}")
        return fwht(np.ascontiguousarray(x, dtype=np.float32))


def r3_qk_transform(head_dim: int) -> HadamardQK:
    """The R3 ``qk_transform`` hook of a decoder layer (:class:`HadamardQK`)."""
    return HadamardQK(head_dim)


def r4_input_transform(intermediate_size: int) -> HadamardInput:
    """The R4 ``down_input_transform`` hook of a decoder layer (:class:`HadamardInput`)."""
    return HadamardInput(intermediate_size)
