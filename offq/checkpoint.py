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

The ``.safetensors`` files are read and written by ``offq.formats.safetensors`` (the project's one
reader: the header is validated before any tensor byte is touched, see its docstring); the
quantized tensors are read raw, in their stored dtype (U8 codes, F32 scales, F64 rotations).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import QuantConfig
from .formats import safetensors as _st
from .formats.safetensors import DTYPES, write_safetensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_DIR = ".offq-partial"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
    """Write one checkpoint file atomically (``offq.formats.safetensors.write_safetensors``:
    aligned, gap-free, laid out by item size then name, so equal tensors give equal bytes)."""
    write_safetensors(path, tensors, metadata)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of one checkpoint file: read-only views into the memory-mapped file,
    in their stored dtype. Raises ValueError naming the file and the problem for anything
    malformed (``offq.formats.safetensors.read_header``)."""
    return _st.load_safetensors(path, mmap=True)


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
        if tuple(a.shape) != shape or a.dtype != DTYPES[dt]:
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
