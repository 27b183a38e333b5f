"""Fast Walsh-Hadamard transforms along the last axis (C kernel ``offq._C.fwht``).

Matrices (row vectors: ``fwht(x) == x @ hadamard_matrix(n)``):

* ``n = 2^k``: the Sylvester matrix ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, symmetric,
  in the order of ``scipy.linalg.hadamard``.
* ``n = m * 2^k`` for a tabulated order ``m`` (:data:`SUPPORTED_ORDERS`; the smallest that fits is
  used): ``H_n = H_m (x) H_{2^k}`` (Kronecker product, element index ``i = a * 2^k + b``). ``H_m``
  comes from Paley's constructions (``csrc/gen_hadamard_tables.py``), sign-normalised so that row 0
  and column 0 are all ones, a property every ``H_n`` here shares. ``H_n`` is orthogonal after the
  ``1/sqrt(n)`` normalisation, but symmetric only for powers of two.

Lengths ``4 * odd`` with no Paley construction (92, 116, 156, 172, 188, ...) are not supported:
the error names the largest power-of-two block that divides the length (e.g. ``block=256`` for
11008 = 43 x 256). NaN and Inf propagate (IEEE arithmetic); nothing is checked for them.
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["fwht", "hadamard_matrix", "hadamard_factor", "is_supported", "SUPPORTED_ORDERS"]

#: The tabulated Hadamard orders ``m`` (multiples of 4 with an odd cofactor); with powers of two,
#: every ``m * 2^k`` length is supported.
SUPPORTED_ORDERS: tuple[int, ...] = tuple(_C.hadamard_orders())


def hadamard_factor(n: int) -> int:
    """The factor ``m`` of ``n = m * 2^k`` used by :func:`fwht` (1 for powers of two, 0 if none)."""
    return int(_C.hadamard_factor(int(n)))


def is_supported(n: int) -> bool:
    """Whether :func:`fwht` has a Hadamard matrix of length ``n``."""
    return n >= 1 and hadamard_factor(n) != 0


def fwht(
    x: np.ndarray,
    *,
    block: int | None = None,
    normalize: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Walsh-Hadamard transform of each row: ``x @ H`` along the last axis.

    Args:
        x: C-contiguous float32 or float64 array of any leading shape, ``[..., n]``.
        block: if given, each contiguous block of ``block`` elements of the last axis is
            transformed independently (``x.reshape(..., n // block, block) @ H_block``); must
            divide ``n``. ``None`` transforms the whole last axis.
        normalize: multiply by ``1 / sqrt(len)`` (``len`` = ``block`` or ``n``), making the
            transform orthogonal.
        out: where to write the result (same shape and dtype as ``x``, C-contiguous). ``out=x``
            transforms in place; ``None`` allocates a new array. ``x`` is never modified otherwise.

    Returns:
        The transformed array (``out`` when given).

    Raises:
        TypeError: ``x``/``out`` is not an ndarray of float32/float64 (or dtypes differ).
        ValueError: non-contiguous ``x``/``out``, zero-length last axis, a bad ``block``, or a
            length with no Hadamard construction (the message offers a power-of-two block).

    The C kernel releases the GIL and runs rows in parallel (OpenMP, see :mod:`.threads`).
    """
    if block is None:
        b = 0
    elif isinstance(block, (bool, np.bool_)) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block: expected an int or None, got {type(block).__name__}")
    else:
        b = int(block)
        if b < 1:
            raise ValueError(f"block: expected a positive divisor of the last axis length, got {b}")
    return _C.fwht(x, b, bool(normalize), out)


def hadamard_matrix(n: int, *, normalize: bool = True, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """The ``[n, n]`` matrix ``H`` with ``fwht(x, normalize=normalize) == x @ H``.

    Built by transforming the identity (row ``i`` of ``H`` is ``fwht(e_i)``), so it is exactly the
    matrix :func:`fwht` applies. ``dtype`` is float32 or float64. Memory is ``n * n`` elements.
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n: expected a length >= 1, got {n}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    if not is_supported(n):
        # let the kernel phrase the error (it names the power-of-two block to use instead)
        _C.fwht(np.zeros((1, n), dtype=dt), 0, True, None)
    h = np.eye(n, dtype=dt)
    return _C.fwht(h, 0, bool(normalize), h)
