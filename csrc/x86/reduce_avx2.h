/* x86/reduce_avx2.h: horizontal reductions of an 8-lane float vector, one fixed order (lanes
 * i and i + 4, then i and i + 2, then the pair), shared by the AVX2 kernels that end a dot
 * product or a softmax max in a scalar. */
#ifndef OFFQ_X86_REDUCE_AVX2_H
#define OFFQ_X86_REDUCE_AVX2_H

#include <immintrin.h>

__attribute__((always_inline, target("avx2,fma"))) static inline float offq_hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

__attribute__((always_inline, target("avx2,fma"))) static inline float offq_hmax8(__m256 v)
{
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

#endif
