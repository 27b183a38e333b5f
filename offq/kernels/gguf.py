"""Dequantization of GGUF block formats in C: what reading a GGUF checkpoint costs.

The gguf package's NumPy dequantizers hold several full-size temporaries and take seconds per
vocabulary-sized matrix (Qwen2.5-1.5B's Q4_K embeddings 4.1 s, its Q6_K LM head 2.0 s on two
Zen3 cores); :func:`gguf_dequantize` computes the same values, bit for bit, in one pass
(``csrc/gguf_dequant.c``; 0.10 and 0.47 s there, ``benchmarks/bench_gguf_read.py``). Types outside :data:`GGUF_TYPES` stay with the gguf package
(:func:`offq.formats.gguf._dequantize_by_rows` chooses).
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["GGUF_TYPES", "gguf_dequantize"]

#: ggml type ids the C dequantizer reads: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K
GGUF_TYPES = frozenset({2, 3, 8, 12, 14})


def gguf_dequantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """The float32 values of a quantized GGUF tensor's rows.

    Args:
        data: uint8 ``[rows, row_bytes]``, C-contiguous: each row whole blocks of ``qtype`` (the
            layout the gguf package's reader gives a quantized tensor).
        qtype: the ggml type id, one of :data:`GGUF_TYPES`.

    Returns:
        float32 ``[rows, row_bytes / block_bytes * block_values]``: the gguf package's
        ``gguf.quants.dequantize`` values, the same bits.

    Raises:
        TypeError: ``data`` not a uint8 array, ``qtype`` not an int. ValueError: an unsupported
        ``qtype``, ``data`` not 2-D or not C-contiguous, rows that are not whole blocks.
    """
    return _C.gguf_dequantize(data, qtype)
