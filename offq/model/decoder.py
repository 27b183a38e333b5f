"""A Llama-family decoder in float32 NumPy: the layer, the model, and loading a layer's tensors.

The computation, for token ids ``x[B, T]`` (row-vector convention, ``y = x @ W.T``)::

    h = E[x]                                             embeddings            [B, T, d]
    for each layer:
        a = rmsnorm(h) * w_in                            "attn_in" capture site
        q, k, v = a Wq^T (+bq), a Wk^T (+bk), a Wv^T (+bv)
        q, k = rope(q), rope(k)                          HF rotate_half convention
        q, k = qk_transform(q, k)                        online R3 hook (identity by default)
        k, v = cache.append(kv_codec(k), kv_codec(v))    KV quantization hook
        o = softmax(q k^T / sqrt(hd) + causal) v         GQA: head j reads kv head j // (H / Hkv)
        h = h + o Wo^T (+bo)                             "o_in" capture site (o before Wo)
        m = rmsnorm(h) * w_post                          "mlp_in" capture site
        u = silu(m Wg^T) * (m Wu^T)
        u = down_input_transform(u)                      online R4 hook; "down_in" capture site
        h = h + u Wd^T (+bd)
    logits = (rmsnorm(h) * w_final) W_lm^T               W_lm = E when embeddings are tied

Every linear is a callable in ``layer.linears`` (see :mod:`offq.model.linear`), so quantization
swaps implementations without touching this file. Tensor names come from
:mod:`offq.model.arch`; the operations from :mod:`offq.model.ops`.

Memory. In *streaming* mode only one decoder layer's weights are resident: a layer is read from
the tensor store (memory-mapped; dequantized on access) when the forward pass enters it and
dropped when it leaves; a batch of sequences goes through each layer before the next is loaded.
The embeddings, the final norm and the LM head stay resident. *Resident* mode keeps every layer
(small models, generation). Logits are computed in row chunks when only the NLL is needed.

Threads: inside the forward BLAS is single-threaded and offq splits products, attention blocks
and elementwise work across its own small pool (see :mod:`offq.model.parallel` for why).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .arch import CAPTURE_SITES, FUSED_LINEARS, LINEAR_NAMES, architecture_of, dims_of, config_flags
from .kv_cache import KVCache, KVCodec, LayerKVCache
from .linear import DenseLinear, Linear, SlicedLinear
from .ops import (SMALL_T, apply_rope, causal_attention, rms_norm, rope_cos_sin, rope_inv_freq,
                  rope_token_major, silu_mul, token_nll)
from .parallel import blas_single_threaded, blas_unrestricted, run_tasks

if TYPE_CHECKING:  # pragma: no cover
    from ..kernels.quant import QTensor
    from .config import ModelConfig

__all__ = ["CAPTURE_SITES", "CaptureFn", "DecoderLayer", "LayerRunner", "Model", "load_decoder_layer"]

log = logging.getLogger(__name__)

#: ``capture(site, layer_index, x)``: x is the float32 ``[B, T, in_features]`` input of the
#: linears of ``CAPTURE_SITES[site]``. It is a live buffer: copy it to keep it.
CaptureFn = Callable[[str, int, np.ndarray], None]
#: ``qk_transform(q, k) -> (q, k)`` on ``q[B, H, T, hd]``, ``k[B, Hkv, T, hd]`` after RoPE.
QKTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``down_input_transform(u) -> u`` on ``u[B, T, intermediate]`` before down_proj; it may work in
#: place (``u`` is the SwiGLU output, a temporary of the layer).
ArrayTransform = Callable[[np.ndarray], np.ndarray]

NLL_CHUNK = 256  # rows of logits materialised at once (per thread) when computing the NLL


@dataclass
class DecoderLayer:
    """One decoder layer: norms, swappable linears and the quantization hooks.

    Attributes:
        index: layer number.
        input_norm / post_attention_norm: RMSNorm weights ``[d]``; ``None`` means all ones
            (after norm fusion).
        linears: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`` -> Linear.
        qk_transform: applied to ``q[B,H,T,hd], k[B,Hkv,T,hd]`` after RoPE (online R3).
        kv_codec: storage codec of K and V (KV quantization); attention reads ``decode(encode)``.
        down_input_transform: applied to the down_proj input (online R4).
        fused: optional ``"qkv"`` / ``"gate_up"`` linears (``FUSED_LINEARS``) whose outputs are
            the named linears' outputs concatenated, the named linears being
            :class:`~offq.model.linear.SlicedLinear` parts of them; the forward calls them instead
            of the separate ones (one activation quantization and one product per input site)
            unless a named linear has been swapped since (see :meth:`fused_linear`).
    """

    index: int
    input_norm: np.ndarray | None
    post_attention_norm: np.ndarray | None
    linears: dict[str, Linear]
    qk_transform: QKTransform | None = None
    kv_codec: KVCodec | None = None
    down_input_transform: ArrayTransform | None = None
    fused: dict[str, Linear] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [n for n in LINEAR_NAMES if n not in self.linears]
        if missing:
            raise ValueError(f"linears: layer {self.index} lacks {missing}")
        for key, lin in self.fused.items():
            if key not in FUSED_LINEARS:
                raise ValueError(f"fused: unknown key {key!r} (expected {list(FUSED_LINEARS)})")
            want = sum(self.linears[n].out_features for n in FUSED_LINEARS[key])
            if lin.out_features != want:
                raise ValueError(f"fused: {key!r} has {lin.out_features} outputs, expected {want}")

    def fused_linear(self, key: str) -> Linear | None:
        """``fused[key]`` while the named linears it stands for are still its slices (a linear
        swapped in ``linears`` since then takes precedence: the forward falls back to the
        separate linears)."""
        lin = self.fused.get(key)
        if lin is None:
            return None
        for n in FUSED_LINEARS[key]:
            part = self.linears[n]
            if not isinstance(part, SlicedLinear) or part.parent is not lin:
                return None
        return lin

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's parameters (linears exposing ``nbytes`` + norms)."""
        n = sum(int(getattr(lin, "nbytes", 0))
                for lin in list(self.linears.values()) + list(self.fused.values()))
        for w in (self.input_norm, self.post_attention_norm):
            n += 0 if w is None else w.nbytes
        return n


# the end of the ValueError a C kernel raises for a NaN or Inf in a float input
# (csrc/python/bind_util.h, module.c)
NONFINITE_KERNEL_INPUT = "contains NaN or Inf (needs finite values)"


def _single_threaded_blas(method: Callable) -> Callable:
    """Run a forward entry point with BLAS single-threaded (offq parallelises it itself, see
    :mod:`offq.model.parallel`)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with blas_single_threaded():
            return method(*args, **kwargs)
    return wrapper


def _capture(fn: CaptureFn, site: str, index: int, x: np.ndarray) -> None:
    """Call a capture callback with the user's BLAS threading (it may run big products)."""
    with blas_unrestricted():
        fn(site, index, x)


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def load_decoder_layer(tensors: Mapping[str, Any], config: ModelConfig, i: int) -> DecoderLayer:
    """Read decoder layer ``i`` (float32 dense linears) from a mapping of HF tensor names.

    Biases are read where the architecture and the config put them (Qwen2's q/k/v; Llama's
    ``attention_bias`` / ``mlp_bias``); a bias the config implies must be present, one it does not
    imply is an error too (it would silently change the model). Shapes are checked.
    """
    arch = architecture_of(config)
    dims = dims_of(config)
    biased = set(arch.biased_linears(config_flags(config)))
    linears: dict[str, Linear] = {}
    for spec in arch.linears:
        key = arch.weight(i, spec.name)
        if key not in tensors:
            raise ValueError(f"missing tensor {key!r} (layer {i} {spec.name})")
        w = _f32(tensors[key])
        shape = (dims[spec.out_dim], dims[spec.in_dim])
        if w.shape != shape:
            raise ValueError(f"tensor {key!r}: expected shape {shape}, got {w.shape}")
        bkey = arch.bias(i, spec.name)
        if spec.name in biased and bkey not in tensors:
            raise ValueError(f"missing tensor {bkey!r}: the config says this linear has a bias")
        if spec.name not in biased and bkey in tensors:
            raise ValueError(f"unexpected tensor {bkey!r}: the config says {spec.name} has no bias "
                             f"(attention_bias / mlp_bias)")
        linears[spec.name] = DenseLinear(w, _f32(tensors[bkey]) if bkey in tensors else None)
    norms = []
    for which in ("input_norm", "post_norm"):
        key = arch.norm(i, which)
        if key not in tensors:
            raise ValueError(f"missing tensor {key!r}")
        w = _f32(tensors[key])
        if w.shape != (config.hidden_size,):
            raise ValueError(f"tensor {key!r}: expected shape ({config.hidden_size},), got {w.shape}")
        norms.append(w)
    return DecoderLayer(index=i, input_norm=norms[0], post_attention_norm=norms[1], linears=linears)


def _head_dim(config: ModelConfig) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


class LayerRunner:
    """Runs decoder layers of one model configuration: what the forward pass and the
    layer-by-layer quantize loop share (no embeddings, no LM head, no layer storage).

    RoPE's cos/sin tables are computed once per (start, length) and reused by every layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.head_dim = _head_dim(config)
        self.inv_freq = rope_inv_freq(self.head_dim, float(config.rope_theta),
                                      getattr(config, "rope_scaling", None))
        self._rope_cached: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None

    def _rope(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`rope_cos_sin` for these positions, remembered for the next layer."""
        key = (start, length)
        if self._rope_cached is None or self._rope_cached[0] != key:
            self._rope_cached = (key, rope_cos_sin(self.inv_freq, start, length))
        return self._rope_cached[1]

    @_single_threaded_blas
    def forward(self, layer: DecoderLayer, h: np.ndarray, *, start: int = 0,
                      cache: LayerKVCache | None = None,
                      capture: CaptureFn | None = None) -> np.ndarray:
        """Run one decoder layer on hidden states ``h[B, T, d]`` at positions ``start..``.

        ``h`` is updated in place and returned. With ``cache``, the new keys/values are appended
        to it and attention reads everything cached (``start`` must equal ``cache.length``).
        ``capture(site, layer index, x)`` sees the input of every linear site on the way.
        A ValueError of a kernel refusing non-finite activations is raised again naming the layer.
        """
        try:
            return self._forward(layer, h, start=start, cache=cache, capture=capture)
        except ValueError as e:
            if not str(e).endswith(NONFINITE_KERNEL_INPUT):
                raise
            raise ValueError(f"layer {layer.index}: its activations became NaN or Inf (the model "
                             "computes non-finite values: NaN/Inf weights, or activations that "
                             f"overflow float32); the kernel said: {e}") from e

    def _forward(self, layer: DecoderLayer, h: np.ndarray, *, start: int,
                 cache: LayerKVCache | None, capture: CaptureFn | None) -> np.ndarray:
        a = self.attention_input(layer, h)
        if capture is not None:
            _capture(capture, "attn_in", layer.index, a)
        o = self.attend(layer, a, start=start, cache=cache)
        del a
        if capture is not None:
            _capture(capture, "o_in", layer.index, o)
        self.add_output(layer, "o_proj", h, o)
        del o
        m = self.mlp_input(layer, h)
        if capture is not None:
            _capture(capture, "mlp_in", layer.index, m)
        u = self.mlp_hidden(layer, m)
        del m
        if capture is not None:
            _capture(capture, "down_in", layer.index, u)
        self.add_output(layer, "down_proj", h, u)
        return h

    # The forward's stages, also run one at a time by the sequential calibration
    # (offq.recipe.calibrate), which quantizes each site between them.
    def attention_input(self, layer: DecoderLayer, h: np.ndarray) -> np.ndarray:
        """The q/k/v input: RMSNorm of the residual ``h[B, T, d]`` (a new array)."""
        return rms_norm(h, layer.input_norm, float(self.config.rms_norm_eps))

    def mlp_input(self, layer: DecoderLayer, h: np.ndarray) -> np.ndarray:
        """The gate/up input: RMSNorm of the residual after attention (a new array)."""
        return rms_norm(h, layer.post_attention_norm, float(self.config.rms_norm_eps))

    @_single_threaded_blas
    def add_output(self, layer: DecoderLayer, linear: str, h: np.ndarray,
                   x: np.ndarray) -> None:
        """``h += linear(x)``: o_proj or down_proj writing the residual stream."""
        h += layer.linears[linear](x)

    @_single_threaded_blas
    def add_quantized_output(self, layer: DecoderLayer, linear: str, h: np.ndarray,
                             qx: QTensor) -> None:
        """``h += linear(x)`` from ``qx``, ``x[B * T, K]`` as the linear's own activation
        quantizer rounds it (the calibration holds down_proj's inputs so): the bits of
        :meth:`add_output`."""
        h += layer.linears[linear].from_quantized(qx).reshape(h.shape)

    @_single_threaded_blas
    def attend(self, layer: DecoderLayer, a: np.ndarray, *, start: int = 0,
               cache: LayerKVCache | None = None) -> np.ndarray:
        """The o_proj input ``[B, T, H * hd]``: q/k/v of the normalised ``a``, RoPE, the
        qk_transform, the KV codec (or the cache) and causal attention."""
        cfg = self.config
        B, T, _ = a.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, self.head_dim
        L = layer.linears
        cos, sin = self._rope(start, T)
        fused_qkv = layer.fused_linear("qkv") if layer.fused else None
        if fused_qkv is not None and T <= SMALL_T:
            # decoding: rotate q and k together in the projection's token-major layout
            qkv = fused_qkv(a).reshape(B, T, H + 2 * Hkv, hd)
            qk = rope_token_major(qkv[:, :, :H + Hkv], cos, sin)
            q, k = qk[:, :, :H].transpose(0, 2, 1, 3), qk[:, :, H:].transpose(0, 2, 1, 3)
            v = qkv[:, :, H + Hkv:].transpose(0, 2, 1, 3)
        else:
            if fused_qkv is not None:
                qkv = fused_qkv(a)
                q, k, v = (qkv[..., :H * hd], qkv[..., H * hd:(H + Hkv) * hd],
                           qkv[..., (H + Hkv) * hd:])
            else:
                q, k, v = L["q_proj"](a), L["k_proj"](a), L["v_proj"](a)
            q = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            k = k.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
            v = np.ascontiguousarray(v.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer.qk_transform is not None:
            q, k = layer.qk_transform(q, k)
        if cache is not None:
            if cache.length != start:
                raise ValueError(f"start: {start} but the cache holds {cache.length} positions")
            k, v = cache.append(k, v, layer.kv_codec)
        elif layer.kv_codec is not None:
            k = layer.kv_codec.decode(layer.kv_codec.encode(k, kind="k"), kind="k")
            v = layer.kv_codec.decode(layer.kv_codec.encode(v, kind="v"), kind="v")
        return causal_attention(q, k, v, start)

    @_single_threaded_blas
    def mlp_hidden(self, layer: DecoderLayer, m: np.ndarray) -> np.ndarray:
        """The down_proj input: SwiGLU of gate/up on the normalised ``m``, then the
        down_input_transform (online R4)."""
        L = layer.linears
        fused_gate_up = layer.fused_linear("gate_up") if layer.fused else None
        if fused_gate_up is not None:
            u = _fused_swiglu(fused_gate_up, m)
        else:
            u = silu_mul(L["gate_proj"](m), L["up_proj"](m))
        if layer.down_input_transform is not None:
            u = layer.down_input_transform(u)
        return u



#: rows of the fused gate/up product formed at once by the forward (:func:`_fused_swiglu`)
GATE_UP_ROWS = 1024


def _fused_swiglu(fused_gate_up: Linear, m: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` from the fused gate/up linear on ``m[..., d]``, as one contiguous
    array. When the linear's rows are independent (``rows_independent``: the 4-bit x 4-bit
    products), the product is formed ``GATE_UP_ROWS`` rows at a time, a final short block
    joining the one before it (no block falls to a kernel's few-rows path).

    Why: the whole product of 4 x 2048 calibration tokens of Qwen2.5-1.5B is 587 MB, and the
    SwiGLU of its gate half is a strided view that R4's in-place Hadamard had to copy (294 MB)
    while the product was still alive; by blocks, only the 294 MB output and one block exist,
    and every row has the single product's bits. matmul_wq (weight-only) rounds differently
    with the number of rows, so it keeps the single product."""
    lead, d = m.shape[:-1], m.shape[-1]
    m2 = m.reshape(-1, d)
    n, f = m2.shape[0], fused_gate_up.out_features // 2
    if n < 2 * GATE_UP_ROWS or not getattr(fused_gate_up, "rows_independent", False):
        gu = fused_gate_up(m2)
        return np.ascontiguousarray(silu_mul(gu[:, :f], gu[:, f:])).reshape(*lead, f)
    out = np.empty((n, f), dtype=np.float32)
    starts = list(range(0, n - GATE_UP_ROWS + 1, GATE_UP_ROWS))
    for r0, r1 in zip(starts, starts[1:] + [n]):
        gu = fused_gate_up(m2[r0:r1])
        out[r0:r1] = silu_mul(gu[:, :f], gu[:, f:])
        gu = None  # not beside the next block's product
    return out.reshape(*lead, f)


class Model:
    """A Llama/Qwen2 decoder in float32 NumPy with swappable linears and quantization hooks.

    Build it with :meth:`from_checkpoint` (an ``offq.formats`` Checkpoint) or :meth:`from_tensors`
    (any mapping of HF tensor names to arrays plus a ModelConfig). Run it with :meth:`forward`
    (logits), :meth:`nll` (per-token negative log-likelihood, logits chunked) or step by step
    with :meth:`embed` / :meth:`load_layer` / :meth:`layer_forward` / :meth:`logits` (what a
    layer-by-layer calibration loop needs).

    Args:
        config: the ModelConfig.
        embed_tokens: float32 ``[vocab, d]``.
        final_norm: float32 ``[d]`` or None (ones).
        lm_head: a Linear ``d -> vocab``.
        layer_loader: ``i -> DecoderLayer``; called on entry to layer ``i`` in streaming mode,
            once per layer in resident mode.
        resident: keep every layer in memory (True) or stream them (False).
        name: model name reported by eval.
        layer_hook: optional ``DecoderLayer -> DecoderLayer`` applied to every freshly loaded
            layer (e.g. to install fake-quant linears or hooks in streaming mode).
    """

    def __init__(self, config: ModelConfig, *, embed_tokens: np.ndarray,
                 final_norm: np.ndarray | None, lm_head: Linear,
                 layer_loader: Callable[[int], DecoderLayer], resident: bool = True,
                 name: str = "", layer_hook: Callable[[DecoderLayer], DecoderLayer] | None = None
                 ) -> None:
        self.config = config
        self.name = name
        self.head_dim = _head_dim(config)
        self.num_layers = int(config.num_hidden_layers)
        H, Hkv = config.num_attention_heads, config.num_key_value_heads
        if H % Hkv:
            raise ValueError(f"config: num_attention_heads {H} is not a multiple of "
                             f"num_key_value_heads {Hkv}")
        self.embed_tokens = _f32(embed_tokens)
        if self.embed_tokens.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"embed_tokens: expected shape {(config.vocab_size, config.hidden_size)},"
                             f" got {self.embed_tokens.shape}")
        self.final_norm = None if final_norm is None else _f32(final_norm)
        self.lm_head = lm_head
        self.layer_loader = layer_loader
        self.layer_hook = layer_hook
        #: the model's Tokenizer when built from a checkpoint (None otherwise)
        self.tokenizer: Any = None
        #: what eval reports as the method ("fp32" for the float reference)
        self.method = "fp32"
        #: the mode a quantized model was built for ("real", "fake" or "fused"; None: float32)
        self.built_mode: str | None = None
        self.resident = bool(resident)
        #: runs one decoder layer (RoPE tables cached between layers)
        self.runner = LayerRunner(config)
        self.inv_freq = self.runner.inv_freq
        self._layers: list[DecoderLayer | None] = [None] * self.num_layers
        #: optional C runtime of every layer (``offq.quant.fused.FusedDecoder``): when set,
        #: :meth:`new_cache` returns its packed cache and :meth:`hidden_states` runs it (one call
        #: per sequence and step) unless a capture callback is given
        self.fused_runner: Any = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, Any], *,
                     resident: bool | None = None, name: str = "",
                     layer_hook: Callable[[DecoderLayer], DecoderLayer] | None = None,
                     max_resident_bytes: int = 2 << 30) -> Model:
        """Model over a mapping of HF tensor names (a TensorStore or a dict of arrays).

        ``resident=None`` keeps all layers when their float32 size is at most
        ``max_resident_bytes`` (2 GiB) and streams them otherwise.
        """
        arch = architecture_of(config)
        embed_name, norm_name, head_name = arch.embed[0], arch.final_norm[0], arch.lm_head[0]
        for tensor in (embed_name, norm_name):
            if tensor not in tensors:
                raise ValueError(f"missing tensor {tensor!r}")
        embed = _f32(tensors[embed_name])
        final_norm = _f32(tensors[norm_name])
        if getattr(config, "tie_word_embeddings", False) or head_name not in tensors:
            if not getattr(config, "tie_word_embeddings", False):
                raise ValueError(f"missing tensor {head_name!r} (embeddings are not tied)")
            lm_head: Linear = DenseLinear(embed)
        else:
            lm_head = DenseLinear(_f32(tensors[head_name]))
        if resident is None:
            resident = _layers_nbytes(config) <= max_resident_bytes
        return cls(config, embed_tokens=embed, final_norm=final_norm, lm_head=lm_head,
                   layer_loader=lambda i: load_decoder_layer(tensors, config, i),
                   resident=resident, name=name, layer_hook=layer_hook)

    @classmethod
    def from_checkpoint(cls, ckpt: Any, *, resident: bool | None = None,
                        layer_hook: Callable[[DecoderLayer], DecoderLayer] | None = None,
                        max_resident_bytes: int = 2 << 30) -> Model:
        """Model over an ``offq.formats`` Checkpoint (``.config``, ``.tensors``, ``.name``,
        ``.tokenizer``)."""
        model = cls.from_tensors(ckpt.config, ckpt.tensors, resident=resident,
                                 name=getattr(ckpt, "name", ""), layer_hook=layer_hook,
                                 max_resident_bytes=max_resident_bytes)
        model.tokenizer = getattr(ckpt, "tokenizer", None)
        return model

    # -- layers -------------------------------------------------------------------------------
    def load_layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i``: the resident copy, or a freshly loaded one in streaming mode."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer index {i} out of range [0, {self.num_layers})")
        layer = self._layers[i]
        if layer is None:
            layer = self.layer_loader(i)
            if self.layer_hook is not None:
                layer = self.layer_hook(layer)
            if self.resident:
                self._layers[i] = layer
        return layer

    @property
    def layers(self) -> list[DecoderLayer]:
        """All layers (loads them; meant for resident mode)."""
        return [self.load_layer(i) for i in range(self.num_layers)]

    def new_cache(self) -> Any:
        """An empty KV cache for incremental decoding with :meth:`forward` (the fused runtime's
        packed cache when one is set; it holds one sequence)."""
        if self.fused_runner is not None:
            return self.fused_runner.new_cache()
        return KVCache(self.num_layers)

    # -- forward pieces -----------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings ``[B, T, d]`` of int ids ``[B, T]`` (range-checked)."""
        ids = _check_ids(ids, self.config.vocab_size)
        return self.embed_tokens[ids]

    @_single_threaded_blas
    def layer_forward(self, layer: DecoderLayer, h: np.ndarray, *, start: int = 0,
                      cache: LayerKVCache | None = None,
                      capture: CaptureFn | None = None) -> np.ndarray:
        """Run one decoder layer on ``h[B, T, d]`` in place (:meth:`LayerRunner.forward`)."""
        return self.runner.forward(layer, h, start=start, cache=cache, capture=capture)

    @_single_threaded_blas
    def hidden_states(self, ids: np.ndarray, *, cache: Any = None,
                      capture: CaptureFn | None = None) -> np.ndarray:
        """Residual stream after the last layer (before the final norm): ``[B, T, d]``."""
        start = 0 if cache is None else cache.length
        limit = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        if limit and start + np.shape(ids)[-1] > limit:
            raise ValueError(f"ids: positions up to {start + np.shape(ids)[-1]} exceed the model's "
                             f"max_position_embeddings {limit}")
        h = self.embed(ids)  # fancy indexing: a fresh float32 array, updated in place below
        if self.fused_runner is not None and capture is None:
            if cache is not None and h.shape[0] != 1:
                raise ValueError(f"ids: the fused runtime's cache holds one sequence, got "
                                 f"batch {h.shape[0]}")
            for b in range(h.shape[0]):
                c = cache if cache is not None else self.fused_runner.new_cache(h.shape[1])
                self.fused_runner.run(h[b], c)
            return h
        for i in range(self.num_layers):
            layer = self.load_layer(i)
            h = self.layer_forward(layer, h, start=start,
                                   cache=None if cache is None else cache[i], capture=capture)
            del layer  # streaming mode: the layer's weights are freed here
        return h

    @_single_threaded_blas
    def logits(self, h: np.ndarray) -> np.ndarray:
        """Final norm + LM head on hidden states ``[..., d]`` -> float32 ``[..., vocab]``."""
        return self.lm_head(rms_norm(h, self.final_norm, float(self.config.rms_norm_eps)))

    def forward(self, ids: np.ndarray, *, cache: Any = None,
                capture: CaptureFn | None = None, last_only: bool = False) -> np.ndarray:
        """Logits ``[B, T, vocab]`` for ids ``[B, T]`` (or ``[T]``, giving ``[T, vocab]``).

        With ``cache`` the ids continue the cached sequences (incremental decoding).
        ``last_only``: logits of the last position only (``T`` becomes 1), what generation needs.
        """
        ids = np.asarray(ids)
        squeeze = ids.ndim == 1
        h = self.hidden_states(ids[None] if squeeze else ids, cache=cache, capture=capture)
        out = self.logits(h[:, -1:] if last_only else h)
        return out[0] if squeeze else out

    __call__ = forward

    @_single_threaded_blas
    def nll(self, ids: np.ndarray, *, capture: CaptureFn | None = None,
            chunk: int = NLL_CHUNK) -> np.ndarray:
        """Per-position NLL ``-log p(ids[:, t+1] | ids[:, :t+1])``: float64 ``[B, T-1]``.

        Logits are materialised ``chunk`` rows at a time per thread (log-sum-exp with the max
        subtracted).
        """
        ids = _check_ids(np.asarray(ids), self.config.vocab_size)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"ids: expected [batch, tokens >= 2], got shape {ids.shape}")
        h = self.hidden_states(ids, capture=capture)
        B, T, d = h.shape
        hs = rms_norm(h[:, :-1], self.final_norm, float(self.config.rms_norm_eps)).reshape(-1, d)
        targets = ids[:, 1:].reshape(-1)
        out = np.empty(targets.shape[0], dtype=np.float64)

        def rows(s: int) -> None:  # chunks run on offq's threads, one logits block each
            lg = self.lm_head(hs[s:s + chunk])
            out[s:s + chunk] = token_nll(lg, targets[s:s + chunk])

        run_tasks(rows, list(range(0, hs.shape[0], chunk)))
        return out.reshape(B, T - 1)


def _check_ids(ids: Any, vocab: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"ids: token ids must lie in [0, {vocab}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64, copy=False)


def _layers_nbytes(config: ModelConfig) -> int:
    d, f = config.hidden_size, config.intermediate_size
    hd = _head_dim(config)
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    per = d * hd * (2 * H + 2 * Hkv) + 3 * d * f
    return 4 * per * int(config.num_hidden_layers)
