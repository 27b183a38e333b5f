"""The weight-only matmul (C kernel ``offq._C.matmul_wq``): float32 activations times 2-, 3-, 4-
or 8-bit weights packed in memory and dequantized on the fly, what a weight-only model
(``a_bits = 16``) runs.

The weight is offq's grid, ``w_hat[n, i] = scale[n, i // group] * (q[n, i] - zero[n, i // group])``
(asymmetric or symmetric alike: the symmetric grid is ``zero = 2**(bits-1)``). Packed layout
(:func:`pack_wq`): each row is a little-endian bit stream, code ``i`` at bits
``[bits*i, bits*(i+1))``, ``ceil(K * bits / 8)`` bytes a row. For 4 bits that is offq's nibble
layout (``QTensor.codes``: element ``2i`` in the low nibble), for 2 bits four codes a byte
(element ``4i + j`` at bits ``2j``), for 3 bits eight codes in three bytes, for 8 bits a code a
byte.

``matmul_wq(x, packed, scale, zero, bits, group) == x @ w_hat.T`` up to float32 summation order
(relative error ~1e-7 of ``|x| @ |w_hat|.T``). Its per-group sums (``x * q`` and ``x`` summed
over a group before the scale and zero-point apply) must fit float32: activations near 1e37
overflow them and give Inf or NaN even where ``x @ w_hat.T`` is finite (e.g. all-zero weights).
A few rows of ``x`` (decode) read the packed weights once (AVX-512 F + BW where the CPU has it
and ``group`` is a multiple of 64, AVX2 + FMA for multiples of 32, else the generic C kernel); many rows dequantize panels of weight rows to
float32 and use sgemm. Where a multiply-add with a subnormal operand runs at full speed (a probe
at import decides: ``_C.simd_info()["wq_subnormal_decode"]``), the SIMD decode skips the
int-to-float conversion: the masked code bits are used as the subnormal float ``q * 2^(t-149)``
and the activations pre-scaled to match, which gives the conversion's bits (rows whose largest
``|x|`` lies outside ``[2^-40, 2^100)`` convert). ``OFFQ_WQ_DECODE=convert|subnormal`` overrides
the probe.
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["WQ_BITS", "pack_wq", "unpack_wq", "matmul_wq", "wq_row_bytes"]

#: the weight widths the kernel reads
WQ_BITS = (2, 3, 4, 8)
#: byte alignment of pack_wq's result (set in the C binding): a cache line, so that the row
#: kernels' 32- and 64-byte loads of a chunk never straddle two (a 4096 x 4096 W8 decode product,
#: one Zen 4 core, AVX-512: 577 us from a 64-byte aligned array against 715 us from NumPy's usual
#: 16 mod 64, best of 30 rounds; benchmarks/bench_alignment.py)
PACKED_ALIGN = 64


def wq_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` codes at ``bits`` bits: ``ceil(k * bits / 8)``."""
    return (int(k) * int(bits) + 7) // 8


def pack_wq(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[N, ceil(K * bits / 8)]``: the packed bit stream of one-code-per-byte uint8
    ``codes [N, K]`` (each ``< 2**bits``; ValueError naming ``codes`` otherwise). ``bits``: 2, 3,
    4 or 8. Its data starts on a ``PACKED_ALIGN``-byte boundary."""
    return _C.pack_wq(codes, bits)


def unpack_wq(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_wq`: uint8 ``[N, k]``, one code per byte."""
    return _C.unpack_wq(packed, bits, k)


def matmul_wq(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
              group: int, *, out: np.ndarray | None = None, kernel: str = "auto") -> np.ndarray:
    """``x @ w_hat.T`` -> float32 ``[M, N]`` for float32 ``x [M, K]`` and the packed weight
    (``packed`` uint8 ``[N, ceil(K * bits / 8)]`` from :func:`pack_wq`, ``scale`` and ``zero``
    float32 ``[N, K / group]``, ``group`` a positive divisor of K; ``group = K`` for one group per
    row). ``out``: optional C-contiguous float32 ``[M, N]`` to write into. ``kernel``: "auto"
    (the widest variant whose chunk divides ``group``: "avx512" for multiples of 64, "avx2" for
    multiples of 32, else "generic"), "generic" (the C reference), "avx2" or "avx512" (AVX-512 F +
    BW; ValueError where the CPU lacks it; a group it cannot chunk runs the generic kernel). Every
    argument is validated by the binding (TypeError/ValueError naming it); nothing is copied
    silently."""
    return _C.matmul_wq(x, packed, scale, zero, bits, group, out, kernel)
