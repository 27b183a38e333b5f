/* clip_search.c: the MSE clip search of the weight grids (offq.quant.grid.mse_clip_search).
 *
 * For each row (a weight row, or one group of it), the clip ratio 1 - i / grid (i = 0 .. top)
 * whose grid reproduces the row with the least squared error: every 5th ratio first, then the
 * 8 neighbours of the best one (25 round trips of the row instead of 81). NumPy did each trial as
 * eight passes over the whole matrix on one thread; here a row stays in cache for all its
 * trials, the rows are split over offq's threads, and each trial's row error is the dispatched
 * one (x86/clip_search_avx2.c on AVX2 CPUs: the same bits).
 *
 * The grids are the C quantizer's (kernels.h), which grid.py's float32 NumPy formulas match bit
 * for bit but for the sign of a zero zero-point (+0 here). Each trial's squared error is summed in
 * float64 from exact float32 squares, in another order than NumPy's einsum: where two ratios'
 * errors tie (or differ only in their last bits) the two can pick differently. A row with NaN or
 * Inf, or (asymmetric) whose range max - min overflows float32, is refused as the quantizer
 * refuses it.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>

/* Coarse stride of the search (grid.py: every 5th ratio, then the 8 neighbours). */
#define CLIP_STEP 5

/* The grid of a row for clip ratio `clip`: the quantizer's own formulas (kernels.h). The range
 * does not depend on the ratio, so only the first candidate can meet an overflowing one. */
static inline offq_status params_of_range(float lo_or_amax, float hi, float clip, int bits,
                                          int symmetric, float *scale, float *zero)
{
    if (symmetric) {
        offq_quant_params_sym(lo_or_amax, bits, clip, scale, zero);
        return OFFQ_OK;
    }
    return offq_quant_params_asym(lo_or_amax, hi, bits, clip, scale, zero);
}

/* Elements per pass of the generic row error: the float32 round trip of a chunk, then its squares
 * summed in float64 (kernels.h fixes the order; x86/clip_search_avx2.c keeps it). */
#define ERR_CHUNK 256

/* Squared round-trip error of the row on the grid (s, z), summed in float64: the reference, and
 * what CPUs without AVX2 run (~12 cycles an element on a Zen3, 10x the AVX2 variant's time). */
double offq_clip_row_error_generic(const float *x, int64_t g, float s, float z, float maxq)
{
    float e[ERR_CHUNK];
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t j0 = 0; j0 < g; j0 += ERR_CHUNK) {
        const int n = g - j0 < ERR_CHUNK ? (int)(g - j0) : ERR_CHUNK;
        const float *xc = x + j0;
        for (int j = 0; j < n; j++) {
            float q = offq_round_half_even(xc[j] / s) + z;
            q = q < 0.0f ? 0.0f : q;
            q = q > maxq ? maxq : q;
            e[j] = (q - z) * s - xc[j];
        }
        int j = 0;
        for (; j + 4 <= n; j += 4) {
            for (int l = 0; l < 4; l++) {
                acc[l] += (double)e[j + l] * (double)e[j + l];
            }
        }
        for (; j < n; j++) {
            acc[0] += (double)e[j] * (double)e[j];
        }
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

offq_status offq_mse_clip_search(const float *x, int64_t rows, int64_t g, int bits, int symmetric,
                                 int grid, int top, float *scale, float *zero)
{
    const float maxq = (float)((1 << bits) - 1);
    int bad = 0, overflow = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(| : bad, overflow) if (rows * g >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * g;
        float a = symmetric ? 0.0f : row[0], b = row[0];
        int nonfinite = 0;
        for (int64_t j = 0; j < g; j++) { /* (max |x|) or (min, max) */
            nonfinite |= offq_is_nonfinite(row[j]);
            if (symmetric) {
                const float v = fabsf(row[j]);
                a = v > a ? v : a;
            } else {
                a = row[j] < a ? row[j] : a;
                b = row[j] > b ? row[j] : b;
            }
        }
        float s, z;
        if (nonfinite || params_of_range(a, b, 1.0f, bits, symmetric, &s, &z) != OFFQ_OK) {
            bad |= nonfinite;
            overflow |= !nonfinite;
            continue;
        }
        int best = 0;
        double best_err = INFINITY;
        for (int pass = 0; pass < 2; pass++) {
            const int coarse = best;
            const int from = pass == 0 ? 0 : -CLIP_STEP + 1;
            const int to = pass == 0 ? top : CLIP_STEP - 1;
            const int stride = pass == 0 ? CLIP_STEP : 1;
            for (int t = from; t <= to; t += stride) {
                if (pass == 1 && t == 0) {
                    continue;
                }
                int i = pass == 0 ? t : coarse + t;
                i = i < 0 ? 0 : (i > top ? top : i);
                params_of_range(a, b, (float)(1.0 - (double)i / grid), bits, symmetric, &s, &z);
                const double err = offq_dispatch.clip_row_error(row, g, s, z, maxq);
                if (err < best_err) {
                    best_err = err;
                    best = i;
                }
            }
        }
        params_of_range(a, b, (float)(1.0 - (double)best / grid), bits, symmetric, &scale[r],
                        &zero[r]);
    }
    return bad ? OFFQ_ERR_NONFINITE : overflow ? OFFQ_ERR_OVERFLOW : OFFQ_OK;
}
