"""Weight quantizers on the shared grid: RTN, GPTQ, and OSAQ's null-space outlier absorption."""
from .gptq import HessianAccumulator, HessianFactor, factor_hessian, gptq_quantize, layer_output_error
from .grid import dequantize_codes, grid_params, group_params, mse_clip_search, quantize_codes
from .osaq import OsaqReport, osaq_absorb
from .rtn import QuantizedWeight, rtn_quantize

__all__ = ["HessianAccumulator", "HessianFactor", "factor_hessian", "gptq_quantize", "layer_output_error", "dequantize_codes",
           "grid_params", "group_params", "mse_clip_search", "quantize_codes", "OsaqReport",
           "osaq_absorb", "QuantizedWeight", "rtn_quantize"]
