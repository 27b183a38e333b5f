/* gptq.c: GPTQ's per-column step over one run of columns inside a lazy-update sub-block.
 *
 * The recipe (offq/quantizers/gptq.py) keeps the weight transposed, wt[k][n] (row i is the i-th
 * column in GPTQ's order), and applies the block-level updates itself (BLAS products). What is
 * left per column is elementwise over the n outputs and costs NumPy one call per operation:
 * round the column onto its grid, record its rounding error against the original weight, and
 * push that error onto the rest of the sub-block. Every output (a position along n) evolves
 * independently of the others, so the outputs are split across threads and each thread runs all
 * the columns of the call.
 *
 * The arithmetic is NumPy's, operation for operation, so the result is bit for bit the same:
 * the float32 grid of the C quantizer (offq_quant_code, kernels.h; then s * (q - z)), the error
 * and update (T)q_hat - orig[i] and wt[t] - s[i][t] * e in the working type T (two roundings:
 * this file is built with -ffp-contract=off like every other). T is double (offq's default) or
 * float (GPTQ in float32, as the reference implementation runs it: half the bytes, sgemm). Why
 * the original weight and a unit factor, not the running weight over a pivot of the inverse's
 * factor: offq/quantizers/gptq.py.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>

#include <cblas.h>

/* Outputs per thread chunk: enough that the team's start-up is paid back. */
#define GPTQ_CHUNK 256

#define DEFINE_GPTQ_COLUMNS(T, NAME)                                                              \
    void NAME(T *wt, const float *orig, int64_t n, T *err, const T *s, int64_t k, uint8_t *codes, \
              const float *scale, const float *zero, int64_t groups, const int64_t *column_group, \
              int64_t block_start, int64_t first, int64_t end, int64_t sub_end, int bits)         \
    {                                                                                             \
        const float maxq = (float)((1 << bits) - 1);                                              \
        const int team = n >= 2 * GPTQ_CHUNK && (end - first) * n >= 65536;                       \
        _Pragma("omp parallel for schedule(static) if (team)")                                    \
        for (int64_t r0 = 0; r0 < n; r0 += GPTQ_CHUNK) {                                          \
            const int64_t r1 = r0 + GPTQ_CHUNK < n ? r0 + GPTQ_CHUNK : n;                         \
            for (int64_t i = first; i < end; i++) {                                               \
                const T *si = s + i * k;                                                          \
                const int64_t grp = column_group[i];                                              \
                T *row = wt + i * n;                                                              \
                const float *w0 = orig + i * n;                                                   \
                T *e = err + (i - block_start) * n;                                               \
                uint8_t *q = codes + i * n;                                                       \
                for (int64_t r = r0; r < r1; r++) {                                               \
                    const float sc = scale[r * groups + grp], z = zero[r * groups + grp];         \
                    const uint8_t c = offq_quant_code((float)row[r], sc, z, maxq);                \
                    const float q_hat = sc * ((float)c - z);                                      \
                    q[r] = c;                                                                     \
                    e[r] = (T)q_hat - (T)w0[r];                                                   \
                }                                                                                 \
                for (int64_t t = i + 1; t < sub_end; t++) {                                       \
                    const T f = si[t];                                                            \
                    T *dst = wt + t * n;                                                          \
                    for (int64_t r = r0; r < r1; r++) {                                           \
                        dst[r] = dst[r] - f * e[r];                                               \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_GPTQ_COLUMNS(double, offq_gptq_columns)
DEFINE_GPTQ_COLUMNS(float, offq_gptq_columns_f32)

/* wt[t0..t1) -= s[first..last, t0..t1)^T err[first - block_start ..]: one gemm with beta = 1,
 * so the product is accumulated into wt without a temporary (at K = 8960 NumPy's
 * `wt -= a.T @ b` allocated and swept a 110 MB product per block). */
#define DEFINE_GPTQ_BLOCK_UPDATE(T, NAME, GEMM)                                                   \
    void NAME(T *wt, int64_t n, const T *err, const T *s, int64_t k, int64_t block_start,         \
              int64_t first, int64_t last, int64_t t0, int64_t t1)                                \
    {                                                                                             \
        if (t1 <= t0 || last <= first || n == 0) {                                                \
            return;                                                                               \
        }                                                                                         \
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)(t1 - t0), (blasint)n,             \
             (blasint)(last - first), -1, s + first * k + t0, (blasint)k,                         \
             err + (first - block_start) * n, (blasint)n, 1, wt + t0 * n, (blasint)n);            \
    }

DEFINE_GPTQ_BLOCK_UPDATE(double, offq_gptq_block_update, scipy_cblas_dgemm)
DEFINE_GPTQ_BLOCK_UPDATE(float, offq_gptq_block_update_f32, scipy_cblas_sgemm)
