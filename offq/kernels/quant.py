"""Group-wise quantization, the :class:`QTensor` container and the W4A4 matmul.

The quantization format (ONE format everywhere in offq: kernels, GPTQ, checkpoints, runtime)::

    x_hat = scale * (q - zero)        q: unsigned integer code in [0, 2**bits - 1]

per group of ``group_size`` consecutive elements of the last axis (``group_size=-1``: one group
per row). ``zero`` is an *integer-valued* zero-point stored as float32; it may lie outside
``[0, 2**bits - 1]``, which is how a group that is entirely offset (an outlier token after the
OffQ rotation) keeps its full resolution. All arithmetic is float32, round half to even::

    asymmetric:  d = (0.5 * (1 - clip)) * (max(g) - min(g)),  lo = min(g) + d,  hi = max(g) - d
                 scale = (hi - lo) / (2**bits - 1)
                 if scale == 0: scale = |hi| if hi != 0 else 1   (constant groups round-trip)
                 zero = rint(-lo / scale)
    symmetric:   scale = clip * max|g| / (2**(bits-1) - 1)  (if 0: 1),   zero = 2**(bits-1)
    both:        q = clip_to_range(rint(x / scale) + zero, 0, 2**bits - 1)

``clip < 1`` shrinks a group's range ``[min, max]`` by the factor ``clip`` about its midpoint
(``lo, hi = mid -/+ clip * (max - min) / 2``; ``clip = 1`` keeps ``min`` and ``max`` exactly), so a
group of a large common offset plus small noise (an OffQ outlier group) keeps its offset; the
symmetric grid scales ``max|g|``, i.e. shrinks about 0.

Storage: ``bits == 4`` packs two codes per byte, ``codes`` has last axis ``ceil(K / 2)``, element
``2i`` in the LOW nibble and ``2i + 1`` in the HIGH nibble; bits 2, 3 and 8 store one code per
byte. ``scale`` and ``zero`` are float32 ``[..., G]`` and ``code_sums`` int32 ``[..., G]`` (the
sum of the codes of each group, used by the zero-point correction of the matmul), ``G = K /
group_size``.

NaN/Inf policy: :func:`quantize` raises ``ValueError`` for non-finite input. Arguments are
validated once, by the C binding (dtype, shape, contiguity, byte order, ranges), or by the
:class:`QTensor` constructor for its fields; errors are ``TypeError``/``ValueError`` naming the
argument, and nothing is copied or converted silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _C

__all__ = ["QTensor", "quantize", "dequantize", "matmul_w4a4", "mse_clip_search",
           "pack_w4_decode", "pack_codes",
           "unpack_codes", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 8)


def _code_row_bytes(k: int, bits: int) -> int:
    return (k + 1) // 2 if bits == 4 else k


@dataclass(frozen=True, eq=False)
class QTensor:
    """A group-wise quantized tensor in offq's format (see the module docstring).

    Attributes:
        codes: uint8 ``[..., ceil(K/2)]`` for 4 bits (two codes per byte, even element in the low
            nibble), else uint8 ``[..., K]``.
        scale: float32 ``[..., G]``.
        zero: float32 ``[..., G]``, integer-valued zero-points.
        code_sums: int32 ``[..., G]``, sum of the codes of each group.
        shape: logical shape of the float tensor (last axis K).
        bits: 2, 3, 4 or 8.
        group_size: the actual group size (K when quantized per row); divides K.
        symmetric: whether the symmetric grid (zero = 2**(bits-1)) was used.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    code_sums: np.ndarray
    shape: tuple[int, ...]
    bits: int
    group_size: int
    symmetric: bool

    @classmethod
    def _from_kernel(cls, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                     code_sums: np.ndarray, shape: tuple[int, ...], bits: int, group_size: int,
                     symmetric: bool) -> "QTensor":
        """Private: a QTensor from arrays a kernel of ``offq._C`` just produced from validated
        arguments (consistent by construction). Skips ``__post_init__``, whose checks would
        dominate a decode-size call; never use it for user-supplied arrays."""
        qt = object.__new__(cls)
        qt.__dict__.update(codes=codes, scale=scale, zero=zero, code_sums=code_sums,
                           shape=tuple(shape), bits=bits, group_size=group_size,
                           symmetric=symmetric)
        return qt

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) < 1 or shape[-1] < 1:
            raise ValueError(f"shape: expected a non-empty last axis, got {shape}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {self.bits}")
        k = shape[-1]
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(
                f"group_size: expected a positive divisor of K={k}, got {self.group_size}")
        lead = shape[:-1]
        g = k // self.group_size
        expect = {
            "codes": (self.codes, np.uint8, lead + (_code_row_bytes(k, self.bits),)),
            "scale": (self.scale, np.float32, lead + (g,)),
            "zero": (self.zero, np.float32, lead + (g,)),
            "code_sums": (self.code_sums, np.int32, lead + (g,)),
        }
        for name, (arr, dtype, want) in expect.items():
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{name}: expected a numpy.ndarray, got {type(arr).__name__}")
            if arr.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
            if arr.shape != want:
                raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"QTensor(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
                f"{kind}, {self.nbytes} bytes)")

    @property
    def groups(self) -> int:
        """Groups per row, G = K / group_size."""
        return self.shape[-1] // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, scales, zero-points and code sums."""
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes + self.code_sums.nbytes)

    def dequantize(self) -> np.ndarray:
        """Float32 array of ``shape``: ``scale * (q - zero)`` per group."""
        return dequantize(self)

    def unpacked_codes(self) -> np.ndarray:
        """The codes one per byte, uint8 of ``shape``."""
        return _C.unpack_codes(np.ascontiguousarray(self.codes), self.bits, self.shape[-1])

    def reshape_rows(self) -> "QTensor":
        """The same tensor viewed as a matrix ``[rows, K]`` (leading axes flattened)."""
        k = self.shape[-1]
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return QTensor._from_kernel(  # views of fields this QTensor already validated
            self.codes.reshape(rows, -1), self.scale.reshape(rows, -1), self.zero.reshape(rows, -1),
            self.code_sums.reshape(rows, -1), (rows, k), self.bits, self.group_size, self.symmetric)

    @classmethod
    def from_codes(cls, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, bits: int,
                   group_size: int, symmetric: bool) -> "QTensor":
        """Build a QTensor from one-code-per-byte ``codes`` (uint8 ``[..., K]``, each < 2**bits).

        Packs the codes (two per byte for 4 bits) and computes ``code_sums``. ``scale`` and
        ``zero`` (float32 ``[..., K / group_size]``) are taken as given; ``zero`` should be
        integer-valued. ``group_size=-1`` means one group per row. Used by GPTQ.
        """
        packed, sums = _C.pack_codes(codes, bits, group_size)  # validates codes, bits, group_size
        gs = codes.shape[-1] // sums.shape[-1]
        # the constructor validates scale and zero against the packed codes
        return cls(packed, scale, zero, sums, codes.shape, int(bits), gs, bool(symmetric))


def pack_codes(codes: np.ndarray, *, bits: int, group_size: int = -1
               ) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes, int32 code sums per group) of one-code-per-byte uint8 ``codes [..., K]``:
    4-bit codes two per byte, element 2i in the low nibble; other widths one per byte."""
    return _C.pack_codes(codes, bits, group_size)


def unpack_codes(packed: np.ndarray, *, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[..., k]``, one code per byte."""
    return _C.unpack_codes(packed, bits, k)


def mse_clip_search(x: np.ndarray, *, bits: int, symmetric: bool, grid: int,
                    top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row grid of ``x`` (float32 ``[..., g]``, finite, C-contiguous) with the clip ratio
    ``1 - i / grid`` (``i`` in ``0..top``) that minimises the squared round-trip error of the row:
    every 5th ratio first, then the 8 neighbours of the best (``csrc/clip_search.c``; the search
    of :func:`offq.quant.grid.mse_clip_search`). Returns float32 ``(scale, zero)`` of shape
    ``x.shape[:-1]``. ``bits`` 2, 3, 4 or 8, ``1 <= grid <= 1000``, ``0 <= top < grid``.
    The grids are the quantizer's (an asymmetric row whose ``max - min`` overflows float32 is
    refused, as :func:`quantize` refuses it). TypeError / ValueError name the argument (NaN or
    Inf in ``x`` included)."""
    return _C.mse_clip_search(x, bits, symmetric, grid, top)


def quantize(x: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             clip: float = 1.0) -> QTensor:
    """Quantize float32 ``x [..., K]`` group-wise along the last axis (format: module docstring).

    Args:
        x: C-contiguous float32 array, any leading shape (flattened to rows), K >= 1.
        bits: 2, 3, 4 or 8.
        group_size: elements per group; must divide K; -1 = one group per row.
        symmetric: symmetric grid (zero = 2**(bits-1)) instead of min/max asymmetric.
        clip: ratio in (0, 1]: shrinks each group's [min, max] about its midpoint (asymmetric) or
            max|x| (symmetric).

    Raises:
        TypeError/ValueError naming the argument for a wrong dtype, layout, group size, bits or
        clip; ValueError("x: contains NaN or Inf ...") for non-finite input.
    """
    codes, scale, zero, sums = _C.quantize(x, bits, group_size, symmetric, clip)
    return QTensor._from_kernel(codes, scale, zero, sums, x.shape, int(bits),
                                x.shape[-1] // scale.shape[-1], bool(symmetric))


def dequantize(qt: QTensor) -> np.ndarray:
    """``scale * (q - zero)`` per group as float32 of ``qt.shape`` (exact inverse of the format)."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt: expected a QTensor, got {type(qt).__name__}")
    return _C.dequantize(qt.codes, qt.scale, qt.zero, qt.bits, qt.group_size, qt.shape[-1])


def matmul_w4a4(a: QTensor, w: QTensor, *, out: np.ndarray | None = None,
                kernel: str = "auto", w_decode: np.ndarray | None = None) -> np.ndarray:
    """``dequantize(a) @ dequantize(w).T`` from 4-bit codes, float32 ``[..., N]``.

    ``a`` is ``[..., K]`` (leading axes flattened to M rows; M = 1 is the decode case) and ``w``
    is ``[N, K]``, both 4-bit. Per block of ``min(a.group_size, w.group_size)`` elements (one
    group size must divide the other) the kernel forms the exact integer dot product of the codes
    and adds the zero-point correction ``sa*sw*(sum qa qw - zw sum qa - za sum qw + g za zw)``;
    blocks are summed in float32, so the result equals the float product up to float32
    accumulation order. ``out``: optional C-contiguous float32 ``[M, N]`` to write into.
    ``kernel``: "auto" (best SIMD variant), or "generic" / "avx2" / "vnni" to force one.
    ``w_decode``: ``w`` also in the decode layout (``pack_w4_decode(w)`` of this very ``w``: the
    binding compares a few of its chunks with ``w``'s); up to 4 rows of ``a``
    then take the faster small-M kernel that reads it (same result bit for bit; the generic
    variant ignores it).

    The binding validates the arrays, group sizes, ``out`` and ``kernel``; the checks here are on
    what it does not see: that ``a`` and ``w`` are 4-bit QTensors with matching logical shapes.
    """
    for name, q in (("a", a), ("w", w)):
        if not isinstance(q, QTensor):
            raise TypeError(f"{name}: expected a QTensor, got {type(q).__name__}")
        if q.bits != 4:
            raise ValueError(f"{name}: expected a 4-bit QTensor, got bits={q.bits}")
    if w.codes.ndim != 2:
        raise ValueError(f"w: expected a 2-D QTensor [N, K], got shape {w.shape}")
    if a.shape[-1] != w.shape[-1]:
        raise ValueError(f"w: K mismatch, a has K={a.shape[-1]} and w has K={w.shape[-1]}")
    lead = a.shape[:-1]
    a2 = a.reshape_rows() if a.codes.ndim != 2 else a
    res = _C.matmul_w4a4(a2.codes, a2.scale, a2.zero, a2.group_size, w.codes, w.scale, w.zero,
                         w.group_size, a.shape[-1], out, kernel, w_decode)
    return res.reshape(lead + (w.shape[0],)) if a.codes.ndim != 2 else res


def pack_w4_decode(w: QTensor) -> np.ndarray:
    """The 4-bit weight ``w [N, K]`` in the decode layout, uint8 ``[ceil(N / 8), K / 8, 32]``.

    Rows in groups of 8 (the last one padded with zero codes), K in chunks of 8: the 32 bytes of
    (group, chunk) hold 4 bytes per row, byte ``i`` of row ``j`` carrying element ``8c + i`` in
    its low nibble and ``8c + 4 + i`` in its high nibble. One 32-byte load thus gives 4
    consecutive inputs of 8 output columns side by side, the operand layout of the x86 small-M
    kernels (``csrc/offq.h``); K must be a multiple of 8.
    """
    if not isinstance(w, QTensor) or w.bits != 4 or w.codes.ndim != 2:
        raise TypeError("w: expected a 2-D 4-bit QTensor [N, K]")
    return _C.pack_w4_decode(w.codes, w.shape[-1])
