/* clip_search.c: the MSE clip search of the weight grids (offq.quant.grid.mse_clip_search).
 *
 * For each row (a weight row, or one group of it), the clip ratio 1 - i / grid (i = 0 .. top)
 * whose grid reproduces the row with the least squared error: every 5th ratio first, then the
 * 8 neighbours of the best one (25 round trips of the row instead of 81). NumPy did each trial as
 * eight passes over the whole matrix on one thread; here a row stays in cache for all its
 * trials and the rows are split over offq's threads.
 *
 * The arithmetic is NumPy's, in float32 step by step (grid.py's _params_of_range and
 * _row_error), with the error summed in float64 from exact float32 squares: the choice is the
 * same as NumPy's except where two ratios' float64 sums differ only in their last bits (the
 * summation orders differ), which the tests do not meet on random or real rows.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>

/* Coarse stride of the search (grid.py: every 5th ratio, then the 8 neighbours). */
#define CLIP_STEP 5

/* round half to even, as rintf in the default rounding mode, written so that the compiler can
 * vectorize it without SSE4.1: below 2^23, adding 2^23 to |t| rounds it to an integer (the
 * float spacing there is 1) and rounding to nearest even is symmetric in the sign; from 2^23 on
 * every float is an integer already. */
static inline float round_even(float t)
{
    const float two23 = 8388608.0f;
    const float at = fabsf(t);
    const float r = copysignf((at + two23) - two23, t);
    return at < two23 ? r : t;
}

/* The grid of a row for clip ratio `clip` from its range (grid.py's _params_of_range). */
static inline void params_of_range(float lo_or_amax, float hi, float clip, int bits, int symmetric,
                                   float *scale, float *zero)
{
    if (symmetric) {
        const float amax = clip * lo_or_amax;
        const float s = amax / (float)((1 << (bits - 1)) - 1);
        *scale = s == 0.0f ? 1.0f : s;
        *zero = (float)(1 << (bits - 1));
        return;
    }
    const float mn = lo_or_amax, mx = hi;
    const float d = (0.5f * (1.0f - clip)) * (mx - mn);
    const float lo = mn + d, h = mx - d;
    float s = (h - lo) / (float)((1 << bits) - 1);
    if (s == 0.0f) {
        s = h != 0.0f ? fabsf(h) : 1.0f;
    }
    *scale = s;
    *zero = rintf(-lo / s);
}

/* Elements per pass of row_error: the float32 round trip of a chunk (a loop the compiler
 * vectorizes), then its squares summed in float64. */
#define ERR_CHUNK 256

/* Squared round-trip error of the row on the grid (s, z), summed in float64. */
static double row_error(const float *x, int64_t g, float s, float z, float maxq)
{
    float e[ERR_CHUNK];
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t j0 = 0; j0 < g; j0 += ERR_CHUNK) {
        const int n = g - j0 < ERR_CHUNK ? (int)(g - j0) : ERR_CHUNK;
        const float *xc = x + j0;
        for (int j = 0; j < n; j++) {
            float q = round_even(xc[j] / s) + z;
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

void offq_mse_clip_search(const float *x, int64_t rows, int64_t g, int bits, int symmetric,
                          int grid, int top, float *scale, float *zero)
{
    const float maxq = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(dynamic, 16) if (rows * g >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * g;
        float a = symmetric ? 0.0f : row[0], b = row[0];
        for (int64_t j = 0; j < g; j++) { /* (max |x|) or (min, max) */
            if (symmetric) {
                const float v = fabsf(row[j]);
                a = v > a ? v : a;
            } else {
                a = row[j] < a ? row[j] : a;
                b = row[j] > b ? row[j] : b;
            }
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
                float s, z;
                params_of_range(a, b, (float)(1.0 - (double)i / grid), bits, symmetric, &s, &z);
                const double err = row_error(row, g, s, z, maxq);
                if (err < best_err) {
                    best_err = err;
                    best = i;
                }
            }
        }
        params_of_range(a, b, (float)(1.0 - (double)best / grid), bits, symmetric, &scale[r],
                        &zero[r]);
    }
}
