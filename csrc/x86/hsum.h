/* x86/hsum.h: a horizontal reduction shared by the AVX2 and AVX-512 VNNI gemv kernels. */
#ifndef OFFQ_X86_HSUM_H
#define OFFQ_X86_HSUM_H

#include <immintrin.h>

/* Lane i of the result = sum of the 8 int32 lanes of v[i]. */
__attribute__((target("avx2,fma"))) static inline __m256i offq_hsum8x8(const __m256i *v)
{
    __m256i a = _mm256_hadd_epi32(v[0], v[1]);
    __m256i b = _mm256_hadd_epi32(v[2], v[3]);
    __m256i c = _mm256_hadd_epi32(v[4], v[5]);
    __m256i d = _mm256_hadd_epi32(v[6], v[7]);
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20),
                            _mm256_permute2x128_si256(ab, cd, 0x31));
}

#endif
