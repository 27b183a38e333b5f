"""The C decoder runtime of a W4A4KV4 model: every decoder layer of a step in one C call
(``offq.kernels.decoder``), the KV cache packed in arrays the C step appends to, and the scratch
it needs, owned here and reused across steps (no allocation per step once sizes are reached).

:class:`FusedDecoder` is built from a real-path :class:`~offq.model.decoder.Model` whose layers
all run the 4-bit x 4-bit integer product with fused q/k/v and gate/up linears and a packed 4-bit
KV codec (what ``load_quantized(..., mode="real")`` builds for a W4A4KV4 checkpoint); it reads
their packed weights (no copy) and Python then only embeds tokens and applies the LM head. A
model that does not qualify raises ValueError naming what is missing.

Prompts. A prompt (more than ``NUMPY_PREFILL_MIN_ROWS`` tokens into an empty cache) runs by
default through the NumPy real path (``prefill="numpy"``: offq.model's layers, sgemm attention),
whose packed K/V are then copied into this cache, and the C step takes over for the tokens after
it. Perplexity (a prompt per window) is then bit-identical to ``--mode real``, and prompts run at
the real path's speed. ``prefill="c"`` runs prompts through the C step too: one OpenMP team for
the whole prompt and attention over the packed cache (8 keys per vector), faster than the NumPy
path for prompts of a few hundred tokens on 2 threads, slower at 2048 (attention is quadratic
and sgemm outruns it; benchmarks/results_speed.md), and a token gets the same numbers as when
decoded alone.

Numerics of the C step: the quantizers, products, RoPE, Hadamard transforms and KV codes are the
same float32 operations as the NumPy path; the RMSNorm sum of squares, the attention sums and exp
differ by float32 rounding (see ``csrc/decoder.c``), so results agree with the NumPy real path to
float32 rounding plus the occasional activation code flip it can cause.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels.decoder import decoder_forward, decoder_plan, decoder_scratch_bytes
from ..model.decoder import NONFINITE_KERNEL_INPUT
from ..model.kv_cache import checked_truncation
from ..model.ops import rope_cos_sin
from .kv_codec import PackedKVCodec
from .linears import PackedWeightLinear, W4A4Linear
from .online import HadamardInput, HadamardQK

__all__ = ["fused_runner", "FusedDecoder", "FusedKVCache", "NUMPY_PREFILL_MIN_ROWS", "AUTO_NUMPY_PREFILL_ROWS",
           "AUTO_NUMPY_PREFILL_ROWS_SIMD", "auto_numpy_prefill_rows", "PREFILL_MODES",
           "ATTENTION_MODES"]

#: prompts longer than this many tokens take the NumPy prefill (``prefill="numpy"``)
NUMPY_PREFILL_MIN_ROWS = 8
#: prefill="auto" with the generic (scalar C) attention: prompts of at least this many tokens take
#: the NumPy path, shorter ones the C step (SmolLM2-135M, 2 threads, OFFQ_SIMD_MAX=generic,
#: 2026-12-07: NumPy 66.7 against C 59.1 tokens/s at 1024 tokens)
AUTO_NUMPY_PREFILL_ROWS = 1024
#: the same with the SIMD attentions (AVX2, AVX-512): None = every prompt through the C step
#: (SmolLM2-135M on the AVX2 kernels since fdff173, 2026-12-07: C 1.2-1.45x faster at 1024
#: tokens, 1.01-1.24x at 2048, 1.1-1.2x at 4096, 1 and 2 threads; Qwen2.5-1.5B 1.04-1.3x at 2048;
#: AVX-512, Zen5: C 1.23x at 2048, 1.25x at 4096)
AUTO_NUMPY_PREFILL_ROWS_SIMD: int | None = None


def auto_numpy_prefill_rows(head_dim: int | None = None, kv_group: int | None = None
                            ) -> int | None:
    """Prompt length from which prefill="auto" takes the NumPy path (None: never), for the
    attention this process runs on a cache of ``head_dim`` and KV groups of ``kv_group`` (None:
    shapes the SIMD attentions take). The SIMD attentions need both to be multiples of 16; other
    shapes run the generic one."""
    from .. import _C

    simd = _C.simd_info()
    group = head_dim if kv_group is None or kv_group <= 0 else kv_group  # -1: one group a head
    shapes = head_dim is None or (head_dim % 16 == 0 and group % 16 == 0)
    return (AUTO_NUMPY_PREFILL_ROWS_SIMD if (simd["avx2"] or simd["avx512"]) and shapes
            else AUTO_NUMPY_PREFILL_ROWS)


PREFILL_MODES = ("numpy", "c", "auto")
#: the C step's attention: float32 sums (default) or 8-bit queries and weights (opt-in)
ATTENTION_MODES = ("float", "int8")


def fused_runner(model: Any, attention: str = "float") -> Any:
    """The C runtime that fits a real-path ``model``: a
    :class:`~offq.quant.fused_wq.FusedWeightOnlyDecoder` when its linears are packed weight-only
    ones (float activations), else a :class:`FusedDecoder`. Either raises ValueError naming what
    the model lacks. ``attention="int8"``: the W4A4KV4 decoder's opt-in 8-bit attention, with
    prompts through the C step too (``prefill="c"``), so that perplexity windows use it."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
    first = model.load_layer(0).fused_linear("qkv") if model.num_layers else None
    if isinstance(first, PackedWeightLinear):
        if attention != "float":
            raise ValueError(f"attention: {attention!r} runs over the W4A4KV4 decoder's 4-bit KV "
                             "cache, and this model is weight-only (float activations and KV)")
        from .fused_wq import FusedWeightOnlyDecoder

        return FusedWeightOnlyDecoder(model)
    if attention == "float":
        return FusedDecoder(model)
    return FusedDecoder(model, prefill="c", attention=attention)


class FusedKVCache:
    """The packed K/V of every layer for one sequence: codes ``[layers, capacity, 2, Hkv, hd/2]``
    and scales / zero-points ``[layers, capacity, 2, Hkv, hd/group]``, grown geometrically."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, group: int,
                 capacity: int = 256) -> None:
        self.length = 0
        self._dims = (layers, kv_heads, head_dim, group)
        self.codes, self.scale, self.zero = self._alloc(max(1, capacity))

    def _alloc(self, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L, Hkv, hd, g = self._dims
        return (np.empty((L, cap, 2, Hkv, hd // 2), np.uint8),
                np.empty((L, cap, 2, Hkv, hd // g), np.float32),
                np.empty((L, cap, 2, Hkv, hd // g), np.float32))

    @property
    def capacity(self) -> int:
        """Positions the arrays hold."""
        return int(self.codes.shape[1])

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions (keeps the cached ones; capacity at least
        doubles)."""
        if positions <= self.capacity:
            return
        new = self._alloc(max(positions, 2 * self.capacity))
        n = self.length
        for dst, src in zip(new, (self.codes, self.scale, self.zero)):
            dst[:, :n] = src[:, :n]
        self.codes, self.scale, self.zero = new

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (the next run continues from there)."""
        self.length = checked_truncation(length, self.length)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached positions."""
        n = self.length
        return int(self.codes[:, :n].nbytes + self.scale[:, :n].nbytes + self.zero[:, :n].nbytes)


def _linear_spec(lin: Any, name: str) -> tuple:
    if not isinstance(lin, W4A4Linear) or not lin.integer:
        kind = {"PackedWeightLinear": "weight-only (float activations)",
                "DenseLinear": "float"}.get(type(lin).__name__, type(lin).__name__)
        raise ValueError(f"{name}: the fused decoder runs W4A4KV4 models (4-bit weights and "
                         f"activations) only, and this linear is {kind}; use mode 'auto' or "
                         "'real'")
    act = lin.act
    if act.bits != 4 or lin.w.bits != 4:
        raise ValueError(f"{name}: expected 4-bit weights and activations")
    return (lin.w.codes, lin.w.scale, lin.w.zero, int(lin.w.group_size), lin.bias,
            int(act.group_size)), act


class FusedDecoder:
    """Runs every decoder layer of a real-path W4A4KV4 model in C, one call per step.

    Args:
        model: a resident real-path Model (``load_quantized(..., mode="real")``).
        kernel: the products' variant: "auto", "generic", "avx2" or "vnni".
        prefill: "numpy" (prompts into an empty cache through the NumPy real path, see the module
            docstring), "c" (every step in C) or "auto" (C below `auto_numpy_prefill_rows()`
            prompt tokens, NumPy from there: the faster of the two on the machines measured).
            ``offq.generate`` runs its prompt with "auto" when this is "numpy": the NumPy
            prompt exists for perplexity's bit-identity with the real path, not for speed.
        attention: "float" (the default: float32 sums over the 4-bit cache, the numbers of the
            NumPy real path up to float32 rounding) or "int8" (an opt-in: queries and softmax
            weights in 8 bits, exact integer dot products, ``csrc/attention_i8.c``; faster long
            prompts, and its own perplexity: ``benchmarks/bench_int8_attention.py``). It applies
            to what the C step runs (a prompt too with prefill="c").
    """

    def __init__(self, model: Any, *, kernel: str = "auto", prefill: str = "numpy",
                 attention: str = "float") -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill: expected one of {PREFILL_MODES}, got {prefill!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        cfg = model.config
        self.model = model
        self.kernel = kernel
        self.prefill = prefill
        self.attention = attention
        self.head_dim = int(model.head_dim)
        self.hidden_size = int(cfg.hidden_size)
        layers = []
        acts = []
        r3 = r4 = None
        kv: PackedKVCodec | None = None
        for layer in model.layers:
            i = layer.index
            qkv, gate_up = layer.fused_linear("qkv"), layer.fused_linear("gate_up")
            if qkv is None or gate_up is None:
                raise ValueError(f"model: layer {i} has no fused q/k/v and gate/up linears")
            specs = []
            for name, lin in (("qkv", qkv), ("o_proj", layer.linears["o_proj"]),
                              ("gate_up", gate_up), ("down_proj", layer.linears["down_proj"])):
                spec, act = _linear_spec(lin, f"layer {i} {name}")
                specs.append(spec)
                acts.append(act)
            codec = layer.kv_codec
            if not isinstance(codec, PackedKVCodec) or codec.bits != 4:
                raise ValueError(f"model: layer {i} needs a packed 4-bit KV codec, got {codec!r}")
            if kv is not None and codec != kv:
                raise ValueError(f"model: layer {i} has a different KV codec")
            kv = codec
            qk = layer.qk_transform
            for hook, what, kind in ((qk, "qk_transform", HadamardQK),
                                     (layer.down_input_transform, "down_input_transform",
                                      HadamardInput)):
                if hook is not None and not isinstance(hook, kind):
                    raise ValueError(f"model: layer {i} {what} is not offq's R3/R4 Hadamard")
            has_r3 = qk is not None and qk.hadamard
            has_r4 = layer.down_input_transform is not None
            if r3 is not None and (has_r3, has_r4) != (r3, r4):
                raise ValueError(f"model: layer {i} has different online transforms")
            r3, r4 = has_r3, has_r4
            k_offset = getattr(qk, "k_offset", None)
            layers.append((layer.input_norm, layer.post_attention_norm, *specs,
                           None if k_offset is None else k_offset.reshape(-1)))
        a0 = acts[0]
        if any((a.symmetric, a.clip) != (a0.symmetric, a0.clip) for a in acts):
            raise ValueError("model: the activation quantizers differ in grid or clip")
        self.kv_group = int(kv.group_size)
        #: the validated per-layer tuples the plan points into (kept alive with it)
        self.plan_layers = tuple(layers)
        self.plan = decoder_plan(
            self.plan_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=self.head_dim, eps=float(cfg.rms_norm_eps), a_symmetric=a0.symmetric,
            a_clip=a0.clip, kv_symmetric=kv.symmetric, kv_group=self.kv_group, r3=bool(r3),
            r4=bool(r4))
        self._scratch = np.empty(0, np.uint8)

    def new_cache(self, capacity: int = 256) -> FusedKVCache:
        """An empty packed cache for one sequence."""
        cfg = self.model.config
        return FusedKVCache(self.model.num_layers, cfg.num_key_value_heads, self.head_dim,
                            self.kv_group, capacity)

    def run(self, h: np.ndarray, cache: FusedKVCache) -> np.ndarray:
        """Every layer on ``h`` (float32 ``[T, d]``, the embeddings of the next ``T`` tokens)
        in place; the cache gains the ``T`` positions. Returns ``h``."""
        T = h.shape[0]
        start = cache.length
        cache.reserve(start + T)
        auto_rows = (auto_numpy_prefill_rows(self.head_dim, self.kv_group)
                     if self.prefill == "auto" else None)
        numpy_prompt = (self.prefill == "numpy" and T > NUMPY_PREFILL_MIN_ROWS
                        or auto_rows is not None and T >= auto_rows)
        if start == 0 and numpy_prompt:
            return self._numpy_prefill(h, cache)
        need = decoder_scratch_bytes(self.plan, T, start + T)
        if self._scratch.size < need:
            self._scratch = np.empty(max(need, 2 * self._scratch.size), np.uint8)
        cos, sin = rope_cos_sin(self.model.inv_freq, start, T)
        try:
            decoder_forward(self.plan, h, start, cos, sin, cache.codes, cache.scale, cache.zero,
                            self._scratch, kernel=self.kernel, attention=self.attention)
        except ValueError as e:
            if not str(e).endswith(NONFINITE_KERNEL_INPUT):
                raise
            raise ValueError("the fused decoder's activations became NaN or Inf (the model "
                             "computes non-finite values: NaN/Inf weights, or activations that "
                             "overflow float32; mode 'real' names the layer); the kernel said: "
                             f"{e}") from e
        cache.length = start + T
        return h

    def _numpy_prefill(self, h: np.ndarray, cache: FusedKVCache) -> np.ndarray:
        """A prompt through the NumPy real path (offq.model's layers), its packed K/V copied into
        ``cache`` (same codes, scales and zero-points, batch 1)."""
        from ..model.kv_cache import KVCache

        T = h.shape[0]
        kv = KVCache(self.model.num_layers)
        for i, layer in enumerate(self.model.layers):
            self.model.runner.forward(layer, h[None], start=0, cache=kv[i])
            codes, scale, zero = kv[i].store.packed()
            cache.codes[i, :T] = codes[:, :, 0]
            cache.scale[i, :T] = scale[:, :, 0]
            cache.zero[i, :T] = zero[:, :, 0]
        cache.length = T
        return h
