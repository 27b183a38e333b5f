"""Weight quantizers and pre-steps by name, built from a QuantConfig.

``QuantConfig.w_quantizer`` names an optional chain of pre-steps and one rounding quantizer,
joined by ``+`` (``gptq``, ``rtn``, ``osaq+gptq``, ``osaq+rtn``); this module is the one place
that reads that name. Add a method by registering its class here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .base import PreStep, WeightQuantizer
from .gptq import GPTQ
from .osaq import OSAQ
from .rtn import RTN

if TYPE_CHECKING:  # pragma: no cover
    from ..config import QuantConfig

__all__ = ["QUANTIZERS", "PRE_STEPS", "parse_weight_quantizer", "build_weight_quantizer"]

#: rounding quantizers: name -> factory(config, input dimension K)
QUANTIZERS: dict[str, Callable[["QuantConfig"], WeightQuantizer]] = {
    "rtn": lambda c: RTN(c.w_bits, c.w_group_size, c.w_symmetric, c.w_clip_search),
    "gptq": lambda c: GPTQ(c.w_bits, c.w_group_size, c.w_symmetric, c.w_clip_search,
                           c.gptq_damp, c.gptq_act_order, c.gptq_block_size,
                           c.gptq_static_groups, c.gptq_cd_sweeps, c.gptq_dtype),
}
#: pre-steps applied to the float weight before rounding: name -> factory(config)
PRE_STEPS: dict[str, Callable[["QuantConfig"], PreStep]] = {
    "osaq": lambda c: OSAQ(c.osaq_gamma, c.osaq_tau_rel, c.osaq_mu1, c.osaq_mu2, c.osaq_iters,
                        c.osaq_tail),
}


def parse_weight_quantizer(name: str) -> tuple[tuple[str, ...], str]:
    """``"osaq+gptq"`` -> ``(("osaq",), "gptq")``; ValueError naming an unknown part."""
    parts = str(name).split("+")
    *pre, rounding = parts
    if rounding not in QUANTIZERS:
        raise ValueError(f"w_quantizer: {name!r} must end in one of {sorted(QUANTIZERS)}")
    for p in pre:
        if p not in PRE_STEPS:
            raise ValueError(f"w_quantizer: unknown pre-step {p!r} in {name!r} "
                             f"(known: {sorted(PRE_STEPS)})")
    if len(set(pre)) != len(pre):
        raise ValueError(f"w_quantizer: {name!r} repeats a pre-step")
    return tuple(pre), rounding


def build_weight_quantizer(config: "QuantConfig") -> tuple[list[PreStep], WeightQuantizer]:
    """The pre-steps and the rounding quantizer of ``config``."""
    pre, rounding = parse_weight_quantizer(config.w_quantizer)
    return [PRE_STEPS[p](config) for p in pre], QUANTIZERS[rounding](config)
