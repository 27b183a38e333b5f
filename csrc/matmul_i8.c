/* matmul_i8.c: out = x @ dequantize(w)^T for float32 activations and int8 weights with one float
 * scale per group of `group` consecutive inputs of a row (w_hat[n, i] = scale[n, i / group] *
 * w[n, i]): the LM head stored in 8 bits.
 *
 * Few rows (decode, m <= OFFQ_I8_SMALL_M): the weights are read once, straight from int8, by the
 * dispatched row kernel (generic here, AVX2 in x86/matmul_i8_avx2.c), OpenMP over blocks of
 * output columns. Per output (m, n): per group a float32 dot of the group's inputs and int8
 * weights, scaled by the group scale and summed over groups. Many rows (perplexity over every
 * position): each block of weight rows is dequantized to float32 once and multiplied by sgemm.
 */
#include <omp.h>
#include <stdlib.h>

#include <cblas.h>

#include "kernels.h"

#define BLOCK_N 64 /* output columns per task / per dequantized block */

void offq_i8_rows_generic(const float *x, int64_t m, int64_t k, const int8_t *w,
                          const float *scale, int64_t group, int64_t n0, int64_t n1, int64_t ldo,
                          float *out)
{
    const int64_t ng = k / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * k;
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                float d[8] = {0};
                for (int64_t i = g * group; i < (g + 1) * group; i++) {
                    d[i & 7] += xr[i] * (float)wr[i];
                }
                const float dot = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
                acc += scale[n * ng + g] * dot;
            }
            out[r * ldo + n] = acc;
        }
    }
}

offq_status offq_matmul_i8(const float *x, int64_t m, int64_t k, const int8_t *w,
                           const float *scale, int64_t n, int64_t group, float *out, int generic)
{
    if (m == 0 || n == 0) {
        return OFFQ_OK;
    }
    const int64_t blocks = (n + BLOCK_N - 1) / BLOCK_N, ng = k / group;
    if (m <= OFFQ_I8_SMALL_M) {
        const offq_i8_rows_fn rows = generic ? offq_i8_rows_generic : offq_dispatch.i8_rows;
#pragma omp parallel for schedule(dynamic, 8) if (blocks > 1 && m * n * k >= ((int64_t)1 << 22))
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n1 = (b + 1) * BLOCK_N < n ? (b + 1) * BLOCK_N : n;
            rows(x, m, k, w, scale, group, b * BLOCK_N, n1, n, out);
        }
        return OFFQ_OK;
    }
    float *buf = malloc(sizeof(float) * (size_t)(BLOCK_N * k));
    if (buf == NULL) {
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * BLOCK_N, nn = (n0 + BLOCK_N < n ? n0 + BLOCK_N : n) - n0;
        for (int64_t j = 0; j < nn; j++) {
            const int8_t *wr = w + (n0 + j) * k;
            for (int64_t i = 0; i < k; i++) {
                buf[j * k + i] = scale[(n0 + j) * ng + i / group] * (float)wr[i];
            }
        }
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)nn, (int)k, 1.0f, x,
                    (int)k, buf, (int)k, 0.0f, out + n0, (int)n);
    }
    free(buf);
    return OFFQ_OK;
}
