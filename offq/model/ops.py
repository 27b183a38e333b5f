"""The operations of a Llama-family decoder layer in float32 NumPy: RMSNorm, RoPE, SwiGLU's
gate, causal grouped-query attention, and the token NLL of the LM head's logits.

Each is a plain function on arrays; :mod:`offq.model.decoder` strings them into a layer. Large
inputs are split across offq's threads (:mod:`offq.model.parallel`); decode-size inputs stay on
the calling thread, where a pool's dispatch would cost more than the work.

Attention runs per (sequence, KV head) over blocks of queries, so the largest temporary is
``block * (H / Hkv) * T`` floats, and only keys up to the end of each query block are touched
(the causal upper triangle is skipped).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .parallel import row_chunks, run_tasks

__all__ = ["rms_norm", "rope_inv_freq", "rope_cos_sin", "apply_rope", "rope_token_major",
           "silu_mul", "causal_attention", "token_nll"]

ATTN_BLOCK = 128  # query positions per attention block (per KV head group)
SMALL_ELEMS = 1 << 16  # elementwise work below this many elements stays on the calling thread
SMALL_T = 8  # up to this many queries (decode steps) attention runs as one batched product


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, float32 (weight None: ones)."""
    d = x.shape[-1]
    if x.size == d:  # one position (decoding): scalar arithmetic, same float32 steps
        flat = x.reshape(d)
        r = np.sqrt(np.float32(np.dot(flat, flat)) / np.float32(d) + np.float32(eps))
        y = x / r
        if weight is not None:
            y *= weight
        return y
    var = np.einsum("...i,...i->...", x, x, dtype=np.float32)[..., None]
    var /= np.float32(x.shape[-1])
    var += np.float32(eps)
    np.sqrt(var, out=var)
    y = x / var
    if weight is not None:
        y *= weight
    return y


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/hd)``, ``i < hd/2`` (float32), with llama3 scaling.

    ``scaling`` is the HF ``rope_scaling`` dict (``rope_type``/``type``); "default", "linear"
    (frequencies divided by ``factor``) and "llama3" are supported (anything else raises
    ValueError). llama3 keeps high frequencies, divides low ones by ``factor`` and interpolates
    smoothly in between (Llama 3.1 recipe).
    """
    inv = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv = inv.astype(np.float32).astype(np.float64)  # HF computes inv_freq in float32
    kind = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv.astype(np.float32)
    if kind == "linear":  # position interpolation: positions / factor
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope_scaling: type {kind!r} is not supported "
                         "(supported: default, linear, llama3)")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2.0 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(mid, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of ``position * inv_freq`` for positions ``start .. start+length-1``: ``[T, hd/2]``.

    The angle is formed in float32 as HF does (so long positions round the same way); cos/sin
    are evaluated in float64 and rounded.
    """
    pos = np.arange(start, start + length, dtype=np.float32)
    ang = (pos[:, None] * inv_freq[None, :]).astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x[B, H, T, hd]`` (HF rotate_half: pairs are (i, i + hd/2)); returns a new
    C-contiguous array. ``cos, sin``: ``[T, hd/2]``. Heads are split across threads."""
    half = x.shape[-1] // 2
    out = np.empty(x.shape, dtype=np.float32)

    def heads(sl: slice) -> None:
        x1, x2 = x[:, sl, :, :half], x[:, sl, :, half:]
        o1, o2 = out[:, sl, :, :half], out[:, sl, :, half:]
        np.multiply(x1, cos, out=o1)
        o1 -= x2 * sin
        np.multiply(x2, cos, out=o2)
        o2 += x1 * sin

    if x.size >= SMALL_ELEMS:
        run_tasks(heads, row_chunks(x.shape[1], 1))
    else:
        heads(slice(None))
    return out


def rope_token_major(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """:func:`apply_rope` (same arithmetic) on ``x[B, T, heads, hd]``, on the calling thread;
    returns a new C-contiguous array."""
    half = x.shape[-1] // 2
    out = np.empty(x.shape, dtype=np.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    np.multiply(x1, c, out=o1)
    o1 -= x2 * s
    np.multiply(x2, c, out=o2)
    o2 += x1 * s
    return out


#: rows of ``silu_mul``'s scratch per step: a task's whole slice was a copy of half the gate
#: (147 MB per thread at 4 x 2048 calibration tokens of Qwen2.5-1.5B)
_SILU_ROWS = 256


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` computed in place in ``gate`` (float32)."""
    g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])

    def rows(sl: slice) -> None:
        scratch = np.empty((min(_SILU_ROWS, sl.stop - sl.start), g2.shape[1]), dtype=g2.dtype)
        for r0 in range(sl.start, sl.stop, _SILU_ROWS):
            g = g2[r0:min(r0 + _SILU_ROWS, sl.stop)]
            t = np.negative(g, out=scratch[:g.shape[0]])
            with np.errstate(over="ignore"):
                np.exp(t, out=t)  # exp(-g) -> inf for very negative g: g / inf = -0, the limit
            t += 1.0
            g /= t
            g *= u2[r0:r0 + g.shape[0]]

    n = g2.shape[0]
    if n * g2.shape[1] < SMALL_ELEMS:
        rows(slice(0, n))
    else:
        run_tasks(rows, row_chunks(n))
    return g2.reshape(gate.shape)  # g2 is a view of gate unless gate could not be reshaped


@functools.lru_cache(maxsize=4)
def _causal_mask(n: int) -> np.ndarray:
    """Additive causal mask of a diagonal block: -inf above the diagonal, 0 elsewhere."""
    m = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=8)
def _ones(n: int) -> np.ndarray:
    """A read-only float32 vector of ``n`` ones (row sums of attention weights by a product)."""
    v = np.ones(n, dtype=np.float32)
    v.flags.writeable = False
    return v


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal GQA attention. ``q[B,H,T,hd]`` at positions ``start..start+T-1``; ``k, v[B,Hkv,S,hd]``
    cover positions ``0..S-1`` with ``S = start + T``. Returns ``[B, T, H*hd]`` float32.

    Per (sequence, KV head) the ``rep = H/Hkv`` query heads that share it are processed together
    as one ``[block*rep, hd] x [hd, keys]`` product over blocks of query positions; keys past the
    block's last position are never touched. Softmax subtracts the row max before ``exp`` and
    divides after the product with V. The (sequence, KV head, block) tasks are independent: they
    run on offq's thread count with single-threaded BLAS inside each task.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if S != start + T:
        raise ValueError(f"k: expected {start + T} positions, got {S}")
    rep = H // Hkv
    scale = np.float32(1.0 / math.sqrt(hd))
    if T <= SMALL_T:
        return _small_attention(q, k, v, start, scale)
    out = np.empty((B, T, H, hd), dtype=np.float32)
    # queries grouped by KV head, token-major inside a group: [B, Hkv, T, rep, hd]
    qg = q.reshape(B, Hkv, rep, T, hd).transpose(0, 1, 3, 2, 4)
    blk = ATTN_BLOCK
    tri = _causal_mask(blk)
    ones = np.ones(S, dtype=np.float32)

    def block(task: tuple[int, int, int]) -> None:
        b, g, t0 = task
        t1 = min(T, t0 + blk)
        n = t1 - t0
        end = start + t1  # keys 0..end-1 are visible to some query of this block
        qb = np.multiply(qg[b, g, t0:t1], scale).reshape(n * rep, hd)
        s = np.matmul(qb, k[b, g, :end].T).reshape(n, rep, end)
        s[:, :, end - n:] += tri[:n, None, :n]  # key j > start + t is masked for query t
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        p = s.reshape(n * rep, end)
        den = np.matmul(p, ones[:end])[:, None]  # row sums (gemv: faster than a float32 sum)
        ob = np.matmul(p, v[b, g, :end])
        ob /= den
        out[b, t0:t1, g * rep:(g + 1) * rep] = ob.reshape(n, rep, hd)

    # largest blocks (most keys) first, for load balance
    tasks = [(b, g, t0) for t0 in reversed(range(0, T, blk)) for b in range(B) for g in range(Hkv)]
    run_tasks(block, tasks)
    return out.reshape(B, T, H * hd)


def _small_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int,
                     scale: np.float32) -> np.ndarray:
    """:func:`causal_attention` for a few queries (decoding): every (sequence, KV head) pair in
    one batched product on the calling thread (a thread pool's dispatch would cost more than the
    work). Same arithmetic per row as the blocked path: scaled queries, max-subtracted ``exp``,
    row sums by a product with ones, division after the product with V."""
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    qg = np.multiply(q.reshape(B, Hkv, rep, T, hd).transpose(0, 1, 3, 2, 4), scale)
    s = np.matmul(qg.reshape(B, Hkv, T * rep, hd), k.transpose(0, 1, 3, 2))
    if T > 1:  # query t (position start + t) sees keys up to start + t
        s.reshape(B, Hkv, T, rep, S)[..., start:] += _causal_mask(T)[:, None, :]
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    den = np.matmul(s, _ones(S))[..., None]
    o = np.matmul(s, v)
    o /= den
    return np.ascontiguousarray(o.reshape(B, Hkv, T, rep, hd).transpose(0, 2, 1, 3, 4)
                                ).reshape(B, T, H * hd)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``logsumexp(logits) - logits[target]`` per row, float64 result, float32 work."""
    mx = logits.max(axis=-1, keepdims=True)
    tgt = np.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    logits -= mx
    np.exp(logits, out=logits)
    lse = np.log(logits.sum(axis=-1, dtype=np.float64)) + mx[:, 0].astype(np.float64)
    return lse - tgt.astype(np.float64)
