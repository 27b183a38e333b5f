"""The weight-only decoder step in C (``offq._C.decoder_wq_*``): every decoder layer of a model
whose linears are packed 2-, 3-, 4- or 8-bit weights with float32 activations (what
:class:`offq.quant.linears.PackedWeightLinear` multiplies), for up to 32 tokens of one sequence in
one call and one OpenMP team (contract: ``csrc/offq.h``, "weight-only decoder step").

* :func:`decoder_wq_plan` validates a model's packed layers once and returns an opaque plan that
  keeps them alive;
* :func:`decoder_wq_scratch_bytes` sizes the scratch a step needs (current thread setting);
* :func:`decoder_wq_forward` runs the layers on ``h`` in place and appends the new keys and
  values to the float32 cache array.

:class:`offq.quant.fused_wq.FusedWeightOnlyDecoder` builds the plan from a real-path model and
owns the cache and the scratch; this module only forwards (the binding validates every argument
and raises TypeError/ValueError naming it).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _C

__all__ = ["WQ_STEP_MAX_ROWS", "WqLinearSpec", "WqLayerSpec", "decoder_wq_plan",
           "decoder_wq_scratch_bytes", "decoder_wq_forward"]

#: the most tokens one step takes (matmul_wq's small-M limit)
WQ_STEP_MAX_ROWS = 32
#: ``(packed uint8 [n, row bytes], scale float32 [n, k/group], zero float32 [n, k/group], bits,
#: group, bias float32 [n] or None)``: the operands of :func:`offq.kernels.matmul_wq.matmul_wq`
WqLinearSpec = tuple[np.ndarray, np.ndarray, np.ndarray, int, int, "np.ndarray | None"]
#: ``(input_norm or None, post_norm or None, qkv, o, gate_up, down)``
WqLayerSpec = tuple[Any, Any, WqLinearSpec, WqLinearSpec, WqLinearSpec, WqLinearSpec]


def decoder_wq_plan(layers: tuple[WqLayerSpec, ...], *, hidden_size: int,
                    intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    eps: float) -> Any:
    """A validated plan of a weight-only decoder (packed weights, float activations and KV).

    ``layers``: a tuple of per-layer tuples (:data:`WqLayerSpec`); qkv is the fused q/k/v linear
    (``(H + 2 Hkv) * head_dim`` outputs), gate_up the fused gate/up one (``2 *
    intermediate_size`` outputs, gate first). The plan references the layers' arrays (no copy):
    do not change them while it is in use.
    """
    return _C.decoder_wq_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                              head_dim, eps)


def decoder_wq_scratch_bytes(plan: Any, rows: int, positions: int) -> int:
    """Bytes of scratch :func:`decoder_wq_forward` needs for ``rows`` tokens ending at position
    ``positions - 1`` with the current thread setting."""
    return _C.decoder_wq_scratch_bytes(plan, rows, positions)


def decoder_wq_forward(plan: Any, h: np.ndarray, start: int, cos: np.ndarray, sin: np.ndarray,
                       kv: np.ndarray, scratch: np.ndarray, *, kernel: str = "auto") -> None:
    """Run every layer on ``h`` (float32 ``[rows, d]``, rows <= 32, positions ``start..``) in
    place.

    ``cos, sin``: float32 ``[rows, head_dim / 2]`` RoPE tables of the positions. ``kv``: float32
    ``[layers, capacity, 2, kv_heads, head_dim]`` (K then V) holding positions ``0..start-1``;
    the step writes ``start..start+rows-1``. ``scratch``: uint8, at least
    :func:`decoder_wq_scratch_bytes`. ``kernel``: "auto", or "generic" / "avx2" / "avx512" to
    force the products' variant (as :func:`~offq.kernels.matmul_wq.matmul_wq`).

    Raises:
        ValueError: naming the argument, before anything is written, for wrong shapes, buffers
            that share memory, a non-finite ``h``, or rotary tables with non-finite values or
            values above 8 in magnitude. A step whose output is not finite fails too: ``h`` is
            put back as it was given, and the error names ``kv`` when a cached position before
            ``start`` holds NaN or Inf, else ``h`` (its activations overflowed inside a layer);
            the cache positions from ``start`` on are then unspecified.
    """
    _C.decoder_wq_forward(plan, h, start, cos, sin, kv, scratch, kernel)
