"""Figures (matplotlib, the optional ``plot`` extra): every one titled, labelled, with units and
its protocol in a caption, so it can be read on its own.

- :func:`plot_activation_channels`: per-channel ``max |x|`` of one site before and after R1;
- :func:`plot_perplexity_bars`: perplexity by method (the results table);
- :func:`plot_kernel_speedups`: each kernel's speed-up over its OpenBLAS/NumPy baseline;
- :func:`plot_e2e`: end-to-end tokens/s by engine.

Each returns its matplotlib Figure (built without pyplot, so no backend is chosen: a notebook
displays it inline) and, given a path, also writes it as a PNG, atomically (temporary name, then
rename).
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_activation_channels", "plot_perplexity_bars", "plot_kernel_speedups",
           "plot_e2e"]

CAPTION_WIDTH = 110


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot: no backend is chosen or changed (a notebook keeps its
    inline display; a headless run needs no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'offq[plot]'") from None
    return Figure(figsize=(width, height))


def _save(fig: Any, path: str | os.PathLike | None, caption: str) -> Any:
    """Lay the figure out above its caption, then write the PNG atomically (when ``path``);
    returns the Figure (a notebook displays it)."""
    import io

    from .formats.files import atomic_write_bytes

    text = textwrap.fill(caption, CAPTION_WIDTH)
    lines = text.count("\n") + 1
    caption_height = (lines * 7 * 1.35 + 10) / 72 / fig.get_figheight()  # 7 pt text
    fig.tight_layout(rect=(0, caption_height + 0.04, 1, 1))
    fig.text(0.01, 0.01, text, fontsize=7, va="bottom", ha="left", color="#333333")
    if path is None:
        return fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return fig


def plot_activation_channels(before: np.ndarray, after: np.ndarray | None,
                             path: str | os.PathLike | None, *, title: str, caption: str,
                             after_label: str = "after OffQ R1") -> Any:
    """Bars of per-channel ``max |x|`` before (and after) a rotation, on one shared y axis."""
    panels = [("before rotation", before)] + ([(after_label, after)] if after is not None else [])
    fig = _figure(5.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        ax.bar(np.arange(len(values)), values, width=1.0, color="#1f77b4")
        ax.set_title(f"{label}: max {values.max():.1f}, median {np.median(values):.2f}",
                     fontsize=9)
        ax.set_xlabel("input channel")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("max |x| over calibration tokens")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, caption)


def plot_perplexity_bars(rows: Sequence[tuple[str, float]], path: str | os.PathLike | None, *,
                         title: str, caption: str, reference: tuple[str, float] | None = None
                         ) -> Any:
    """Horizontal bars of perplexity per method (log scale when they span > 10x); ``reference``
    (e.g. ``("FP32", 18.9)``) is drawn as a dashed line."""
    names = [n for n, _ in rows]
    values = np.array([v for _, v in rows], dtype=float)
    fig = _figure(7.5, 0.42 * len(rows) + 1.9)
    ax = fig.subplots()
    ax.barh(np.arange(len(rows)), values, color="#1f77b4")
    ax.set_yticks(np.arange(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    finite = values[np.isfinite(values)]
    if finite.size and finite.max() / max(finite.min(), 1e-9) > 10:
        ax.set_xscale("log")
        low = min([finite.min()] + ([reference[1]] if reference is not None else []))
        ax.set_xlim(left=0.8 * low)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    if reference is not None:
        ax.axvline(reference[1], color="#d62728", ls="--", lw=1,
                   label=f"{reference[0]} {reference[1]:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path, caption)


def plot_kernel_speedups(rows: Sequence[dict[str, Any]], path: str | os.PathLike | None, *,
                         caption: str, title: str = "offq kernels: speed-up over the baseline "
                                                      "in the same run") -> Any:
    """One bar per (case, threads): baseline seconds / offq seconds against the first measured
    baseline of each row; the 1x line marks parity."""
    items = []
    for r in rows:
        base = next(((k, v) for k, v in r["speedup_vs"].items() if v is not None), None)
        if base is not None:
            items.append((f"{r['case']} [{r['threads']} th] vs {base[0]}", base[1]))
    fig = _figure(8.5, 0.3 * len(items) + 1.9)
    ax = fig.subplots()
    ax.barh(np.arange(len(items)), [v for _, v in items], color="#2ca02c")
    ax.set_yticks(np.arange(len(items)), [n for n, _ in items], fontsize=6.5)
    ax.invert_yaxis()
    ax.axvline(1.0, color="#333333", lw=1, ls="--", label="1x = baseline speed")
    for y, (_, v) in enumerate(items):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=6.5)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up (baseline time / offq time, log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, caption)


def plot_e2e(result: dict[str, Any], path: str | os.PathLike | None, *, caption: str) -> Any:
    """Grouped bars of tokens/s per test, one bar per engine and thread count."""
    tests = result["protocol"]["tests"]
    series: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        series.setdefault(f"{r['engine']} ({r['threads']} th)", {})[r["test"]] = r["tokens_per_s"]
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(tests)) + k * width, [vals.get(t, 0.0) for t in tests], width,
               label=name)
    ax.set_xticks(np.arange(len(tests)) + 0.4 - width / 2, tests)
    ax.set_ylabel("tokens per second (higher is better)")
    ax.set_title(f"End-to-end speed, {result['protocol']['model']}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, caption)
