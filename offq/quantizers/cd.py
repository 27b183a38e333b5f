"""Coordinate-descent re-quantization after GPTQ (OSAQ's ``+CD`` variant, a (choice)).

docs/METHODS.md, "OSAQ", ``+CD``. GPTQ visits each column once and never revisits a rounding
decision. With the grid (scales, zero-points) held fixed, these sweeps minimise GPTQ's own
objective over the codes, one column at a time, for all output rows at once:

    f(W_hat) = sum over rows of (w - w_hat)^T H (w - w_hat),   H = damped 2 X^T X / n

For column ``j``, with the residual ``r = w - w_hat`` and ``g = H r``, the best continuous value is
``w_hat_j + g_j / H_jj``; f is a parabola in ``w_hat_j``, so the nearest grid point to it (clamped
to the code range) is the best code. Each step therefore never increases f, and a sweep that
changes no code is a fixed point. ``g`` is kept up to date lazily: inside a block of columns
only the block's later entries are updated after each step; a finished block updates all of
``g`` with one matrix product (the same arithmetic as updating everything after every step).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..quant.grid import dequantize_codes, quantize_codes
from ..quant.weight import QuantizedWeight

__all__ = ["coordinate_descent", "objective"]


def damped_hessian(hessian: np.ndarray, damp: float) -> np.ndarray:
    """``H`` as GPTQ minimises it (a new float64 array): its diagonal
    (:func:`~offq.quantizers.gptq.gptq_diagonal`) plus ``damp * mean(diag)``."""
    from .gptq import gptq_diagonal  # gptq imports this module

    h = np.array(hessian, dtype=np.float64)
    diag, _ = gptq_diagonal(h)
    h[np.diag_indices_from(h)] = diag + damp * float(np.mean(diag))
    return h


def objective(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``sum_rows (w - w_hat)^T h (w - w_hat)`` in float64."""
    r = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((r @ h) * r))


def coordinate_descent(w: np.ndarray, q: QuantizedWeight, hessian: np.ndarray, *,
                       damp: float = 0.01, sweeps: int = 1, block: int = 32
                       ) -> tuple[QuantizedWeight, dict[str, Any]]:
    """Re-quantize the codes of ``q`` (the grid of ``w [N, K]``) by up to ``sweeps`` coordinate
    descent sweeps on ``H = 2 X^T X / n [K, K]`` damped like GPTQ's (``damp``: the relative
    damping GPTQ's factor used, ``HessianFactor.damp``). Returns the new weight
    (same scales and zero-points) and a report: objective before and after, codes changed."""
    w = np.array(w, dtype=np.float64)  # a copy: dead inputs are zeroed below
    n_out, k = w.shape
    if q.codes.shape != (n_out, k):
        raise ValueError(f"q: codes of shape {q.codes.shape} do not match w {w.shape}")
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian: expected shape ({k}, {k}), got {np.shape(hessian)}")
    if sweeps < 0 or block < 1:
        raise ValueError(f"sweeps >= 0 and block >= 1 expected, got {sweeps}, {block}")
    h = damped_hessian(hessian, damp)
    dead = np.diag(np.asarray(hessian)) == 0
    w[:, dead] = 0.0  # as GPTQ: a dead input's weight is zero, whatever its code
    g_size = q.group_size
    # transposed (row j = input j), so each column step reads and writes contiguous memory
    scale_t = np.ascontiguousarray(np.repeat(q.scale, g_size, axis=1).T)
    zero_t = np.ascontiguousarray(np.repeat(q.zero, g_size, axis=1).T)
    codes_t = np.ascontiguousarray(q.codes.T)
    hat_t = dequantize_codes(codes_t, scale_t, zero_t).astype(np.float64)
    grad_t = h @ (w.T - hat_t)  # g = H r per row of w, as columns (h symmetric)
    before = float(np.sum(grad_t * (w.T - hat_t)))
    diag = np.diag(h)
    changed_total = 0
    done = 0
    for _ in range(sweeps):
        changed = 0
        for j1 in range(0, k, block):
            j2 = min(j1 + block, k)
            gb = grad_t[j1:j2].copy()  # the block's entries of g, kept current
            delta = np.zeros((j2 - j1, n_out))
            block_changed = False
            for j in range(j1, j2):
                target = hat_t[j] + gb[j - j1] / diag[j]
                new = quantize_codes(target.astype(np.float32), scale_t[j], zero_t[j], q.bits)
                moved = new != codes_t[j]
                if not np.any(moved):
                    continue
                changed += int(np.count_nonzero(moved))
                block_changed = True
                new_hat = dequantize_codes(new, scale_t[j], zero_t[j]).astype(np.float64)
                d = new_hat - hat_t[j]  # w_hat_j grows by d: r_j shrinks, g -= H_j d
                codes_t[j], hat_t[j] = new, new_hat
                delta[j - j1] = d
                if j + 1 < j2:  # only the block's later columns are read again this pass
                    gb[j - j1 + 1:] -= h[j + 1:j2, j, None] * d[None, :]
            if block_changed:
                grad_t -= h[:, j1:j2] @ delta
        changed_total += changed
        done += 1
        if changed == 0:
            break
    codes = np.ascontiguousarray(codes_t.T)
    after = float(np.sum(grad_t * (w.T - hat_t)))  # g is current after every block's update
    report = {"objective_before": before, "objective_after": after,
              "relative_drop": (before - after) / before if before > 0 else 0.0,
              "codes_changed": changed_total, "sweeps": done}
    return replace(q, codes=codes), report
