"""Input Hessians of chosen decoder layers' linear sites on the float model (the OSAQ
benchmarks: benchmarks/bench_osaq_heldout.py, benchmarks/bench_osaq_grid.py)."""
from __future__ import annotations

import numpy as np

from ..model import Model
from ..quantizers.gptq import HessianAccumulator


def site_hessians(model: Model, ids: np.ndarray, layers: list[int]
                  ) -> dict[tuple[str, int], np.ndarray]:
    """``{(site, layer): 2 X^T X / n}`` for every capture site of ``layers``, ``X`` the
    (normalised) activations the site's linears read while the float ``model`` runs the
    sequences ``ids [B, T]`` one at a time. Raises ValueError naming a layer outside the model."""
    bad = [i for i in layers if not 0 <= i < model.num_layers]
    if bad:
        raise ValueError(f"layers: {bad} outside 0..{model.num_layers - 1}")
    wanted = set(layers)
    accs: dict[tuple[str, int], HessianAccumulator] = {}

    def capture(site: str, i: int, x: np.ndarray) -> None:
        if i in wanted:
            acc = accs.setdefault((site, i), HessianAccumulator(x.shape[-1]))
            acc.update(x.reshape(-1, x.shape[-1]))

    for r in range(ids.shape[0]):
        model.hidden_states(ids[r:r + 1], capture=capture)
    return {key: acc.hessian for key, acc in accs.items()}
