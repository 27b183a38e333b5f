"""The C decoder runtime of a weight-only model: every decoder layer of a decode step in one C call
(``offq.kernels.decoder_wq``), the float32 KV cache in one array the C step appends to, and the
scratch it needs, owned here and reused across steps.

:class:`FusedWeightOnlyDecoder` is built from a real-path :class:`~offq.model.decoder.Model`
whose layers all run packed 2-, 3-, 4- or 8-bit weights on float activations
(:class:`~offq.quant.linears.PackedWeightLinear`) with fused q/k/v and gate/up linears, a float
KV cache (no KV codec) and no online transforms: what ``load_quantized(..., mode="real")`` builds
for a weight-only GPTQ / OSAQ / RTN checkpoint. It reads their packed weights (no copy); Python
then only embeds tokens and applies the LM head. A model that does not qualify raises ValueError
naming what is missing.

Prompts. A prompt (more than ``NUMPY_PREFILL_MIN_ROWS`` tokens into an empty cache) runs through
the NumPy real path (its products dequantize panels for sgemm, faster than the per-row kernels
for many rows), whose K/V are then copied into this cache, so perplexity is bit-identical to
``--mode real``. Every other step (decoding; a few tokens after a prompt) runs in C, up to
``WQ_STEP_MAX_ROWS`` tokens a call.

Numerics of the C step: the products are matmul_wq's own row kernels (bit-identical), the bias
and residual adds, RoPE and SwiGLU the same float32 operations as the NumPy path; the RMSNorm sum
of squares, the attention sums and exp round differently (``csrc/decoder_wq.c``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels.decoder_wq import (WQ_STEP_MAX_ROWS, decoder_wq_forward, decoder_wq_plan,
                                  decoder_wq_scratch_bytes)
from ..model.kv_cache import checked_truncation
from ..model.ops import rope_cos_sin
from .linears import PackedWeightLinear

__all__ = ["FusedWeightOnlyDecoder", "FloatStepCache"]

#: prompts longer than this many tokens into an empty cache take the NumPy path
NUMPY_PREFILL_MIN_ROWS = 8


class FloatStepCache:
    """The float32 K/V of every layer for one sequence, ``kv[layers, capacity, 2, Hkv, hd]`` (K
    then V per position), grown geometrically."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256) -> None:
        self.length = 0
        self._dims = (layers, kv_heads, head_dim)
        self.kv = self._alloc(max(1, capacity))

    def _alloc(self, cap: int) -> np.ndarray:
        L, Hkv, hd = self._dims
        return np.empty((L, cap, 2, Hkv, hd), np.float32)

    @property
    def capacity(self) -> int:
        """Positions the array holds."""
        return int(self.kv.shape[1])

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions (the cached ones are kept)."""
        if positions <= self.capacity:
            return
        kv = self._alloc(max(positions, 2 * self.capacity))
        kv[:, :self.length] = self.kv[:, :self.length]
        self.kv = kv

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (the next run continues from there)."""
        self.length = checked_truncation(length, self.length)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached positions."""
        return int(self.kv[:, :self.length].nbytes)


def _wq_spec(lin: Any, name: str) -> tuple:
    if not isinstance(lin, PackedWeightLinear):
        kind = {"W4A4Linear": "W4A4 (quantized activations)",
                "DenseLinear": "float"}.get(type(lin).__name__, type(lin).__name__)
        raise ValueError(f"{name}: the weight-only C decoder runs packed 2/3/4/8-bit weights on "
                         f"float activations, and this linear is {kind}")
    return (lin.packed, lin.scale, lin.zero, lin.bits, lin.group, lin.bias)


class FusedWeightOnlyDecoder:
    """Runs every decoder layer of a real-path weight-only model in C, one call per step.

    Args:
        model: a resident real-path Model (``load_quantized(..., mode="real")`` of a weight-only
            checkpoint).
        kernel: the products' variant: "auto", "generic", "avx2" or "avx512".
    """

    #: prompts always take the NumPy path (the W4A4KV4 runner's choice; kept for a common API)
    prefill = "numpy"

    def __init__(self, model: Any, *, kernel: str = "auto") -> None:
        cfg = model.config
        self.model = model
        self.kernel = kernel
        self.head_dim = int(model.head_dim)
        layers = []
        for layer in model.layers:
            i = layer.index
            qkv, gate_up = layer.fused_linear("qkv"), layer.fused_linear("gate_up")
            if qkv is None or gate_up is None:
                raise ValueError(f"model: layer {i} has no fused q/k/v and gate/up linears")
            specs = [_wq_spec(lin, f"layer {i} {name}")
                     for name, lin in (("qkv", qkv), ("o_proj", layer.linears["o_proj"]),
                                       ("gate_up", gate_up),
                                       ("down_proj", layer.linears["down_proj"]))]
            if layer.kv_codec is not None:
                raise ValueError(f"model: layer {i} quantizes its KV cache ({layer.kv_codec!r}); "
                                 "the weight-only C decoder keeps K and V in float32")
            for hook, what in ((layer.qk_transform, "qk_transform"),
                               (layer.down_input_transform, "down_input_transform")):
                if hook is not None:
                    raise ValueError(f"model: layer {i} has an online {what}; the weight-only C "
                                     "decoder runs none")
            layers.append((layer.input_norm, layer.post_attention_norm, *specs))
        #: the validated per-layer tuples the plan points into (kept alive with it)
        self.plan_layers = tuple(layers)
        self.plan = decoder_wq_plan(
            self.plan_layers, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads, head_dim=self.head_dim,
            eps=float(cfg.rms_norm_eps))
        self._scratch = np.empty(0, np.uint8)

    def new_cache(self, capacity: int = 256) -> FloatStepCache:
        """An empty float32 cache for one sequence."""
        cfg = self.model.config
        return FloatStepCache(self.model.num_layers, cfg.num_key_value_heads, self.head_dim,
                              capacity)

    def run(self, h: np.ndarray, cache: FloatStepCache) -> np.ndarray:
        """Every layer on ``h`` (float32 ``[T, d]``, the embeddings of the next ``T`` tokens)
        in place; the cache gains the ``T`` positions. Returns ``h``."""
        T = h.shape[0]
        start = cache.length
        cache.reserve(start + T)
        if start == 0 and T > NUMPY_PREFILL_MIN_ROWS:
            return self._numpy_prefill(h, cache)
        for r0 in range(0, T, WQ_STEP_MAX_ROWS):
            rows = h[r0:r0 + WQ_STEP_MAX_ROWS]
            self._step(rows, cache)
        return h

    def _step(self, h: np.ndarray, cache: FloatStepCache) -> None:
        """One C call on at most WQ_STEP_MAX_ROWS contiguous rows of the residual stream."""
        T, start = h.shape[0], cache.length
        need = decoder_wq_scratch_bytes(self.plan, T, start + T)
        if self._scratch.size < need:
            self._scratch = np.empty(max(need, 2 * self._scratch.size), np.uint8)
        cos, sin = rope_cos_sin(self.model.inv_freq, start, T)
        decoder_wq_forward(self.plan, h, start, cos, sin, cache.kv, self._scratch,
                           kernel=self.kernel)
        cache.length = start + T

    def _numpy_prefill(self, h: np.ndarray, cache: FloatStepCache) -> np.ndarray:
        """A prompt through the NumPy real path (offq.model's layers), its float K/V copied
        into ``cache`` (batch 1)."""
        from ..model.kv_cache import KVCache

        T = h.shape[0]
        kv = KVCache(self.model.num_layers)
        for i, layer in enumerate(self.model.layers):
            self.model.runner.forward(layer, h[None], start=0, cache=kv[i])
            k, v = kv[i].store.read()  # [1, Hkv, T, hd] views
            cache.kv[i, :T, 0] = k[0].transpose(1, 0, 2)
            cache.kv[i, :T, 1] = v[0].transpose(1, 0, 2)
        cache.length = T
        return h
