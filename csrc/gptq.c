/* gptq.c: GPTQ's per-column step over one run of columns inside a lazy-update sub-block.
 *
 * The recipe (offq/quantizers/gptq.py) keeps the weight transposed, wt[k][n] (row i is the i-th
 * column in GPTQ's order), and applies the block-level updates itself (BLAS products). What is
 * left per column is elementwise over the n outputs and costs NumPy one call per operation:
 * round the column onto its grid, record the scaled error, and push that error onto the rest of
 * the sub-block. Every output (a position along n) evolves independently of the others, so the
 * outputs are split across threads and each thread runs all the columns of the call.
 *
 * The arithmetic is NumPy's, operation for operation, so the result is bit for bit the same:
 * the float32 grid of the C quantizer (offq_quant_code, kernels.h; then s * (q - z)), a float64
 * error and update (wt - (double)q_hat) / u[i][i] and wt[t] - u[i][t] * e (two roundings: this
 * file is built with -ffp-contract=off like every other).
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>

/* Outputs per thread chunk: enough that the team's start-up is paid back. */
#define GPTQ_CHUNK 256

void offq_gptq_columns(double *wt, int64_t n, double *err, const double *u, int64_t k,
                       uint8_t *codes, const float *scale, const float *zero, int64_t groups,
                       const int64_t *column_group, int64_t block_start, int64_t first,
                       int64_t end, int64_t sub_end, int bits)
{
    const float maxq = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(static) if (n >= 2 * GPTQ_CHUNK && (end - first) * n >= 65536)
    for (int64_t r0 = 0; r0 < n; r0 += GPTQ_CHUNK) {
        const int64_t r1 = r0 + GPTQ_CHUNK < n ? r0 + GPTQ_CHUNK : n;
        for (int64_t i = first; i < end; i++) {
            const double *ui = u + i * k;
            const double pivot = ui[i];
            const int64_t grp = column_group[i];
            double *row = wt + i * n;
            double *e = err + (i - block_start) * n;
            uint8_t *q = codes + i * n;
            for (int64_t r = r0; r < r1; r++) {
                const float s = scale[r * groups + grp], z = zero[r * groups + grp];
                const uint8_t c = offq_quant_code((float)row[r], s, z, maxq);
                const float q_hat = s * ((float)c - z);
                q[r] = c;
                e[r] = (row[r] - (double)q_hat) / pivot;
            }
            for (int64_t t = i + 1; t < sub_end; t++) {
                const double f = ui[t];
                double *dst = wt + t * n;
                for (int64_t r = r0; r < r1; r++) {
                    dst[r] = dst[r] - f * e[r];
                }
            }
        }
    }
}
