"""offq.kernels: typed wrappers of the C core (offq._C).

Everything a method or the runtime needs: Walsh-Hadamard transforms (:mod:`.hadamard`), covariance
accumulation and top eigenpairs (:mod:`.cov`), group-wise quantization and the W4A4 matmul
(:mod:`.quant`), and the single thread setting (:mod:`.threads`).
"""
from .cov import cov_update, top_eigenpairs
from .hadamard import SUPPORTED_ORDERS, fwht, hadamard_factor, hadamard_matrix, is_supported
from .threads import get_num_threads, set_num_threads, threads

try:
    from .quant import QTensor, dequantize, matmul_w4a4, quantize
except ModuleNotFoundError as exc:  # TODO(lead): drop this guard once offq/kernels/quant.py lands
    if exc.name != f"{__name__}.quant":
        raise

__all__ = [
    "fwht",
    "hadamard_matrix",
    "hadamard_factor",
    "is_supported",
    "SUPPORTED_ORDERS",
    "cov_update",
    "top_eigenpairs",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "QTensor",
    "quantize",
    "dequantize",
    "matmul_w4a4",
]
