"""Dense factorizations through the LAPACK of the OpenBLAS offq links (C in ``csrc/linalg.c``).

``upper_cholesky_of_inverse`` is the factor GPTQ needs: the upper ``U`` with
``(H + add I)^-1 = U.T @ U``, without forming the inverse. With ``J`` the reversal permutation,
the lower Cholesky factor of ``J (H + add I) J = L L^T`` (LAPACK ``potrf``) gives
``U = J L^-1 J`` (``trtri``): about ``2 K^3 / 3`` flops instead of the ``~7 K^3 / 3`` of an inverse
followed by a Cholesky factorization of it. OpenBLAS threads follow :func:`offq.kernels.threads`
(or ``threadpoolctl``'s ``user_api="blas"`` limits).
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["upper_cholesky_of_inverse"]


def upper_cholesky_of_inverse(h: np.ndarray, add: float = 0.0) -> np.ndarray | None:
    """The upper triangular ``u`` with ``(h + add * I)^-1 = u.T @ u``, or None.

    Args:
        h: ``[k, k]`` float64, C-contiguous, symmetric, ``1 <= k <= 46000``. Only the upper
            triangle is read (the lower one is assumed to mirror it).
        add: added to the diagonal of ``h`` (damping); a finite number ``>= 0``.

    Returns:
        A new ``[k, k]`` float64 array: upper triangular (the strictly lower part is zero) with a
        positive diagonal. None when ``h + add * I`` is not numerically positive definite: the
        Cholesky factorization breaks down, or the result has a non-finite entry or a
        non-positive diagonal entry (a caller can retry with a larger ``add``).

    Raises:
        TypeError: ``h`` is not a float64 ndarray (no silent conversion), ``add`` not a number.
        ValueError: ``h`` not 2-D, not square, empty, too large, not C-contiguous, or with NaN/Inf
        in its upper triangle; ``add`` negative or not finite. Every message names the argument.
    """
    return _C.upper_cholesky_of_inverse(h, add)
