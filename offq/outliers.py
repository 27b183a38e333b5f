"""Activation outlier statistics per layer and input site (``offq inspect``).

What OffQ is about, measured on a model: LLMs put a few *massive activations* on one residual
direction. For every layer and capture site (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``; see
:mod:`offq.model.arch`) of the norm-fused float model (RMSNorm weights folded into the next
linears, so the residual sites see ``rmsnorm(h)`` and rotations act on exactly these inputs), over
the tokens of a few calibration sequences:

- ``max_abs``: the largest ``|x|``; ``channel``: the input channel that holds it;
- ``max_over_median``: the largest per-channel ``max |x|`` over the median one (flat ~ 1-3;
  a massive channel ~ 10^2-10^3);
- ``top1_energy``: the share of ``sum ||x||^2`` along the leading eigenvector of ``X^T X``
  (power iteration on ``X``; no ``d x d`` matrix). One dominant direction: near 1.

With an R1 rotation (``rotation=``), the residual-stream sites (``attn_in``, ``mlp_in``) are
also measured after ``x -> x R1``, the input the rotated model's linears see; ``o_in`` and
``down_in`` are R1-free (R2/R4 act there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .model.arch import architecture_of
from .model.decoder import LayerRunner, load_decoder_layer
from .progress import track

__all__ = ["SiteOutliers", "site_outliers", "activation_outliers", "channel_max_abs", "offq_r1",
           "summarize"]

POWER_ITERATIONS = 60


@dataclass(frozen=True)
class SiteOutliers:
    """The statistics of one input site (see the module docstring)."""

    layer: int
    site: str
    rotated: bool  # after R1
    tokens: int
    max_abs: float
    channel: int
    max_over_median: float
    top1_energy: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def channel_max_abs(x: np.ndarray) -> np.ndarray:
    """Per-channel ``max |x|`` of ``x[..., d]`` over every token."""
    return np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)


def _top1_energy(x: np.ndarray, rng: np.random.Generator) -> float:
    """Largest eigenvalue of ``X^T X`` over its trace, by power iteration on ``X`` (float64)."""
    total = float(np.einsum("ij,ij->", x, x))
    if total == 0.0:
        return 0.0
    v = rng.standard_normal(x.shape[1])
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(POWER_ITERATIONS):
        w = x.T @ (x @ v)
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return min(1.0, lam / total)


def site_outliers(x: np.ndarray, layer: int, site: str, *, rotated: bool = False,
                  seed: int = 0) -> SiteOutliers:
    """The statistics of one site's inputs ``x[..., d]`` (any leading shape)."""
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    if not np.all(np.isfinite(x2)):
        raise ValueError(f"layer {layer} site {site}: the activations contain NaN or Inf")
    per_channel = np.abs(x2).max(axis=0)
    channel = int(per_channel.argmax())
    median = float(np.median(per_channel))
    return SiteOutliers(
        layer=layer, site=site, rotated=rotated, tokens=int(x2.shape[0]),
        max_abs=float(per_channel[channel]), channel=channel,
        max_over_median=float(per_channel[channel] / median) if median > 0 else float("inf"),
        top1_energy=_top1_energy(x2, np.random.default_rng(seed)))


def offq_r1(ckpt: Any, calib: np.ndarray, config: Any = None, *,
            show: bool | None = None) -> np.ndarray:
    """OffQ's R1 ``[d, d]`` for ``ckpt`` from ``calib`` (the recipe's statistics pass and
    rotation; ``config`` defaults to ``QuantConfig(method="offq")``)."""
    from .config import QuantConfig
    from .recipe.pipeline import check_hadamard_sizes, compute_rotations

    config = QuantConfig(method="offq") if config is None else config
    if config.method != "offq":
        raise ValueError(f"config: OffQ's R1 needs method='offq', got {config.method!r}")
    mc = ckpt.config.replace(tie_word_embeddings=False)
    check_hadamard_sizes(mc, config)
    r1, _, _ = compute_rotations(ckpt, mc, config, np.asarray(calib), 2, show)
    return r1


def activation_outliers(ckpt: Any, calib: np.ndarray, *, rotation: np.ndarray | None = None,
                        layers: Sequence[int] | None = None, keep_channels: int | None = None,
                        show: bool | None = None) -> tuple[list[SiteOutliers], dict]:
    """Statistics of every site of ``layers`` (default all) on ``calib[n, seqlen]`` token ids.

    Layers are read one at a time from the checkpoint (norm-fused float32) and the calibration
    batch goes through the whole stack. With ``rotation`` (R1 ``[d, d]``) the residual sites are
    measured before and after it. ``keep_channels=L`` also returns, for layer ``L``'s
    ``attn_in``, the per-channel ``max |x|`` before (and after) R1 in the second value
    (``{"before": [d], "after": [d]}``; for plots).
    """
    from .recipe.statistics import fused_layer

    mc = ckpt.config
    arch = architecture_of(mc)
    wanted = set(range(mc.num_hidden_layers) if layers is None else layers)
    bad = sorted(i for i in wanted if not 0 <= i < mc.num_hidden_layers)
    if bad:
        raise ValueError(f"layers: {bad} out of range for a {mc.num_hidden_layers}-layer model")
    if rotation is not None and rotation.shape != (mc.hidden_size, mc.hidden_size):
        raise ValueError(f"rotation: expected [{mc.hidden_size}, {mc.hidden_size}], got "
                         f"{rotation.shape}")
    calib = np.asarray(calib)
    runner = LayerRunner(mc)
    h = np.asarray(ckpt.tensors[arch.embed[0]], dtype=np.float32)[calib]
    rows: list[SiteOutliers] = []
    channels: dict[str, np.ndarray] = {}
    last = max(wanted)
    for i in track(range(last + 1), "inspect layers", unit="layer", show=show):
        layer = load_decoder_layer(fused_layer(ckpt, mc, i), mc, i)

        def capture(site: str, _i: int, x: np.ndarray, i: int = i) -> None:
            if i not in wanted:
                return
            rows.append(site_outliers(x, i, site))
            residual = site in arch.site_norm
            if rotation is not None and residual:
                xr = x.reshape(-1, x.shape[-1]).astype(np.float64) @ rotation
                rows.append(site_outliers(xr, i, site, rotated=True))
                if keep_channels == i and site == "attn_in":
                    channels["after"] = channel_max_abs(xr)
            if keep_channels == i and site == "attn_in":
                channels["before"] = channel_max_abs(x)

        h = runner.forward(layer, h, capture=capture)
    return rows, channels


def summarize(rows: Sequence[SiteOutliers]) -> str:
    """A table: one line per layer and site (after-R1 columns when present)."""
    after = {(r.layer, r.site): r for r in rows if r.rotated}
    head = (f"{'layer':>5} {'site':<8} {'max|x|':>9} {'channel':>7} {'max/med':>8} {'top1':>6}"
            + (f" | {'R1: max|x|':>10} {'max/med':>8} {'top1':>6}" if after else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.rotated:
            continue
        line = (f"{r.layer:>5} {r.site:<8} {r.max_abs:>9.2f} {r.channel:>7} "
                f"{r.max_over_median:>8.1f} {r.top1_energy:>6.3f}")
        a = after.get((r.layer, r.site))
        if a is not None:
            line += f" | {a.max_abs:>10.2f} {a.max_over_median:>8.1f} {a.top1_energy:>6.3f}"
        lines.append(line)
    return "\n".join(lines)
