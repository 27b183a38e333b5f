"""Input Hessians of chosen decoder layers' linear sites on the float model (the OSAQ
benchmarks: benchmarks/bench_osaq_heldout.py, benchmarks/bench_osaq_grid.py)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..model import Model
from ..model.arch import Architecture, architecture_of
from ..quantizers.gptq import HessianAccumulator

SiteHessians = dict[tuple[str, int], np.ndarray]


def check_layers(model: Model, layers: list[int]) -> None:
    """Raise ValueError naming the ``layers`` outside ``model``."""
    bad = [i for i in layers if not 0 <= i < model.num_layers]
    if bad:
        raise ValueError(f"--layers: {bad} outside 0..{model.num_layers - 1}")


def site_hessians(model: Model, ids: np.ndarray, layers: list[int]) -> SiteHessians:
    """``{(site, layer): 2 X^T X / n}`` for every capture site of ``layers``, ``X`` the
    (normalised) activations the site's linears read while the float ``model`` runs the
    sequences ``ids [B, T]`` one at a time (:func:`check_layers` first)."""
    check_layers(model, layers)
    wanted = set(layers)
    accs: dict[tuple[str, int], HessianAccumulator] = {}

    def capture(site: str, i: int, x: np.ndarray) -> None:
        if i in wanted:
            acc = accs.setdefault((site, i), HessianAccumulator(x.shape[-1]))
            acc.update(x.reshape(-1, x.shape[-1]))

    for r in range(ids.shape[0]):
        model.hidden_states(ids[r:r + 1], capture=capture)
    return {key: acc.hessian for key, acc in accs.items()}


@contextlib.contextmanager
def float_model_sites(name: str, layers: list[int]
                      ) -> Iterator[tuple[Any, Architecture, Callable[[np.ndarray], SiteHessians]]]:
    """Open model ``name`` (``offq.load``), build its float model and check ``layers`` before
    any long capture; yield ``(checkpoint, architecture, hessians)`` with ``hessians(ids)`` =
    :func:`site_hessians` of those layers."""
    from .. import load

    with load(name) as ckpt:
        model = Model.from_checkpoint(ckpt)
        check_layers(model, layers)
        yield ckpt, architecture_of(ckpt.config), lambda ids: site_hessians(model, ids, layers)


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; a ValueError (a bad ``--layers`` or OSAQ setting, found
    once the model is open) ends the script with one line on stderr instead of a traceback."""
    try:
        status = main()
    except ValueError as e:
        raise SystemExit(f"{sys.argv[0]}: error: {e}") from None
    raise SystemExit(status)
