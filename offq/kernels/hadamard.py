"""Fast Walsh-Hadamard transforms along the last axis (C kernel ``offq._C.fwht``).

Matrices (row vectors: ``fwht(x) == x @ hadamard_matrix(n)``):

* ``n = 2^k``: the Sylvester matrix ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, symmetric,
  in the order of ``scipy.linalg.hadamard``.
* ``n = m * 2^k`` for a tabulated order ``m`` (:data:`SUPPORTED_ORDERS`; the smallest that fits is
  used): ``H_n = H_m (x) H_{2^k}`` (Kronecker product, element index ``i = a * 2^k + b``). ``H_m``
  comes from Paley's constructions, or Williamson's for 92, 116, 156 and 172
  (``csrc/gen_hadamard_tables.py``), sign-normalised so that row 0
  and column 0 are all ones, a property every ``H_n`` here shares. ``H_n`` is orthogonal after the
  ``1/sqrt(n)`` normalisation, but symmetric only for powers of two.

Lengths ``4 * odd`` with no construction here (188, ...) are not supported: the error names the
largest power-of-two block that divides the length (e.g. ``block=256`` for 12032 = 47 x 256). NaN and Inf propagate (IEEE arithmetic); nothing is checked for them.
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
    return _C.hadamard_factor(n)


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

    Arguments are validated by the C binding (the one check). The kernel releases the GIL and
    runs rows in parallel (OpenMP, see :mod:`.threads`).
    """
    return _C.fwht(x, block, normalize, out)


def hadamard_matrix(n: int, *, normalize: bool = True, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """The ``[n, n]`` matrix ``H`` with ``fwht(x, normalize=normalize) == x @ H``.

    Built by transforming the identity (row ``i`` of ``H`` is ``fwht(e_i)``), so it is exactly the
    matrix :func:`fwht` applies. ``dtype`` is float32 or float64. Memory is ``n * n`` elements.
    Raises TypeError/ValueError naming ``n`` or ``dtype`` (an unsupported ``n`` names a block).
    """
    return _C.hadamard_matrix(n, normalize, dtype)
