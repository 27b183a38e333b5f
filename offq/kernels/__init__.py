"""offq.kernels: typed wrappers of the C core (offq._C).

Everything a method or the runtime needs: Walsh-Hadamard transforms (:mod:`.hadamard`), covariance
accumulation and top eigenpairs (:mod:`.cov`), the Hessian's UDU^T factor for GPTQ (:mod:`.linalg`)
and GPTQ's per-column step and block update (:mod:`.gptq`), group-wise quantization, the weight
grids' clip search and the W4A4 matmul (:mod:`.quant`), and the single thread setting
(:mod:`.threads`). Imported from their modules: GGUF block dequantization (:mod:`.gguf`), the
int8-weight matmul
(:mod:`.matmul_i8`), the float32 x packed 2/3/4/8-bit weight matmul of weight-only models
(:mod:`.matmul_wq`), the fused decoder steps (:mod:`.decoder`, W4A4KV4; :mod:`.decoder_wq`,
weight-only) and the weight-only step's attention over a float32 cache (:mod:`.attention_f32`).
"""
from .cov import cov_accumulator, cov_mirror, cov_update, top_eigenpairs
from .gptq import gptq_block_update, gptq_columns
from .hadamard import SUPPORTED_ORDERS, fwht, hadamard_factor, hadamard_matrix, is_supported
from .linalg import (TailFactor, smallest_eigenpairs, tail_eigenpairs, tail_subspace,
                     udu_factor, upper_cholesky_of_inverse)
from .quant import (SUPPORTED_BITS, QTensor, dequantize, matmul_w4a4, mse_clip_search, pack_codes,
                    pack_w4_decode, quantize, unpack_codes)
from .threads import get_num_threads, set_num_threads, threads

__all__ = [
    "fwht",
    "hadamard_matrix",
    "hadamard_factor",
    "is_supported",
    "SUPPORTED_ORDERS",
    "cov_accumulator",
    "cov_mirror",
    "cov_update",
    "top_eigenpairs",
    "smallest_eigenpairs",
    "tail_eigenpairs",
    "tail_subspace",
    "TailFactor",
    "udu_factor",
    "upper_cholesky_of_inverse",
    "gptq_columns",
    "gptq_block_update",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "QTensor",
    "quantize",
    "dequantize",
    "matmul_w4a4",
    "mse_clip_search",
    "pack_w4_decode",
    "pack_codes",
    "unpack_codes",
    "SUPPORTED_BITS",
]
