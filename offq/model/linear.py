"""Linear layers as swappable callables.

A decoder layer does not own matrices; it owns a dict of *Linear callables*
``x[..., in] -> y[..., out]`` keyed by the linear's short name (``q_proj`` ... ``down_proj``,
see :mod:`offq.model.arch`).
The float32 reference is :class:`DenseLinear`; quantization replaces entries of that dict with
fake-quant or real W4A4 implementations without touching the forward pass.

Layout follows HF/torch: a weight is stored ``[out, in]`` and ``y = x @ W.T (+ b)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .parallel import num_threads, row_chunks, run_tasks

__all__ = ["Linear", "DenseLinear", "SlicedLinear"]


@runtime_checkable
class Linear(Protocol):
    """Anything that maps float32 ``x[..., in_features]`` to float32 ``y[..., out_features]``."""

    in_features: int
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class DenseLinear:
    """Float32 ``y = x @ W.T + b`` through NumPy's BLAS (sgemm).

    Attributes:
        weight: float32 ``[out, in]``, C-contiguous (BLAS reads the transpose without a copy).
        bias: optional float32 ``[out]`` (Qwen2's q/k/v biases).
    """

    weight: np.ndarray
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"weight: expected a 2-D [out, in] array, got shape {w.shape}")
        self.weight = w
        if self.bias is not None:
            b = np.ascontiguousarray(self.bias, dtype=np.float32)
            if b.shape != (w.shape[0],):
                raise ValueError(f"bias: expected shape ({w.shape[0]},), got {b.shape}")
            self.bias = b

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected last axis {self.in_features}, got shape {x.shape}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        return self.matmul(x2).reshape(*lead, self.out_features)

    def matmul(self, x2: np.ndarray) -> np.ndarray:
        """``x2[M, in] @ W.T + b`` split across offq's threads (single-threaded BLAS per piece):
        by row blocks when M is large, by output columns otherwise (decode)."""
        w, b = self.weight, self.bias
        M, K = x2.shape
        N = w.shape[0]
        out = np.empty((M, N), dtype=np.float32)
        threads = num_threads()
        if threads == 1 or M * N * K < _PARALLEL_MIN_MACS:
            pieces: list[tuple[slice, slice]] = [(slice(None), slice(None))]
        elif M >= 32 * threads:
            pieces = [(r, slice(None)) for r in row_chunks(M, 32)]
        else:
            pieces = [(slice(None), c) for c in row_chunks(N, 256)]

        def piece(p: tuple[slice, slice]) -> None:
            r, c = p
            if c == slice(None):
                np.matmul(x2[r], w.T, out=out[r])
            else:
                out[r, c] = np.matmul(x2[r], w[c].T)
            if b is not None:
                out[r, c] += b[c]

        run_tasks(piece, pieces)
        return out


class SlicedLinear:
    """Output features ``[start, stop)`` of a fused linear (``Architecture.fused``).

    Calling it runs the whole fused product and keeps its slice: it exists so that a layer whose
    forward uses the fused linear still offers every named linear. Its parameters belong to the
    parent (``nbytes`` is 0).
    """

    def __init__(self, parent: Linear, start: int, stop: int) -> None:
        if not 0 <= start < stop <= parent.out_features:
            raise ValueError(f"start, stop: expected 0 <= start < stop <= "
                             f"{parent.out_features}, got {start}, {stop}")
        self.parent, self.start, self.stop = parent, start, stop
        self.in_features = parent.in_features
        self.out_features = stop - start
        self.nbytes = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The slice ``[..., start:stop]`` of the parent's output (C-contiguous)."""
        return np.ascontiguousarray(self.parent(x)[..., self.start:self.stop])


#: products smaller than this many multiply-adds run as one single-threaded BLAS call
_PARALLEL_MIN_MACS = 1 << 22
