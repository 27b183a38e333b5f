"""GPTQ's per-column step in C (``csrc/gptq.c``): what is left of GPTQ once its block updates are
BLAS products.

For every column of one run inside a lazy-update sub-block, :func:`gptq_columns` rounds the
column onto its grid, records the scaled error and pushes it onto the rest of the sub-block. In
NumPy that is a handful of calls per column (~18,000 columns per Qwen2.5-1.5B layer); in C it is
one call per run, split over offq's threads by output. The arithmetic is NumPy's operation for
operation (float32 grid, float64 error), so this step's result is unchanged bit for bit
(``tests/test_gptq_columns.py`` checks it against the NumPy step). GPTQ as a whole is too, given
the same grids; the MSE clip search that picks them (:func:`offq.kernels.mse_clip_search`) can
rank two exactly tied clip ratios differently from NumPy (docs/METHODS.md, section 2).
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["gptq_columns"]


def gptq_columns(wt: np.ndarray, err: np.ndarray, u: np.ndarray, codes: np.ndarray,
                 scale: np.ndarray, zero: np.ndarray, column_group: np.ndarray, *,
                 block_start: int, first: int, end: int, sub_end: int, bits: int) -> None:
    """GPTQ's step for the columns ``first .. end - 1`` of the sub-block ending at ``sub_end``,
    in place.

    Args:
        wt: float64 ``[k, n]``, the transposed weight in GPTQ's column order (row ``i`` is the
            i-th column visited); rows ``first + 1 .. sub_end - 1`` are updated.
        err: float64 ``[>= sub_end - block_start, n]``, the scaled errors of the lazy block that
            starts at ``block_start``; row ``i - block_start`` is written for each column ``i``.
        u: float64 ``[k, k]``, upper Cholesky factor of the damped inverse Hessian in the same
            order (``u[i, i] > 0`` for the columns of the call).
        codes: uint8 ``[k, n]``; row ``i`` receives column ``i``'s codes.
        scale, zero: float32 ``[n, groups]``, the grids; column ``i`` uses grid column
            ``column_group[i]`` (scale finite and > 0, zero finite there).
        column_group: int64 ``[k]``.
        block_start, first, end, sub_end: ``0 <= block_start <= first <= end <= sub_end <= k``.
        bits: 2, 3, 4 or 8.

    For each column ``i``: ``codes[i]`` = the codes of ``float32(wt[i])`` on its grid
    (``offq.quant.grid.quantize_codes``), ``e = (wt[i] - dequantized) / u[i, i]`` stored in
    ``err[i - block_start]``, then ``wt[t] -= u[i, t] * e`` for ``i < t < sub_end``.

    Raises:
        TypeError: wrong types or dtypes. ValueError: shapes, non-contiguous or read-only arrays,
            indices out of order or range, a group index outside ``[0, groups)``, a pivot or
            scale that is not finite and positive, or outputs sharing memory with inputs.
    """
    _C.gptq_columns(wt, err, u, codes, scale, zero, column_group, block_start, first, end,
                    sub_end, bits)
