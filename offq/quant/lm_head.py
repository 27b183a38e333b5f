"""The LM head stored in 8 or 4 bits (``QuantConfig.lm_head_bits``):

- 8: symmetric int8 weights with one scale per group of inputs, applied by
  ``offq.kernels.matmul_i8`` (activations rounded to 16 bits per group);
- 4: asymmetric 4-bit codes on offq's grid (``scale * (q - zero)``, the clip ratio of each group
  searched for the least squared error, as the linears' weights), kept packed and applied by the
  weight-only kernel ``offq.kernels.matmul_wq`` with float32 activations. A decode step reads the
  head in full, so this halves the int8 head's bytes per token (Qwen2.5-1.5B: 0.24 -> 0.12 GB).

The group is the largest power of two dividing the hidden size, at most 128. The embedding table
(the LM head's tied twin in the source model) stays float32 for the lookup: offq unties them
before fusing the final norm and R1 into the head.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..config import largest_pow2_divisor_at_most
from ..kernels.matmul_i8 import matmul_i8, quantize_i8
from ..model.arch import Architecture
from .grid import group_params, quantize_codes
from .weight import QuantizedWeight

__all__ = ["Int8Linear", "lm_head_from_tensors", "lm_head_group", "lm_head_names",
           "lm_head_tensor_specs", "quantize_lm_head", "quantize_lm_head4", "store_lm_head"]

#: Rows of the head quantized at once by :func:`quantize_lm_head4` (bounds its float32
#: temporaries to a few times 64 MiB at d = 1536 instead of the whole head's 0.9 GB).
_ROWS_PER_STEP = 8192


def lm_head_names(head: str) -> tuple[str, str, str]:
    """The stored names of a quantized head ``<prefix>.weight``: codes (int8, or 4-bit two a
    byte), scales and zero points (4 bits only), as every quantized weight's
    (:meth:`offq.model.arch.Architecture.quantized_names`)."""
    return Architecture.quantized_names(head)


def lm_head_group(hidden_size: int) -> int:
    """The group of a quantized LM head's scales (and 4-bit zero points)."""
    return largest_pow2_divisor_at_most(hidden_size, 128)


def lm_head_tensor_specs(head: str, bits: int, vocab: int, hidden: int
                         ) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of the head stored at ``bits`` (4 or 8)."""
    qname, sname, zname = lm_head_names(head)
    groups = hidden // lm_head_group(hidden)
    if bits == 8:
        return {qname: ((vocab, hidden), "I8"), sname: ((vocab, groups), "F32")}
    if bits == 4:
        return {qname: ((vocab, (hidden + 1) // 2), "U8"), sname: ((vocab, groups), "F32"),
                zname: ((vocab, groups), "F32")}
    raise ValueError(f"bits: expected 4 or 8, got {bits!r}")


def store_lm_head(glob: dict, head: str, bits: int = 8) -> None:
    """Replace the float head ``glob[head]`` by its ``bits``-bit codes and grid (in place)."""
    w = np.asarray(glob.pop(head), np.float32)
    qname, sname, zname = lm_head_names(head)
    if bits == 8:
        glob[qname], glob[sname] = quantize_lm_head(w)
    elif bits == 4:
        qw = quantize_lm_head4(w)
        glob[qname], glob[sname], glob[zname] = qw.packed_codes(), qw.scale, qw.zero
    else:
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")


def quantize_lm_head(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 [V, d], float32 scales [V, d / group])`` of a float LM head ``[V, d]``."""
    return quantize_i8(weight, lm_head_group(weight.shape[1]))


def quantize_lm_head4(weight: np.ndarray) -> QuantizedWeight:
    """The 4-bit asymmetric grid of a float LM head ``[V, d]``: per group of
    :func:`lm_head_group` inputs, the clip ratio with the least squared error
    (:func:`offq.quant.grid.group_params`), codes rounded onto it."""
    v, d = weight.shape
    g = lm_head_group(d)
    codes = np.empty((v, d), np.uint8)
    scale = np.empty((v, d // g), np.float32)
    zero = np.empty((v, d // g), np.float32)
    for r0 in range(0, v, _ROWS_PER_STEP):
        rows = np.ascontiguousarray(weight[r0:r0 + _ROWS_PER_STEP], dtype=np.float32)
        s, z = group_params(rows, 4, g, symmetric=False, clip_search=True)
        n = rows.shape[0]
        codes[r0:r0 + n] = quantize_codes(rows.reshape(n, d // g, g), s[..., None], z[..., None],
                                          4).reshape(n, d)
        scale[r0:r0 + n], zero[r0:r0 + n] = s, z
    return QuantizedWeight(codes, scale, zero, 4, g, False)


def lm_head_from_tensors(tensors: Mapping[str, np.ndarray], head: str, hidden_size: int) -> Any:
    """The runnable quantized head stored under ``head``'s names (``Int8Linear`` or a packed
    4-bit ``PackedWeightLinear``), or None when the head is stored in float32."""
    qname, sname, zname = lm_head_names(head)
    if qname not in tensors:
        return None
    if zname not in tensors:  # lm_head_bits = 8
        return Int8Linear(tensors[qname], tensors[sname])
    from .linears import PackedWeightLinear  # lm_head_bits = 4

    stored = QuantizedWeight.from_stored(tensors[qname], tensors[sname], tensors[zname], bits=4,
                                         group_size=lm_head_group(hidden_size), symmetric=False,
                                         in_features=hidden_size)
    return PackedWeightLinear(stored)


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
