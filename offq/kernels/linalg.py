"""Dense factorizations through the LAPACK of the OpenBLAS offq links (C in ``csrc/linalg.c``).

``upper_cholesky_of_inverse`` is the factor GPTQ needs: the upper ``U`` with
``(H + add I)^-1 = U.T @ U``, without forming the inverse. With ``J`` the reversal permutation,
the lower Cholesky factor of ``J (H + add I) J = L L^T`` (LAPACK ``potrf``) gives
``U = J L^-1 J`` (``trtri``): about ``2 K^3 / 3`` flops instead of the ``~7 K^3 / 3`` of an inverse
followed by a Cholesky factorization of it. ``udu_factor`` is what GPTQ uses since: the same
``potrf`` without the ``trtri`` (``K^3 / 3`` flops), as ``H + add I = S diag(d) S.T`` with ``S``
unit upper triangular. ``smallest_eigenpairs`` serves OSAQ's Hessian tail:
a few of the smallest eigenpairs (a tridiagonal reduction, then only the wanted pairs, as LAPACK
``dsyevr`` does for an index range) instead of all of them, 2.4-2.8x less time than
``numpy.linalg.eigh`` on SmolLM2's 1536-wide Hessians; ``tail_eigenpairs`` finds how many of them
fit an eigenvalue budget from the same reduction. OpenBLAS threads follow
:func:`offq.kernels.threads` (or ``threadpoolctl``'s ``user_api="blas"`` limits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _C

__all__ = ["TailFactor", "smallest_eigenpairs", "tail_eigenpairs", "tail_subspace",
           "udu_factor", "upper_cholesky_of_inverse"]


@dataclass(frozen=True, eq=False)
class TailFactor:
    """The float32 Cholesky factor :func:`tail_subspace` iterated with: ``u`` ``[k, k]`` upper
    triangular (zeros below) with ``u.T @ u = h / scale + shift * I``."""

    u: np.ndarray
    scale: float
    shift: float

    def energies(self, w: np.ndarray) -> np.ndarray:
        """``w_i h w_i^T`` for each row of ``w`` ``[n, k]`` (float32, C-contiguous) -> float64
        ``[n]``, as ``scale * (|u w_i|^2 - shift |w_i|^2)``: a triangular product (BLAS
        ``strmm``), half the flops of ``w @ h``. Relative error: ~1e-7, times the ratio of
        ``h``'s largest eigenvalue to ``w``'s Rayleigh quotient for the factor's own rounding."""
        return _C.factor_energies(self.u, self.scale, self.shift, w)


def upper_cholesky_of_inverse(h: np.ndarray, add: float = 0.0, *, perm: np.ndarray | None = None,
                              diag: np.ndarray | None = None) -> np.ndarray | None:
    """The upper triangular ``u`` with ``(M + add * I)^-1 = u.T @ u``, or None, where
    ``M = h[perm][:, perm]`` with its diagonal replaced by ``diag[perm]`` (each optional).

    Args:
        h: ``[k, k]`` float64, C-contiguous, symmetric, ``1 <= k <= 46000``. Without ``perm`` only
            the upper triangle is read (the lower one is assumed to mirror it); with ``perm``, rows
            of ``h`` are gathered and both triangles are read, so ``h`` must be symmetric in full.
        add: added to the diagonal (damping); a finite number ``>= 0``.
        perm: None (the identity) or an int64 ``[k]`` permutation of ``0..k-1``. The permuted
            matrix is never formed (GPTQ's act-order at K = 8960 saved a 640 MB copy).
        diag: None (``h``'s own diagonal, read) or a finite float64 ``[k]`` in ``h``'s order
            that replaces it (``h``'s diagonal is then not read).

    Returns:
        A new ``[k, k]`` float64 array: upper triangular (the strictly lower part is zero) with a
        positive diagonal. None when ``M + add * I`` is not numerically positive definite: the
        Cholesky factorization breaks down, or the result has a non-finite entry or a
        non-positive diagonal entry (a caller can retry with a larger ``add``).

    Raises:
        TypeError: ``h`` (or ``diag``) not a float64 ndarray, ``perm`` not an int64 one (no silent
        conversion), ``add`` not a number.
        ValueError: ``h`` not 2-D, not square, empty, too large, not C-contiguous, or with NaN/Inf
        among the entries read; ``add`` negative or not finite; ``perm`` of the wrong length or not
        a permutation; ``diag`` of the wrong length or not finite. Every message names the
        argument.
    """
    return _C.upper_cholesky_of_inverse(h, add, perm, diag)


def udu_factor(h: np.ndarray, add: float = 0.0, *, perm: np.ndarray | None = None,
               diag: np.ndarray | None = None,
               single: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """The UDU^T factorization ``M + add * I = s @ np.diag(d) @ s.T``, or None, where ``M`` is
    ``h`` permuted and with its diagonal replaced as for :func:`upper_cholesky_of_inverse`.

    One LAPACK ``potrf`` of the reversed matrix (``J M J = L L^T`` gives the upper ``R = J L J``
    with ``M = R R^T``; ``s`` is ``R`` with each column divided by its diagonal entry, ``d`` those
    entries squared): half the flops of :func:`upper_cholesky_of_inverse`, whose factor is
    ``R^-1`` with ``(M + add I)^-1 = R^-T R^-1``. GPTQ uses ``s`` (offq/quantizers/gptq.py).

    Args: as for :func:`upper_cholesky_of_inverse` (``h`` float64 ``[k, k]``, ``add``, ``perm``,
        ``diag``), and ``single``: the whole factorization in float32 (LAPACK ``spotrf``, about
        twice ``dpotrf``'s rate: 1.0 against 2.0 s at k = 8960 on two Zen5 cores), from
        ``M + add * I`` rounded to float32; ``s`` is then float32 (half the memory), ``d``
        float64 (squares of float32 entries, exact). Its relative error is float32's times the
        condition number; a matrix float32 cannot factor (or whose entries overflow float32)
        gives None, like a matrix that is not positive definite, so a caller can retry in
        float64.

    Returns:
        ``(s, d)``: ``s`` a new float64 (float32 with ``single``) ``[k, k]`` unit upper triangular
        array (the diagonal exactly 1, the strictly lower part exactly 0), ``d`` float64 ``[k]``,
        positive. None when ``M + add * I`` is not numerically positive definite (as for
        :func:`upper_cholesky_of_inverse`).

    Raises:
        TypeError, ValueError: as for :func:`upper_cholesky_of_inverse`; every message names the
        argument.
    """
    return _C.udu_factor(h, add, perm, diag, single)


def smallest_eigenpairs(h: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` algebraically smallest eigenpairs of the symmetric ``h``.

    Args:
        h: ``[k, k]`` float64, C-contiguous, ``1 <= k <= 46000``; only the upper triangle is read
            (the lower one is assumed to mirror it).
        count: how many, ``1 <= count <= k``.

    Returns:
        ``(values, vectors)``: float64 ``[count]`` ascending, and float64 ``[count, k]`` whose
        rows are the matching orthonormal eigenvectors (``h @ vectors[i] = values[i] *
        vectors[i]`` to LAPACK's accuracy; each vector's sign is LAPACK's).

    Raises:
        TypeError: ``h`` not a float64 ndarray (no silent conversion), ``count`` not an integer.
        ValueError: ``h`` not 2-D, not square, empty, too large, not C-contiguous, or with NaN/Inf
            in its upper triangle; ``count`` out of range. Every message names the argument.
        RuntimeError: LAPACK's solver failed to converge.
    """
    return _C.smallest_eigenpairs(h, count)


def tail_eigenpairs(h: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The longest run of smallest eigenpairs of the symmetric ``h`` whose eigenvalues' magnitudes
    sum to at most ``budget`` (OSAQ's Hessian tail, :func:`offq.quantizers.osaq.hessian_tail`).

    One tridiagonal reduction of ``h`` gives every eigenvalue (O(k^2) once reduced), so the count
    ``m`` is known before any eigenvector is formed; then only those ``m`` vectors are computed.
    Eigenvalues count in ascending (algebraic) order, so for a positive semidefinite ``h`` they
    are the smallest in magnitude (rounding may leave a few at about ``-1e-16`` of the largest).

    Args:
        h: as for :func:`smallest_eigenpairs` (float64 ``[k, k]``, upper triangle read).
        budget: a finite number ``>= 0``.

    Returns:
        ``(values, vectors)``: float64 ``[m]`` ascending and ``[m, k]`` (orthonormal rows), with
        ``0 <= m <= k``; the same pairs as ``smallest_eigenpairs(h, m)``.

    Raises:
        TypeError: ``h`` not a float64 ndarray, ``budget`` not a number.
        ValueError: as for :func:`smallest_eigenpairs`; ``budget`` negative or not finite.
        RuntimeError: LAPACK's solver failed to converge.
    """
    return _C.tail_eigenpairs(h, budget)


def tail_subspace(h: np.ndarray, budget: float, *, block: int = 128, max_iter: int = 40,
                  seed: int = 0, keep_factor: bool = False) -> tuple:
    """An orthonormal basis of (approximately) the smallest-eigenvalue tail of the symmetric
    positive semidefinite ``h`` whose energy fits ``budget``, without a tridiagonal reduction.

    Inverse subspace iteration on a float32 Cholesky factor of ``h / c + delta I`` (``c = trace /
    k``; ``delta`` = float32's rounding unit of the largest diagonal entry of ``h / c``, grown
    tenfold while the factorization fails): ``k^3 / 3`` flops for the factor, then two triangular
    solves per step on a block of ``block`` rows that grows with the tail, until two steps in a
    row give the same count (or ``max_iter`` steps). The last step diagonalises the basis' exact
    Rayleigh matrix (float64), so whatever the convergence the returned rows ``V`` satisfy
    ``V @ h @ V.T = diag(values)`` (to rounding) and ``sum(|values|) <= budget``; ``values[i] >=``
    the ``i``-th smallest eigenvalue, so ``m`` is at most :func:`tail_eigenpairs`' count. At
    ``k = 8960`` (a down_proj of Qwen2.5-1.5B) this takes a twelfth to a quarter of
    :func:`tail_eigenpairs`' time (``benchmarks/bench_osaq_tail.py``); at ``k <= 2048`` the exact
    reduction is as fast.

    Falls back to :func:`tail_eigenpairs` (``steps == 0``) when the block would pass ``k / 2``
    (a tail too long for the method to pay), when ``h`` has no positive trace, or when ``h / c +
    delta I`` does not factor with ``delta`` up to ``1e-2``.

    Args:
        h: as for :func:`tail_eigenpairs`.
        budget: a finite number ``>= 0``.
        block: the start block's rows, ``>= 1`` (a block over ``k`` is taken as ``k``: the
            fallback).
        max_iter: at most this many steps, ``>= 1``.
        seed: fixes the start block (results are deterministic for a given thread count).
        keep_factor: also return the factor (:class:`TailFactor`, or None after a fallback), for
            :meth:`TailFactor.energies`.

    Returns:
        ``(values, vectors, steps)``: float64 ``[m]`` ascending, float64 ``[m, k]`` orthonormal
        rows, and the number of iteration steps taken; with ``keep_factor``, ``(values, vectors,
        steps, factor)``.

    Raises:
        TypeError / ValueError: as for :func:`tail_eigenpairs`; ``block``, ``max_iter`` or
            ``seed`` out of range (each message names the argument).
        RuntimeError: a LAPACK routine failed.
    """
    out = _C.tail_subspace(h, budget, block, max_iter, seed, keep_factor)
    if not keep_factor:
        return out
    values, vectors, steps, u, scale, shift = out
    return values, vectors, steps, None if u is None else TailFactor(u, scale, shift)
