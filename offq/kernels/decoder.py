"""The W4A4KV4 decoder step in C (``offq._C.decoder_*``): every decoder layer of a model for a few
tokens of one sequence in one call and one OpenMP team (contract: ``csrc/offq.h``).

* :func:`decoder_plan` validates a model's packed layers once and returns an opaque plan that
  keeps them alive;
* :func:`decoder_scratch_bytes` sizes the scratch buffer a step needs (for the current thread
  setting);
* :func:`decoder_forward` runs the layers on ``h`` in place and appends the new keys and values to
  the packed cache arrays.

:class:`offq.quant.fused.FusedDecoder` builds the plan from a real-path model and owns the cache
and the scratch; this module only forwards (the binding validates every argument and raises
TypeError/ValueError naming it).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _C

__all__ = ["LinearSpec", "LayerSpec", "decoder_plan", "decoder_scratch_bytes", "decoder_forward"]

#: ``(codes uint8 [n, k/2], scale float32 [n, k/wg], zero float32 [n, k/wg], w_group,
#: bias float32 [n] or None, a_group)``
LinearSpec = tuple[np.ndarray, np.ndarray, np.ndarray, int, "np.ndarray | None", int]
#: ``(input_norm or None, post_norm or None, qkv, o, gate_up, down, k_offset or None)``; the key
#: offset (float32 ``[num_kv_heads * head_dim]``) is subtracted from k after RoPE and R3
LayerSpec = tuple[Any, Any, LinearSpec, LinearSpec, LinearSpec, LinearSpec, Any]


def decoder_plan(layers: tuple[LayerSpec, ...], *, hidden_size: int, intermediate_size: int,
                 num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 a_symmetric: bool, a_clip: float, kv_symmetric: bool, kv_group: int, r3: bool,
                 r4: bool) -> Any:
    """A validated plan of a W4A4KV4 decoder (4-bit weights, 4-bit activations, 4-bit KV).

    ``layers``: a tuple of per-layer tuples (see :data:`LayerSpec`); qkv is the fused q/k/v
    linear (``(H + 2 Hkv) * head_dim`` outputs), gate_up the fused gate/up one (``2 *
    intermediate_size`` outputs, gate first). ``r3`` / ``r4``: the online Hadamard transforms.

    The plan references the layers' arrays (no copy: a model's weights are not duplicated) and
    holds a copy of each weight's codes in the decode layout, made here: changing an array after
    planning makes the step's kernels disagree with one another. Plan again instead.
    """
    return _C.decoder_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                           head_dim, eps, a_symmetric, a_clip, kv_symmetric, kv_group, r3, r4)


def decoder_scratch_bytes(plan: Any, rows: int, positions: int) -> int:
    """Bytes of scratch :func:`decoder_forward` needs for ``rows`` tokens ending at position
    ``positions - 1`` with the current thread setting."""
    return _C.decoder_scratch_bytes(plan, rows, positions)


def decoder_forward(plan: Any, h: np.ndarray, start: int, cos: np.ndarray, sin: np.ndarray,
                    kv_codes: np.ndarray, kv_scale: np.ndarray, kv_zero: np.ndarray,
                    scratch: np.ndarray, *, kernel: str = "auto",
                    attention: str = "float") -> None:
    """Run every layer on ``h`` (float32 ``[rows, d]``, positions ``start..``) in place.

    ``cos, sin``: float32 ``[rows, head_dim / 2]`` RoPE tables of the positions. The cache arrays
    (``[layers, capacity, 2, kv_heads, head_dim / 2]`` uint8 codes, ``[..., head_dim / kv_group]``
    float32 scales and zero-points) must hold positions ``0..start-1``; the step writes
    ``start..start+rows-1``. ``scratch``: uint8, at least :func:`decoder_scratch_bytes`.
    ``kernel``: "auto", or "generic" / "avx2" / "vnni" to force the products' variant.
    ``attention``: "float" (the default: float32 sums over the dequantized 4-bit cache) or "int8"
    (8-bit queries and softmax weights, exact int32 dot products: faster, and its own numbers;
    ``csrc/attention_i8.c``), for each KV head whose cached grids it can take: the 4-bit grid of
    a key or value group of one sign can have a zero-point outside 0..15 (a constant positive
    group: -1), and attention over such rows runs the float kernel.

    Raises:
        ValueError: naming the argument, before anything is written, for wrong shapes, buffers
            that share memory, a non-finite ``h``, or rotary tables with non-finite values or
            values above 8 in magnitude (cos/sin are at most 1, times the attention factor some
            rope scalings fold in). A step that fails while running puts ``h`` back as it was
            given and names ``kv_scale`` / ``kv_zero`` when a cached position before ``start``
            holds NaN or Inf, else ``h`` (its activations overflowed inside a layer); the cache
            positions from ``start`` on are then unspecified.
    """
    _C.decoder_forward(plan, h, start, cos, sin, kv_codes, kv_scale, kv_zero, scratch, kernel,
                       attention)
