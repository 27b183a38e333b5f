/* x86/attention_avx2.c: offq_attend (steps: attention.c) with 8-wide float vectors: 16 codes
 * (8 packed bytes) are widened per step, q and the output accumulate in ymm registers. Needs
 * group % 16 == 0 (so hd % 16 == 0); other shapes take the generic kernel. */
#include <math.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

/* 16 codes (8 packed bytes, element 2i in the low nibble) as two float vectors, minus z. */
__attribute__((target("avx2,fma"))) static inline void codes16(const uint8_t *p, __m256 z,
                                                               __m256 *lo8, __m256 *hi8)
{
    const __m128i v = _mm_loadl_epi64((const __m128i *)p);
    const __m128i m15 = _mm_set1_epi8(15);
    const __m128i bytes =
        _mm_unpacklo_epi8(_mm_and_si128(v, m15), _mm_and_si128(_mm_srli_epi16(v, 4), m15));
    *lo8 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), z);
    *hi8 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), z);
}

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

__attribute__((target("avx2,fma"))) void offq_attend_avx2(const offq_attn_args *a,
                                                         const float *q, float *s, float *out)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    if (g % 16 != 0) {
        offq_attend_generic(a, q, s, out);
        return;
    }
    float mx = -INFINITY;
    for (int64_t j = 0; j < a->n; j++) {
        const uint8_t *c = a->kc + j * a->cstride;
        float sj = 0.0f;
        for (int64_t gi = 0; gi < ng; gi++) {
            const __m256 z = _mm256_set1_ps(a->kz[j * a->pstride + gi]);
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
            for (int64_t i = gi * g; i < (gi + 1) * g; i += 16) {
                __m256 lo, hi;
                codes16(c + i / 2, z, &lo, &hi);
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), lo, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), hi, acc1);
            }
            sj += a->ks[j * a->pstride + gi] * hsum8(_mm256_add_ps(acc0, acc1));
        }
        s[j] = sj;
        mx = sj > mx ? sj : mx;
    }
    float den = 0.0f;
    for (int64_t j = 0; j < a->n; j++) {
        s[j] = expf(s[j] - mx);
        den += s[j];
    }
    for (int64_t i = 0; i < hd; i++) {
        out[i] = 0.0f;
    }
    for (int64_t j = 0; j < a->n; j++) {
        const uint8_t *c = a->vc + j * a->cstride;
        for (int64_t gi = 0; gi < ng; gi++) {
            const __m256 w = _mm256_set1_ps(s[j] * a->vs[j * a->pstride + gi]);
            const __m256 z = _mm256_set1_ps(a->vz[j * a->pstride + gi]);
            for (int64_t i = gi * g; i < (gi + 1) * g; i += 16) {
                __m256 lo, hi;
                codes16(c + i / 2, z, &lo, &hi);
                _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, lo, _mm256_loadu_ps(out + i)));
                _mm256_storeu_ps(out + i + 8,
                                 _mm256_fmadd_ps(w, hi, _mm256_loadu_ps(out + i + 8)));
            }
        }
    }
    const __m256 inv = _mm256_set1_ps(den);
    for (int64_t i = 0; i < hd; i += 8) {
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), inv));
    }
}
#endif
