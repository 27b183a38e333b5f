"""OSAQ: absorb weight outliers into the near-null space of the layer's input Hessian.

docs/METHODS.md, "OSAQ" (a reconstruction; the **(choice)** points are keyword arguments).
For a linear layer ``W`` [N, K] with inputs ``X`` and ``H = 2 X^T X / n`` (undamped):

1. ``N`` [m, K] = the eigenvectors of the m smallest eigenvalues of ``H``, m the largest count
   whose eigenvalues sum to at most ``gamma`` of the trace (only those pairs are computed; from
   input width 4096 up, an orthonormal basis of their span by subspace iteration whose energy
   ``trace(N H N^T)`` fits the same budget: :func:`hessian_tail`).
2. Per row ``i``: start from ``s = softmax(|w| / (tau_rel max|w|))`` (max-subtracted) and run
   ``iters`` rounds of the ridge solve ``(N diag(s) N^T + mu1' I + mu2' v v^T) b = -N (s * w)``,
   ``v = N 1`` (mu1', mu2' = mu1, mu2 times ``trace(N diag(s) N^T) / m``), updating the weights
   between rounds as Lawson's algorithm for the minimax fit does: ``s <- s |w + b N|``,
   normalised (**choice**; it aims the direction at the row max, but on the synthetic test layer
   one round did as well, see docs/METHODS.md). A solve with ``s`` fixed from ``w`` and nothing
   else puts almost no weight on the entries that are not already outliers, so it zeroes the few
   largest entries by moving all others arbitrarily far (on SmolLM2 that made the row max 2-5x
   larger and moved ``W X`` by 25-90% on held-out tokens): step 3 is what prevents that.
3. Safeguard (the bound the method promises): along the direction ``d = b N`` the step ``t`` in
   [0, 1] is the one of a small grid that minimises ``max_j |w_j + t d_j|`` subject to
   ``t^2 d H d^T <= gamma * w H w^T`` (the row's output change on the calibration data stays
   within ``sqrt(gamma)`` relative). ``t = 0`` is a candidate, so no row's maximum ever grows and
   ``W X`` never moves beyond the bound: on a full-rank Hessian with a heavy spectrum the "tail"
   is not near-null, and without the bound the change of ``W X`` reached 25-90% on real layers.
4. ``W <- W + B N``; then quantize with GPTQ or RTN as usual (zero inference cost).

Memory: every temporary is bounded by ``max_bytes`` (default 256 MiB): the weighted Gram
matrices ``N diag(s) N^T`` of a chunk of rows come from float32 GEMMs ``S @ Z`` with
``Z[(a, b), j] = N_aj N_bj`` formed in blocks of pairs, never as a [rows, m, K] tensor, and are
kept packed (upper triangle, float32) until a few rows at a time are unpacked for the solve.

Layers sharing an input (q/k/v, gate/up) share the tail: compute it once with
:func:`hessian_tail` (``OSAQ.prepare``) and pass it to :func:`osaq_absorb`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.linalg import TailFactor, tail_eigenpairs, tail_subspace
from .base import PreStep

MAX_BYTES = 256 << 20  # bound on the solve's temporaries
STEP_GRID = np.linspace(0.0, 1.0, 17)  # candidate step sizes t of the safeguard
TAIL_SOLVERS = ("auto", "exact", "subspace")
#: "auto" takes the subspace iteration from this input width up: below it the exact reduction is
#: as fast (0.23 s both at K = 1536), at K = 8960 it is 3-6x slower (benchmarks/bench_osaq_tail.py)
SUBSPACE_MIN_ORDER = 4096


@dataclass(frozen=True)
class OsaqReport:
    """What the absorption did to one weight matrix."""

    tail_dim: int  # m, rows of N
    rel_change_wx: float  # ||dW X||_F / ||W X||_F on the calibration data (through H)
    row_max_before: float  # mean over rows of max |W_i|
    row_max_after: float
    max_row_sum_change: float  # max_i |sum_j dW_ij|
    rows_moved: float = 0.0  # fraction of rows with a nonzero step


@dataclass(frozen=True)
class HessianTail:
    """A site's Hessian and its tail basis, shared by the site's linears."""

    hessian: np.ndarray  # [K, K] float64
    basis: np.ndarray  # N [m, K], orthonormal rows
    tail_gram: np.ndarray  # N H N^T [m, m]
    #: the subspace iteration's float32 Cholesky factor of H (None from the exact reduction),
    #: which gives the rows' energies w H w^T at half a GEMM's flops
    factor: TailFactor | None = None


def hessian_tail(hessian: np.ndarray, gamma: float = 1e-4, solver: str = "auto") -> np.ndarray:
    """Rows = an orthonormal basis of ``hessian``'s smallest-eigenvalue tail holding at most
    ``gamma`` of the total eigenvalue mass -> [m, K] float64 (m may be 0; it is 0 for a Hessian
    with no positive trace).

    ``hessian`` is positive semidefinite (``2 X^T X / n``), so the mass is the trace and the
    smallest eigenvalues are the smallest in magnitude (rounding may leave a few at about
    ``-1e-16`` of the largest: they count by magnitude). ``solver``:

    - ``"exact"``: the eigenvectors themselves (:func:`offq.kernels.tail_eigenpairs`: one
      tridiagonal reduction gives every eigenvalue, which fixes m, then only m vectors);
    - ``"subspace"``: the same budget by inverse subspace iteration on a Cholesky factor
      (:func:`offq.kernels.tail_subspace`): no reduction, so 3-6x faster at K = 8960, and a basis
      whose energy ``trace(N H N^T)`` provably fits the budget; it spans the smallest
      eigenvectors to within the iteration's convergence, and m may fall a little short of the
      exact count (288 of 289 and 58 of 58 on two Qwen2.5-1.5B down_proj sites);
    - ``"auto"``: ``"subspace"`` from input width ``SUBSPACE_MIN_ORDER`` up, else ``"exact"``.
    """
    return _tail_pairs(hessian, gamma, solver)[1]


def _tail_pairs(hessian: np.ndarray, gamma: float, solver: str, keep_factor: bool = False
                ) -> tuple[np.ndarray | None, np.ndarray, TailFactor | None]:
    """:func:`hessian_tail`'s basis, with its values when they are its exact Rayleigh values
    ``diag(N H N^T)`` (the subspace kernel formed ``N H N^T`` and diagonalised it), else None,
    and (``keep_factor``) the subspace kernel's Cholesky factor, else None."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian: expected a square matrix, got shape {h.shape}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma: expected a fraction in (0, 1), got {gamma}")
    if solver not in TAIL_SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(TAIL_SOLVERS)}, got {solver!r}")
    k = h.shape[0]
    h = np.ascontiguousarray(h)  # symmetric: the kernels read the upper triangle
    total = float(np.trace(h))
    if not total > 0:
        return None, np.zeros((0, k)), None
    if solver == "subspace" or (solver == "auto" and k >= SUBSPACE_MIN_ORDER):
        values, basis, _, factor = tail_subspace(h, gamma * total, keep_factor=True)
        return values, basis, factor if keep_factor else None
    return None, tail_eigenpairs(h, gamma * total)[1], None


def prepare_tail(hessian: np.ndarray, gamma: float, solver: str = "auto") -> HessianTail:
    """:class:`HessianTail` of a site (the tail, once per site). The tail Gram ``N H N^T`` is
    ``diag(values)`` when the subspace kernel already computed it (0.45 s saved at K = 8960,
    m = 288), else one product. The subspace kernel's factor is kept for the rows' energies
    (``k^2`` float32: 320 MB at K = 8960, the size of the float32 copy of ``H`` it replaces)."""
    h = np.asarray(hessian, dtype=np.float64)
    values, basis, factor = _tail_pairs(h, gamma, solver, keep_factor=True)
    gram = np.diag(values) if values is not None else basis @ h @ basis.T
    return HessianTail(h, basis, gram, factor if len(basis) else None)


def _softmax_weights(rows: np.ndarray, tau_rel: float) -> np.ndarray:
    """``softmax(|w| / (tau_rel max|w|))`` per row, max-subtracted, in place on one float32
    buffer (half the time of float64 exp; the weights enter float32 Gram GEMMs anyway)."""
    s = np.abs(rows, dtype=np.float32)
    amax = s.max(axis=1, keepdims=True)
    inv_tau = 1.0 / (tau_rel * np.where(amax > 0, amax, 1.0))
    s -= amax
    s *= inv_tau
    np.exp(s, out=s)
    s /= s.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    return s


def _weighted_grams(s: np.ndarray, basis: np.ndarray, max_bytes: int) -> np.ndarray:
    """``N diag(s_i) N^T`` for every row of ``s`` [c, K], packed: -> [c, m (m + 1) / 2] float32,
    the upper triangle row by row (pairs ``(0, 0..m-1), (1, 1..m-1), ...``). One float32 GEMM
    per block of index pairs: ``s @ Z^T`` with ``Z[(a, b), j] = N_aj N_bj`` (each block of
    ``Z`` within ``max_bytes``).

    float32 halves the GEMM's time and the cost of forming ``Z``; packing lets one chunk hold
    many rows, so ``Z`` is formed once per chunk, one lead index at a time into one reused buffer
    (at m = 288, K = 8960 gathering its index pairs cost 30% more than the GEMM itself, which now
    runs near the float32 peak: 1.6 s for 450 rows). The Gram entries are exact to about 1e-6
    relative to the diagonal's scale, far inside the ridge term ``mu1' = mu1 * trace / m`` that
    the float64 solve adds."""
    m, k = basis.shape
    b32 = np.asarray(basis, dtype=np.float32)
    s32 = np.asarray(s, dtype=np.float32)
    out = np.empty((s.shape[0], m * (m + 1) // 2), dtype=np.float32)
    block = max(1, int(max_bytes // (4 * max(k, 1))))  # pairs per Z block
    z = np.empty((min(block, m * (m + 1) // 2), k), dtype=np.float32)
    a0 = p0 = 0
    while a0 < m:
        a1, pairs = a0, 0
        while a1 < m and (pairs == 0 or pairs + (m - a1) <= block):
            if pairs + m - a1 > z.shape[0]:  # one lead's pairs exceed the block: grow it
                z = np.empty((m - a1, k), dtype=np.float32)
            # Z's rows for lead index a1, N_a1 * N_b for b >= a1, written in place (one pass)
            np.multiply(b32[a1], b32[a1:], out=z[pairs:pairs + m - a1])
            pairs += m - a1
            a1 += 1
        np.matmul(s32, z[:pairs].T, out=out[:, p0:p0 + pairs])
        a0, p0 = a1, p0 + pairs
    return out


def _systems(packed: np.ndarray, vv: np.ndarray, mu1: float, mu2: float) -> np.ndarray:
    """The rows' systems ``G + mu1' I + mu2' v v^T`` (``mu' = mu * trace(G) / m``) from packed Gram
    matrices [c, m (m + 1) / 2] (upper triangle row by row) -> [c, m, m] float64, built one
    matrix row at a time (no [c, m, m] temporaries besides the result)."""
    m = vv.shape[0]
    lead = np.arange(m)
    diag = np.cumsum(np.concatenate([[0], np.arange(m, 1, -1)]))  # packed index of (a, a)
    scale = packed[:, diag].astype(np.float64).sum(axis=1) / m
    ridge, rank_one = mu1 * scale, mu2 * scale
    out = np.empty((packed.shape[0], m, m))
    off = 0
    for a in range(m):
        row = packed[:, off:off + m - a] + rank_one[:, None] * vv[a, a:]
        out[:, a, a:] = row
        out[:, a:, a] = row
        off += m - a
    out[:, lead, lead] += ridge[:, None]
    return out


def _solve_rows(packed: np.ndarray, rho: np.ndarray, vv: np.ndarray, mu1: float, mu2: float,
                max_bytes: int) -> np.ndarray:
    """Per row, ``(G + mu1' I + mu2' v v^T) b = -rho`` with ``G`` the row's packed Gram matrix and
    ``mu' = mu * trace(G) / m`` -> b [c, m] float64 (systems formed a few rows at a time, within
    ``max_bytes``)."""
    m = vv.shape[0]
    step = max(1, int(max_bytes // (16 * m * m)))
    b = np.empty((packed.shape[0], m))
    for r0 in range(0, packed.shape[0], step):
        a = _systems(packed[r0:r0 + step], vv, mu1, mu2)
        b[r0:r0 + step] = np.linalg.solve(a, -rho[r0:r0 + step, :, None])[:, :, 0]
    return b


def _row_chunk(n_rows: int, m: int, k: int, max_bytes: int) -> int:
    """Rows per chunk so that the packed float32 Gram matrices and the [c, K] float32 rows'
    temporaries (weights, steps, products, the step search's buffer) fit in ``max_bytes``."""
    per_row = 4 * (m * (m + 1) // 2) + 4 * 6 * k
    return int(max(1, min(n_rows, max_bytes // max(per_row, 1))))


def osaq_absorb(w: np.ndarray, hessian: np.ndarray, *, gamma: float = 1e-4, tau_rel: float = 0.03,
                mu1: float = 1e-2, mu2: float = 100.0, iters: int = 1,
                tail: np.ndarray | HessianTail | None = None,
                max_bytes: int = MAX_BYTES) -> tuple[np.ndarray, OsaqReport]:
    """Return ``W + B N`` (float32) and a report. ``hessian`` = undamped ``2 X^T X / n`` of the
    calibration inputs (the output-change bound and the report are measured through it)."""
    w = np.ascontiguousarray(w, dtype=np.float32)  # row chunks for the C energies
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight [out, in], got shape {w.shape}")
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian: expected shape ({w.shape[1]}, {w.shape[1]}), got {h.shape}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma: expected a fraction in (0, 1), got {gamma}")
    if tau_rel <= 0 or mu1 < 0 or mu2 < 0:
        raise ValueError("tau_rel must be > 0 and mu1, mu2 >= 0")
    if iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters}")
    if tail is None:
        tail = prepare_tail(h, gamma)
    elif not isinstance(tail, HessianTail):
        basis = np.asarray(tail, dtype=np.float64)
        tail = HessianTail(h, basis, basis @ h @ basis.T)
    basis, gram = tail.basis, tail.tail_gram
    m, k = basis.shape
    new = w.copy()
    moved = 0
    num = den = 0.0  # sums over rows of t^2 d H d^T and w H w^T (the report's relative change)
    row_sum_change = 0.0  # max_i |sum_j dW_ij|
    if m:
        v = basis.sum(axis=1)  # N 1
        vv = np.outer(v, v)
        # the row-sized work runs in float32 (the weights are float32 and so is the result);
        # only the m x m systems are float64. w H w^T per row from the tail's Cholesky factor
        # (a triangular product) or a float32 GEMM: both within ~1e-7 of float64
        b32 = basis.astype(np.float32)
        if tail.factor is not None:
            energies = tail.factor.energies
        else:
            h32 = h.astype(np.float32)

            def energies(rows: np.ndarray) -> np.ndarray:
                return np.sum((rows @ h32) * rows, axis=1, dtype=np.float64)
        chunk = _row_chunk(w.shape[0], m, k, max_bytes)
        for r0 in range(0, w.shape[0], chunk):
            rows = w[r0:r0 + chunk]
            cur = rows
            b = np.zeros((rows.shape[0], m))
            s = _softmax_weights(rows, tau_rel)
            for it in range(iters):
                if it:  # Lawson's update towards the minimax row: weight by the current |w'|
                    s *= np.abs(cur)
                    s /= np.maximum(s.sum(axis=1, keepdims=True, dtype=np.float64),
                                    1e-300).astype(np.float32)
                grams = _weighted_grams(s, b32, max_bytes)
                rho = ((s * rows) @ b32.T).astype(np.float64)  # N (s * w), [c, m]
                b = _solve_rows(grams, rho, vv, mu1, mu2, max_bytes)
                grams = None
                if it + 1 < iters:
                    cur = rows + b.astype(np.float32) @ b32
            d = b.astype(np.float32) @ b32
            change = np.sum((b @ gram) * b, axis=1)  # d H d^T through the m x m tail Gram
            energy = energies(rows)
            t = _safe_steps(rows, d, change, energy, gamma)
            moved += int(np.count_nonzero(t))
            num += float(np.sum(t * t * change))
            den += float(np.sum(energy))
            d *= t[:, None].astype(np.float32)
            d += rows
            new[r0:r0 + chunk] = d
            # what was applied (float32 rounding included), summed in float64
            delta = d.sum(axis=1, dtype=np.float64) - rows.sum(axis=1, dtype=np.float64)
            row_sum_change = max(row_sum_change, float(np.abs(delta).max()))
    # the relative change of W X through H, as the steps' model gives it: the float32 rounding
    # of the result adds below 1e-7 relative, and an unmoved site costs no K x K product
    rel = float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
    report = OsaqReport(m, rel, float(np.abs(w).max(axis=1).mean()),
                        float(np.abs(new).max(axis=1).mean()), row_sum_change,
                        moved / max(w.shape[0], 1))
    return new, report


def _safe_steps(rows: np.ndarray, d: np.ndarray, change: np.ndarray, energy: np.ndarray,
                gamma: float) -> np.ndarray:
    """Per row, the step ``t`` of `STEP_GRID` minimising ``max |w + t d|`` among those with
    ``t^2 change <= gamma energy`` (``change = d H d^T``, ``energy = w H w^T``; t = 0 always
    qualifies) -> [c]."""
    buf = np.empty_like(d)

    def cost(t: float) -> np.ndarray:  # max_j |w_j + t d_j| per row, in one float32 buffer
        np.multiply(d, d.dtype.type(t), out=buf)
        np.add(buf, rows, out=buf)
        np.abs(buf, out=buf)
        return buf.max(axis=1)

    best_t = np.zeros(rows.shape[0])
    best = cost(0.0)
    for t in STEP_GRID[1:]:
        ok = t * t * change <= gamma * energy
        if not ok.any():
            break  # the change grows with t
        c = cost(t)
        better = ok & (c < best)
        best_t = np.where(better, t, best_t)
        best = np.where(better, c, best)
    return best_t


@dataclass(frozen=True)
class OSAQ(PreStep):
    """OSAQ behind the pre-step interface: ``prepare`` computes the site's Hessian tail once."""

    gamma: float = 1e-4
    tau_rel: float = 0.03  # from the grid: benchmarks/bench_osaq_grid.py
    mu1: float = 1e-2
    mu2: float = 100.0
    iters: int = 1
    tail: str = "auto"  # hessian_tail's solver

    def prepare(self, hessian: np.ndarray | None, where: str) -> HessianTail:
        if hessian is None:
            raise ValueError(f"OSAQ {where}: needs the site's Hessian (calibration inputs)")
        return prepare_tail(hessian, self.gamma, self.tail)

    def apply(self, w: np.ndarray, prepared: Any) -> tuple[np.ndarray, dict[str, Any]]:
        new, report = osaq_absorb(w, prepared.hessian, gamma=self.gamma, tau_rel=self.tau_rel,
                                  mu1=self.mu1, mu2=self.mu2, iters=self.iters, tail=prepared)
        return new, dataclasses.asdict(report)
