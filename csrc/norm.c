/* norm.c: the residual add and RMSNorm of one row of the C decoders (the generic reference;
 * x86/norm_avx2.c gives the same bits with 8 and 16 lanes):
 *   h += y (when y is not NULL), out = h / sqrt(sum(h^2) / d + eps) * w (w NULL: ones),
 * the sum of squares in float64 as eight running sums (element i into sum i % 8) joined by one
 * fixed tree, so a vector variant holding the eight sums in lanes adds in the same order. One
 * dependent chain of d adds was ~2.4% of SmolLM2's prefill in a perf profile. */
#include <math.h>

#include "kernels.h"

void offq_residual_norm_row_generic(float *h, const float *y, const float *w, int64_t d, float eps,
                                    float *out)
{
    if (y != NULL) {
        for (int64_t i = 0; i < d; i++) {
            h[i] = h[i] + y[i];
        }
    }
    double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t i = 0; i < d; i++) {
        part[i % 8] += (double)h[i] * (double)h[i];
    }
    const float r = offq_norm_root(part, d, eps);
    for (int64_t i = 0; i < d; i++) {
        out[i] = w != NULL ? h[i] / r * w[i] : h[i] / r;
    }
}

void offq_residual_rms_norm(float *h, const float *y, const float *w, int64_t rows, int64_t d,
                            float eps, float *out)
{
    for (int64_t r = 0; r < rows; r++) {
        offq_dispatch.residual_norm_row(h + r * d, y != NULL ? y + r * d : NULL, w, d, eps,
                                        out + r * d);
    }
}
