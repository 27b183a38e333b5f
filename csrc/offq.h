/* offq.h: the C API of the offq core.
 *
 * Plain C types only (pointers, int64_t sizes and strides); no Python objects below the binding
 * layer (bind_*.c). Each concern has its own header, included here:
 *   cpu.h       run-time SIMD dispatch and thread control
 *   hadamard.h  fast Walsh-Hadamard transforms (powers of two, m * 2^k, block mode)
 *   quant.h     group-wise quantize / dequantize, int4 packing, the W4A4 matmul
 *   cov.h       streaming covariance (syrk), top-1 token selection, top eigenpairs
 */
#ifndef OFFQ_H
#define OFFQ_H

#include "cpu.h"
#include "hadamard.h"
#include "quant.h"
#include "cov.h"

#endif
