"""The one interface every weight quantizer implements, so the quantize loop never knows which
method runs (docs/METHODS.md, "GPTQ" and "OSAQ").

The loop, per input site of a layer (the linears that read one activation, e.g. q/k/v):

    hessian = 2 X^T X / n of the site's calibration inputs       (only if any step needs it)
    for step in pre_steps: state = step.prepare(hessian, where);  w = step.apply(w, state)
    state = quantizer.prepare(hessian, where)                     (once per site)
    q = quantizer.quantize(stacked w of the site, state)          -> QuantizedWeight

``prepare`` does the per-site work once (GPTQ's Cholesky factor, OSAQ's Hessian tail), and
``quantize`` / ``apply`` run per weight. Output rows are independent for every quantizer here,
so the site's linears are quantized as one stacked matrix.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..quant.weight import QuantizedWeight

__all__ = ["WeightQuantizer", "PreStep"]


@dataclass(frozen=True)
class WeightQuantizer(ABC):
    """Turns a float weight ``[N, K]`` into a :class:`QuantizedWeight` on the grid these fields
    describe (``group_size`` -1: one group per output row; ``clip_search``: MSE clip ratio)."""

    bits: int = 4
    group_size: int = -1
    symmetric: bool = True
    clip_search: bool = True

    #: whether :meth:`prepare` needs the site's Hessian (False: it is called with None)
    needs_hessian: ClassVar[bool] = False

    def prepare(self, hessian: np.ndarray | None, where: str) -> Any:
        """Per-site state shared by the site's linears (``where`` names the layer and site in
        messages). Default: nothing."""
        return None

    @abstractmethod
    def quantize(self, w: np.ndarray, prepared: Any) -> QuantizedWeight:
        """Quantize ``w [N, K]`` (float32) with the site's prepared state."""


class PreStep(ABC):
    """A float-to-float weight transform applied before quantization (OSAQ), with a report."""

    needs_hessian: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, hessian: np.ndarray | None, where: str) -> Any:
        """Per-site state (computed once for the site's linears)."""

    @abstractmethod
    def apply(self, w: np.ndarray, prepared: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The transformed weight (float32, same shape) and a JSON-able report."""
