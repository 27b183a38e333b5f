"""Streaming second moments and leading eigenpairs (C kernels in ``csrc/cov.c``).

``cov_update`` is OpenBLAS ``syrk`` (the scipy-openblas32 library offq links): it adds ``x.T @ x``
to the upper triangle of the accumulator and mirrors it into the lower one, so the accumulator is
always a full symmetric matrix; a long stream of updates can skip the mirror (``mirror=False``)
and call ``cov_mirror`` once at its end (at d = 8960 and 8,192 rows an update spent 0.25-0.28 s
beyond ``ssyrk``'s ~1.5 s clearing its scratch and mirroring column by column; 0.08-0.15 s
now). Precision: a float32 accumulator with float32 ``x`` uses ``ssyrk``
in place; a float64 accumulator with float64 ``x`` uses ``dsyrk``; a float64 accumulator with
float32 ``x`` forms each call's ``x.T @ x`` with ``ssyrk`` (float32 sums over that call's rows)
and adds it in float64, so long streams of calls do not lose precision; calls of at most 256 rows
(e.g. top-1 tokens) widen the rows and use ``dsyrk``. That float32 ``d x d`` scratch is kept for
the next call when it is at most 256 MB (d <= 8192). NaN/Inf propagate.
"""
from __future__ import annotations

import numpy as np

from .. import _C

__all__ = ["cov_accumulator", "cov_mirror", "cov_update", "top_eigenpairs"]


def cov_accumulator(d: int, dtype: type = np.float64) -> np.ndarray:
    """A zeroed ``[d, d]`` accumulator for :func:`cov_update`, its pages already faulted in.

    ``np.zeros`` maps lazily zeroed pages, and their first touch then happens inside
    ``cov_update``'s threaded add of the product, in tile order across rows: at ``d = 8960`` that
    made the first call on a fresh float64 accumulator 3-6 s slower (7.9-11.0 s against 4.7 s on
    two Zen3 cores, one call of 8,192 rows) than on one filled here, sequentially, in ~0.1 s.
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d: expected a positive integer, got {d!r}")
    acc = np.empty((int(d), int(d)), dtype=dtype)
    acc.fill(0)
    return acc


def cov_update(acc: np.ndarray, x: np.ndarray, *, top1: bool = False,
               mirror: bool = True) -> np.ndarray:
    """Accumulate the (uncentred) second moment in place: ``acc += x.T @ x``.

    Args:
        acc: ``[d, d]`` float64 or float32, C-contiguous, writeable, symmetric on entry (start
            from zeros); updated in place (both triangles; only the upper one without
            ``mirror``).
        x: float32 (or float64 when ``acc`` is float64), C-contiguous. Without ``top1``,
            ``[..., d]``: every row (token) enters. With ``top1=True``, ``[batch, tokens, d]``:
            only each sequence's token of largest L-infinity norm enters (the first one on ties;
            a token containing NaN counts as the largest, so the NaN propagates).
        top1: select one token per sequence (the OffQ top-1 PCA statistic).
        mirror: copy the upper triangle into the lower one afterwards. With False the lower
            triangle is left as it was (stale): end the stream with :func:`cov_mirror`.

    Returns:
        ``acc`` (the same object).

    Raises:
        TypeError: wrong types/dtypes. ValueError: shapes (``acc`` not square, last axis of ``x``
        not ``d``, ``top1`` with ``x.ndim != 3``), non-contiguous or read-only arrays, overlap.
    """
    return _C.cov_update(acc, x, top1, mirror)


def cov_mirror(acc: np.ndarray) -> np.ndarray:
    """Copy the upper triangle of the square ``acc`` (float32 or float64, C-contiguous,
    writeable) into its lower one, in place: the end of a stream of
    ``cov_update(..., mirror=False)``. Returns ``acc``.

    Raises:
        TypeError: wrong type or dtype. ValueError: not square, not contiguous, read-only.
    """
    return _C.cov_mirror(acc)


def top_eigenpairs(
    cov: np.ndarray, k: int, *, tol: float = 1e-10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues of the symmetric ``cov`` and their eigenvectors.

    Lanczos iteration with full reorthogonalisation (C, float64), extended until every wanted Ritz
    pair has residual ``||cov v - lambda v|| <= tol * ||cov||`` (at most ``d`` steps, which is
    exact). Only the upper triangle of ``cov`` is read. The start vector is pseudo-random from
    ``seed`` (deterministic).

    Args:
        cov: ``[d, d]`` float64 or float32, C-contiguous, finite.
        k: number of eigenpairs, ``1 <= k <= d``.
        tol: relative residual tolerance, ``0 < tol < 1``.
        seed: seed of the start vector.

    Returns:
        ``(values, vectors)``: float64 ``[k]`` in descending order and float64 ``[d, k]`` whose
        column ``i`` is the unit eigenvector of ``values[i]``, signed so that its largest-magnitude
        component is positive. Within a repeated eigenvalue the vectors are an orthonormal basis of
        the eigenspace (not unique).

    Raises:
        TypeError / ValueError naming ``cov``, ``k`` or ``tol``; ValueError if ``cov`` has NaN/Inf.
    """
    return _C.top_eigenpairs(cov, k, tol, seed)
