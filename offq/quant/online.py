"""The online transforms a rotated model applies at run time (docs/METHODS.md, "OffQ", step 8):
R3, the normalised Hadamard of head_dim on Q and K after RoPE (it cancels in ``Q K^T``, and the K
cache is quantized in the rotated basis), the key offset (each KV head's calibrated mean key,
subtracted before the K cache is quantized: softmax ignores a shift common to all keys), and R4's
online half, the Hadamard of the intermediate
size on the down_proj input (its inverse is fused into down_proj's weight offline by
``offq.recipe.rotations.rotate_layer``)."""
from __future__ import annotations

import numpy as np

from ..kernels import fwht

__all__ = ["HadamardQK", "HadamardInput", "r3_qk_transform", "r4_input_transform",
           "qk_transform"]


class HadamardQK:
    """The online Q/K transform: ``(q, k) -> (q H, k H - mu)``.

    ``H`` is R3, the normalised Hadamard over head_dim after RoPE (``(q H)(k H)^T = q k^T``; the
    K cache is stored in the rotated basis), or the identity with ``hadamard=False``. ``mu`` is
    the optional key offset ``[kv_heads, head_dim]``: every key of a head loses the same vector,
    so each query's scores shift by one constant and softmax leaves attention unchanged, while the
    4-bit K cache no longer spends its range on a large constant (Qwen2.5's key biases). A class
    (not a closure) so that a runtime can recognise it (``offq.quant.fused``).
    """

    def __init__(self, head_dim: int, k_offset: np.ndarray | None = None, *,
                 hadamard: bool = True) -> None:
        self.head_dim = int(head_dim)
        self.hadamard = bool(hadamard)
        if k_offset is not None:
            k_offset = np.ascontiguousarray(k_offset, dtype=np.float32)
            if k_offset.ndim != 2 or k_offset.shape[1] != self.head_dim:
                raise ValueError(f"k_offset: expected [kv_heads, {self.head_dim}], got "
                                 f"{list(k_offset.shape)}")
            if not np.all(np.isfinite(k_offset)):
                raise ValueError("k_offset: contains NaN or Inf")
        self.k_offset = k_offset

    def __call__(self, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"qk_transform: expected last axis {self.head_dim}, got {q.shape}, "
                             f"{k.shape}")
        if self.hadamard:
            q = fwht(np.ascontiguousarray(q, dtype=np.float32))
            k = fwht(np.ascontiguousarray(k, dtype=np.float32))
        if self.k_offset is not None:
            if k.ndim != 4 or k.shape[1] != self.k_offset.shape[0]:
                raise ValueError(f"k: expected [B, {self.k_offset.shape[0]}, T, "
                                 f"{self.head_dim}], got {list(k.shape)}")
            k = k - self.k_offset[None, :, None, :]
        return q, k


class HadamardInput:
    """R4's online half: ``x -> x H`` (full Hadamard of the intermediate size) on the down_proj
    input, the inverse of the ``W_down <- W_down H`` fused by ``rotate_layer``. In place when
    ``x`` is C-contiguous float32 (the SwiGLU output, a temporary the layer owns: at 4 x 2048
    calibration tokens of Qwen2.5-1.5B a copy is 294 MB)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.size:
            raise ValueError(f"down_input_transform: expected last axis {self.size}, "
                             f"got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        return fwht(x, out=x)


def r3_qk_transform(head_dim: int) -> HadamardQK:
    """The R3 ``qk_transform`` hook of a decoder layer (:class:`HadamardQK`)."""
    return HadamardQK(head_dim)


def qk_transform(head_dim: int, r3: bool, k_offset: np.ndarray | None) -> HadamardQK | None:
    """A layer's ``qk_transform`` hook: R3 and/or the key offset, None when neither applies."""
    if not r3 and k_offset is None:
        return None
    return HadamardQK(head_dim, k_offset, hadamard=r3)


def r4_input_transform(intermediate_size: int) -> HadamardInput:
    """The R4 ``down_input_transform`` hook of a decoder layer (:class:`HadamardInput`)."""
    return HadamardInput(intermediate_size)
