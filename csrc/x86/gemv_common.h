/* x86/gemv_common.h: pieces shared by the AVX2 and AVX-512 VNNI small-M (gemv) kernels of the
 * W4A4 matmul: a horizontal reduction, the weight parameters of 8 columns, and the float epilogue
 * of a block (the steps of offq_mm_gemv_range_generic in the same order, so every kernel gives
 * the same bits). */
#ifndef OFFQ_X86_GEMV_COMMON_H
#define OFFQ_X86_GEMV_COMMON_H

#include <immintrin.h>

#include "kernels.h"

/* Software prefetch distance of the decode-layout kernels (bytes ahead in a group's stream). */
#ifndef DEC_PREFETCH
#define DEC_PREFETCH 4096
#endif

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

/* zw, sw and blk * zw of the 8 columns nidx[] in weight group gi. */
__attribute__((target("avx2,fma"))) static inline void
offq_gemv_wparams(const offq_mm_gemv_args *g, const int64_t *nidx, int64_t gi, __m256 *zw,
                  __m256 *sw, __m256 *bzw)
{
    const int64_t ngw = g->pl->k / g->w->group;
    float zb[8], sb[8];
    for (int j = 0; j < 8; j++) {
        zb[j] = g->w->zero[nidx[j] * ngw + gi];
        sb[j] = g->w->scale[nidx[j] * ngw + gi];
    }
    *zw = _mm256_loadu_ps(zb);
    *sw = _mm256_loadu_ps(sb);
    *bzw = _mm256_mul_ps(_mm256_set1_ps((float)g->pl->blk), *zw);
}

/* Before block b: the weight parameters of its weight group, loaded when b starts a new group.
 * *group_end is the first k past the current group (0 before the first block), so the group's
 * index is divided out only where a group starts (per-channel weights: once), not per block. */
__attribute__((target("avx2,fma"))) static inline void
offq_gemv_wgroup(const offq_mm_gemv_args *g, const int64_t *nidx, int64_t b, int64_t *group_end,
                 __m256 *zw, __m256 *sw, __m256 *bzw)
{
    const int64_t k0 = b * g->pl->blk, gw = g->w->group;
    if (k0 >= *group_end) {
        const int64_t gi = k0 / gw;
        *group_end = (gi + 1) * gw;
        offq_gemv_wparams(g, nidx, gi, zw, sw, bzw);
    }
}

/* acc += sa * sw * E for activation row m and block b, E from the integer sums d of 8 columns
 * (folded: D' - zw * asum; else D - zw * Sa - za * wT with wT = Sw - blk * zw). */
__attribute__((target("avx2,fma"))) static inline __m256
offq_gemv_epilogue(const offq_mm_gemv_args *g, int m, int64_t b, int folded, __m256i d,
                   __m256 zw, __m256 sw, __m256 wT, __m256 acc)
{
    const int64_t nb = g->pl->nb;
    __m256 e = _mm256_cvtepi32_ps(d);
    e = _mm256_fnmadd_ps(_mm256_set1_ps(g->asum[m * nb + b]), zw, e);
    if (!folded) {
        e = _mm256_fnmadd_ps(_mm256_set1_ps(g->azero[m * nb + b]), wT, e);
    }
    const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(g->ascale[m * nb + b]), sw);
    return _mm256_fmadd_ps(sc, e, acc);
}

/* The first 8 (or fewer, at the end) outputs of row m from acc. */
__attribute__((target("avx2,fma"))) static inline void
offq_gemv_store(const offq_mm_gemv_args *g, int m, int64_t n0, __m256 acc)
{
    const int64_t cols = g->pl->n - n0 < 8 ? g->pl->n - n0 : 8;
    float tmp[8];
    _mm256_storeu_ps(tmp, acc);
    memcpy(g->out + m * g->pl->n + n0, tmp, sizeof(float) * (size_t)cols);
}

/* The body of a small-M range function: groups [i0, i1) of 8 columns, each by
 * kernel(g, first column, rows, folded) with the rows (up to 4 or 8) and `folded` as constants,
 * so that the always-inline kernel is compiled once per combination. */
#define OFFQ_GEMV_CASE(kernel, r)                                                                \
    case r:                                                                                      \
        if (folded) {                                                                            \
            kernel(g, 8 * i, r, 1);                                                              \
        } else {                                                                                 \
            kernel(g, 8 * i, r, 0);                                                              \
        }                                                                                        \
        break;
#define OFFQ_GEMV_RANGE4(kernel)                                                                 \
    for (int64_t i = i0; i < i1; i++) {                                                          \
        switch (mrows) {                                                                         \
            OFFQ_GEMV_CASE(kernel, 1)                                                            \
            OFFQ_GEMV_CASE(kernel, 2)                                                            \
            OFFQ_GEMV_CASE(kernel, 3)                                                            \
        default:                                                                                 \
            OFFQ_GEMV_CASE(kernel, 4)                                                            \
        }                                                                                        \
    }
#define OFFQ_GEMV_RANGE8(kernel)                                                                 \
    for (int64_t i = i0; i < i1; i++) {                                                          \
        switch (mrows) {                                                                         \
            OFFQ_GEMV_CASE(kernel, 1)                                                            \
            OFFQ_GEMV_CASE(kernel, 2)                                                            \
            OFFQ_GEMV_CASE(kernel, 3)                                                            \
            OFFQ_GEMV_CASE(kernel, 4)                                                            \
            OFFQ_GEMV_CASE(kernel, 5)                                                            \
            OFFQ_GEMV_CASE(kernel, 6)                                                            \
            OFFQ_GEMV_CASE(kernel, 7)                                                            \
        default:                                                                                 \
            OFFQ_GEMV_CASE(kernel, 8)                                                            \
        }                                                                                        \
    }

/* The 4-bit weights of one packed 32-byte vector: low nibbles and high nibbles, one per byte. */
__attribute__((target("avx2,fma"))) static inline void offq_nibbles(__m256i v, __m256i *lo,
                                                                   __m256i *hi)
{
    const __m256i m15 = _mm256_set1_epi8(15);
    *lo = _mm256_and_si256(v, m15);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
}

#endif
