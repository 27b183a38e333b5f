"""Norm fusion and the rotations R1..R4 (OffQ, QuaRot-style), fused into HF-named weights.

Conventions (docs/METHODS.md): a Linear stores ``W`` [out, in]; activations are row vectors,
``y = x @ W.T``; a rotation ``R`` [d, d] (orthogonal) acts as ``x -> x @ R``.

Everything here edits a ``dict[str, np.ndarray]`` of HF-named float32 tensors in place (names
from the model's :class:`~offq.model.arch.Architecture`), so the pipeline can pass one decoder
layer at a time. The recipe, which leaves the float model's logits unchanged:

1. :func:`untie_embeddings`, :func:`fuse_layer_norms` (RMSNorm weights folded into q/k/v and
   gate/up, the norm weight set to ones), :func:`fuse_final_norm` (into lm_head). RMSNorm without a
   weight commutes with any orthogonal R: ``rmsnorm(x R) = rmsnorm(x) R``.
2. R1 on the residual stream: ``E <- E R1``; q/k/v/gate/up ``W <- W R1``; o/down ``W <- R1^T W``
   and their biases ``b <- b R1`` (they are added to the residual stream); lm_head ``W <- W R1``
   (:func:`rotate_embeddings`, :func:`rotate_layer`, :func:`rotate_head`). The biases of the
   linears that read the residual (q/k/v, gate/up) sit on their output side: R1 leaves them.
3. R2 per head, fused into v_proj's output side (``W_v[h] <- R2_h^T W_v[h]``, ``b_v[h] <- b_v[h]
   R2_h``) and o_proj's input side (``W_o[:, j] <- W_o[:, j] R2_{kv(j)}``; GQA heads share their
   kv head's R2).
4. R4: ``W_down <- W_down H`` with ``H = hadamard_matrix(intermediate)``, and at run time the online
   ``fwht`` on the down_proj input (``x -> x H``) restores the product.
5. R3 has no weights: the online ``fwht`` over head_dim on Q and K after RoPE cancels in ``Q K^T``
   (the online halves of R3 and R4 live in :mod:`offq.quant.online`).

R1 constructions: :func:`offq_r1` (``U1 P H1``: PCA basis, sorted grouping, block Hadamard aligned
with the activation groups, no sign flips) and :func:`quarot_r1` (random signs times a full
Hadamard). Hadamard matrices come from ``offq.kernels.hadamard_matrix`` (fwht(x) == x @ H).
"""
from __future__ import annotations

import logging
from typing import Any, MutableMapping

import numpy as np
from threadpoolctl import threadpool_limits

from ..model.arch import Architecture, architecture_of

logger = logging.getLogger(__name__)

Weights = MutableMapping[str, np.ndarray]

#: rows of a vocabulary-sized tensor (embeddings, LM head) per product in :func:`_rows_by_block`
#: and :func:`fuse_final_norm` (a 50 MB temporary at d = 1536)
_VOCAB_ROWS = 8192


def _hadamard(n: int) -> np.ndarray:
    from offq.kernels import hadamard_matrix

    return np.asarray(hadamard_matrix(n, normalize=True, dtype=np.float64), dtype=np.float64)


def _rows(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``W @ R`` for W [out, in] (input side) in float32 (sgemm; R rounded to float32 once).
    The float32 product keeps the rotated model within ~1e-6 of exact, well inside the 1e-4
    invariance budget, at half the cost of float64 on large matrices (embeddings, MLP)."""
    return np.matmul(np.asarray(w, dtype=np.float32), np.asarray(r, dtype=np.float32))


def _rows_by_block(w: np.ndarray, r: np.ndarray, *, in_place: bool) -> np.ndarray:
    """``W @ R`` like :func:`_rows`, a block of ``_VOCAB_ROWS`` rows at a time (the same blocks
    whether or not in place, so both give the same bits). ``in_place`` overwrites ``w`` (an
    owned float32 array): the embeddings and LM head, 0.93 GB each on Qwen2.5-1.5B, then never
    exist twice, which was the peak of quantization's final write."""
    r32 = np.ascontiguousarray(r, dtype=np.float32)
    src = np.asarray(w, dtype=np.float32)
    out = src if in_place else np.empty(src.shape, dtype=np.float32)
    for r0 in range(0, src.shape[0], _VOCAB_ROWS):
        out[r0:r0 + _VOCAB_ROWS] = src[r0:r0 + _VOCAB_ROWS] @ r32
    return out


# ---------------------------------------------------------------------------------- norm fusion
def untie_embeddings(weights: Weights, arch: Architecture) -> None:
    """Give lm_head its own copy of the embedding matrix when the model ties them."""
    if arch.lm_head[0] not in weights:
        weights[arch.lm_head[0]] = np.array(weights[arch.embed[0]], dtype=np.float32, copy=True)


def fuse_layer_norms(weights: Weights, i: int, arch: Architecture) -> None:
    """Fold layer ``i``'s RMSNorm weights into the linears of the sites that read them (q/k/v,
    gate/up: ``W[:, j] *= g_j``); the norms become ones."""
    sites = arch.sites
    for site, norm in arch.site_norm.items():
        name = arch.norm(i, norm)
        g = weights[name].astype(np.float64)
        for lin in sites[site]:
            w = arch.weight(i, lin)
            weights[w] = (weights[w].astype(np.float64) * g[None, :]).astype(np.float32)
        weights[name] = np.ones_like(weights[name], dtype=np.float32)


def fuse_final_norm(weights: Weights, arch: Architecture, *, in_place: bool = False) -> None:
    """Fold the final RMSNorm into lm_head (call :func:`untie_embeddings` first); ``in_place``
    overwrites the head's array (which the caller must own) instead of making a new one."""
    head, norm = arch.lm_head[0], arch.final_norm[0]
    if head not in weights:
        raise ValueError(f"fuse_final_norm: {head} missing; untie the embeddings first")
    g = weights[norm].astype(np.float64)[None, :]
    w = weights[head]
    out = w if in_place and w.dtype == np.float32 else np.empty(w.shape, dtype=np.float32)
    # float64 a block of rows at a time (the same products, elementwise): a whole float64 copy
    # of a large vocabulary's head was 2 x 1.9 GB on Qwen2.5-1.5B, the peak of quantization
    for r0 in range(0, w.shape[0], _VOCAB_ROWS):
        out[r0:r0 + _VOCAB_ROWS] = w[r0:r0 + _VOCAB_ROWS].astype(np.float64) * g
    weights[head] = out
    weights[norm] = np.ones_like(weights[norm], dtype=np.float32)


def fuse_norms(weights: Weights, num_layers: int, arch: Architecture) -> None:
    """All of the above on a full weight dict."""
    untie_embeddings(weights, arch)
    for i in range(num_layers):
        fuse_layer_norms(weights, i, arch)
    fuse_final_norm(weights, arch)


# ---------------------------------------------------------------------------------- R1 pieces
def pca_basis(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and the full orthonormal eigenbasis (columns) of a symmetric
    second-moment matrix; column 0 is the dominant (outlier) direction. Signs are fixed so that
    each column's largest-magnitude entry is positive (deterministic across LAPACK builds)."""
    c = np.asarray(cov, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cov: expected a square matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cov: contains NaN or Inf")
    # one BLAS thread: OpenBLAS workers spin-wait badly on a busy 2-core machine (2 threads ran
    # slower than 1 there), and this [K, K] eigh is a small part of the work
    with threadpool_limits(limits=1, user_api="blas"):
        vals, vecs = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(-vals, kind="stable")
    vals, vecs = vals[order], vecs[:, order]
    pivot = np.abs(vecs).argmax(axis=0)
    vecs *= np.sign(vecs[pivot, np.arange(vecs.shape[1])])[None, :]
    return vals, vecs


def all_ones_index(h: np.ndarray) -> int:
    """Index of a row of the Hadamard matrix ``h`` whose entries all share one sign (the row that
    turns a single input coordinate into a constant over the block). ValueError if none."""
    same_sign = np.all(h > 0, axis=1) | np.all(h < 0, axis=1)
    idx = np.flatnonzero(same_sign)
    if idx.size == 0:
        raise ValueError(f"hadamard matrix of order {h.shape[0]} has no constant-sign row")
    return int(idx[0])


def sorted_grouping(d: int, group: int) -> np.ndarray:
    """Slot -> eigen-rank order ``P``: rank ``b`` in slot 0 of group ``b`` for ``b < G``, remaining
    ranks dealt round-robin (reshape the sorted index [g, G], transpose, flatten)."""
    if d % group:
        raise ValueError(f"group: {group} does not divide the dimension {d}")
    return np.arange(d).reshape(group, d // group).T.reshape(-1)


def place_outliers(order: np.ndarray, group: int, target: int) -> np.ndarray:
    """Within each group, swap slot 0 (where the grouping put the group's lead rank) with slot
    ``target`` (the Hadamard's constant-sign row, or another row for the ablation)."""
    order = order.copy().reshape(-1, group)
    order[:, [0, target]] = order[:, [target, 0]]
    return order.reshape(-1)


def block_hadamard(d: int, group: int) -> np.ndarray:
    """blockdiag of ``d / group`` normalised Hadamards of order ``group`` ([d, d], float64)."""
    if d % group:
        raise ValueError(f"group: {group} does not divide the dimension {d}")
    h = _hadamard(group)
    out = np.zeros((d, d), dtype=np.float64)
    for s in range(0, d, group):
        out[s:s + group, s:s + group] = h
    return out


def offq_r1(cov: np.ndarray | None, d: int, group: int, *, pca: str = "top1",
            sorted_groups: bool = True, outlier_index: str = "ones") -> np.ndarray:
    """``R1 = U1 P H1`` [d, d] float64.

    cov: the accumulated second moment (top-1 tokens for ``pca='top1'``, all tokens for
    ``'standard'``; ignored for ``'none'``, where U1 = I). P: :func:`sorted_grouping` when
    ``sorted_groups`` else the eigen order, then each group's lead rank moved onto the block
    Hadamard's constant-sign row (``outlier_index='ones'``) or onto the next row (``'other'``,
    the ablation). H1: :func:`block_hadamard` with blocks = the activation groups; no sign flips.
    """
    if pca not in ("top1", "standard", "none"):
        raise ValueError(f"pca: expected top1, standard or none, got {pca!r}")
    if outlier_index not in ("ones", "other"):
        raise ValueError(f"outlier_index: expected ones or other, got {outlier_index!r}")
    if pca == "none":
        u1 = np.eye(d)
    else:
        if cov is None or np.shape(cov) != (d, d):
            raise ValueError(f"cov: expected a [{d}, {d}] matrix for pca={pca!r}")
        _, u1 = pca_basis(cov)
    h1 = block_hadamard(d, group)
    ones = all_ones_index(h1[:group, :group])
    target = ones if outlier_index == "ones" else (ones + 1) % group
    order = sorted_grouping(d, group) if sorted_groups else np.arange(d)
    order = place_outliers(order, group, target)
    return u1[:, order] @ h1


def quarot_r1(d: int, seed: int = 0) -> np.ndarray:
    """QuaRot-style R1 = diag(random signs) @ H_d, a full normalised Hadamard of order d."""
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=d)
    return signs[:, None] * _hadamard(d)


def r2_matrices(head_dim: int, num_kv_heads: int, covs: np.ndarray | None = None) -> np.ndarray:
    """Per-kv-head R2 [num_kv_heads, head_dim, head_dim]: the normalised Hadamard of head_dim, or
    with ``covs`` ([num_kv_heads, hd, hd] second moments of the value vectors) each head's PCA
    basis with the top direction on the Hadamard's constant-sign row, then the Hadamard."""
    h = _hadamard(head_dim)
    if covs is None:
        return np.broadcast_to(h, (num_kv_heads, head_dim, head_dim)).copy()
    covs = np.asarray(covs, dtype=np.float64)
    if covs.shape != (num_kv_heads, head_dim, head_dim):
        raise ValueError(f"covs: expected shape {(num_kv_heads, head_dim, head_dim)}, got {covs.shape}")
    order = place_outliers(np.arange(head_dim), head_dim, all_ones_index(h))
    return np.stack([pca_basis(c)[1][:, order] @ h for c in covs])


# ---------------------------------------------------------------------------------- fusing
def rotate_embeddings(weights: Weights, r1: np.ndarray, arch: Architecture, *,
                      in_place: bool = False) -> None:
    """``E <- E R1`` (``in_place``: into the array itself, which the caller must own)."""
    weights[arch.embed[0]] = _rows_by_block(weights[arch.embed[0]], r1, in_place=in_place)


def rotate_rows(rows: np.ndarray, r1: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """``x R1`` for rows ``x[..., d]`` taken from the embeddings (the calibration's hidden
    states), by the float32 products of :func:`rotate_embeddings`. A row can differ from the
    same row of the rotated matrix in its last bits (~1e-7 relative): OpenBLAS's sgemm rounds a
    row differently with the number of rows in the call (tests/test_pipeline.py)."""
    flat = rows.reshape(-1, rows.shape[-1])
    return _rows_by_block(flat, r1, in_place=in_place).reshape(rows.shape)


def rotate_head(weights: Weights, r1: np.ndarray, arch: Architecture, *,
                in_place: bool = False) -> None:
    """``W_head <- W_head R1`` (``in_place`` as for :func:`rotate_embeddings`)."""
    weights[arch.lm_head[0]] = _rows_by_block(weights[arch.lm_head[0]], r1, in_place=in_place)


def rotate_layer(weights: Weights, i: int, cfg: Any, *, r1: np.ndarray | None = None,
                 r2: np.ndarray | None = None, r4: bool = False) -> None:
    """Fuse R1 (input side of the linears reading the residual stream, output side -- weight and
    bias -- of those writing it), R2 ([n_kv, hd, hd]) and the weight half of R4 into layer ``i``.
    ``cfg`` is the ModelConfig (sizes and architecture)."""
    arch = architecture_of(cfg)
    if r1 is not None:
        r1_32 = np.ascontiguousarray(r1, dtype=np.float32)
        for spec in arch.linears:
            name = arch.weight(i, spec.name)
            if spec.writes_residual:
                weights[name] = np.matmul(np.ascontiguousarray(r1_32.T),
                                          np.asarray(weights[name], dtype=np.float32))
                bias = arch.bias(i, spec.name)
                if bias in weights:  # y + b lives in the residual basis too: b <- b R1
                    weights[bias] = (weights[bias].astype(np.float64) @ r1).astype(np.float32)
            elif spec.in_dim == "hidden":
                weights[name] = _rows(weights[name], r1)
    if r2 is not None:
        hd, n_kv, n_h = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
        if r2.shape != (n_kv, hd, hd):
            raise ValueError(f"r2: expected shape {(n_kv, hd, hd)}, got {r2.shape}")
        v_name, o_name = arch.weight(i, "v_proj"), arch.weight(i, "o_proj")
        wv = weights[v_name].astype(np.float64).reshape(n_kv, hd, -1)
        weights[v_name] = np.einsum("hji,hjk->hik", r2, wv).reshape(n_kv * hd, -1).astype(np.float32)
        bias = arch.bias(i, "v_proj")
        if bias in weights:
            b = weights[bias].astype(np.float64).reshape(n_kv, hd)
            weights[bias] = np.einsum("hj,hjk->hk", b, r2).reshape(-1).astype(np.float32)
        wo = weights[o_name].astype(np.float64).reshape(-1, n_h, hd)
        per_head = np.repeat(r2, n_h // n_kv, axis=0)  # q head j uses kv head j // rep
        weights[o_name] = np.einsum(
            "ohj,hjk->ohk", wo, per_head).reshape(-1, n_h * hd).astype(np.float32)
    if r4:  # W_down H by the transform itself: the dense H is 640 MB (float64) at 8960
        from offq.kernels import fwht

        name = arch.weight(i, "down_proj")
        weights[name] = fwht(np.ascontiguousarray(weights[name], dtype=np.float32))


def rotate_model(weights: Weights, cfg: Any, *, r1: np.ndarray | None, r2: np.ndarray | None,
                 r4: bool) -> None:
    """Fuse R1/R2/R4 into every tensor of a full (norm-fused, untied) weight dict."""
    arch = architecture_of(cfg)
    if r1 is not None:
        rotate_embeddings(weights, r1, arch)
        rotate_head(weights, r1, arch)
    for i in range(cfg.num_hidden_layers):
        rotate_layer(weights, i, cfg, r1=r1, r2=r2, r4=r4)
