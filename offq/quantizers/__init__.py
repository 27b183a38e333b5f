"""Weight quantizers behind one interface (`base`): RTN, GPTQ, and OSAQ's null-space outlier
absorption as a pre-step, built by name from a QuantConfig (`registry`)."""
from .base import PreStep, WeightQuantizer
from .gptq import GPTQ, HessianAccumulator, HessianFactor, factor_hessian, gptq_quantize, layer_output_error
from .osaq import OSAQ, OsaqReport, hessian_tail, osaq_absorb
from .registry import PRE_STEPS, QUANTIZERS, build_weight_quantizer, parse_weight_quantizer
from .rtn import RTN, rtn_quantize

__all__ = ["GPTQ", "HessianAccumulator", "HessianFactor", "OSAQ", "OsaqReport", "PRE_STEPS",
           "PreStep", "QUANTIZERS", "RTN", "WeightQuantizer", "build_weight_quantizer",
           "factor_hessian", "gptq_quantize", "hessian_tail", "layer_output_error",
           "osaq_absorb", "parse_weight_quantizer", "rtn_quantize"]
