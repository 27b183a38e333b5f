"""Bounds check of a GGUF file's metadata before the ``gguf`` package parses it.

The ``gguf`` reader trusts the lengths a file declares: an array of 2^62 elements at the end of a
65-byte file makes it build parts past the end of the file until memory runs out. This walks the
header (version 2 or 3: counts and lengths are uint64) and checks that every key, string and
array fits in the file before anything is read. It reads only lengths and skips payloads; a
string array (the vocabulary) is walked string by string: 0.04 s for SmolLM2-135M's header and
0.12 s for Qwen2.5-1.5B's (151,936 tokens and their merges), timed once on the 2-vCPU Zen 5.

Fitting in the file is not enough:

* The reader makes a numpy view per metadata value and array element (measured: ~0.7 KB per
  uint8 element, ~1.3 KB per string, 700x and 150x the file) and ~5 KB per tensor info, so their
  numbers have budgets, far above real models'.
* Each tensor's data must lie in the file, computed here with Python ints: the reader adds the
  offset as a uint64, and an offset of 2^64 - 1 wraps to one byte before the data section.
* The reader reads a file whose version looks byte-swapped as big-endian, every length swapped;
  this walk reads little-endian, so such files (and every version but 2 and 3) are refused.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

__all__ = ["check_metadata_bounds", "MAX_METADATA_VALUES", "MAX_TENSORS"]

#: GGUF value types with a fixed size in bytes (uint8 .. float64, bool).
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
UINT32, STRING, ARRAY = 4, 8, 9
MAX_ARRAY_DEPTH = 8  # arrays of arrays: no real file nests; bounds the recursion
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (dims and name extra)
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
SUPPORTED_VERSIONS = (2, 3)
#: Metadata keys plus array elements. Qwen2.5 has ~455k (151,936 tokens and token types, 151,387
#: merges), Llama 3 ~0.5M (128,256 tokens and types, ~280k merges), Llama 2 96k; at the budget
#: the reader's views take up to ~2.6 GB.
MAX_METADATA_VALUES = 2_000_000
#: Tensor infos (~5 KB of reader memory each: ~340 MB at the budget). Llama-3.1-405B has ~1,100.
MAX_TENSORS = 65_536
MAX_TENSOR_DIMS = 4  # ggml's GGML_MAX_DIMS; llama.cpp refuses more
DEFAULT_ALIGNMENT = 32  # of the tensor data section, when general.alignment is absent
ALIGNMENT_KEY = b"general.alignment"


def check_metadata_bounds(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` when a count or length in its GGUF header runs past the
    end of the file, a value or tensor type is unknown, the metadata values or tensors exceed
    their budgets, a tensor's data lies outside the file, or the file is not a little-endian GGUF
    of version 2 or 3."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: {size} bytes is too short for a GGUF header (24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Walker(path, data, size).header()


class _Walker:
    """A cursor over the file's bytes that refuses to move past its end."""

    def __init__(self, path: Path, data: mmap.mmap, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0
        self.values = 0  # metadata keys and array elements so far, against MAX_METADATA_VALUES
        self.alignment = DEFAULT_ALIGNMENT

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

    def string(self, what: str) -> None:
        self.skip(self.u64(f"{what}'s length"), what)

    def name(self, what: str) -> bytes:
        """Skip a key or tensor name; return its first 200 bytes (enough for messages)."""
        n = self.u64(f"{what}'s length")
        self.skip(n, what)
        return bytes(self.data[self.pos - n:self.pos - n + min(n, 200)])

    def count_values(self, n: int, what: str) -> None:
        self.values += n
        if self.values > MAX_METADATA_VALUES:
            raise ValueError(f"{self.path}: {what}: the metadata holds more than "
                             f"{MAX_METADATA_VALUES} values (keys and array elements), the budget "
                             "offq allows (the gguf reader takes ~1 KB of memory per value)")

    def header(self) -> None:
        self.skip(4, "magic")
        self.version(self.u32("version"))
        tensors = self.u64("tensor count")
        if tensors > self.size // MIN_TENSOR_INFO_BYTES:
            raise self.fail(f"tensor count {tensors} cannot fit in the file")
        if tensors > MAX_TENSORS:
            raise ValueError(f"{self.path}: tensor count {tensors} exceeds the budget of "
                             f"{MAX_TENSORS} tensors (the gguf reader takes ~5 KB per tensor)")
        kvs = self.u64("metadata count")
        if kvs > self.size // MIN_KV_BYTES:
            raise self.fail(f"metadata count {kvs} cannot fit in the file")
        self.count_values(kvs, "metadata count")
        for i in range(kvs):
            key = self.name(f"metadata key {i}")
            kind = self.u32(f"metadata {i}'s type")
            if key == ALIGNMENT_KEY and kind == UINT32:  # other types: the reader refuses them
                self.alignment = self.u32("general.alignment")
            else:
                self.value(kind, f"metadata value {i}", 0)
        self.tensor_data(self.tensor_infos(tensors))

    def version(self, version: int) -> None:
        """Refuse what this walk cannot read, so that no file reaches the reader unchecked."""
        if version in SUPPORTED_VERSIONS:
            return
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:  # the reader would switch to big-endian lengths
            raise ValueError(f"{self.path}: big-endian GGUF file (version {swapped}); offq reads "
                             "little-endian GGUF files only")
        raise ValueError(f"{self.path}: unsupported GGUF version {version} (offq reads "
                         "little-endian GGUF versions 2 and 3)")

    def value(self, kind: int, what: str, depth: int) -> None:
        if kind in FIXED_SIZES:
            self.skip(FIXED_SIZES[kind], what)
        elif kind == STRING:
            self.string(what)
        elif kind == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            item = self.u32(f"{what}'s element type")
            count = self.u64(f"{what}'s length")
            if item in FIXED_SIZES:
                self.skip(count * FIXED_SIZES[item], f"{what} ({count} elements)")
                self.count_values(count, what)
                return
            if count > (self.size - self.pos) // 8:  # each string or array takes >= 8 bytes
                raise self.fail(f"{what}: {count} elements cannot fit in the file")
            self.count_values(count, what)
            for j in range(count):
                self.value(item, f"{what}[{j}]", depth + 1)
        else:
            raise self.fail(f"{what}: unknown value type {kind}")

    def tensor_infos(self, count: int) -> list[tuple[str, list[int], int, int]]:
        """(name, dims, type, data offset) of each tensor info."""
        infos = []
        for i in range(count):
            name = self.name(f"tensor {i}'s name").decode("utf-8", "replace")
            n_dims = self.u32(f"tensor {name!r}'s dimension count")
            if n_dims > MAX_TENSOR_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (at most "
                                f"{MAX_TENSOR_DIMS})")
            dims = [self.u64(f"tensor {name!r}'s dimension {d}") for d in range(n_dims)]
            kind = self.u32(f"tensor {name!r}'s type")
            infos.append((name, dims, kind, self.u64(f"tensor {name!r}'s data offset")))
        return infos

    def tensor_data(self, infos: list[tuple[str, list[int], int, int]]) -> None:
        """Check that each tensor's bytes lie in the file, in Python ints (no uint64 wrap)."""
        if not infos:
            return
        from gguf import GGML_QUANT_SIZES  # each tensor type's block size and bytes per block

        sizes = {int(kind): size for kind, size in GGML_QUANT_SIZES.items()}
        if self.alignment == 0 or self.alignment & (self.alignment - 1):
            raise self.fail(f"general.alignment {self.alignment} is not a power of two")
        start = -(-self.pos // self.alignment) * self.alignment  # the data section, aligned
        for name, dims, kind, offset in infos:
            if kind not in sizes:
                raise self.fail(f"tensor {name!r} has unknown type {kind}")
            block, block_bytes = sizes[kind]
            elements = 1
            for d in dims:
                elements *= d
            first, end = start + offset, start + offset + elements * block_bytes // block
            if end > self.size:
                raise ValueError(f"{self.path}: tensor {name!r} data [{first}, {end}) lies "
                                 f"outside the file ({self.size} bytes): truncated or corrupted "
                                 "GGUF file")
