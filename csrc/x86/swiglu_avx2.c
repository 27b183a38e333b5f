/* x86/swiglu_avx2.c: offq_swiglu (swiglu.c) 8 lanes at a time, and 16 with AVX-512: the same
 * formula with the polynomial exp of exp_simd.h instead of libm's expf (they differ by about an
 * ulp); both widths give the same bits (exp_simd.h), the wider one in half the instructions. */
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

__attribute__((target("avx512f"))) void offq_swiglu_avx512(const float *g, const float *u,
                                                           float *x, int64_t n)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv), sign));
        const __m512 t = _mm512_add_ps(offq_exp16(neg), one);
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_div_ps(gv, t), _mm512_loadu_ps(u + i)));
    }
    if (i < n) { /* the last 1 to 15 lanes as AVX2 does them */
        offq_swiglu_avx2(g + i, u + i, x + i, n - i);
    }
}
#endif
