"""Export a weight-only offq checkpoint in the GPTQ layout HF-side GPTQ loaders read, and read
such an export back (``offq eval`` runs it).

The layout (``checkpoint_format: gptq``, the one transformers/optimum, AutoGPTQ and GPTQModel
load), per quantized linear ``prefix`` (its weight name without ``.weight``), with ``K``
inputs, ``N`` outputs, ``G = K / group_size`` groups:

    prefix.qweight  int32 [K * bits / 32, N]   codes packed along K
    prefix.qzeros   int32 [G, N * bits / 32]   (zero - 1) packed along N
    prefix.scales   float16 [G, N]
    prefix.g_idx    int32 [K]                   group of each input (k // group_size)
    prefix.bias     float16 [N]                 where the linear has one

and ``w = scales[g_idx[k], n] * (code[k, n] - (zero_stored[g_idx[k], n] + 1))``. Packing: the
codes of one column (or the zeros of one group row) form a little-endian bit stream, value ``j``
at bits ``[j * bits, (j + 1) * bits)``, cut into 32-bit words; for 2/4/8 bits that is
``32 / bits`` values per word, lowest bits first, and for 3 bits 32 values per 3 words, some
values straddling two words. The stored zero is the zero-point minus one (the format's long-
standing convention, undone by every loader), so a zero-point must lie in ``[1, 2^bits]``.

Everything else (embeddings, norms, lm_head) is stored as float16, and config.json gets
``quantization_config = {quant_method: gptq, bits, group_size, desc_act: false, sym,
checkpoint_format: gptq}`` (``group_size`` -1 for one group per output channel). offq keeps its
groups contiguous in the original column order even with act-order (static groups), so
``desc_act`` is false and ``g_idx`` is ``k // group_size``.

What the format cannot express is refused with the reason: quantized activations or KV cache
(they are quantized at run time by offq's kernels; a GPTQ loader runs float activations), online
rotations (R3/R4 run inside offq's forward), unquantized weights, a quantized LM head
(``--lm-head-bits``: loaders read a float one), a zero-point outside
``[1, 2^bits]`` (``checkpoint_format gptq_v2`` stores the zero-point itself, range
``[0, 2^bits - 1]``; GPTQModel reads it), or a dimension whose packed size is not a whole number of 32-bit words.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import (DirectoryLock, atomic_copy, atomic_write_json, check_json_size,
                    check_output_dir, fsync_dir, read_json_object)
from .safetensors import write_safetensors

log = logging.getLogger(__name__)

__all__ = ["GptqExportError", "export_gptq", "is_gptq_export", "load_gptq_export", "pack_stream",
           "unpack_stream", "GPTQ_BITS"]

GPTQ_BITS = (2, 3, 4, 8)
#: stored zero = zero-point - offset, by checkpoint_format ("gptq": the v1 convention)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json")


class GptqExportError(ValueError):
    """The checkpoint holds something the GPTQ format cannot express (the message says what)."""


# ---------------------------------------------------------------------------------- packing
def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``values [L, M]`` (each < 2^bits) along axis 0 into int32 ``[L * bits / 32, M]``:
    per column a little-endian bit stream, value j at bit j * bits."""
    values = np.asarray(values)
    length, width = values.shape
    if (length * bits) % 32:
        raise GptqExportError(f"{length} values of {bits} bits are not a whole number of 32-bit "
                              "words")
    v = values.astype(np.uint64)
    words = np.zeros((length * bits // 32 + 1, width), dtype=np.uint64)  # +1: spill of the last
    pos = np.arange(length, dtype=np.int64) * bits
    word, shift = pos // 32, (pos % 32).astype(np.uint64)
    # values of one period (32 values = `bits` words) never share (word, shift) pairs, so each
    # step of this loop writes disjoint bits; np.add on disjoint bits is a bitwise or
    for j in range(min(32, length)):
        rows = np.arange(j, length, 32)
        shifted = v[rows] << shift[rows, None]
        np.add.at(words, word[rows], shifted & np.uint64(0xFFFFFFFF))
        np.add.at(words, word[rows] + 1, shifted >> np.uint64(32))
    return words[:-1].astype(np.uint32).view(np.int32)


def unpack_stream(words: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_stream` -> uint8 ``[length, M]``."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    if w.shape[0] * 32 != length * bits:
        raise ValueError(f"packed shape {w.shape} does not hold {length} values of {bits} bits")
    w = np.concatenate([w, np.zeros((1, w.shape[1]), np.uint64)])
    pos = np.arange(length, dtype=np.int64) * bits
    word, shift = pos // 32, (pos % 32).astype(np.uint64)
    both = w[word] | (w[word + 1] << np.uint64(32))
    return ((both >> shift[:, None]) & np.uint64((1 << bits) - 1)).astype(np.uint8)


# ---------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class GptqLinear:
    """One linear in the GPTQ layout."""

    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray

    @classmethod
    def from_quantized(cls, qw: Any, name: str, checkpoint_format: str = "gptq") -> "GptqLinear":
        """From an offq :class:`~offq.quant.weight.QuantizedWeight` (codes [N, K])."""
        n, k = qw.codes.shape
        offset = ZERO_OFFSET[checkpoint_format]
        lo, hi = offset, 2 ** qw.bits - 1 + offset
        bad = (qw.zero < lo) | (qw.zero > hi)
        if bad.any():
            hint = (" (checkpoint_format gptq_v2 stores the zero-point itself, and GPTQModel "
                    "reads it: --checkpoint-format gptq_v2)") if offset else ""
            raise GptqExportError(
                f"{name}: {int(bad.sum())} of {qw.zero.size} groups have a zero-point outside "
                f"[{lo}, {hi}], which checkpoint_format {checkpoint_format} (it stores zero - "
                f"{offset} in {qw.bits} bits) cannot express{hint}")
        if (n * qw.bits) % 32 or (k * qw.bits) % 32:
            raise GptqExportError(f"{name}: [{n}, {k}] at {qw.bits} bits does not pack into whole "
                                  "32-bit words (the GPTQ layout needs K * bits and N * bits to "
                                  "be multiples of 32)")
        if not np.array_equal(qw.zero, np.rint(qw.zero)):  # offq's grids have integer ones
            raise GptqExportError(f"{name}: zero-points that are not integers (the GPTQ layout "
                                  "stores integer zero-points; the checkpoint was edited or is "
                                  "corrupt)")
        zeros = (qw.zero.T - offset).astype(np.uint8)  # [G, N]
        return cls(qweight=pack_stream(qw.codes.T, qw.bits),
                   qzeros=np.ascontiguousarray(pack_stream(zeros.T, qw.bits).T),
                   scales=np.ascontiguousarray(to_float16(qw.scale.T, name + " scales")),
                   g_idx=(np.arange(k) // qw.group_size).astype(np.int32))


def to_float16(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as float16, or GptqExportError when a value is not finite or does not fit float16
    (|x| > 65504 became Inf with only NumPy's warning: an export that loads with Inf weights)."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h).all():
        bad = x[~np.isfinite(h)]
        raise GptqExportError(f"{name}: {bad.size} values are not finite or exceed float16's "
                              f"range (+-65504), e.g. {float(bad.flat[0]):g}; the GPTQ layout "
                              "stores float16")
    return h


def check_exportable(qcfg: Any, block: dict[str, Any]) -> None:
    """GptqExportError naming the first setting the GPTQ format cannot express."""
    if qcfg.w_bits not in GPTQ_BITS:
        raise GptqExportError(f"w_bits {qcfg.w_bits}: the weights are not quantized; the GPTQ "
                              f"format stores {', '.join(map(str, GPTQ_BITS))}-bit weights")
    if qcfg.a_bits != 16 or qcfg.kv_bits != 16:
        raise GptqExportError(
            f"activations A{qcfg.a_bits} / KV cache KV{qcfg.kv_bits} are quantized at run time by "
            "offq's kernels; the GPTQ format is weight-only (its loaders run float activations), "
            "so the export would silently change the model. Quantize with --a-bits 16 "
            "--kv-bits 16")
    if qcfg.lm_head_bits != 16:
        raise GptqExportError(
            f"the LM head is stored in {qcfg.lm_head_bits} bits (--lm-head-bits), which GPTQ "
            "loaders do not read (they expect a float head weight). Quantize without "
            "--lm-head-bits")
    online = {k: v for k, v in (block.get("online") or {}).items() if v}
    if online:
        raise GptqExportError(
            f"online rotations {sorted(online)} must run inside the forward pass (offq applies "
            "them with its Hadamard kernel); GPTQ loaders run a plain Llama forward. Quantize "
            "with --no-r3 --no-r4 or --method gptq")


def export_gptq(src: str | Path, out: str | Path, *, checkpoint_format: str = "gptq") -> Path:
    """Write the GPTQ layout of the offq checkpoint ``src`` into directory ``out`` (created;
    files written atomically, config.json last) and return ``out``. ``checkpoint_format``
    ``gptq`` (stored zero = zero-point - 1, what every GPTQ loader reads) or ``gptq_v2``
    (the zero-point itself; GPTQModel)."""
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"checkpoint_format: expected one of {sorted(ZERO_OFFSET)}, got "
                         f"{checkpoint_format!r}")
    from ..model.arch import architecture_of
    from ..quant.assemble import stored_layer
    from ..quant.weight import QuantizedWeight
    from .checkpoint import MODEL_FILE, check_checkpoint_tensors, load_safetensors, read_config

    src, out = Path(src), Path(out)
    check_output_dir(out, src, reusable=is_gptq_export)
    mc, qcfg, block = read_config(src)
    check_exportable(qcfg, block)
    mc = mc.replace(tie_word_embeddings=False)
    tensors, _ = load_safetensors(src / MODEL_FILE)
    check_checkpoint_tensors(tensors, mc, qcfg, str(src / MODEL_FILE))
    arch = architecture_of(mc)
    result: dict[str, np.ndarray] = {}
    quantized: set[str] = set()
    for i in range(mc.num_hidden_layers):
        for lin, qw in stored_layer(tensors, mc, qcfg, i).items():
            name = arch.weight(i, lin)
            prefix = name[: -len(".weight")]
            if not isinstance(qw, QuantizedWeight):
                raise GptqExportError(f"{name}: stored in float; the GPTQ layout quantizes every "
                                      "decoder linear")
            g = GptqLinear.from_quantized(qw, name, checkpoint_format)
            result.update({prefix + ".qweight": g.qweight, prefix + ".qzeros": g.qzeros,
                           prefix + ".scales": g.scales, prefix + ".g_idx": g.g_idx})
            quantized.update(arch.quantized_names(name))
            if qw.bias is not None:
                result[prefix + ".bias"] = to_float16(qw.bias, arch.bias(i, lin))
                quantized.add(arch.bias(i, lin))
    for name in tensors:
        if name not in quantized:
            result[name] = to_float16(tensors[name], name)
    if is_gptq_export(out):  # the one kind of directory an export may overwrite: say so
        log.warning("%s: replacing the GPTQ export already there", out)
    with DirectoryLock(out, "--out"):  # one writer at a time (it creates the directory)
        check_output_dir(out, src, reusable=is_gptq_export)  # again, now that it is ours
        # an earlier export's config.json goes first: a crash below then leaves a directory
        # that does not claim to be a GPTQ export, not the old config beside new weights
        (out / "config.json").unlink(missing_ok=True)
        fsync_dir(out)
        write_safetensors(out / MODEL_FILE, result, {"format": "pt"})
        for f in _COPIED:
            if (src / f).is_file():
                atomic_copy(src / f, out / f)
        hf = {k: v for k, v in json.loads((src / "config.json").read_text("utf-8")).items()
              if k != "offq"}
        hf["torch_dtype"] = "float16"
        hf["quantization_config"] = {
            "quant_method": "gptq", "bits": qcfg.w_bits, "group_size": qcfg.w_group_size,
            "desc_act": False, "sym": bool(qcfg.w_symmetric),
            "checkpoint_format": checkpoint_format, "true_sequential": True,
            "damp_percent": qcfg.gptq_damp}
        atomic_write_json(out / "config.json", hf)
        fsync_dir(out)
    return out


# ---------------------------------------------------------------------------------- reading
#: what each stored part of a GPTQ linear must be: (number of axes, allowed dtypes)
_GPTQ_PARTS = {"qweight": (2, ("int32", "uint32")), "qzeros": (2, ("int32", "uint32")),
               "scales": (2, ("float16", "float32")), "g_idx": (1, ("int32", "int64"))}


def _check_gptq_parts(parts: dict[str, Any], where: str) -> None:
    """ValueError naming the linear and the part when a part has the wrong number of axes or
    dtype (before any shape arithmetic reads them)."""
    for part, (ndim, dtypes) in _GPTQ_PARTS.items():
        a = parts[part]
        if a.ndim != ndim or str(a.dtype) not in dtypes:
            raise ValueError(f"{where}.{part}: {a.dtype} with {a.ndim} axes; expected {ndim} "
                             f"axes of {' or '.join(dtypes)}")


def is_gptq_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose config.json says ``quant_method: gptq``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = read_json_object(cfg).get("quantization_config")
    except ValueError:
        return False
    return isinstance(q, dict) and q.get("quant_method") == "gptq"


def load_gptq_export(path: str | Path, *, mode: str = "real"):
    """A GPTQ-layout directory (this module's export, or any ``desc_act: false`` GPTQ checkpoint
    of an architecture offq knows) -> (Model, Tokenizer or None, QuantConfig). The weights are
    read back into offq's grid (codes, scale, integer zero) and run by offq's runtime."""
    from ..config import QuantConfig
    from ..model.arch import architecture_of
    from ..model.config import ModelConfig
    from ..quant.assemble import build_model
    from ..quant.grid import pack_codes
    from .checkpoint import (MODEL_FILE, check_checkpoint_tensors, expected_tensors,
                             load_safetensors)
    from .tokenizer import Tokenizer

    path = Path(path)
    check_json_size(path / "config.json")
    try:
        raw = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path / 'config.json'}: unreadable or invalid JSON: {e!r}") from e
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(q, dict):
        raise ValueError(f"{path / 'config.json'}: no 'quantization_config' object")
    bits, group, sym = q.get("bits"), q.get("group_size", -1), q.get("sym", True)
    fmt = q.get("checkpoint_format", "gptq")
    if bits not in GPTQ_BITS:
        raise ValueError(f"{path}: quantization_config bits {bits!r} not in {GPTQ_BITS}")
    if not isinstance(fmt, str) or fmt not in ZERO_OFFSET:  # a list or object is no dict key
        raise ValueError(f"{path}: checkpoint_format {fmt!r}; offq reads {sorted(ZERO_OFFSET)}")
    try:  # QuantConfig checks the JSON types and ranges (a list group_size, a string sym, ...)
        qcfg = QuantConfig(method="gptq", w_bits=bits, a_bits=16, kv_bits=16,
                           w_group_size=group, w_symmetric=sym, calib_samples=1, calib_seqlen=2)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: quantization_config bits, group_size, sym "
                         f"(offq's w_bits, w_group_size, w_symmetric): {e}") from e
    try:
        mc = ModelConfig.from_hf({k: v for k, v in raw.items() if k != "quantization_config"},
                                 add_bos=raw.get("offq_add_bos"))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e
    mc = mc.replace(tie_word_embeddings=False)
    try:  # a group_size that divides no linear's width (the fields' own message, with the file)
        expected_tensors(mc, qcfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path / 'config.json'}: quantization_config group_size {group!r} "
                         f"does not fit the model's widths: {e}") from None
    arch = architecture_of(mc)
    stored, _ = load_safetensors(path / MODEL_FILE)
    tensors: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for i in range(mc.num_hidden_layers):
        for lin in arch.linear_names:
            name = arch.weight(i, lin)
            prefix = name[: -len(".weight")]
            parts = {s: stored.get(prefix + "." + s) for s in ("qweight", "qzeros", "scales",
                                                                "g_idx")}
            missing = [s for s, a in parts.items() if a is None]
            if missing:
                raise ValueError(f"{path / MODEL_FILE}: {prefix}: missing {missing}")
            _check_gptq_parts(parts, f"{path / MODEL_FILE}: {prefix}")
            scales = np.asarray(parts["scales"], np.float32)
            groups, n = scales.shape
            k = parts["qweight"].shape[0] * 32 // bits
            g = k if group == -1 else group
            if g <= 0 or k % g or k // g != groups or parts["qzeros"].shape != (groups, n * bits // 32):
                raise ValueError(f"{path / MODEL_FILE}: {prefix}: shapes qweight "
                                 f"{parts['qweight'].shape}, qzeros {parts['qzeros'].shape}, "
                                 f"scales {scales.shape} disagree with {bits} bits, group {group}")
            if not np.array_equal(np.asarray(parts["g_idx"]), np.arange(k) // g):
                raise ValueError(f"{path / MODEL_FILE}: {prefix}: g_idx is not k // group_size "
                                 "(desc_act checkpoints are not supported)")
            codes = unpack_stream(parts["qweight"], bits, k).T
            zeros = unpack_stream(np.ascontiguousarray(parts["qzeros"].T), bits, n).T.astype(
                np.float32) + ZERO_OFFSET[fmt]
            c, s, z = arch.quantized_names(name)
            tensors[c] = pack_codes(np.ascontiguousarray(codes), bits)
            tensors[s] = np.ascontiguousarray(scales.T)
            tensors[z] = np.ascontiguousarray(zeros.T)
            used.update(prefix + "." + p for p in parts)
            if prefix + ".bias" in stored:
                tensors[arch.bias(i, lin)] = np.asarray(stored[prefix + ".bias"], np.float32)
                used.add(prefix + ".bias")
    for name, a in stored.items():
        # rotary inv_freq buffers (older exporters saved them) are recomputed from config.json
        if name not in used and not name.endswith(".rotary_emb.inv_freq"):
            tensors[name] = np.asarray(a, np.float32)
    # what offq's own checkpoints must satisfy: every tensor present with its shape, none
    # unknown, scales and zero-points finite and on their grids (a layer count below the stored
    # one, a missing norm or a NaN scale is an error here, not a KeyError or an infinite
    # perplexity later)
    check_checkpoint_tensors(tensors, mc, qcfg, str(path / MODEL_FILE), offq_grids=False)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    model = build_model(mc, qcfg, tensors, mode=mode, name=path.name)
    model.tokenizer = tokenizer  # generate(model) and perplexity(model, text) find it there
    return model, tokenizer, qcfg
