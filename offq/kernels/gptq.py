"""GPTQ's per-column step and its lazy block update in C (``csrc/gptq.c``).

For every column of one run inside a lazy-update sub-block, :func:`gptq_columns` rounds the
column onto its grid, records its rounding error and pushes it onto the rest of the sub-block. In
NumPy that is a handful of calls per column (~18,000 columns per Qwen2.5-1.5B layer); in C it is
one call per run, split over offq's threads by output. The arithmetic is NumPy's operation for
operation (float32 grid; the error and updates in float64, or in float32 when ``wt`` is
float32: GPTQ's ``gptq_dtype``), so this step's result is unchanged bit for bit
(``tests/test_gptq_columns.py`` checks it against the NumPy step). GPTQ as a whole is too, given
the same grids; the MSE clip search that picks them (:func:`offq.kernels.mse_clip_search`) can
rank two exactly tied clip ratios differently from NumPy (docs/METHODS.md, section 2).
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["gptq_block_update", "gptq_columns"]


def gptq_columns(wt: np.ndarray, orig: np.ndarray, err: np.ndarray, s: np.ndarray,
                 codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                 column_group: np.ndarray, *, block_start: int, first: int, end: int,
                 sub_end: int, bits: int) -> None:
    """GPTQ's step for the columns ``first .. end - 1`` of the sub-block ending at ``sub_end``,
    in place.

    Args:
        wt: float64 (or float32) ``[k, n]``, the transposed weight in GPTQ's column order (row
            ``i`` is the i-th column visited) as the updates so far left it; rows ``first + 1 ..
            sub_end - 1`` are updated. Its dtype is the working precision: ``err`` and ``s``
            must have it too.
        orig: float32 ``[k, n]``, the same weight before any update (rows ``first .. end - 1``
            read, finite).
        err: ``wt``'s dtype, ``[>= sub_end - block_start, n]``, the rounding errors of the lazy block
            that starts at ``block_start``; row ``i - block_start`` is written for each column
            ``i``.
        s: ``wt``'s dtype, ``[k, k]``, the unit upper factor of the damped Hessian in the same order
            (``H = s diag(d) s.T``, :func:`offq.kernels.udu_factor`); only ``s[i, t]`` for
            ``i < t < sub_end`` is read (finite).
        codes: uint8 ``[k, n]``; row ``i`` receives column ``i``'s codes.
        scale, zero: float32 ``[n, groups]``, the grids; column ``i`` uses grid column
            ``column_group[i]`` (scale finite and > 0, zero finite there).
        column_group: int64 ``[k]``.
        block_start, first, end, sub_end: ``0 <= block_start <= first <= end <= sub_end <= k``.
        bits: 2, 3, 4 or 8.

    For each column ``i``: ``codes[i]`` = the codes of ``float32(wt[i])`` on its grid
    (``offq.quant.grid.quantize_codes``), ``e = dequantized - orig[i]`` stored in
    ``err[i - block_start]``, then ``wt[t] -= s[i, t] * e`` for ``i < t < sub_end``.

    Raises:
        TypeError: wrong types or dtypes. ValueError: shapes, non-contiguous or read-only arrays,
            indices out of order or range, a group index outside ``[0, groups)``, a factor entry
            or original weight read that is not finite, a scale that is not finite and positive,
            or outputs sharing memory with inputs.
    """
    _C.gptq_columns(wt, orig, err, s, codes, scale, zero, column_group, block_start, first, end,
                    sub_end, bits)


def gptq_block_update(wt: np.ndarray, err: np.ndarray, s: np.ndarray, *, block_start: int,
                      first: int, last: int, t0: int, t1: int) -> None:
    """GPTQ's lazy update, in place: ``wt[t0:t1] -= s[first:last, t0:t1].T @ err[first -
    block_start:last - block_start]``, as one BLAS ``dgemm`` (``sgemm`` for float32) that
    accumulates into ``wt`` (no temporary product: at K = 8960 NumPy's form allocated and swept
    110 MB per block).

    Args:
        wt: float64 or float32 ``[k, n]``, C-contiguous, writeable.
        err: ``wt``'s dtype, ``[>= last - block_start, n]``, the block's rounding errors (rows
            read: finite).
        s: ``wt``'s dtype, ``[k, k]``, the unit upper factor (entries read: finite).
        block_start, first, last, t0, t1: ``0 <= block_start <= first <= last <= t0 <= t1 <= k``.

    The sum runs in BLAS's order, so the result matches NumPy's two-step form to rounding
    (``tests/test_gptq_columns.py``), not bit for bit.

    Raises:
        TypeError: wrong types or dtypes. ValueError: shapes, non-contiguous or read-only ``wt``,
            indices out of order or range, a non-finite entry read, or ``wt`` sharing memory with
            ``err`` or ``s``.
    """
    _C.gptq_block_update(wt, err, s, block_start, first, last, t0, t1)
