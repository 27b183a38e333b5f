"""Model assembly: a runnable decoder from quantized layers, in memory or from an offq checkpoint.

:func:`build_layer` turns one layer's :class:`~offq.quant.weight.QuantizedWeight` linears (or
float ones, when weights stay in float) into a :class:`~offq.model.decoder.DecoderLayer` with the
fake or real linears, the online R3/R4 transforms and the KV codec of the QuantConfig. The quantize
loop calls it on the layer it has just quantized (to propagate the calibration batch), and
:func:`build_model` / :func:`load_quantized` call it on the stored tensors of a checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import OFF, QuantConfig
from ..kernels.matmul_wq import WQ_BITS
from ..model.arch import architecture_of, dims_of
from ..model.decoder import DecoderLayer, Model
from ..model.linear import DenseLinear, SlicedLinear
from .activation import activation_quantizer
from .kv_codec import kv_codec
from .linears import (FakeQuantLinear, GroupProduct, PackedWeightLinear, W4A4Linear,
                      integer_product, packed_weight_only)
from .online import qk_transform, r4_input_transform
from .weight import QuantizedWeight

logger = logging.getLogger(__name__)

__all__ = ["MODES", "stored_layer", "build_layer", "layer_from_tensors", "install_online",
           "build_model", "load_quantized", "resolved_mode"]

#: "fake": simulated in float32; "real": packed weights and the C kernels, sequenced by NumPy;
#: "fused": the real path with every layer of a step in one C call (:mod:`offq.quant.fused` for
#: W4A4KV4 models, :mod:`offq.quant.fused_wq` for weight-only ones);
#: "auto": "fused" for a resident model that qualifies (W4A4KV4 on the integer product, packed
#: 4-bit KV, offq's R3/R4; or packed 2/3/4/8-bit weights on float activations with a float KV
#: cache and no online transforms), else "real" (:func:`resolved_mode` tells which was taken)
MODES = ("fake", "real", "fused", "auto")

def stored_layer(tensors: Mapping[str, np.ndarray], model_config: Any, cfg: QuantConfig,
                 i: int) -> dict[str, Any]:
    """Layer ``i``'s linears as a checkpoint stores them: a :class:`QuantizedWeight` for each
    quantized linear, a float :class:`DenseLinear` for the others (weights kept in float)."""
    arch = architecture_of(model_config)
    dims = dims_of(model_config)
    out: dict[str, Any] = {}
    for spec in arch.linears:
        name = arch.weight(i, spec.name)
        bias_name = arch.bias(i, spec.name)
        bias = np.asarray(tensors[bias_name], np.float32) if bias_name in tensors else None
        codes_name, scales_name, zeros_name = arch.quantized_names(name)
        if codes_name not in tensors:
            out[spec.name] = DenseLinear(np.asarray(tensors[name], np.float32), bias)
            continue
        k = dims[spec.in_dim]
        qw = QuantizedWeight.from_stored(
            tensors[codes_name], tensors[scales_name], tensors[zeros_name], bits=cfg.w_bits,
            group_size=cfg.weight_group(k), symmetric=cfg.w_symmetric, in_features=k, bias=bias)
        out[spec.name] = qw
    return out


def _linear(weight: Any, act: Any, mode: str) -> Any:
    """The runtime linear of one stored weight."""
    if isinstance(weight, DenseLinear):
        return weight if act is None else FakeQuantLinear(weight.weight, weight.bias, act)
    if mode == "real":
        if packed_weight_only(weight, act):  # float activations: packed weights
            return PackedWeightLinear(weight)
        return W4A4Linear(weight, act)
    if integer_product(weight, act):
        return FakeQuantLinear(None, weight.bias, act, GroupProduct(weight, act.group_size))
    return FakeQuantLinear(weight.dequantized, weight.bias, act)


def build_layer(linears: Mapping[str, Any], input_norm: np.ndarray, post_norm: np.ndarray,
                model_config: Any, cfg: QuantConfig, i: int, mode: str,
                k_offset: np.ndarray | None = None) -> DecoderLayer:
    """Decoder layer ``i`` from its stored linears (``QuantizedWeight`` or float
    ``DenseLinear``, by short name), its norms, its key offset (``[kv_heads, head_dim]``, when
    ``cfg.centres_keys``), and the run-time quantizers and online transforms of ``cfg``
    (``mode`` "real": packed kernels; "fake": simulated in float32)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    mode = "fake" if mode == "fake" else "real"  # a fused model's layers are real layers
    arch = architecture_of(model_config)
    dims = dims_of(model_config)
    acts = {s.name: activation_quantizer(cfg, dims[s.in_dim]) for s in arch.linears}
    layer_linears: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    for key, members in arch.fused.items():
        parts = [linears[n] for n in members]
        if not all(isinstance(p, QuantizedWeight) for p in parts):
            continue
        pairs = list(zip(parts, members))
        if not (all(integer_product(p, acts[n]) for p, n in pairs)
                or (mode == "real" and all(packed_weight_only(p, acts[n]) for p, n in pairs))):
            continue
        # one activation quantization and one product for the input site; each output column
        # is computed exactly as in the separate product (the integer path and matmul_wq's
        # few-rows path are column-wise)
        fused[key] = _linear(QuantizedWeight.concat(parts), acts[members[0]], mode)
        start = 0
        for n, p in zip(members, parts):
            layer_linears[n] = SlicedLinear(fused[key], start, start + p.codes.shape[0])
            start += p.codes.shape[0]
    for name in arch.linear_names:
        if name not in layer_linears:
            layer_linears[name] = _linear(linears[name], acts[name], mode)
    layer = DecoderLayer(index=i, input_norm=np.asarray(input_norm, np.float32),
                         post_attention_norm=np.asarray(post_norm, np.float32),
                         linears=layer_linears, fused=fused)
    return install_online(layer, model_config, cfg, mode, k_offset)


def layer_from_tensors(tensors: Mapping[str, np.ndarray], model_config: Any, cfg: QuantConfig,
                       i: int, mode: str) -> DecoderLayer:
    """:func:`build_layer` over the stored tensors of a checkpoint."""
    arch = architecture_of(model_config)
    k_offset = tensors[arch.key_offset(i)] if cfg.centres_keys else None
    return build_layer(stored_layer(tensors, model_config, cfg, i),
                       tensors[arch.norm(i, "input_norm")], tensors[arch.norm(i, "post_norm")],
                       model_config, cfg, i, mode, k_offset)


def install_online(layer: DecoderLayer, model_config: Any, cfg: QuantConfig,
                   mode: str, k_offset: np.ndarray | None = None) -> DecoderLayer:
    """Attach R3 and the key offset (qk_transform), R4 (down_input_transform) and the KV codec
    to a layer (the key offset only when ``cfg.centres_keys``: it centres what K4 quantizes)."""
    if cfg.centres_keys and k_offset is None:
        raise ValueError(f"k_offset: layer {layer.index} needs its key offset "
                         f"(kv_centre_keys with a {cfg.kv_bits}-bit K cache)")
    layer.qk_transform = qk_transform(model_config.head_dim, cfg.rotates and cfg.r3,
                                      k_offset if cfg.centres_keys else None)
    if cfg.rotates and cfg.r4:
        layer.down_input_transform = r4_input_transform(model_config.intermediate_size)
    layer.kv_codec = kv_codec(cfg, model_config.head_dim, mode)
    return layer


def build_model(model_config: Any, cfg: QuantConfig, tensors: Mapping[str, np.ndarray], *,
                mode: str = "real", resident: bool = True, name: str = "",
                attention: str = "float", origin: str = "") -> Model:
    """A runnable :class:`offq.model.Model` over the stored tensors of a quantized model
    (``attention``: see :func:`load_quantized`). ``origin``: the checkpoint's path, named in
    the errors that are about what it stores (a width or layout the fused decoder cannot run)."""
    from .fused import ATTENTION_MODES

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(resident, (bool, np.bool_)):
        raise ValueError(f"resident: expected True or False, got {resident!r}")
    resident = bool(resident)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
    if attention != "float" and mode not in ("fused", "auto"):
        raise ValueError(f"attention: {attention!r} is the fused C decoder's (mode 'fused' or "
                         f"'auto'); mode {mode!r} runs the float attention")
    where = f"{origin}: " if origin else ""
    arch = architecture_of(model_config)
    embed = np.asarray(tensors[arch.embed[0]], dtype=np.float32)
    from .lm_head import lm_head_from_tensors

    lm_head: Any = lm_head_from_tensors(tensors, arch.lm_head[0], model_config.hidden_size)
    if lm_head is None:  # the float32 head
        head = tensors[arch.lm_head[0]] if arch.lm_head[0] in tensors else embed
        lm_head = DenseLinear(np.asarray(head, np.float32))
    model = Model(model_config, embed_tokens=embed,
                  final_norm=np.asarray(tensors[arch.final_norm[0]], np.float32),
                  lm_head=lm_head,
                  layer_loader=lambda i: layer_from_tensors(tensors, model_config, cfg, i, mode),
                  resident=resident or mode == "fused", name=name)
    if mode == "fused" and cfg.w_bits not in WQ_BITS:  # said before "layer 0 has no ..."
        kind = "float32" if cfg.w_bits >= 16 else f"{cfg.w_bits}-bit"
        raise ValueError(f"{where}mode 'fused': the C decoders run 2-, 3-, 4- or 8-bit weights, "
                         f"and this model's are {kind}: use mode 'real' (or 'auto')")
    if mode == "fused" or (mode == "auto" and resident):
        from .fused import fused_runner

        try:
            model.fused_runner = fused_runner(model, attention)
        except ValueError as e:  # FusedDecoder names what the model lacks
            if mode == "fused" or attention != "float":
                kinds = ((cfg.w_bits, cfg.a_bits, cfg.kv_bits) == (4, 4, 4)
                         or (cfg.a_bits, cfg.kv_bits) == (OFF, OFF))
                what = "" if kinds else (  # the widths themselves are not what the C runs
                    f"the C decoders run W4A4KV4 and weight-only models, not "
                    f"{cfg.describe(model_config.hidden_size)}: ")
                advice = "; use mode 'real'" if attention == "float" else ""
                raise ValueError(f"{where}mode {mode!r}: {what}{e}{advice}") from None
            logger.info("mode auto: %s runs on the NumPy-sequenced real path (%s)",
                        name or "the model", e)
    if attention != "float" and getattr(model, "fused_runner", None) is None:
        raise ValueError(f"attention: {attention!r} needs the fused C decoder, which a streamed "
                         "model (resident=False) does not get")
    model.built_mode = resolved_mode(model, mode)
    # what evaluations record: the config and the path it runs on (a float model's is "fp32")
    runs_on = model.built_mode + ("" if attention == "float" else f", {attention} attention")
    model.method = f"{cfg.describe(model_config.hidden_size)} ({runs_on})"
    return model


def resolved_mode(model: Model, mode: str) -> str:
    """The path ``mode`` gave ``model``: "auto" resolves to "fused" or "real"."""
    if mode != "auto":
        return mode
    return "fused" if getattr(model, "fused_runner", None) is not None else "real"


def load_quantized(path: str | os.PathLike, *, mode: str = "real", resident: bool = True,
                   attention: str = "float"):
    """Open an offq checkpoint directory -> (Model, Tokenizer or None, QuantConfig).

    Validates the format version, the QuantConfig, and every tensor's presence, dtype, shape and
    (for scales and zero-points) finiteness against the model config before building the model;
    a tensor the model does not use is an error too. ``mode``: one of :data:`MODES`; "auto" runs
    a W4A4KV4 or weight-only checkpoint on its fused C decoder (perplexity bit-identical to
    "real", generation faster) and anything else on "real". ``attention``: "float" (the
    default) or "int8", the fused W4A4KV4 decoder's opt-in 8-bit attention over the 4-bit cache
    (``FusedDecoder(attention="int8")``; prompts then run through the C step too, so perplexity
    measures it: within +-1% on SmolLM2-135M, +0.88% on Qwen2.5-Coder-1.5B,
    benchmarks/results_speed.md); it needs mode "fused" or "auto" and a W4A4KV4 checkpoint.
    """
    from ..formats.checkpoint import (MODEL_FILE, check_checkpoint_tensors, load_safetensors,
                                      read_config)
    from ..formats.tokenizer import Tokenizer

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected an offq checkpoint directory, got {type(path).__name__}")
    path = Path(path)
    model_config, qcfg, _ = read_config(path)
    model_config = model_config.replace(tie_word_embeddings=False)
    tensors, _ = load_safetensors(path / MODEL_FILE)
    check_checkpoint_tensors(tensors, model_config, qcfg, str(path / MODEL_FILE))
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    model = build_model(model_config, qcfg, tensors, mode=mode, resident=resident, name=path.name,
                        attention=attention, origin=str(path))
    model.tokenizer = tokenizer  # perplexity(model) and generate find it there
    return model, tokenizer, qcfg
