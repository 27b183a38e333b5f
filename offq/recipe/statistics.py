"""The statistics pass: one float forward of the norm-fused model over the calibration data,
collecting what the rotations need (docs/METHODS.md, "OffQ", steps 2-3 and 7).

* the pooled second moment of the attention and MLP inputs of every layer: each sequence's
  top-1 token (largest L-inf norm) at each site (``pca="top1"``, the default), or every token
  (``pca="standard"``), uncentred (default) or centred;
* for R2 = per-head PCA + Hadamard, per-layer per-KV-head second moments of the value vectors
  (top-1 token per sequence).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from ..progress import track

from ..config import QuantConfig
from ..kernels import cov_accumulator, cov_update
from ..model.arch import architecture_of
from ..model.decoder import LayerRunner, load_decoder_layer
from . import rotations as rot

__all__ = ["collect_statistics", "SecondMoment"]


def collect_statistics(ckpt: Any, mc: Any, cfg: QuantConfig, calib: np.ndarray,
                       batch_size: int, show: bool | None, *,
                       embedded: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """(pooled second moment ``[d, d]``, value second moments ``[layers, n_kv, hd, hd]`` or None)
    of the norm-fused float model on ``calib`` (see the module docstring). ``embedded``: the
    embeddings' rows of ``calib`` (``[samples, seqlen, d]``, read, not modified) when the caller
    has them; else they are read from the checkpoint."""
    arch = architecture_of(mc)
    d, hd, n_kv = mc.hidden_size, mc.head_dim, mc.num_key_value_heads
    stats = SecondMoment(d, cfg.pca_centred)
    want_v = cfg.r2 == "pca_hadamard"
    vcovs = np.zeros((mc.num_hidden_layers, n_kv, hd, hd)) if want_v else None
    runner = LayerRunner(mc)
    if embedded is None:
        h = np.asarray(ckpt.tensors[arch.embed[0]], dtype=np.float32)[calib]
    else:
        if embedded.shape != calib.shape + (d,):
            raise ValueError(f"embedded: expected shape {calib.shape + (d,)}, got {embedded.shape}")
        h = np.array(embedded, dtype=np.float32)  # the forward advances it in place
    top1 = cfg.pca == "top1"
    for i in track(range(mc.num_hidden_layers), "statistics", unit="layer", show=show):
        w = fused_layer(ckpt, mc, i)
        layer = load_decoder_layer(w, mc, i)
        wv = w[arch.weight(i, "v_proj")].astype(np.float64)
        bv = w.get(arch.bias(i, "v_proj"))

        def capture(site: str, _i: int, x: np.ndarray) -> None:
            if site in arch.site_norm:  # the sites reading the residual stream
                stats.add(x, top1=top1)
            if want_v and site == "attn_in":
                v = x.astype(np.float64) @ wv.T + (0 if bv is None else bv)
                v = v.reshape(x.shape[0], x.shape[1], n_kv, hd)
                for head in range(n_kv):
                    vcovs[i, head] += _top1_moment(v[:, :, head])

        for s in range(0, h.shape[0], batch_size):
            runner.forward(layer, h[s:s + batch_size], capture=capture)
    return stats.matrix(), vcovs


def fused_layer(ckpt: Any, mc: Any, i: int) -> dict[str, np.ndarray]:
    """Layer ``i``'s float32 tensors (HF names) with its norms fused, checked finite."""
    arch = architecture_of(mc)
    prefix = arch.layer_prefix(i)
    w = {}
    for n in ckpt.tensors.keys():
        if n.startswith(prefix):
            a = ckpt.tensors[n]
            if not np.all(np.isfinite(a)):
                raise ValueError(f"layer {i}: weight {n!r} contains NaN or Inf")
            w[n] = a
    rot.fuse_layer_norms(w, i, arch)
    return w


def _top1_moment(x: np.ndarray) -> np.ndarray:
    """``sum t t^T`` over each sequence's largest-L-inf token of ``x[B, T, k]`` (float64)."""
    idx = np.abs(x).max(axis=-1).argmax(axis=1)
    t = x[np.arange(x.shape[0]), idx].astype(np.float64)
    return t.T @ t


class SecondMoment:
    """Pooled second moment of captured inputs (top-1 token per sequence, or every token),
    uncentred or centred, accumulated in float64."""

    def __init__(self, d: int, centred: bool) -> None:
        self.acc = cov_accumulator(d)
        self.sum = np.zeros(d, dtype=np.float64)
        self.n = 0
        self.centred = centred

    def add(self, x: np.ndarray, *, top1: bool) -> None:
        if not self.centred:  # the streaming covariance kernel (syrk; top-1 selection in C)
            x = np.ascontiguousarray(x, dtype=np.float32)
            cov_update(self.acc, x if top1 else x.reshape(-1, x.shape[-1]), top1=top1)
            self.n += x.shape[0] if top1 else x.size // x.shape[-1]
            return
        if top1:
            idx = np.abs(x).max(axis=-1).argmax(axis=1)
            rows = x[np.arange(x.shape[0]), idx]
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.astype(np.float64)
        self.acc += rows.T @ rows
        self.sum += rows.sum(axis=0)
        self.n += rows.shape[0]

    def matrix(self) -> np.ndarray:
        if not self.centred or self.n == 0:
            return self.acc
        mean = self.sum / self.n
        return self.acc - self.n * np.outer(mean, mean)
