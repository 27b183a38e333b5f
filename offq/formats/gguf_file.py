"""The GGUF container: header, metadata and tensor infos, read with every length checked against
the file before anything is read; tensor data as views of one read-only memory map.

offq read GGUF files through the ``gguf`` package's ``GGUFReader`` until 2026-12-01. That reader
makes a NumPy memmap view for every metadata value and array element (~1 KB each) and trusts the
lengths a file declares. Opening Qwen2.5-Coder-1.5B's file (303k vocabulary and merge strings)
took ~10 s in it, and an array of 2^62 elements at the end of a 65-byte file made it build parts
until memory ran out, so offq walked the header once for bounds before handing the file over.
This module is that walk, reading the values as it goes: one pass, plain Python values, and the
strings kept as bytes until asked for (:meth:`GGUFField.contents` decodes them, as strictly as
the package did). The ``gguf`` package stays the source of the tensor types' block sizes
(``GGML_QUANT_SIZES``), of the dequantizers offq's C kernel lacks, and of the tests' reference
reading (tests/test_formats_gguf.py compares every field and tensor on the default model).

Format (version 2 or 3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor count,
uint64 metadata count; each metadata entry a string key, a uint32 value type and the value
(strings and array lengths uint64, arrays typed once for all elements); each tensor info a
string name, uint32 dimension count, uint64 dimensions (innermost first), uint32 tensor type and
a uint64 data offset, relative to the data section, which starts at the next multiple of
``general.alignment`` (default 32) after the infos.

Budgets against hostile files whose counts fit in the file: metadata values (keys and array
elements) and tensor infos each have a limit far above real models'. A tensor's data must lie
in the file, computed with Python ints (a uint64 sum could wrap). Big-endian files and versions
other than 2 and 3 are refused.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFField", "GGUFTensor", "MAX_METADATA_VALUES", "MAX_TENSORS"]

#: GGUF value types with a fixed size: their struct format and NumPy dtype (little-endian)
FIXED_TYPES = {0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "<u2"), 3: ("h", "<i2"),
               4: ("I", "<u4"), 5: ("i", "<i4"), 6: ("f", "<f4"), 7: ("?", "?"),
               10: ("Q", "<u8"), 11: ("q", "<i8"), 12: ("d", "<f8")}
UINT32, STRING, ARRAY = 4, 8, 9
MAX_ARRAY_DEPTH = 8  # arrays of arrays: no real file nests; bounds the recursion
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (dims and name extra)
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
SUPPORTED_VERSIONS = (2, 3)
#: Metadata keys plus array elements. Qwen2.5 has ~455k (151,936 tokens and token types, 151,387
#: merges), Llama 3 ~0.5M (128,256 tokens and types, ~280k merges), Llama 2 96k.
MAX_METADATA_VALUES = 2_000_000
#: Tensor infos. Llama-3.1-405B has ~1,100.
MAX_TENSORS = 65_536
MAX_TENSOR_DIMS = 4  # ggml's GGML_MAX_DIMS; llama.cpp refuses more
DEFAULT_ALIGNMENT = 32  # of the tensor data section, when general.alignment is absent
ALIGNMENT_KEY = "general.alignment"
#: tensor types whose data is viewed as their own element type, not as bytes (ggml's plain
#: types), by GGML type number: F32, F16, I8, I16, I32, I64, F64
PLAIN_TENSOR_DTYPES = {0: "<f4", 1: "<f2", 24: "i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}


@dataclass(frozen=True)
class GGUFField:
    """One metadata entry. ``value``: a Python scalar, ``bytes`` for a string, and for an array
    a NumPy array (fixed-size elements), a list of ``bytes`` (strings) or a list of
    ``(element type, value)`` pairs (arrays of arrays)."""

    name: str
    value_type: int  # GGUF value type (ARRAY for arrays)
    item_type: int | None  # arrays: the elements' type
    value: Any

    def __len__(self) -> int:
        """Elements of an array (1 for a scalar or string)."""
        return len(self.value) if self.value_type == ARRAY else 1

    def contents(self) -> Any:
        """The value as plain Python: str for strings (UTF-8, strict: a bad byte raises
        UnicodeDecodeError), lists for arrays: what ``gguf.ReaderField.contents()`` returns."""
        return _plain(self.value_type, self.item_type, self.value)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info. ``shape`` is ggml's (innermost dimension first), as the file stores it;
    ``data`` views the bytes in the memory map: plain types (F32, F16, I8..I64, F64) as their
    element type shaped ``reversed(shape)``, every other type as uint8 rows of the encoded blocks
    (``reversed(shape)[:-1] + [bytes per row]``), the layout of ``gguf.quants.dequantize``'s
    input."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray


class GGUFFile:
    """A GGUF file's metadata (``fields``, in file order) and tensor infos (``tensors``).

    Raises ValueError naming the file for anything that is not a well-formed little-endian GGUF
    of version 2 or 3 within the budgets (module docstring), and FileNotFoundError when there is
    no file. Tensor data is mapped, not read: nothing is copied until a view is used.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{self.path}: not a GGUF file (expected magic b'GGUF')")
                raise ValueError(f"{self.path}: {size} bytes is too short for a GGUF header (24)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        walk = _Walker(self.path, self._map, size)
        self.fields: dict[str, GGUFField] = walk.metadata()
        self.alignment = walk.alignment
        self.tensors: list[GGUFTensor] = walk.tensors()
        self.data_offset = walk.data_start

    def close(self) -> None:
        """Drop the file's views; the map is released once no tensor data view is alive."""
        self.fields, self.tensors = {}, []
        self._map = None


def _plain(kind: int, item: int | None, value: Any) -> Any:
    if kind == STRING:
        return value.decode("utf-8")
    if kind != ARRAY:
        return value
    if item == STRING:
        return [v.decode("utf-8") for v in value]
    if item == ARRAY:  # elements stored as (their element type, their value)
        return [_plain(ARRAY, inner, v) for inner, v in value]
    return value.tolist()


class _Walker:
    """A cursor over the file's bytes that refuses to move past its end."""

    def __init__(self, path: Path, data: mmap.mmap, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0
        self.values = 0  # metadata keys and array elements so far, against MAX_METADATA_VALUES
        self.alignment = DEFAULT_ALIGNMENT
        self.tensor_count = 0
        self.data_start = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} (at byte {self.pos} of {self.size}): truncated "
                          "or corrupted GGUF file")

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} of {n} bytes runs past the end of the file")
        self.pos += n

    def u32(self, what: str) -> int:
        self.skip(4, what)
        return struct.unpack_from("<I", self.data, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self.skip(8, what)
        return struct.unpack_from("<Q", self.data, self.pos - 8)[0]

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"{what}'s length")
        self.skip(n, what)
        return self.data[self.pos - n:self.pos]

    def name(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None

    def count_values(self, n: int, what: str) -> None:
        self.values += n
        if self.values > MAX_METADATA_VALUES:
            raise ValueError(f"{self.path}: {what}: the metadata holds more than "
                             f"{MAX_METADATA_VALUES} values (keys and array elements), the budget "
                             "offq allows")

    def metadata(self) -> dict[str, GGUFField]:
        if self.data[:4] != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (magic {self.data[:4]!r}, expected "
                             "b'GGUF')")
        self.skip(4, "magic")
        self.version(self.u32("version"))
        tensors = self.u64("tensor count")
        if tensors > self.size // MIN_TENSOR_INFO_BYTES:
            raise self.fail(f"tensor count {tensors} cannot fit in the file")
        if tensors > MAX_TENSORS:
            raise ValueError(f"{self.path}: tensor count {tensors} exceeds the budget of "
                             f"{MAX_TENSORS} tensors")
        self.tensor_count = tensors
        kvs = self.u64("metadata count")
        if kvs > self.size // MIN_KV_BYTES:
            raise self.fail(f"metadata count {kvs} cannot fit in the file")
        self.count_values(kvs, "metadata count")
        fields: dict[str, GGUFField] = {}
        for i in range(kvs):
            key = self.name(f"metadata key {i}")
            if key in fields:
                raise self.fail(f"metadata key {key!r} appears twice")
            kind = self.u32(f"metadata {key!r}'s type")
            item, value = self.value(kind, f"metadata value {i} ({key!r})", 0)
            if key == ALIGNMENT_KEY:
                if kind != UINT32:
                    raise self.fail(f"{ALIGNMENT_KEY} has value type {kind}, not uint32")
                if value == 0 or value & (value - 1):
                    raise self.fail(f"{ALIGNMENT_KEY} {value} is not a power of two")
                self.alignment = value
            fields[key] = GGUFField(key, kind, item, value)
        return fields

    def version(self, version: int) -> None:
        if version in SUPPORTED_VERSIONS:
            return
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise ValueError(f"{self.path}: big-endian GGUF file (version {swapped}); offq reads "
                             "little-endian GGUF files only")
        raise ValueError(f"{self.path}: unsupported GGUF version {version} (offq reads "
                         "little-endian GGUF versions 2 and 3)")

    def value(self, kind: int, what: str, depth: int) -> tuple[int | None, Any]:
        """``(element type or None, value)`` of a value of type ``kind`` at the cursor."""
        if kind in FIXED_TYPES:
            fmt, dtype = FIXED_TYPES[kind]
            n = np.dtype(dtype).itemsize
            self.skip(n, what)
            return None, struct.unpack_from("<" + fmt, self.data, self.pos - n)[0]
        if kind == STRING:
            return None, self.raw_string(what)
        if kind != ARRAY:
            raise self.fail(f"{what}: unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item = self.u32(f"{what}'s element type")
        count = self.u64(f"{what}'s length")
        if item in FIXED_TYPES:
            dtype = np.dtype(FIXED_TYPES[item][1])
            start = self.pos
            self.skip(count * dtype.itemsize, f"{what} ({count} elements)")
            self.count_values(count, what)
            return item, np.frombuffer(self.data, dtype, count, start).copy()
        if item not in (STRING, ARRAY):
            raise self.fail(f"{what}: unknown value type {item}")
        if count > (self.size - self.pos) // 8:  # each string or array takes >= 8 bytes
            raise self.fail(f"{what}: {count} elements cannot fit in the file")
        self.count_values(count, what)
        if item == STRING:  # the vocabulary: the hot loop of opening a file
            return item, [self.raw_string(f"{what}[{j}]") for j in range(count)]
        return item, [self.value(item, f"{what}[{j}]", depth + 1) for j in range(count)]

    def tensors(self) -> list[GGUFTensor]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # block size, bytes per block

        infos, names = [], set()
        for i in range(self.tensor_count):
            name = self.name(f"tensor {i}'s name")
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self.u32(f"tensor {name!r}'s dimension count")
            if n_dims > MAX_TENSOR_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (at most "
                                f"{MAX_TENSOR_DIMS})")
            dims = tuple(self.u64(f"tensor {name!r}'s dimension {d}") for d in range(n_dims))
            kind = self.u32(f"tensor {name!r}'s type")
            infos.append((name, dims, kind, self.u64(f"tensor {name!r}'s data offset")))
        self.data_start = -(-self.pos // self.alignment) * self.alignment
        sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
        out = []
        for name, dims, kind, offset in infos:
            if kind not in sizes:
                raise self.fail(f"tensor {name!r} has unknown type {kind}")
            block, block_bytes = sizes[kind]
            # every dimension, not only their product (0 when one is 0), must fit an array
            # shape: (0, 2^63) passed the byte check below and failed in NumPy unnamed
            elements = nonzero = 1
            for d in dims:
                elements *= d
                nonzero *= max(d, 1)
            if max(dims, default=0) >= 1 << 62 or nonzero * max(block_bytes, 1) >= 1 << 63:
                raise self.fail(f"tensor {name!r} has dimensions {list(dims)}: too large for any "
                                "file")
            if offset % self.alignment:  # llama.cpp refuses these too; the data would be shifted
                raise self.fail(f"tensor {name!r}: data offset {offset} is not a multiple of "
                                f"the alignment {self.alignment}")
            inner = dims[0] if dims else 1
            if inner % block:
                raise self.fail(f"tensor {name!r}: rows of {inner} elements are not whole blocks "
                                f"of {block} (type {GGMLQuantizationType(kind).name})")
            first = self.data_start + offset
            n_bytes = elements // block * block_bytes
            if first + n_bytes > self.size:
                raise ValueError(f"{self.path}: tensor {name!r} data [{first}, {first + n_bytes}) "
                                 f"lies outside the file ({self.size} bytes): truncated or "
                                 "corrupted GGUF file")
            np_dims = tuple(reversed(dims))
            if kind in PLAIN_TENSOR_DTYPES:
                dtype = np.dtype(PLAIN_TENSOR_DTYPES[kind])
                shape = np_dims
            else:
                dtype = np.dtype(np.uint8)
                shape = np_dims[:-1] + (inner // block * block_bytes,) if np_dims else (n_bytes,)
            data = np.frombuffer(self.data, dtype, n_bytes // dtype.itemsize, first).reshape(shape)
            out.append(GGUFTensor(name, GGMLQuantizationType(kind), dims, elements, n_bytes, first,
                                  data))
        return out
