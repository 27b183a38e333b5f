/* x86/matmul_i8_avx2.c: the few-rows int8 x float32 row kernel (matmul_i8.c) with 8-wide vectors:
 * 8 int8 weights widened to float per step, two accumulators per group, the group scale applied
 * with one FMA per group. Groups that are not a multiple of 16 take the generic kernel. */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline __m256 widen8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

__attribute__((target("avx2,fma"))) void offq_i8_rows_avx2(const float *x, int64_t m, int64_t k,
                                                          const int8_t *w, const float *scale,
                                                          int64_t group, int64_t n0, int64_t n1,
                                                          int64_t ldo, float *out)
{
    if (group % 16 != 0) {
        offq_i8_rows_generic(x, m, k, w, scale, group, n0, n1, ldo, out);
        return;
    }
    const int64_t ng = k / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        const float *sc = scale + n * ng;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * k;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++) {
                __m256 d0 = _mm256_setzero_ps(), d1 = d0;
                for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
                    d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), widen8(wr + i), d0);
                    d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 8), widen8(wr + i + 8), d1);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[g]), _mm256_add_ps(d0, d1), acc);
            }
            out[r * ldo + n] = hsum8(acc);
        }
    }
}
#endif
