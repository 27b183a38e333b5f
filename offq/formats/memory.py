"""A model handed over in memory: a HF config dict plus a mapping of HF names to arrays.

What a transformers script already holds, without saving first::

    ckpt = offq.load(model.config.to_dict(), model.state_dict(), tokenizer=tok)

Values may be anything with ``__array__`` (NumPy arrays, torch tensors on the CPU, ...), in any
float dtype. torch's bfloat16 has no NumPy equivalent, so a tensor that NumPy cannot take is
converted with its own ``.float()`` first; neither torch nor transformers is imported here.
Tensors are read lazily like the file-backed stores: each read returns a fresh float32 copy the
caller owns, so the source mapping is never modified.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .registry import Checkpoint, TensorStore, check_tensors

__all__ = ["ArrayTensorStore", "MemoryCheckpoint", "from_state_dict", "as_float32", "as_tokenizer"]

#: bytes hashed from each end of every tensor by ``MemoryCheckpoint.source_id``
SOURCE_ID_SAMPLE = 1 << 16


def _dtype_name(value: Any) -> str:
    """``"BF16"``, ``"F16"``, ``"F32"``... from a NumPy or torch dtype's name."""
    name = str(getattr(value, "dtype", "")).replace("torch.", "")
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}.get(
        name, name.upper() or "?")


def as_float32(value: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 copy of ``value`` (anything with ``__array__``; torch bfloat16 via
    its ``.float()``); a TypeError naming the tensor otherwise."""
    v = value
    if hasattr(v, "detach"):  # torch: leave autograd (a state_dict's tensors usually have)
        v = v.detach()
    if hasattr(v, "cpu"):
        v = v.cpu()
    try:
        arr = np.asarray(v)
    except (TypeError, RuntimeError, ValueError):
        if not hasattr(v, "float"):
            raise TypeError(f"tensor {name!r}: cannot read a {type(value).__name__} as an array "
                            "(expected a NumPy array or an object with __array__)") from None
        arr = np.asarray(v.float())  # bfloat16 and other dtypes NumPy lacks
    if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not numeric")
    return np.array(arr, dtype=np.float32, order="C", copy=True)


class ArrayTensorStore(TensorStore):
    """A :class:`TensorStore` over an in-memory mapping of HF names to array-likes."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"state_dict: expected a mapping of tensor names to arrays, got "
                            f"{type(tensors).__name__}")
        self._tensors = dict(tensors)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, value in self._tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"state_dict: tensor names must be strings, got {name!r}")
            shape = getattr(value, "shape", None)
            if shape is None:
                shape = np.shape(value)
            self._shapes[name] = tuple(int(s) for s in shape)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return _dtype_name(self._tensors[name])

    def _read(self, name: str) -> np.ndarray:
        return as_float32(self._tensors[name], name)

    def close(self) -> None:
        self._tensors = {}


class MemoryCheckpoint(Checkpoint):
    """A :class:`Checkpoint` without files: its identity is a hash over its tensors."""

    def source_id(self) -> str:
        """SHA-256 over every tensor's name, shape, type and the first and last 64 KiB of its
        float32 bytes: replacing weights changes it (a resumed run notices), in one pass that
        reads each tensor once."""
        h = hashlib.sha256()
        for name in self.tensors.keys():
            data = self.tensors[name].tobytes()
            h.update(f"{name}:{self.tensors.shape(name)}:{self.tensors.dtype(name)};".encode())
            h.update(data[:SOURCE_ID_SAMPLE])
            h.update(data[-SOURCE_ID_SAMPLE:])
        return h.hexdigest()


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return dict(config.to_dict())
    raise TypeError(f"config: expected a HF config dict (or an object with to_dict()), got "
                    f"{type(config).__name__}")


def as_tokenizer(tokenizer: Any) -> Any:
    """offq's Tokenizer from one, a ``tokenizers.Tokenizer``, a transformers fast tokenizer, or
    a path (a directory with tokenizer.json, or the file); None stays None."""
    from .tokenizer import Tokenizer, puts_bos_first

    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        return Tokenizer.from_hf_dir(path.parent if path.is_file() else path)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers fast tokenizer
    import tokenizers

    if not isinstance(backend, tokenizers.Tokenizer):
        raise TypeError(f"tokenizer: expected a path, a tokenizers.Tokenizer or a fast "
                        f"transformers tokenizer, got {type(tokenizer).__name__}")

    def special(attr: str) -> int | None:
        tid = getattr(tokenizer, attr, None)
        return int(tid) if isinstance(tid, int) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    # the Tokenizer drops the backend's padding/truncation (on a copy) before the BOS probe: a
    # padded probe would start with a pad token, not BOS
    name = getattr(tokenizer, "name_or_path", "") or "in-memory"
    # a transformers tokenizer's template (a str, or a dict of named ones: its "default")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    tok = Tokenizer(backend, bos_id=bos, eos_id=eos, name=name,
                    chat_template=template if isinstance(template, str) else None)
    tok.adds_bos = puts_bos_first(tok.backend, bos, tok.name)
    return tok


def from_state_dict(config: Any, state_dict: Mapping[str, Any], *, tokenizer: Any = None,
                    name: str = "in-memory", validate: bool = True) -> MemoryCheckpoint:
    """A Checkpoint over a HF config (dict or ``PretrainedConfig``) and a state dict.

    Args:
        config: the model's HF config (``model.config.to_dict()``).
        state_dict: HF tensor names -> arrays (``model.state_dict()``); tied models may carry
            their LM head tensor too (ignored when the config ties it).
        tokenizer: optional; a path, a ``tokenizers.Tokenizer`` or a fast transformers
            tokenizer (needed for text evaluation and calibration from text).
        name: the model's display name.
        validate: check every tensor the config implies (names and shapes).
    """
    from ..model.config import ModelConfig

    tok = as_tokenizer(tokenizer)
    hf = _config_dict(config)
    add_bos = tok.adds_bos if tok is not None else None
    mc = ModelConfig.from_hf(hf, add_bos=add_bos)
    if tok is not None and tok.vocab_size > mc.vocab_size:
        raise ValueError(f"tokenizer: {tok.vocab_size} tokens, the embedding only "
                         f"{mc.vocab_size} rows")
    store = ArrayTensorStore(state_dict)
    if validate:
        check_tensors(store, mc, name)
    return MemoryCheckpoint(name=name, path=Path(f"<{name}>"), config=mc, tensors=store,
                            tokenizer=tok, source_format="memory")
