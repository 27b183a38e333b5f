"""The online transforms a rotated model applies at run time (docs/METHODS.md, "OffQ", step 8):
R3, the normalised Hadamard of head_dim on Q and K after RoPE (it cancels in ``Q K^T``, and the K
cache is quantized in the rotated basis), and R4's online half, the Hadamard of the intermediate
size on the down_proj input (its inverse is fused into down_proj's weight offline by
``offq.recipe.rotations.rotate_layer``)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..kernels import fwht

__all__ = ["r3_qk_transform", "r4_input_transform"]


def r3_qk_transform(head_dim: int) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """R3: ``qk_transform(q, k)`` applying the normalised Hadamard over head_dim to both (after
    RoPE); ``(q H)(k H)^T = q k^T``, and the K cache is stored in the rotated basis."""
    def transform(q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if q.shape[-1] != head_dim or k.shape[-1] != head_dim:
            raise ValueError(f"qk_transform: expected last axis {head_dim}, got {q.shape}, {k.shape}")
        return (fwht(np.ascontiguousarray(q, dtype=np.float32)),
                fwht(np.ascontiguousarray(k, dtype=np.float32)))

    return transform


def r4_input_transform(intermediate_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """R4's online half: ``x -> x H`` (full Hadamard of the intermediate size) on the down_proj
    input, the inverse of the ``W_down <- W_down H`` fused by ``rotate_layer``."""
    def transform(x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != intermediate_size:
            raise ValueError(f"down_input_transform: expected last axis {intermediate_size}, "
                             f"got {x.shape}")
        return fwht(np.ascontiguousarray(x, dtype=np.float32))

    return transform
