/* x86/attention_i8_avx2.c: offq_attend_i8 (steps: attention_i8.c) with 8 int32 lanes, the dot
 * products as vpmaddubsw + vpmaddwd (AVX2 has no VNNI). */
#include "kernels.h"

#ifdef OFFQ_X86
#define AI8_TARGET "avx2,fma"
#define AI8_W 8
#define AI8_NV 2 /* key vectors per score block: 4 queries x 2 = 8 accumulators of 16 ymm */
#define AI8_IV __m256i
#define AI8_FV __m256
#define AI8_ZEROI() _mm256_setzero_si256()
#define AI8_LOADI(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define AI8_SET1I(x) _mm256_set1_epi32(x)
#define AI8_CVTF(a) _mm256_cvtepi32_ps(a)
#define AI8_SET1F(x) _mm256_set1_ps(x)
#define AI8_LOADF(p) _mm256_loadu_ps(p)
#define AI8_STOREF(p, v) _mm256_storeu_ps(p, v)
#define AI8_FNMADDF(a, b, c) _mm256_fnmadd_ps(a, b, c) /* c - a * b, one rounding */
#define AI8_MULF(a, b) _mm256_mul_ps(a, b)
#define AI8_ADDF(a, b) _mm256_add_ps(a, b)
#define AI8_MAXF(a, b) _mm256_max_ps(a, b)
#define AI8_DIVF(a, b) _mm256_div_ps(a, b)
#define AI8_ABSF(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define AI8_ADDI(a, b) _mm256_add_epi32(a, b)
#define AI8_MAXI(a, b) _mm256_max_epi32(a, b)
#define AI8_MINI(a, b) _mm256_min_epi32(a, b)
#define AI8_CVTI(a) _mm256_cvtps_epi32(a)
#define AI8_STOREI(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), v)
#define AI8_DP(acc, u8, s8)                                                                       \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)))
/* partial sums in 16-bit lanes, widened once a span: |pair sums| <= 2 x 127 x 15 = 3810 (scores,
 * 8 blocks: 30480) and 2 x 255 x 15 = 7650 (values, 4 blocks: 30600), exact in int16 */
#define AI8_SPAN_S 8
#define AI8_SPAN_V 4
#define AI8_SPAN_START(acc) _mm256_setzero_si256()
/* p + maddubs(u8, s8) as one asm block: the product's register is taken only for these two
 * instructions. As intrinsics GCC hoisted the four queries' broadcasts and products of a score
 * step above their adds, which needs more than 16 ymm: one accumulator lived on the stack, and its
 * store-to-load round trip every step became the loop's critical path. */
#define AI8_DP_PART(p, u8, s8)                                                                    \
    __extension__({                                                                               \
        __m256i p_ = (p), t_;                                                                     \
        __asm__("vpmaddubsw %[b], %[a], %[t]\n\t"                                                 \
                "vpaddw %[t], %[sum], %[sum]"                                                     \
                : [sum] "+x"(p_), [t] "=&x"(t_)                                                   \
                : [a] "x"(u8), [b] "x"(s8));                                                      \
        p_;                                                                                       \
    })
#define AI8_WIDEN(acc, p) _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
#include "x86/attention_i8_tiles.h"

__attribute__((target("avx2,fma"))) void offq_attend_i8_avx2(const offq_attn_args *a, int64_t nq,
                                                              const float *q, const int64_t *n,
                                                              float *s, float *const *out,
                                                              float *tile, void *qwork)
{
    if (!offq_attn_i8_tiled(a->hd, a->group)) {
        offq_attend_i8_generic(a, nq, q, n, s, out, tile, qwork);
        return;
    }
    attend_i8_tiles(a, nq, q, n, s, out, tile, qwork);
}

/* The tiles both SIMD variants read (the layout does not depend on the vector width). */
__attribute__((target("avx2,fma"))) void offq_attn_i8_pretile_avx2(const offq_attn_args *a,
                                                                    int64_t j0, int64_t jn,
                                                                    uint8_t *dst)
{
    ai8_pretile(a, j0, jn, dst);
}
#endif
