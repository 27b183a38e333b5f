"""The offq checkpoint directory: writing (atomic, per layer, resumable) and loading.

Layout of ``DIR/``::

    config.json          the source model's HF config (norms fused, embeddings untied) plus an
                         ``offq`` block: format_version, offq_version, the QuantConfig, the
                         rotations used and the online transforms the runtime must apply
    model.safetensors    packed codes (``*.qweight`` uint8), ``*.scales`` / ``*.zeros`` (float32),
                         biases, norms, rotated embeddings and lm_head (float32)
    tokenizer.json ...   the tokenizer (``Tokenizer.save``)

While quantizing, finished layers go to ``DIR/.offq-partial/`` (``layer_0000.safetensors`` ...,
``rotations.npz``, ``state.json``); ``--resume`` continues from there, and the final files are
assembled from the same bytes, so an interrupted-then-resumed run writes the same checkpoint as an
uninterrupted one. Every file is written to a temporary name and renamed (``os.replace``).

The safetensors reader here is small and strict (offsets bounds-checked, dtypes F32/F64/U8/I32
only) because the quantized tensors are not float32 and must be read raw.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import QuantConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_DIR = ".offq-partial"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "U8": np.dtype("u1"),
           "I32": np.dtype("<i4")}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


# ---------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, chunks: list[bytes] | bytes) -> None:
    """Write to ``path.tmp-<pid>`` then ``os.replace`` it onto ``path`` (fsync'd)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for chunk in ([chunks] if isinstance(chunks, bytes) else chunks):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (names sorted, little-endian, 8-byte aligned header) atomically."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored (F32, F64, U8, I32)")
        a = a.astype(dt, copy=False)
        header[name] = {"dtype": _NAMES[dt], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    atomic_write_bytes(path, [struct.pack("<Q", len(raw)), raw] + [a.tobytes() for a in arrays])


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file (memory-mapped, read-only) -> (tensors, metadata).

    Raises ValueError naming the file and the problem for anything malformed: short file, header
    size out of range, bad JSON, unknown dtype, offsets outside the data or overlapping, or a
    shape that does not match the byte count.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    data_size = size - 8 - n
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)) \
        if data_size else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        try:
            dt = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed or unsupported entry "
                             f"{info!r} (dtypes: {', '.join(_DTYPES)})") from None
        if any(s < 0 for s in shape) or not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r} offsets [{begin}, {end}) outside the data "
                             f"({data_size} bytes)")
        count = int(np.prod(shape, dtype=np.int64))
        if count * dt.itemsize != end - begin:
            raise ValueError(f"{path}: tensor {name!r} shape {list(shape)} needs "
                             f"{count * dt.itemsize} bytes, offsets give {end - begin}")
        spans.append((begin, end, name))
        out[name] = buf[begin:end].view(dt).reshape(shape)
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return out, {str(k): str(v) for k, v in metadata.items()}


# ---------------------------------------------------------------------------------- config
def offq_block(cfg: QuantConfig, model_config: Any, rotations: Mapping[str, Any]) -> dict[str, Any]:
    """The ``offq`` block of config.json."""
    from . import __version__

    return {"format_version": FORMAT_VERSION, "offq_version": __version__,
            "quant_config": cfg.to_dict(), "rotations": dict(rotations),
            "online": {"r3_head_dim": model_config.head_dim if cfg.rotates and cfg.r3 else None,
                       "r4_size": model_config.intermediate_size if cfg.rotates and cfg.r4 else None},
            "norms_fused": True}


def read_config(path: str | os.PathLike) -> tuple[Any, QuantConfig, dict[str, Any]]:
    """(ModelConfig, QuantConfig, offq block) of an offq checkpoint directory, validated."""
    from .model.config import ModelConfig

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not an offq checkpoint directory")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    block = raw.get("offq") if isinstance(raw, dict) else None
    if not isinstance(block, dict):
        raise ValueError(f"{cfg_path}: no 'offq' block; this is not an offq checkpoint "
                         "(quantize it with `offq quantize`)")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: offq format_version {version!r} is not supported "
                         f"(this offq reads version {FORMAT_VERSION})")
    qcfg = QuantConfig.from_dict(block.get("quant_config", {}))
    hf = {k: v for k, v in raw.items() if k != "offq"}
    return ModelConfig.from_hf(hf), qcfg, block


def is_offq_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose config.json carries an ``offq`` block."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        return False
    try:
        return isinstance(json.loads(cfg_path.read_text(encoding="utf-8")).get("offq"), dict)
    except (ValueError, AttributeError):
        return False


def expected_tensors(model_config: Any, cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor an offq checkpoint of this model/config holds: name -> (shape, dtype)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in model_config.tensor_shapes().items():
        is_linear = name.endswith("_proj.weight")
        if is_linear and cfg.w_bits != 16:
            base = name[: -len(".weight")]
            n, k = shape
            g = cfg.weight_group(k)
            out[base + ".qweight"] = ((n, (k + 1) // 2 if cfg.w_bits == 4 else k), "U8")
            out[base + ".scales"] = ((n, k // g), "F32")
            out[base + ".zeros"] = ((n, k // g), "F32")
        else:
            out[name] = (tuple(shape), "F32")
    out.setdefault("lm_head.weight", ((model_config.vocab_size, model_config.hidden_size), "F32"))
    return out


def check_checkpoint_tensors(tensors: Mapping[str, np.ndarray], model_config: Any,
                             cfg: QuantConfig, source: str) -> None:
    for name, (shape, dt) in expected_tensors(model_config, cfg).items():
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name!r} ({cfg.w_bits}-bit weights)")
        a = tensors[name]
        if tuple(a.shape) != shape or a.dtype != _DTYPES[dt]:
            raise ValueError(f"{source}: tensor {name!r} is {a.dtype} {list(a.shape)}, expected "
                             f"{dt} {list(shape)}")


def load_quantized(path: str | os.PathLike, *, mode: str = "real", resident: bool = True):
    """Open an offq checkpoint directory -> (Model, Tokenizer or None, QuantConfig).

    Validates the format version, the QuantConfig, and every tensor's presence, dtype and shape
    against the model config before building the runtime model (offq.runtime.build_model).
    """
    from .runtime import build_model

    path = Path(path)
    model_config, qcfg, _ = read_config(path)
    model_config = model_config.replace(tie_word_embeddings=False)
    tensors, _ = load_safetensors(path / MODEL_FILE)
    check_checkpoint_tensors(tensors, model_config, qcfg, str(path / MODEL_FILE))
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    model = build_model(model_config, qcfg, tensors, mode=mode, resident=resident, name=path.name)
    return model, tokenizer, qcfg
