"""safetensors files, read by memory map and written atomically, without the safetensors package.

Layout of a ``.safetensors`` file::

    [8 bytes: N, little-endian uint64][N bytes: JSON header, UTF-8, may be space padded][data]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the start of the data region, plus an optional ``"__metadata__"`` string map.

Files are untrusted. `read_header` validates, before any tensor byte is touched: the header length
(at least 2, at most `MAX_HEADER_BYTES`, inside the file), UTF-8 JSON that is an object without
duplicate keys, every entry's fields and types, a known dtype, ``prod(shape) * itemsize ==
end - begin``, every span inside the data region, and no two spans overlapping. Any violation is a
ValueError naming the file and the tensor.

Also here: `HFTensorStore` / `open_hf_dir` (HF checkpoint directories, single file or sharded via
``model.safetensors.index.json``) and `write_safetensors` / `SafetensorsWriter` (offq's own output).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .files import atomic_write_bytes, check_json_size, fsync_dir
from .registry import Checkpoint, TensorStore

logger = logging.getLogger(__name__)

#: Upper bound on the JSON header (the reference implementation uses the same 100 MB limit).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Tensors in one file, counted as the header's JSON objects before it is parsed: an entry costs
#: ~1 KB of Python objects, and the 100 MB header cap alone admits ~2M zero-size entries (2.3 GB,
#: 27 s to parse); real checkpoints hold a few thousand.
MAX_TENSORS = 100_000

#: safetensors dtype -> numpy dtype (little-endian). BF16 is read as raw uint16 and widened.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
#: dtypes `HFTensorStore` converts to float32 (model weights).
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_NP_TO_ST = {np.dtype(v).newbyteorder("<") if v.itemsize > 1 else v: k
             for k, v in DTYPES.items() if k != "BF16"}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the bf16 bits are the high half of an f32."""
    raw = np.asarray(raw, dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (NaN kept NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape, absolute byte span [begin, end) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns:
        (tensors by name with absolute byte spans, ``__metadata__`` dict, file size).

    Raises:
        ValueError: any inconsistency (see the module docstring), naming file and tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header "
                         "length missing): truncated?")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} outside [2, {MAX_HEADER_BYTES}]: "
                             "not a safetensors file or corrupted")
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file "
                             f"({size} bytes): truncated file")
        blob = f.read(n)
    # every tensor entry is a JSON object: bound their number before parsing builds them
    if blob.count(b"{") > MAX_TENSORS + 2:
        raise ValueError(f"{path}: the header holds more than {MAX_TENSORS} objects; offq reads "
                         f"at most {MAX_TENSORS} tensors a file (real checkpoints: a few thousand)")
    try:
        text = blob.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise ValueError(f"{path}: header is not valid UTF-8 JSON: {e!r}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta  # absent or null; [] or 0 is no string map
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: header entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r} (known: {sorted(DTYPES)})")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        # what NumPy can build: at most 32 axes (its limit is 64), each below 2^62 (an empty
        # tensor of shape [0, 2^70] has a consistent byte count of 0 but no array)
        if len(shape) > 32 or any(d >= 1 << 62 for d in shape):
            raise ValueError(f"{where}: shape {shape!r} has more than 32 axes or an axis of "
                             "2^62 or more")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"{where}: data_offsets must be [begin, end] integers, got {offsets!r}")
        begin, end = offsets
        if not (0 <= begin <= end):
            raise ValueError(f"{where}: data_offsets {offsets} not ordered 0 <= begin <= end")
        count = 1
        for d in shape:
            count *= d
        expected = count * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise ValueError(f"{where}: {dtype}{shape} needs {expected} bytes, data_offsets span "
                             f"{end - begin}")
        if count == 0:  # empty: NumPy still refuses non-zero axes of 2^63 bytes or more
            nonzero = DTYPES[dtype].itemsize
            for d in shape:
                nonzero *= d or 1
            if nonzero >= 1 << 63:  # ([0, 2^61] in F32: "array is too big", naming nothing)
                raise ValueError(f"{where}: shape {shape!r}: its non-zero axes hold 2^63 bytes "
                                 f"or more of {dtype}, more than NumPy can index")
        if end > data_size:
            raise ValueError(f"{where}: data [{begin}, {end}) lies outside the data region "
                             f"({data_size} bytes): truncated file or corrupted offsets")
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    spans = sorted((i.begin, i.end, i.name) for i in infos.values() if i.end > i.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data region")
    return infos, meta, size


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class SafetensorsFile:
    """One validated, memory-mapped safetensors file.

    `raw` returns read-only views in the stored dtype (BF16 as uint16 bit patterns); `float32`
    returns a fresh float32 copy (F32/F16/BF16/F64 only).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, size = read_header(self.path)
        self._mmap: mmap.mmap | None = None
        self._size = size

    def _buffer(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size != self._size:
                    raise ValueError(f"{self.path}: file changed size since its header was read")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def keys(self) -> list[str]:
        return list(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of tensor ``name`` in its stored dtype (no copy)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dt = DTYPES[info.dtype]
        count = info.nbytes // dt.itemsize
        arr = np.frombuffer(self._buffer(), dtype=dt, count=count, offset=info.begin)
        return arr.reshape(info.shape)

    def float32(self, name: str) -> np.ndarray:
        """Fresh float32 copy of a floating-point tensor (bf16 widened exactly)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if info.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {info.dtype}; model weights "
                             f"must be one of {list(FLOAT_DTYPES)}")
        raw = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_f32(raw)
        return np.array(raw, dtype=np.float32, copy=True)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a raw() view; the GC unmaps later
                pass
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_safetensors(path: str | os.PathLike, *, mmap: bool = False
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a file in its stored dtype (BF16 as uint16 bits), and the metadata.

    ``mmap=False``: fresh, writable in-memory copies. ``mmap=True``: read-only views into the
    memory-mapped file (a byte is read when it is touched; the map lives as long as any view),
    except that a tensor whose data is not aligned to its item size is copied.
    Either way the header is validated first (`read_header`).
    """
    f = SafetensorsFile(path)
    if mmap:
        # a view whose bytes do not start at a multiple of its item size (a file not written by
        # offq may pad its header to any length) is copied: kernels need aligned operands
        views = {n: f.raw(n) for n in f.keys()}
        return {n: v if v.flags.aligned else v.copy() for n, v in views.items()}, dict(f.metadata)
    with f:
        return {n: np.array(f.raw(n)) for n in f.keys()}, dict(f.metadata)


# ---------------------------------------------------------------------- HF directories
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_index(directory: Path) -> dict[str, str]:
    """Validate ``model.safetensors.index.json``: tensor name -> shard file name inside the dir."""
    index_path = directory / INDEX_NAME
    check_json_size(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=_no_duplicate_keys)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{index_path}: unreadable or invalid JSON: {e!r}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or shard != os.path.basename(shard) \
                or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise ValueError(f"{index_path}: tensor {tensor!r} maps to {shard!r}; expected a "
                             ".safetensors file name inside the checkpoint directory")
    return weight_map


class HFTensorStore(TensorStore):
    """Float32 view of the safetensors file(s) of a HF checkpoint directory.

    Single ``model.safetensors`` (read first when both are there, as transformers does), or every
    shard listed in ``model.safetensors.index.json`` (each listed tensor must be in the shard the
    index names; a tensor in two shards is an error).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.directory = directory
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        # model.safetensors first, as transformers reads a directory that has both
        if not (directory / SINGLE_NAME).is_file() and (directory / INDEX_NAME).is_file():
            weight_map = _read_index(directory)
            for shard in dict.fromkeys(weight_map.values()):
                try:
                    present = (directory / shard).is_file()
                except OSError as e:  # a name past the file system's limit, ...
                    raise ValueError(f"{directory / INDEX_NAME}: shard {shard!r}: "
                                     f"{e.strerror}") from None
                if not present:
                    raise ValueError(f"{directory / INDEX_NAME}: shard {shard!r} is missing")
                self._files[shard] = SafetensorsFile(directory / shard)
            for tensor, shard in weight_map.items():
                if tensor not in self._files[shard].tensors:
                    raise ValueError(f"{directory / shard}: tensor {tensor!r} listed in the index "
                                     "is not in this shard")
            for shard, f in self._files.items():
                for tensor in f.keys():
                    if tensor in self._where:
                        raise ValueError(f"{directory}: tensor {tensor!r} appears in two shards "
                                         f"({self._where[tensor].path.name}, {shard})")
                    if weight_map.get(tensor) != shard:
                        logger.warning("%s: tensor %r not listed in the index for this shard",
                                       f.path, tensor)
                    self._where[tensor] = f
        elif (directory / SINGLE_NAME).is_file():
            if (directory / INDEX_NAME).is_file():
                logger.warning("%s: reading %s; %s beside it is ignored (as transformers does)",
                               directory, SINGLE_NAME, INDEX_NAME)
            f = SafetensorsFile(directory / SINGLE_NAME)
            self._files[SINGLE_NAME] = f
            self._where = {t: f for t in f.keys()}
        else:
            raise FileNotFoundError(f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found "
                                    "(offq reads safetensors checkpoints; convert .bin with transformers)")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].tensors[name].shape

    def dtype(self, name: str) -> str:
        return self._where[name].tensors[name].dtype

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def source(self) -> str:
        return str(self.directory)

    def _read(self, name: str) -> np.ndarray:
        return self._where[name].float32(name)

    def raw(self, name: str) -> np.ndarray:
        """Stored-dtype view (e.g. packed uint8 codes of an offq checkpoint)."""
        return self._where[name].raw(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def open_hf_dir(directory: str | os.PathLike, *, name: str | None = None) -> Checkpoint:
    """Open a HuggingFace checkpoint directory (config.json, safetensors, tokenizer.json)."""
    from ..model.config import ModelConfig
    from .tokenizer import Tokenizer

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a HF checkpoint directory)")
    check_json_size(cfg_path)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw_cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{cfg_path}: invalid JSON: {e!r}") from e
    tokenizer = Tokenizer.from_hf_dir(directory)
    add_bos = raw_cfg.get("offq_add_bos", tokenizer.adds_bos) if isinstance(raw_cfg, dict) else None
    try:
        config = ModelConfig.from_hf(raw_cfg, add_bos=add_bos)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, the embedding "
                         f"only {config.vocab_size} rows")
    if tokenizer.bos_id is None and config.bos_token_id is not None:
        tokenizer.bos_id = config.bos_token_id
    if tokenizer.eos_id is None and config.eos_token_id is not None:
        tokenizer.eos_id = config.eos_token_id
    store = HFTensorStore(directory)
    return Checkpoint(name=name or directory.name, path=directory, config=config, tensors=store,
                      tokenizer=tokenizer, source_format="safetensors")


# ---------------------------------------------------------------------- writing
def _st_dtype(arr: np.ndarray, name: str) -> str:
    dt = arr.dtype
    key = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    if key not in _NP_TO_ST:
        raise TypeError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors "
                        f"(supported: {sorted(str(d) for d in _NP_TO_ST)})")
    return _NP_TO_ST[key]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"name: expected a non-empty tensor name, got {name!r}")


def _little_endian(arr: np.ndarray) -> np.dtype:
    return arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype


def _layout(entries: Mapping[str, dict[str, Any]], metadata: Mapping[str, str]
            ) -> tuple[list[str], bytes]:
    """The tensors' order in the file and the header (length prefix included) for ``entries``
    (name -> dtype, shape, nbytes, itemsize). Larger item sizes first, so every tensor is aligned
    to its item size with no gaps between tensors (the reference reader requires a gap-free data
    region); names break ties, so the bytes do not depend on the order tensors were given in."""
    order = sorted(entries, key=lambda n: (-entries[n]["itemsize"], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        e = entries[name]
        header[name] = {"dtype": e["dtype"], "shape": e["shape"],
                        "data_offsets": [offset, offset + e["nbytes"]]}
        offset += e["nbytes"]
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((-len(blob)) % 8)
    return order, len(blob).to_bytes(8, "little") + blob


def _write_whole(path: Path, tensors: Mapping[str, np.ndarray],
                 metadata: Mapping[str, str] | None) -> Path:
    """`write_safetensors` of a mapping: its arrays already exist, so the header comes first and
    each array's bytes go straight to the temporary file of `atomic_write_bytes`, in the file's
    order (SafetensorsWriter stages them in a spill file first, then copies it: two writes and a
    read of every byte). The same bytes as the writer's."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    entries: dict[str, dict[str, Any]] = {}
    for name, arr in tensors.items():
        _check_name(name)
        arr = np.asarray(arr)
        entries[name] = {"dtype": _st_dtype(arr, name), "shape": [int(d) for d in arr.shape],
                         "nbytes": int(arr.nbytes), "itemsize": arr.dtype.itemsize}
    order, blob = _layout(entries, meta)

    def chunks() -> Iterator[Any]:  # one converted array alive at a time
        yield blob
        for name in order:
            arr = np.asarray(tensors[name])
            data = np.ascontiguousarray(arr, dtype=_little_endian(arr))
            if data.size:  # the array's own bytes (a uint8 view, no copy)
                yield data.reshape(-1).view(np.uint8)

    atomic_write_bytes(path, chunks())
    return path


class SafetensorsWriter:
    """Incremental, atomic safetensors writer (one tensor at a time, bounded memory).

    Tensor bytes go to a temporary spill file as they are added; `close` writes the header and
    the data into a temporary file next to ``path`` and renames it over ``path``. Nothing appears
    at ``path`` unless `close` succeeds. The header is padded to a multiple of 8 bytes and tensors
    are laid out by decreasing item size, so every tensor is aligned and the data has no gaps.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._entries: dict[str, dict[str, Any]] = {}
        self._spill_path = self.path.with_name(f".{self.path.name}.data-{os.getpid()}-{id(self)}")
        self._spill = open(self._spill_path, "wb")
        self._offset = 0
        self._closed = False

    def add(self, name: str, arr: np.ndarray) -> None:
        """Append tensor ``name`` (any shape; stored little-endian)."""
        if self._closed:
            raise ValueError(f"{self.path}: writer already closed")
        _check_name(name)
        if name in self._entries:
            raise ValueError(f"tensor {name!r} added twice")
        arr = np.asarray(arr)
        st = _st_dtype(arr, name)
        data = np.ascontiguousarray(arr, dtype=_little_endian(arr))
        if data.size:  # the array's own bytes (a uint8 view, no copy: tensors reach ~1 GB)
            self._spill.write(data.reshape(-1).view(np.uint8))
        self._entries[name] = {"dtype": st, "shape": [int(d) for d in arr.shape],
                               "nbytes": data.nbytes, "spill": (self._offset, data.nbytes),
                               "itemsize": data.dtype.itemsize}
        self._offset += data.nbytes

    def close(self) -> Path:
        """Write the final file atomically; returns its path."""
        if self._closed:
            return self.path
        self._closed = True
        self._spill.close()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{id(self)}")
        try:
            order, blob = _layout(self._entries, self.metadata)
            with open(tmp, "wb") as out, open(self._spill_path, "rb") as spill:
                out.write(blob)
                for name in order:
                    start, left = self._entries[name]["spill"]
                    spill.seek(start)
                    while left > 0:
                        chunk = spill.read(min(left, 1 << 24))
                        if not chunk:
                            raise OSError(f"{self._spill_path}: spill file shorter than expected")
                        out.write(chunk)
                        left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            for p in (tmp, self._spill_path):
                if p.exists():
                    p.unlink()
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        self._spill.close()
        if self._spill_path.exists():
            self._spill_path.unlink()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (name -> array; uint8/int32/float32/float16/... ) atomically to ``path``.

    A mapping is written straight (header, then each array's bytes; each value is looked up
    twice, for the header and for the bytes, so it should hold arrays, not loaders); an iterable of
    ``(name, array)`` pairs goes through `SafetensorsWriter`, which holds one array at a time.
    Both give the same bytes."""
    if isinstance(tensors, Mapping):
        return _write_whole(Path(path), tensors, metadata)
    items = tensors
    with SafetensorsWriter(path, metadata) as w:
        for name, arr in items:
            w.add(name, arr)
    return Path(path)
