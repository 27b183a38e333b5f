/* x86/norm_avx2.c: offq_residual_norm_row (norm.c) 8 and 16 lanes wide. The eight float64 sums
 * of squares sit in lanes (two ymm of 4 doubles, or one zmm of 8): lane j adds the elements
 * i = j (mod 8) in order, as the reference does, and h * h in float64 is exact for float inputs,
 * so an fma adds the same values; the division and the weight product are IEEE operations per
 * element. Both widths give the reference's bits. Rows whose d is not a multiple of 8 go to it. */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

__attribute__((target("avx2,fma"))) void offq_residual_norm_row_avx2(float *h, const float *y,
                                                                    const float *w, int64_t d,
                                                                    float eps, float *out)
{
    if (d % 8 != 0) {
        offq_residual_norm_row_generic(h, y, w, d, eps, out);
        return;
    }
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(); /* sums 0..3 and 4..7 */
    for (int64_t i = 0; i < d; i += 8) {
        __m256 v = _mm256_loadu_ps(h + i);
        if (y != NULL) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(y + i));
            _mm256_storeu_ps(h + i, v);
        }
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    double part[8];
    _mm256_storeu_pd(part, s0);
    _mm256_storeu_pd(part + 4, s1);
    const __m256 r = _mm256_set1_ps(offq_norm_root(part, d, eps));
    for (int64_t i = 0; i < d; i += 8) {
        const __m256 q = _mm256_div_ps(_mm256_loadu_ps(h + i), r);
        _mm256_storeu_ps(out + i, w != NULL ? _mm256_mul_ps(q, _mm256_loadu_ps(w + i)) : q);
    }
}

__attribute__((target("avx512f"))) void offq_residual_norm_row_avx512(float *h, const float *y,
                                                                      const float *w, int64_t d,
                                                                      float eps, float *out)
{
    if (d % 16 != 0) {
        offq_residual_norm_row_avx2(h, y, w, d, eps, out);
        return;
    }
    __m512d s = _mm512_setzero_pd(); /* sum j in lane j: both halves of 16 elements add into it */
    for (int64_t i = 0; i < d; i += 16) {
        __m512 v = _mm512_loadu_ps(h + i);
        if (y != NULL) {
            v = _mm512_add_ps(v, _mm512_loadu_ps(y + i));
            _mm512_storeu_ps(h + i, v);
        }
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi =
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        s = _mm512_fmadd_pd(lo, lo, s);
        s = _mm512_fmadd_pd(hi, hi, s);
    }
    double part[8];
    _mm512_storeu_pd(part, s);
    const __m512 r = _mm512_set1_ps(offq_norm_root(part, d, eps));
    for (int64_t i = 0; i < d; i += 16) {
        const __m512 q = _mm512_div_ps(_mm512_loadu_ps(h + i), r);
        _mm512_storeu_ps(out + i, w != NULL ? _mm512_mul_ps(q, _mm512_loadu_ps(w + i)) : q);
    }
}
#endif
