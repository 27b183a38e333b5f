"""OSAQ: absorb weight outliers into the near-null space of the layer's input Hessian.

docs/METHODS.md, "OSAQ" (a reconstruction; the **(choice)** points are keyword arguments).
For a linear layer ``W`` [N, K] with inputs ``X``:

1. ``H = 2 X^T X`` (undamped). Eigendecompose, sort by |eigenvalue| ascending. ``N`` [m, K] = the
   eigenvectors of the m smallest, where m is the largest count whose eigenvalues sum to at most
   ``gamma`` of the total (so the energy ``dW = B N`` can move is bounded by gamma; reading the
   method's "smallest k reaching gamma" literally can admit one large eigenvalue).
2. Per row ``i``: ``s_i = softmax(|W_i| / (tau_rel * max|W_i|))`` (max-subtracted), fixed.
3. Ridge solve ``A_i b_i = -rho_i`` with ``A_i = N diag(s_i) N^T + mu1 I + mu2 v v^T``,
   ``rho_i = N (s_i * W_i)``, ``v = N 1``; this minimises
   ``sum_j s_ij (W_ij + (b_i N)_j)^2 + mu1 |b_i|^2 + mu2 (v . b_i)^2``: the largest weights shrink,
   the row sum stays (the mu2 term), and ``W X`` moves only along the Hessian's tail.
   mu1 and mu2 are relative to ``m_i = trace(N diag(s_i) N^T) / m`` (defaults 1e-2 and 1.0).
4. ``W <- W + B N``; then quantize with GPTQ or RTN as usual (zero inference cost).

Layers sharing an input (q/k/v, gate/up) share the decomposition: compute it once with
:func:`hessian_tail` and pass it to :func:`osaq_absorb`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import PreStep


@dataclass(frozen=True)
class OsaqReport:
    """What the absorption did to one weight matrix."""

    tail_dim: int  # m, rows of N
    rel_change_wx: float  # ||dW X||_F / ||W X||_F on the calibration data (through H)
    row_max_before: float  # mean over rows of max |W_i|
    row_max_after: float
    max_row_sum_change: float  # max_i |sum_j dW_ij|


def hessian_tail(hessian: np.ndarray, gamma: float = 1e-4) -> np.ndarray:
    """Rows = orthonormal eigenvectors of ``hessian`` spanning its smallest-|eigenvalue| tail that
    holds at most ``gamma`` of the total |eigenvalue| mass -> [m, K] float64 (m may be 0)."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian: expected a square matrix, got shape {h.shape}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma: expected a fraction in (0, 1), got {gamma}")
    vals, vecs = np.linalg.eigh((h + h.T) / 2)
    order = np.argsort(np.abs(vals), kind="stable")
    mass = np.cumsum(np.abs(vals[order]))
    total = mass[-1]
    m = int(np.searchsorted(mass, gamma * total, side="right")) if total > 0 else h.shape[0]
    return np.ascontiguousarray(vecs[:, order[:m]].T)


def osaq_absorb(w: np.ndarray, hessian: np.ndarray, *, gamma: float = 1e-4, tau_rel: float = 0.1,
                mu1: float = 1e-2, mu2: float = 1.0, tail: np.ndarray | None = None,
                chunk: int = 64) -> tuple[np.ndarray, OsaqReport]:
    """Return ``W + B N`` (float32) and a report. ``hessian`` = undamped ``2 X^T X`` (any
    positive multiple works: only its eigenvectors and the relative change use it)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight [out, in], got shape {w.shape}")
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian: expected shape ({w.shape[1]}, {w.shape[1]}), got {h.shape}")
    if tau_rel <= 0 or mu1 < 0 or mu2 < 0:
        raise ValueError("tau_rel must be > 0 and mu1, mu2 >= 0")
    basis = hessian_tail(h, gamma) if tail is None else np.asarray(tail, dtype=np.float64)
    m = basis.shape[0]
    w64 = w.astype(np.float64)
    dw = np.zeros_like(w64)
    if m:
        v = basis.sum(axis=1)  # N 1
        for r0 in range(0, w.shape[0], chunk):
            rows = w64[r0:r0 + chunk]
            a = np.abs(rows)
            amax = a.max(axis=1, keepdims=True)
            tau = tau_rel * np.where(amax > 0, amax, 1.0)
            logits = (a - amax) / tau
            s = np.exp(logits)
            s /= s.sum(axis=1, keepdims=True)
            ns = basis[None, :, :] * s[:, None, :]  # [c, m, K]
            A = ns @ basis.T  # [c, m, m]
            rho = ns @ rows[:, :, None]  # [c, m, 1]
            scale = np.trace(A, axis1=1, axis2=2) / m  # m_i
            A = A + (mu1 * scale)[:, None, None] * np.eye(m) \
                + (mu2 * scale)[:, None, None] * np.outer(v, v)[None]
            b = np.linalg.solve(A, -rho)[:, :, 0]  # [c, m]
            dw[r0:r0 + chunk] = b @ basis
    new = (w64 + dw).astype(np.float32)
    num = np.einsum("ij,jk,ik->", dw, h, dw)
    den = np.einsum("ij,jk,ik->", w64, h, w64)
    rel = float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
    report = OsaqReport(m, rel, float(np.abs(w).max(axis=1).mean()),
                        float(np.abs(new).max(axis=1).mean()), float(np.abs(dw.sum(axis=1)).max()))
    return new, report


@dataclass(frozen=True)
class OSAQ(PreStep):
    """OSAQ behind the pre-step interface: ``prepare`` computes the site's Hessian tail once."""

    gamma: float = 1e-4
    tau_rel: float = 0.1
    mu1: float = 1e-2
    mu2: float = 1.0

    def prepare(self, hessian: np.ndarray | None, where: str) -> tuple[np.ndarray, np.ndarray]:
        if hessian is None:
            raise ValueError(f"OSAQ {where}: needs the site's Hessian (calibration inputs)")
        return hessian, hessian_tail(hessian, self.gamma)

    def apply(self, w: np.ndarray, prepared: Any) -> tuple[np.ndarray, dict[str, Any]]:
        hessian, tail = prepared
        new, report = osaq_absorb(w, hessian, gamma=self.gamma, tau_rel=self.tau_rel,
                                  mu1=self.mu1, mu2=self.mu2, tail=tail)
        return new, dataclasses.asdict(report)
