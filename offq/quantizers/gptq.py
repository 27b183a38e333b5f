"""GPTQ: weight quantization that corrects each rounding error with the remaining columns.

docs/METHODS.md, "GPTQ". For a linear layer with weight ``W`` [N, K] and calibration inputs ``X``
(rows = tokens, taken after the already-quantized earlier layers):

1. ``H = 2 X^T X / n`` accumulated in float64 while streaming (:class:`HessianAccumulator`);
2. dead inputs (``diag H == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``;
3. optional act-order: columns visited by descending ``diag H``;
4. damping ``H += damp * mean(diag H) * I``;
5. the UDU^T factor ``H = S D S^T`` (``S`` unit upper triangular; :func:`offq.kernels.udu_factor`:
   one Cholesky factorization of the reversed ``H``, no inverse); when the damped Hessian is too
   ill-conditioned for that (a rank-deficient H with ``damp = 0``, say), the damping grows tenfold
   per retry (at most `MAX_DAMP_RETRIES` times) and a warning names the layer and site;
6. columns in lazy blocks of ``block_size``: quantize column ``i`` from its current weight, take
   its rounding error against the *original* weight, ``e_i = q_i - w_i``, and update every later
   column ``t`` with ``- e_i S_it``: the rest of the block at once, the columns after it once per
   block with the rank-``block_size`` product. (Inside a block the same updates are applied in
   sub-blocks of 16 columns, on the transposed weight, so each column step touches little
   contiguous memory; the tests check the result equals the plain unblocked algorithm.)

Why this is GPTQ. The paper's form uses ``U``, the upper Cholesky factor of ``H^-1 = U^T U``: the
error ``(w~_i - q_i) / U_ii`` of the *updated* weight ``w~_i``, pushed with row ``i`` of ``U``. With
``H = R R^T`` (``R`` upper, ``R = S D^1/2``) that ``U`` is ``R^-1``, and solving the paper's updates
for ``w~`` gives ``w~_t = w_t + sum_{i<t} (w_i - q_i) R_it / R_tt``: the same corrections from the
original weights and ``S`` (``S_it = R_it / R_tt``), the same codes up to rounding, and no
triangular inverse (half the factorization's flops; down_proj's factor at K = 8960 went from 5.9
to 3.1-3.7 s on two Zen3 cores, ``benchmarks/bench_gptq_stage.py``).

Group parameters: per channel (group -1) they come from the whole row before any update (with the
MSE clip search when asked); with groups, each group's grid is fixed when its first column is
reached, from the updated weights ("dynamic"), or from the original weights ("static"). Act-order
with groups always uses static groups, so that the groups stay contiguous in the original column
order (the storage format of offq.kernels.QTensor).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..kernels.cov import cov_accumulator
from ..kernels.gptq import gptq_block_update, gptq_columns
from ..quant.grid import check_bits, group_params, resolve_group
from ..quant.weight import QuantizedWeight
from .base import WeightQuantizer
from .cd import coordinate_descent

logger = logging.getLogger(__name__)

_SUB = 16  # columns per inner sub-block of the lazy updates (speed only; same arithmetic)
MAX_DAMP_RETRIES = 6  # damping x10 per retry when the Cholesky factorization fails
_MIN_RETRY_DAMP = 1e-6  # first retry's relative damping when damp was 0


class HessianAccumulator:
    """Streams ``H = 2 X^T X / n`` in float64 over batches of layer inputs ``x[..., K]``."""

    def __init__(self, k: int) -> None:
        self.k = k
        # pages faulted in here, in order, not by cov_update's threads (cov_accumulator)
        self.sum: np.ndarray | None = cov_accumulator(k)
        self.n = 0
        self.finished = False
        # updates add to the upper triangle only; the lower one is filled once, when read
        self._mirrored = True

    def update(self, x: np.ndarray) -> None:
        """Add the rows of ``x[..., K]``: ``offq.kernels.cov_update`` (OpenBLAS syrk; float32
        sums within one call, float64 across calls; the upper triangle only, mirrored when the
        Hessian is read)."""
        from offq.kernels import cov_update

        if self.finished:
            raise ValueError("HessianAccumulator: finish() was called; no more inputs")
        self._check_held()
        x = np.asarray(x)
        if x.shape[-1] != self.k:
            raise ValueError(f"x: expected last axis {self.k}, got shape {x.shape}")
        rows = np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32)
        cov_update(self.sum, rows, mirror=False)
        self._mirrored = False
        self.n += rows.shape[0]

    def _full(self) -> np.ndarray:
        """The running sum, its lower triangle brought up to date."""
        from offq.kernels import cov_mirror

        if not self._mirrored:
            cov_mirror(self.sum)
            self._mirrored = True
        return self.sum

    @property
    def hessian(self) -> np.ndarray:
        """``2 X^T X / n`` (a new array; :meth:`finish` avoids the copy)."""
        self._check_held()
        if self.finished:
            return self.sum.copy()
        if self.n == 0:
            raise ValueError("HessianAccumulator: no inputs were added")
        return self._full() * (2.0 / self.n)

    def finish(self) -> np.ndarray:
        """``2 X^T X / n`` computed in place in the running sum (no K x K copy: 640 MB at
        K = 8960), which ends the accumulation (a later :meth:`update` raises)."""
        self._check_held()
        if not self.finished:
            if self.n == 0:
                raise ValueError("HessianAccumulator: no inputs were added")
            self._full()
            self.sum *= 2.0 / self.n
            self.finished = True
        return self.sum

    def take(self) -> np.ndarray:
        """:meth:`finish`, handing the Hessian over: the accumulator keeps no reference, so it
        is freed with the caller's last one (the recipe drops it once GPTQ has its factor: 640 MB
        at K = 8960). Any later use of the accumulator raises."""
        h = self.finish()
        self.sum = None
        return h

    def _check_held(self) -> None:
        if self.sum is None:
            raise ValueError("HessianAccumulator: the Hessian was handed over by take()")


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs from a Hessian, shared by the linears that read the same input:
    the dead inputs, the column order (act-order or identity) and the UDU^T factor of the
    damped, permuted ``H``: ``H_damped = s @ diag(d) @ s.T``, ``s`` unit upper triangular."""

    dead: np.ndarray
    perm: np.ndarray
    s: np.ndarray
    d: np.ndarray
    #: the damping actually added (x mean diag): ``damp``, or larger after a retry
    damp: float = 0.0
    #: the Hessian itself, kept (not copied) only when coordinate-descent sweeps follow GPTQ
    hessian: np.ndarray | None = None


def gptq_diagonal(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal GPTQ works with (float64, step 2: a dead input's ``H_jj = 0`` becomes 1) and
    the dead inputs' mask."""
    diag = np.diag(hessian).astype(np.float64)
    dead = diag == 0
    diag[dead] = 1.0
    return diag, dead


def factor_hessian(hessian: np.ndarray, *, damp: float = 0.01, act_order: bool = True,
                   where: str = "", dtype: str = "float64") -> HessianFactor:
    """Steps 2-5 of the module docstring on ``H = 2 X^T X / n`` [K, K] (``where`` names the
    layer and site in the warning a damping retry logs). ``dtype="auto"`` picks float32 or
    float64 by the Hessian's width (:func:`gptq_precision`). ``dtype="float32"`` runs the
    factorization in float32 (:func:`offq.kernels.udu_factor` ``single``: ``s`` float32, and GPTQ
    then runs in float32); where float32 cannot factor the damped matrix, float64 is tried at the
    same damping before the damping grows (``s`` float64: that site's GPTQ runs in float64)."""
    if dtype not in ("float64", "float32", "auto"):
        raise ValueError(f"dtype: expected 'float64', 'float32' or 'auto', got {dtype!r}")
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp: expected a finite number >= 0, got {damp}")
    hessian = np.asarray(hessian)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian: expected a square matrix, got shape {hessian.shape}")
    if not np.all(np.isfinite(hessian)):
        raise ValueError(f"hessian{' of ' + where if where else ''}: contains NaN or Inf")
    k = hessian.shape[0]
    dtype = gptq_precision(dtype, k)
    diag, dead = gptq_diagonal(hessian)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    # the kernel gathers the permuted rows and takes the step-2 diagonal itself: no permuted
    # K x K copy (640 MB at K = 8960, the peak of a Qwen2.5-1.5B layer); float64 inputs are read
    # where they lie (the accumulator's sum is float64, C-contiguous, symmetric in full)
    h = np.ascontiguousarray(hessian, dtype=np.float64)
    mean_diag = np.mean(diag[perm])
    tried = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        factor = None
        if dtype == "float32":
            factor = _udu_factor(h, tried * mean_diag, perm, diag, single=True)
            if factor is None:
                logger.info("GPTQ %s: float32 could not factor the Hessian with damping %g; "
                            "trying float64", where or "(unnamed site)", tried)
        if factor is None:
            factor = _udu_factor(h, tried * mean_diag, perm, diag)
        if factor is not None:
            if attempt:
                logger.warning("GPTQ %s: the Hessian was not positive definite with damping %g; "
                               "used %g (x mean diag)", where or "(unnamed site)", damp, tried)
            return HessianFactor(dead, perm, *factor, damp=tried)
        tried = max(tried, _MIN_RETRY_DAMP) * 10.0
    raise ValueError(f"GPTQ {where or '(unnamed site)'}: the Hessian stays singular up to damping "
                     f"{tried / 10:g} (x mean diag); are the calibration inputs degenerate?")


def _udu_factor(h: np.ndarray, add: float, perm: np.ndarray, diag: np.ndarray,
                single: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, d)`` with ``h[perm][:, perm] + add I = s @ diag(d) @ s.T`` (the diagonal taken from
    ``diag``; ``s`` float32 with ``single``, else float64), or None when that is not computable.

    :func:`offq.kernels.udu_factor` (C, LAPACK potrf of the reversed matrix, no permuted copy
    formed)."""
    from offq.kernels import udu_factor

    # LAPACK on the session's BLAS threads: at K = 8960 (Qwen2.5-1.5B's down_proj) the
    # factorization is most of GPTQ's time, 3.1-3.7 s on two Zen3 cores (bench_gptq_stage.py)
    return udu_factor(h, float(add), perm=np.ascontiguousarray(perm, np.int64),
                      diag=np.ascontiguousarray(diag, np.float64), single=single)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray | None = None, *, bits: int = 4,
                  group_size: int = -1, symmetric: bool = True, clip_search: bool = True,
                  damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                  static_groups: bool = False,
                  factor: HessianFactor | None = None) -> QuantizedWeight:
    """Quantize ``w`` [N, K] with GPTQ given the Hessian ``2 X^T X / n`` [K, K] of its inputs
    (or its precomputed :func:`factor_hessian`, which then fixes ``damp`` and ``act_order``)."""
    check_bits(bits)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D weight [out, in], got shape {w.shape}")
    n_out, k = w.shape
    if factor is None:
        if hessian is None:
            raise ValueError("hessian: required when no factor is given")
        if np.shape(hessian) != (k, k):
            raise ValueError(f"hessian: expected shape ({k}, {k}) for w of shape {w.shape}, "
                             f"got {np.shape(hessian)}")
        factor = factor_hessian(hessian, damp=damp, act_order=act_order)
    if factor.s.shape != (k, k):
        raise ValueError(f"factor: built for {factor.s.shape[0]} inputs, w has {k}")
    act_order = not np.array_equal(factor.perm, np.arange(k))
    if not np.all(np.isfinite(w)):
        raise ValueError("w: contains NaN or Inf")
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive integer, got {block_size}")
    g = resolve_group(group_size, k)
    per_channel = g == k
    if act_order and not per_channel:
        static_groups = True

    if factor.dead.any():  # zeroed in a copy: the caller's weight stays as given
        w = w.copy()
        w[:, factor.dead] = 0.0

    # Grids fixed up front: per channel, or static groups (original, dead-zeroed weights).
    scale = np.zeros((n_out, k // g), dtype=np.float32)
    zero = np.zeros((n_out, k // g), dtype=np.float32)
    if per_channel or static_groups:
        scale[:], zero[:] = group_params(w, bits, g, symmetric, clip_search)

    # GPTQ's working precision is the factor's: float64, or float32 (factor_hessian's dtype)
    s = factor.s if factor.s.dtype == np.float32 else factor.s.astype(np.float64, copy=False)
    s, perm, work = np.ascontiguousarray(s), factor.perm, s.dtype
    # Work on the transpose: row i of wt is column perm[i] of w, so every per-column step reads
    # and writes contiguous memory. orig keeps the weights before any update (float32, as given).
    # (one gather from the transposed view: a K x N copy of the weight, not three)
    orig = np.ascontiguousarray(w.T[perm])
    del w
    wt = orig.astype(work)  # a copy in either precision
    codes_t = np.zeros((k, n_out), dtype=np.uint8)
    # Two levels of lazy updates (same arithmetic as one, fewer bytes moved per column): inside a
    # sub-block of _SUB columns each column updates only the rest of its sub-block; a finished
    # sub-block updates the rest of its block with one product; a finished block updates all
    # later columns with one product.
    dynamic = not (per_channel or static_groups)  # then perm is the identity
    column_group = np.ascontiguousarray(perm // g, dtype=np.int64)
    for i1 in range(0, k if n_out else 0, block_size):  # no outputs: nothing to quantize
        i2 = min(i1 + block_size, k)
        err = np.zeros((i2 - i1, n_out), dtype=work)
        for j1 in range(i1, i2, _SUB):
            j2 = min(j1 + _SUB, i2)
            i = j1
            while i < j2:
                end = j2
                if dynamic:
                    if i % g == 0:
                        # a dynamic group starts: the weights of columns i..i+g as the paper's
                        # form has them after columns 0..i-1
                        cur = _group_start_weights(wt, orig, err, s, i, i1, i2, j1, j2, g)
                        gs, gz = group_params(np.ascontiguousarray(cur.T, dtype=np.float32),
                                              bits, g, symmetric, clip_search)
                        scale[:, i // g], zero[:, i // g] = gs[:, 0], gz[:, 0]
                    end = min(j2, (i // g + 1) * g)
                # the per-column step (quantize, error, update the sub-block) in C: NumPy's
                # arithmetic, one call instead of a few per column
                gptq_columns(wt, orig, err, s, codes_t, scale, zero, column_group,
                             block_start=i1, first=i, end=end, sub_end=j2, bits=bits)
                i = end
            # the finished sub-block's update of the rest of its block (BLAS, in place)
            gptq_block_update(wt, err, s, block_start=i1, first=j1, last=j2, t0=j2, t1=i2)
        # the finished block's update of every later column
        gptq_block_update(wt, err, s, block_start=i1, first=i1, last=i2, t0=i2, t1=k)
    inv = np.argsort(perm)
    codes = np.ascontiguousarray(codes_t[inv].T)
    return QuantizedWeight(codes, scale, zero, bits, g, symmetric)


def _group_start_weights(wt: np.ndarray, orig: np.ndarray, err: np.ndarray, s: np.ndarray,
                         i: int, i1: int, i2: int, j1: int, j2: int, g: int) -> np.ndarray:
    """Rows ``i..i+g`` of the weight (transposed) as the paper's form of GPTQ has them once
    columns ``0..i-1`` are quantized: the optimal update of the columns not yet fixed, from which
    a dynamic group takes its grid.

    ``wt`` holds the corrections from the original weights instead (module docstring): after every
    pending lazy update from the columns ``i1..i-1`` is applied (rows below ``j2`` are already
    current), ``wt_t = w_t + sum_{j<i} d_j S_jt``, while the paper's form has
    ``w_t + sum_{j<i} d_j R_jt`` times ``R22^-1`` (``R22``: the trailing block of ``R`` from ``i``).
    ``R22^-1`` is upper triangular, so its leading ``g x g`` block is the inverse of
    ``R[i:i+g, i:i+g]``, and the diagonal scalings cancel: ``p - w = (wt - w) S_gg^-1``, one
    ``g x g`` solve per group."""
    end = min(i + g, wt.shape[0])
    cur = wt[i:end].copy()
    lo, hi = max(j2, i), min(i2, end)
    if lo < hi:  # later sub-blocks of this block: pending from this sub-block's columns
        cur[lo - i:hi - i] -= s[j1:i, lo:hi].T @ err[j1 - i1:i - i1]
    lo = max(i2, i)
    if lo < end:  # past the block: pending from every quantized column of the block
        cur[lo - i:] -= s[i1:i, lo:end].T @ err[:i - i1]
    if i == 0:
        return cur  # nothing quantized yet: both forms hold the original weights
    w0 = orig[i:end].astype(wt.dtype)
    # rows are columns: (p - w)^T = S_gg^-T (wt - w)^T, a unit lower triangular system
    return w0 + np.linalg.solve(s[i:end, i:end].T, cur - w0)


#: inputs from which ``gptq_dtype="auto"`` runs GPTQ in float32. Below it float64 costs little
#: (SmolLM2-135M's widest site, K = 1536: its whole GPTQ stage takes seconds); at Qwen2.5-1.5B's
#: down_proj (K = 8960) float64 takes three quarters of a layer's GPTQ (factor + quantize ~5.0
#: against ~2.9 s in float32 on two Zen 4 cores: benchmarks/bench_gptq_stage.py), and float32
#: gave the same per-linear loss there (mean ratio to float64 0.99997 on the calibration
#: Hessians, 0.99953 held out: benchmarks/bench_gptq_precision.py)
GPTQ_FLOAT32_FROM_K = 4096


def gptq_precision(dtype: str, k: int) -> str:
    """The precision GPTQ runs in for a site of ``k`` inputs: ``dtype`` itself, or for "auto"
    float32 from :data:`GPTQ_FLOAT32_FROM_K` inputs and float64 below."""
    if dtype == "auto":
        return "float32" if k >= GPTQ_FLOAT32_FROM_K else "float64"
    return dtype


@dataclass(frozen=True)
class GPTQ(WeightQuantizer):
    """GPTQ behind the quantizer interface: ``prepare`` factors the site's Hessian once."""

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    static_groups: bool = False
    #: coordinate-descent re-quantization sweeps after GPTQ (offq/quantizers/cd.py; 0: none)
    cd_sweeps: int = 0
    #: GPTQ's arithmetic, float64, float32 or auto (:func:`gptq_precision`): the factorization
    #: (:func:`factor_hessian`), the errors and the updates
    dtype: str = "auto"
    needs_hessian = True

    def prepare(self, hessian: np.ndarray | None, where: str) -> HessianFactor:
        if hessian is None:
            raise ValueError(f"GPTQ {where}: needs the site's Hessian (calibration inputs)")
        factor = factor_hessian(hessian, damp=self.damp, act_order=self.act_order, where=where,
                                dtype=self.dtype)
        if self.cd_sweeps:
            factor = replace(factor, hessian=hessian)
        return factor

    def quantize(self, w: np.ndarray, prepared: Any) -> QuantizedWeight:
        q = gptq_quantize(w, factor=prepared, bits=self.bits, group_size=self.group_size,
                          symmetric=self.symmetric, clip_search=self.clip_search,
                          block_size=self.block_size, static_groups=self.static_groups)
        if self.cd_sweeps and prepared.hessian is not None:
            q, report = coordinate_descent(w, q, prepared.hessian, damp=prepared.damp,
                                           sweeps=self.cd_sweeps)
            logger.info("GPTQ + CD %s: %s", w.shape, report)
        return q


def layer_output_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative layer-output error ``||X W^T - X W_hat^T||_F / ||X W^T||_F`` (float64)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, w.shape[1])
    ref = x @ np.asarray(w, dtype=np.float64).T
    return float(np.linalg.norm(ref - x @ np.asarray(w_hat, dtype=np.float64).T) / np.linalg.norm(ref))
