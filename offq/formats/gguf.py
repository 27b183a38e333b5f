"""GGUF (llama.cpp) checkpoints: config, tensors and tokenizer from one file.

The container is parsed by :mod:`offq.formats.gguf_file` (bounds-checked; tensors stay on disk,
memory-mapped, until asked for). What this module adds:

* **Names.** llama.cpp names map to HF names (``offq.model.arch``): ``token_embd`` -> ``model.embed_tokens``,
  ``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj``, ``output_norm`` -> ``model.norm``,
  ``output`` -> ``lm_head`` (absent when embeddings are tied), etc.
* **Dequantization.** Every tensor type that ``gguf.quants.dequantize`` implements (F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, ...) is returned as float32, on access.
* **The q/k row permutation.** llama.cpp's HF converter reorders the rows of q_proj / k_proj (and
  their biases) for the *llama* architecture so that its RoPE can rotate adjacent pairs
  (x[2i], x[2i+1]) instead of HF's halves (x[i], x[i + d/2]). Within each head of width ``d`` the
  HF row ``r = s * d/2 + i`` (half s in {0, 1}, index i < d/2) is stored at GGUF row ``2 * i + s``:
  viewed as ``[heads, 2, d/2]`` the rows are transposed to ``[heads, d/2, 2]``. The inverse view
  (`unpermute_qk_rows`) reshapes GGUF rows to ``[heads, d/2, 2]`` and transposes back to
  ``[heads, 2, d/2]``. q uses the attention head count, k the KV head count. Qwen2 GGUFs are not
  permuted (llama.cpp uses NeoX-style RoPE for them) and are returned unchanged.
* **Config** from ``{arch}.*`` metadata and **tokenizer** from ``tokenizer.ggml.*`` metadata
  (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``), rebuilt as a ``tokenizers.Tokenizer``,
  with the chat template of ``tokenizer.chat_template``.

Every problem (not a GGUF, truncated file, unknown architecture or tensor type, inconsistent
shapes) is a ValueError that names the file and, where relevant, the tensor or key.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..model.arch import ARCHITECTURES, LLAMA, Architecture, architecture_of
from ..model.config import ModelConfig, as_json_bool
from .gguf_file import GGUFFile
from .registry import Checkpoint, TensorStore, check_tensors

logger = logging.getLogger(__name__)

#: Longest SentencePiece piece given merge rules (real vocabularies stay far below). Without the
#: cap a piece's cuts cost time quadratic in its length: 16.6 s at 320 KB in an audit run, so
#: ~45 min for 4 MB by extrapolation.
MAX_MERGED_PIECE = 256

#: Most merge rules per vocabulary token a SentencePiece vocabulary may imply (every cut of a
#: piece into two pieces is one). A 32,000-piece BPE vocabulary trained on 28 MB of Python source
#: implies 1.4 per token; pieces c, cc, .., c*64 of many characters imply ~31, each a ~300-byte
#: Python tuple (an 18 MB file aborted inside tokenizers).
MAX_SENTENCEPIECE_MERGES_PER_TOKEN = 8

#: Most merge rules of any SentencePiece vocabulary, whatever its size (~0.5 KB of Python each
#: while they are ranked: a 20 MB file of a million pieces over five letters, within the
#: per-token budget, took 3.8 GB in a review's scratch run). The SentencePiece models offq reads
#: (Llama 1/2, Mistral, TinyLlama: 32,000-32,768 pieces) imply ~45,000.
MAX_SENTENCEPIECE_MERGES = 1 << 20

#: GGUF ``general.architecture`` values offq reads -> ModelConfig.architecture.
SUPPORTED_GGUF_ARCHS = {a.gguf_arch: a.name for a in ARCHITECTURES.values()}

def hf_name(gguf_name: str, arch: Architecture = LLAMA) -> str | None:
    """HF name of a llama.cpp tensor name, or None for tensors offq does not use (rope_freqs)."""
    return arch.hf_name(gguf_name)


def gguf_name(hf: str, arch: Architecture = LLAMA) -> str | None:
    """Inverse of `hf_name` (used when writing GGUF files, e.g. in tests)."""
    return arch.gguf_name(hf)


# ---------------------------------------------------------------------- q/k permutation
def permute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order -> llama.cpp row order (what llama.cpp's converter does to q/k weights/biases).

    ``w`` has ``n_heads * head_dim`` rows (first axis); any trailing shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"w: {rows} rows are not n_heads={n_heads} heads of even width")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp row order -> HF row order; the exact inverse of `permute_qk_rows`."""
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"w: {rows} rows are not n_heads={n_heads} heads of even width")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------- reader access
def open_reader(path: str | os.PathLike) -> GGUFFile:
    """The parsed header of the GGUF file ``path`` (:class:`~offq.formats.gguf_file.GGUFFile`:
    every length bounds-checked, tensors memory-mapped); a malformed file is a ValueError naming
    it."""
    return GGUFFile(path)


def _malformed_as_value_error(fn):
    """Turn anything but ValueError/FileNotFoundError raised while interpreting a (possibly hostile)
    file's metadata -- TypeError from a wrongly typed key, the tokenizers library's plain Exception
    for an inconsistent vocabulary, its Rust panics (pyo3's PanicException, a BaseException that
    cannot be imported by name), ... -- into a ValueError naming the file."""
    @functools.wraps(fn)
    def wrapper(reader_or_path, *args, **kwargs):
        where = (_reader_path(reader_or_path) if hasattr(reader_or_path, "fields")
                 else reader_or_path)
        try:
            return fn(reader_or_path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except ValueError as e:  # e.g. ModelConfig's checks, which know no file: name it
            if str(where) in str(e):
                raise
            raise ValueError(f"{where}: {e}") from e
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised as ValueError with the cause attached
            raise ValueError(f"{where}: malformed GGUF metadata ({type(e).__name__}: {e})") from e
    return wrapper


def _reader_path(reader: GGUFFile) -> Path:
    """The file behind a parsed header."""
    return reader.path


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise ValueError(f"{_reader_path(reader)}: metadata key {key!r} unreadable: {e}") from e


def _bool_field(reader, key: str, default: bool) -> bool:
    """A yes/no metadata value (GGUF BOOL, or an integer 0 / 1); ValueError naming the key
    otherwise: ``bool("no")`` is True."""
    value = _field(reader, key)
    if value is None:
        return default
    try:
        return as_json_bool(repr(key), value.item() if isinstance(value, np.generic) else value)
    except ValueError as e:
        raise ValueError(f"{_reader_path(reader)}: metadata key {e}") from None


def _float_field(reader, key: str, default: float | None = None) -> float:
    """Metadata ``key`` as its float32 value (`_f32_value`; ``default`` when absent, else
    missing is an error); ValueError naming the key for anything but a number."""
    value = _field(reader, key, default)
    if value is None:
        raise ValueError(f"{_reader_path(reader)}: missing metadata key {key!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise ValueError(f"{_reader_path(reader)}: metadata key {key!r} must be a number, got "
                         f"{type(value).__name__} {value!r}")
    return _f32_value(value)


def metadata(reader) -> dict[str, Any]:
    """All scalar / short-array metadata (tokenizer vocab, merges and token types left out)."""
    out: dict[str, Any] = {}
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"}
    for key in reader.fields:
        if key in skip or key.startswith("GGUF."):
            continue
        out[key] = _field(reader, key)
    return out


# ---------------------------------------------------------------------- config
@_malformed_as_value_error
def config_from_gguf(reader) -> ModelConfig:
    """`ModelConfig` from GGUF metadata (``general.architecture`` + ``{arch}.*`` keys).

    Raises ValueError naming an unsupported architecture (with the supported list), a missing key,
    or an unsupported RoPE variant.
    """
    path = _reader_path(reader)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; offq reads GGUF architectures "
                         f"{sorted(SUPPORTED_GGUF_ARCHS)} (Llama 2/3/3.1/3.2, SmolLM, Mistral without "
                         "sliding window, Qwen2/Qwen2.5)")
    desc = architecture_of(SUPPORTED_GGUF_ARCHS[arch])

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: missing metadata key '{arch}.{key}'")
        return value

    def integer(key: str, value: Any) -> Any:
        """value when it is an integer (a list: each item), else ValueError naming the key: a
        float 64.5 or a string "64" used to be truncated or parsed into a size."""
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{path}: metadata key {key!r} must be an integer, got "
                                 f"{type(v).__name__} {v!r}")
        return value

    def need_int(key: str) -> Any:
        return integer(f"{arch}.{key}", need(key))

    def int_field(key: str, default: Any) -> Any:
        value = _field(reader, key)
        return default if value is None else integer(key, value)

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(need_int("embedding_length"))
    heads = int(need_int("attention.head_count"))
    if hidden <= 0 or heads <= 0:  # before head_dim is derived from them
        raise ValueError(f"{path}: {arch}.embedding_length ({hidden}) and "
                         f"{arch}.attention.head_count ({heads}) must be positive")
    kv_heads = int_field(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer KV heads (not in any supported model)
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{path}: per-layer KV head counts {kv_heads} are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(int_field(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int_field(f"{arch}.rope.dimension_count", None)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embedding ({arch}.rope.dimension_count={rope_dim} "
                         f"< head_dim={head_dim}) is not supported")
    ffn = need_int("feed_forward_length")
    if isinstance(ffn, list):
        if len(set(ffn)) != 1:
            raise ValueError(f"{path}: per-layer feed_forward_length {ffn} is not supported")
        ffn = ffn[0]

    vocab = int_field(f"{arch}.vocab_size", None)
    if vocab is None:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        if toks is not None:
            vocab = len(toks)
        elif desc.embed[1] in tensors:
            vocab = int(tensors[desc.embed[1]].shape[-1])
        else:
            raise ValueError(f"{path}: cannot determine the vocabulary size")

    rope_scaling = _rope_scaling(reader, arch, tensors, head_dim)
    # Llama's optional biases: present in the file <=> the HF config flag was set
    attention_bias = desc.name == "qwen2" or desc.gguf_name(desc.bias(0, "q_proj")) in tensors
    mlp_bias = desc.name != "qwen2" and desc.gguf_name(desc.bias(0, "gate_proj")) in tensors
    # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
    add_bos = _bool_field(reader, "tokenizer.ggml.add_bos_token",
                          _field(reader, "tokenizer.ggml.model") == "llama")

    raw = metadata(reader)
    return ModelConfig(
        architecture=SUPPORTED_GGUF_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(ffn),
        num_hidden_layers=int(need_int("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=_float_field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_float_field(reader, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(int_field(f"{arch}.context_length", 2048)),
        tie_word_embeddings=desc.lm_head[1] not in tensors,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        bos_token_id=_opt_int(int_field("tokenizer.ggml.bos_token_id", None)),
        eos_token_id=_opt_int(int_field("tokenizer.ggml.eos_token_id", None)),
        add_bos=bool(add_bos),
        raw=raw,
    )


def _f32_value(v: Any) -> float:
    """GGUF stores floats as float32: return the shortest decimal that rounds to it (1e-05, not
    9.99999974e-06), which is what the source config.json said."""
    return float(str(np.float32(v)))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _rope_scaling(reader, arch: str, tensors: dict, head_dim: int) -> dict | None:
    """RoPE scaling from ``{arch}.rope.scaling.*`` keys, or Llama 3's ``rope_freqs`` tensor."""
    path = _reader_path(reader)
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
        raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (offq supports linear and "
                         "llama3)")
    if "rope_freqs.weight" not in tensors:
        return None
    # Llama 3.1/3.2: llama.cpp stores per-frequency divisors instead of the llama3 parameters.
    # Recover the parameters by matching the known recipes exactly.
    import gguf

    t = tensors["rope_freqs.weight"]
    freqs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    orig = _field(reader, f"{arch}.rope.scaling.original_context_length", 8192) or 8192
    # The largest divisor is the factor when some wavelength exceeds the original context;
    # otherwise try the factors Llama 3.1 (8) and 3.2 (32) use.
    for factor in dict.fromkeys((float(freqs.max()), 8.0, 32.0, 16.0, 4.0)):
        for low, high in ((1.0, 4.0),):
            cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": int(orig)}
            if (len(freqs) == head_dim // 2 and
                    np.allclose(_llama3_divisors(cand, theta, head_dim), freqs, rtol=1e-5, atol=1e-6)):
                return cand
    raise ValueError(f"{path}: tensor 'rope_freqs.weight' does not match the llama3 RoPE recipe "
                     f"(max divisor {float(freqs.max())}); this RoPE variant is not supported")


def _llama3_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisor llama.cpp stores in rope_freqs for the llama3 scaling recipe."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    div = np.where(wavelen < high_wl, 1.0,
                   np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return div


# ---------------------------------------------------------------------- tensors
#: rows of a 2-D tensor dequantized per call of the gguf package (see _dequantize_by_rows)
_DEQUANT_ROWS = 8192


def _dequantize_by_rows(data: np.ndarray, qtype: Any) -> np.ndarray:
    """``gguf.quants.dequantize`` as float32: in C (:func:`offq.kernels.gguf.gguf_dequantize`,
    the same bits, no temporaries) for the types it reads, else the gguf package's, a block of
    rows at a time. Its dequantizers hold several full-size temporaries: 2.7 GB beside
    Qwen2.5-1.5B's 0.93 GB embedding matrix, the peak of quantizing that model. GGUF
    quantization blocks never span rows, so the blocks give the same numbers."""
    from ..kernels import gguf as c_gguf  # looked up per call: tests and bench_gguf_read.py
    # switch the C path off by emptying c_gguf.GGUF_TYPES

    if (int(qtype) in c_gguf.GGUF_TYPES and isinstance(data, np.ndarray) and data.ndim == 2
            and data.dtype == np.uint8):
        return c_gguf.gguf_dequantize(np.ascontiguousarray(data), int(qtype))
    import gguf

    if data.ndim < 2 or data.shape[0] <= _DEQUANT_ROWS:
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    out: np.ndarray | None = None
    for r0 in range(0, data.shape[0], _DEQUANT_ROWS):
        part = np.asarray(gguf.quants.dequantize(data[r0:r0 + _DEQUANT_ROWS], qtype),
                          dtype=np.float32)
        if out is None:
            out = np.empty((data.shape[0],) + part.shape[1:], dtype=np.float32)
        out[r0:r0 + part.shape[0]] = part
    return out


class GGUFTensorStore(TensorStore):
    """Lazy HF-named float32 view of a GGUF file's tensors (dequantized and un-permuted on access)."""

    def __init__(self, reader, config: ModelConfig) -> None:
        self._reader = reader
        self._path = Path(_reader_path(reader))
        self._config = config
        self._arch = architecture_of(config)
        self._tensors: dict[str, Any] = {}
        size = self._path.stat().st_size
        spans = []
        for t in reader.tensors:
            start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
            if start < 0 or end > size:
                raise ValueError(f"{self._path}: tensor {t.name!r} data [{start}, {end}) lies outside "
                                 f"the file ({size} bytes): truncated file?")
            spans.append((start, end, t.name))
            name = self._arch.hf_name(t.name)
            if name is None:
                if t.name != "rope_freqs.weight":
                    logger.info("%s: ignoring tensor %r (not used by the architecture)", self._path, t.name)
                continue
            if name in self._tensors:
                raise ValueError(f"{self._path}: tensor {t.name!r} appears twice")
            self._tensors[name] = t
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ValueError(f"{self._path}: tensors {n0!r} and {n1!r} overlap in the file")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        return tuple(reversed(t.shape))

    def dtype(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def gguf_name(self, name: str) -> str:
        """The llama.cpp name of HF tensor ``name``."""
        return self._tensors[name].name

    def source(self) -> str:
        return str(self._path)

    def _read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            arr = _dequantize_by_rows(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{self._path}: tensor {t.name!r} ({name}) has type "
                             f"{t.tensor_type.name}, which the gguf package cannot dequantize") from e
        except Exception as e:
            raise ValueError(f"{self._path}: tensor {t.name!r} ({name}) could not be read: {e}") from e
        arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(name))
        linear = self._arch.linear_of(name)
        if linear is not None and linear[0] in self._arch.gguf_permuted:
            heads = getattr(self._config, self._arch.gguf_permuted[linear[0]])
            arr = unpermute_qk_rows(arr, heads)
        return arr

    def close(self) -> None:
        # the tensors view the file's memory map: dropping them (and the header) unmaps it
        self._tensors = {}
        if self._reader is not None:
            self._reader.close()
        self._reader = None


# ---------------------------------------------------------------------- tokenizer
# Pre-tokenizer split patterns per llama.cpp ``tokenizer.ggml.pre`` family (standard regexes of
# those tokenizer families: GPT-2's contraction / letters / numbers / punctuation / whitespace
# split, Llama 3's with up-to-3-digit groups, Qwen2's with single digits).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt-2", "gpt2", "default", "phi-2", "jais", "poro-chat", "olmo", "stablelm2", "mpt")
_LLAMA3 = ("llama3", "llama-bpe", "llama-v3", "falcon3", "pixtral", "smaug-bpe", "dbrx")
_QWEN2 = ("qwen2", "deepseek-r1-qwen")


def _pre_tokenizer(pre: str, path: Path):
    """``tokenizers`` pre-tokenizer + whether the BPE model ignores merges for whole-word hits."""
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level]), False
    if pre in _GPT2:
        return byte_level, False
    if pre in _LLAMA3 or pre in _QWEN2:
        pattern = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT
        seq = pt.Sequence([pt.Split(Regex(pattern), behavior="isolated", invert=False),
                           pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        return seq, pre in _LLAMA3
    raise ValueError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
                     f"{sorted(_DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3 + _QWEN2)}")


@_malformed_as_value_error
def build_gguf_tokenizer(reader_or_path: Any):
    """Rebuild the tokenizer stored in a GGUF file's metadata as an offq `Tokenizer`.

    Two vocabulary kinds (``tokenizer.ggml.model``):

    * ``"gpt2"``: byte-level BPE (SmolLM, Llama 3, Qwen2). ``tokens`` (id order), ``merges``
      (priority order) and ``pre`` (the pre-tokenizer family: its split regex) define it.
    * ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, Mistral). GGUF stores pieces and
      scores but no merges. SentencePiece merges the adjacent pair whose concatenation is the
      highest-scoring piece; the equivalent ``tokenizers`` BPE therefore gets, as merges, every
      split ``(left, right)`` of every normal piece into two vocabulary pieces, ordered by the
      score of the merged piece (ties: lower ids first). Spaces become ``"▁"``, one is prepended to
      each stretch of text (the start, and after a special token; also before a leading space,
      as llama.cpp does) when ``tokenizer.ggml.add_space_prefix`` (default true), unknown
      characters fall back to ``<0xXX>`` byte pieces.

    Both: ``token_type`` CONTROL/UNKNOWN -> special tokens (matched whole, never split),
    USER_DEFINED -> added tokens; ``bos_token_id`` / ``eos_token_id``; ``add_bos_token`` (llama.cpp's
    default when absent: true for SentencePiece, false for byte-level BPE).
    """
    import gguf
    from tokenizers import AddedToken

    from .tokenizer import Tokenizer

    reader = reader_or_path if hasattr(reader_or_path, "fields") else open_reader(reader_or_path)
    path = Path(_reader_path(reader))
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    known = {0} | {int(t) for t in gguf.TokenType}  # 0: llama.cpp's UNDEFINED, read as normal
    bad = next((t for t in types if isinstance(t, (bool, np.bool_))
                or not isinstance(t, (int, np.integer)) or int(t) not in known), None)
    if bad is not None:  # an unknown type made a control token such as <s> an ordinary one
        raise ValueError(f"{path}: tokenizer.ggml.token_type holds {bad!r}, not one of the token "
                         f"types {sorted(known)}")
    types = [int(t) for t in types]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"{path}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i

    if model == "gpt2":
        backend = _byte_level_bpe(reader, path, vocab)
        adds_bos_default = False
    elif model == "llama":
        backend = _sentencepiece_bpe(reader, path, tokens, vocab, types)
        adds_bos_default = True
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported (offq rebuilds "
                         "'gpt2' byte-level BPE and 'llama' SentencePiece BPE vocabularies; for "
                         "others use the HF checkpoint directory with tokenizer.json)")

    special_types = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN))
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types) if t in special_types]
    users = [AddedToken(tokens[i], special=False, normalized=False)
             for i, t in enumerate(types) if t == int(gguf.TokenType.USER_DEFINED)]
    if specials:
        backend.add_special_tokens(specials)
    if users:
        backend.add_tokens(users)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt tokenizer has {backend.get_vocab_size(True)} ids, the "
                         f"file lists {len(tokens)} tokens")

    bos = _opt_int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = _opt_int(_field(reader, "tokenizer.ggml.eos_token_id"))
    adds_bos = _bool_field(reader, "tokenizer.ggml.add_bos_token", adds_bos_default)
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"{path}: metadata key 'tokenizer.chat_template' holds "
                         f"{type(chat_template).__name__}, not a string")
    return Tokenizer(backend, bos_id=bos, eos_id=eos, adds_bos=adds_bos and bos is not None,
                     name=str(path), chat_template=chat_template)


def _byte_level_bpe(reader, path: Path, vocab: dict[str, int]):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    merges = _field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    merge_pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: malformed merge {m!r} (expected 'left right')")
        # tokenizers panics (a BaseException) when a merge's result is not a token
        for part in (parts[0], parts[1], parts[0] + parts[1]):
            if part not in vocab:
                raise ValueError(f"{path}: merge {m!r}: {part!r} is not in the vocabulary")
        merge_pairs.append((parts[0], parts[1]))
    pre_name = _field(reader, "tokenizer.ggml.pre", "default")
    pre_tok, ignore_merges = _pre_tokenizer(pre_name, path)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=ignore_merges,
                                     fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(reader, path: Path, tokens: list[str], vocab: dict[str, int],
                       types: list[int]):
    import gguf
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{path}: SentencePiece tokenizer needs one tokenizer.ggml.scores entry "
                         "per token")
    if not all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
               and math.isfinite(x) for x in scores):  # they rank the merge rules
        raise ValueError(f"{path}: tokenizer.ggml.scores must be finite numbers")
    normal = int(gguf.TokenType.NORMAL)
    ranked = []
    max_merges = min(MAX_SENTENCEPIECE_MERGES_PER_TOKEN * len(tokens), MAX_SENTENCEPIECE_MERGES)
    too_long = 0
    for piece, pid in vocab.items():
        if types[pid] != normal or len(piece) < 2:
            continue
        if len(piece) > MAX_MERGED_PIECE:  # every cut slices the piece: quadratic in its length
            too_long += 1
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            lid, rid = vocab.get(left), vocab.get(right)
            if lid is not None and rid is not None:
                ranked.append((-float(scores[pid]), pid, lid, rid, left, right))
        if len(ranked) > max_merges:  # stop before the list outgrows memory
            raise ValueError(f"{path}: SentencePiece vocabulary implies more than {max_merges} "
                             f"merge rules (the budget: {MAX_SENTENCEPIECE_MERGES_PER_TOKEN} per "
                             f"token, {MAX_SENTENCEPIECE_MERGES} in all; real vocabularies imply "
                             f"~1.5 per token): hostile or corrupted file")
    if too_long:
        logger.warning("%s: %d SentencePiece pieces longer than %d characters get no merge rule "
                       "(they stay in the vocabulary)", path, too_long, MAX_MERGED_PIECE)
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = _bool_field(reader, "tokenizer.ggml.add_space_prefix", True)
    # As llama.cpp (and SentencePiece): one "▁" before every stretch of text, also one that starts
    # with a space (" a" -> "▁▁a") and one that follows a special token, then spaces -> "▁". A
    # Metaspace pre-tokenizer would skip the prefix where the text already starts with a space.
    prepend = [normalizers.Prepend("\u2581")] if prefix else []
    backend.normalizer = normalizers.Sequence(prepend + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


# ---------------------------------------------------------------------- checkpoint
def open_gguf(path: str | os.PathLike, *, name: str | None = None,
              validate: bool = True) -> Checkpoint:
    """Open a GGUF file as a `Checkpoint` (config, lazy tensors, tokenizer); ``validate``: check
    the tensors against the config (`check_tensors`) before the tokenizer is built, so that a
    file that is no model fails in milliseconds, not after its vocabulary (up to ~1M pieces)."""
    path = Path(path)
    reader = open_reader(path)
    try:
        config = config_from_gguf(reader)
        store = GGUFTensorStore(reader, config)
        if validate:
            check_tensors(store, config, str(path))
        tokenizer = build_gguf_tokenizer(reader)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the embedding "
                             f"only {config.vocab_size} rows")
    except BaseException:
        reader.close()
        raise
    return Checkpoint(name=name or path.name, path=path, config=config, tensors=store,
                      tokenizer=tokenizer, source_format="gguf")
