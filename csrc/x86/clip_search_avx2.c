/* x86/clip_search_avx2.c: the clip search's row error (clip_search.c) 8 elements at a time.
 *
 * The same float32 operations as the generic loop (division, round to nearest even, the clamp as
 * the generic's comparisons order it, no fused multiply-add) and the same float64 summation order:
 * element i goes into lane i % 4 of one 4-double accumulator, the g % 4 leftovers into lane 0,
 * then (l0 + l1) + (l2 + l3). The square of a float32 is exact in float64, so every sum matches
 * the generic one bit for bit. */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

/* e = (min(maxq, max(0, rint(x / s) + z)) - z) * s - x, lane by lane. max_ps(0, q) is
 * `0 > q ? 0 : q` and min_ps(maxq, q) is `maxq < q ? maxq : q`: the generic's clamps, a NaN and
 * the sign of a zero included. */
__attribute__((target("avx2,fma"))) static inline __m256 round_trip_error(__m256 x, __m256 s,
                                                                          __m256 z, __m256 maxq)
{
    __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_add_ps(q, z);
    q = _mm256_max_ps(_mm256_setzero_ps(), q);
    q = _mm256_min_ps(maxq, q);
    return _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(q, z), s), x);
}

__attribute__((target("avx2,fma"))) static inline __m256d add_squares(__m256d acc, __m128 e)
{
    const __m256d d = _mm256_cvtps_pd(e);
    return _mm256_add_pd(acc, _mm256_mul_pd(d, d));
}

__attribute__((target("avx2,fma"))) double offq_clip_row_error_avx2(const float *x, int64_t g,
                                                                    float s, float z, float maxq)
{
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vmax = _mm256_set1_ps(maxq);
    __m256d acc = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= g; i += 8) {
        const __m256 e = round_trip_error(_mm256_loadu_ps(x + i), vs, vz, vmax);
        acc = add_squares(acc, _mm256_castps256_ps128(e));
        acc = add_squares(acc, _mm256_extractf128_ps(e, 1));
    }
    float e[8];
    const int64_t rest = g - i;
    if (rest > 0) { /* a padded copy of the last < 8 elements (padding lanes are not summed) */
        float xp[8] = {0};
        for (int64_t j = 0; j < rest; j++) {
            xp[j] = x[i + j];
        }
        _mm256_storeu_ps(e, round_trip_error(_mm256_loadu_ps(xp), vs, vz, vmax));
    }
    int64_t j = 0;
    if (rest >= 4) {
        acc = add_squares(acc, _mm_loadu_ps(e));
        j = 4;
    }
    double lane[4];
    _mm256_storeu_pd(lane, acc);
    for (; j < rest; j++) {
        lane[0] += (double)e[j] * (double)e[j];
    }
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}
#endif
