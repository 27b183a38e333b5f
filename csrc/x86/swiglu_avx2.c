/* x86/swiglu_avx2.c: offq_swiglu (swiglu.c) 8 lanes at a time: the same formula with the
 * polynomial exp of exp_simd.h instead of libm's expf (they differ by about an ulp). */
#include <math.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include "x86/exp_simd.h"

__attribute__((target("avx2,fma"))) void offq_swiglu_avx2(const float *g, const float *u,
                                                          float *x, int64_t n)
{
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 t = _mm256_add_ps(offq_exp8(_mm256_xor_ps(gv, sign)), one);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_div_ps(gv, t), _mm256_loadu_ps(u + i)));
    }
    if (i < n) { /* the tail through padded copies (padding lanes: g = 0, u = 0) */
        float gp[8] = {0}, up[8] = {0}, xp[8];
        for (int64_t k = 0; k < n - i; k++) {
            gp[k] = g[i + k];
            up[k] = u[i + k];
        }
        const __m256 gv = _mm256_loadu_ps(gp);
        const __m256 t = _mm256_add_ps(offq_exp8(_mm256_xor_ps(gv, sign)), one);
        _mm256_storeu_ps(xp, _mm256_mul_ps(_mm256_div_ps(gv, t), _mm256_loadu_ps(up)));
        for (int64_t k = 0; k < n - i; k++) {
            x[i + k] = xp[k];
        }
    }
}
#endif
