/* swiglu.c: the SwiGLU activation of the C decoder, x_i = silu(g_i) * u_i with
 * silu(g) = g / (1 + exp(-g)) (the generic reference; x86/swiglu_avx2.c computes the same formula
 * 8 lanes at a time with a polynomial exp). */
#include <math.h>

#include "kernels.h"

void offq_swiglu_generic(const float *g, const float *u, float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float t = expf(-g[i]); /* exp(-g) -> inf: g / inf = -0, the limit */
        t = t + 1.0f;
        const float sg = g[i] / t;
        x[i] = sg * u[i];
    }
}
