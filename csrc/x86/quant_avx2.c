/* x86/quant_avx2.c: the quantize group kernel with explicit AVX2, and AVX-512 (reference:
 * quant.c).
 *
 * Same formulas, same float32 operations (vdivps is the IEEE division, vroundps / vrndscaleps
 * with round-to-nearest-even is rint, the group parameters come from the shared scalar formula),
 * so the results are identical to the generic kernel; minima, maxima and code sums do not depend
 * on their order. One body (DEFINE_QUANT_GROUP) for both widths, over each width's helpers.
 */
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#define Q8 __attribute__((target("avx2,fma"), always_inline)) static inline
#define Q16 __attribute__((target("avx512f"), always_inline)) static inline

/* ---- 8 lanes (AVX2): non-finite lanes collected in a vector -------------------------------- */
typedef __m256i q8_bad_t;
Q8 q8_bad_t q8_bad0(void) { return _mm256_setzero_si256(); }
Q8 q8_bad_t q8_nonfinite(q8_bad_t bad, __m256 v)
{
    const __m256i e = _mm256_set1_epi32(0x7f800000);
    return _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), e), e));
}
Q8 int q8_any(q8_bad_t bad) { return !_mm256_testz_si256(bad, bad); }
Q8 __m256 q8_abs(__m256 v)
{
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}
Q8 float q8_hmax(__m256 v)
{
    float b[8];
    _mm256_storeu_ps(b, v);
    float m = b[0];
    for (int j = 1; j < 8; j++) {
        m = b[j] > m ? b[j] : m;
    }
    return m;
}
Q8 float q8_hmin(__m256 v)
{
    float b[8];
    _mm256_storeu_ps(b, v);
    float m = b[0];
    for (int j = 1; j < 8; j++) {
        m = b[j] < m ? b[j] : m;
    }
    return m;
}
Q8 __m256 q8_round(__m256 v)
{
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
Q8 void q8_store_codes(uint8_t *q, __m256i c)
{
    const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packus_epi16(c16, c16));
}
Q8 __m256i q8_zeroi(void) { return _mm256_setzero_si256(); }
Q8 int32_t q8_hsum(__m256i v)
{
    int32_t b[8];
    _mm256_storeu_si256((__m256i *)b, v);
    return b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7];
}

/* ---- 16 lanes (AVX-512): non-finite lanes in a mask, reductions in registers --------------- */
typedef __mmask16 q16_bad_t;
Q16 q16_bad_t q16_bad0(void) { return 0; }
Q16 q16_bad_t q16_nonfinite(q16_bad_t bad, __m512 v)
{
    const __m512i e = _mm512_set1_epi32(0x7f800000);
    return bad | _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), e), e);
}
Q16 int q16_any(q16_bad_t bad) { return bad != 0; }
Q16 __m512 q16_abs(__m512 v) { return _mm512_abs_ps(v); }
Q16 float q16_hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
Q16 float q16_hmin(__m512 v) { return _mm512_reduce_min_ps(v); }
Q16 __m512 q16_round(__m512 v)
{
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
Q16 void q16_store_codes(uint8_t *q, __m512i c)
{
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(c));
}
Q16 __m512i q16_zeroi(void) { return _mm512_setzero_si512(); }
Q16 int32_t q16_hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }

/* One group g[0..n) of `lanes`-wide vectors (P: the _mm256 / _mm512 intrinsics, H: the helpers
 * above); the last n mod lanes values by the scalar formulas of kernels.h. */
#define DEFINE_QUANT_GROUP(NAME, ATTR, H, P, VEC, VECI, LANES)                                    \
    ATTR offq_status NAME(const float *restrict g, int64_t n, int bits, int symmetric, float clip, \
                          uint8_t *restrict q, float *scale_out, float *zero_out, int32_t *sum)  \
    {                                                                                             \
        const float maxq = (float)((1 << bits) - 1);                                              \
        const int64_t nv = n / LANES * LANES;                                                     \
        H##_bad_t bad = H##_bad0();                                                               \
        int bads = 0;                                                                             \
        float scale, zero;                                                                        \
        if (symmetric) {                                                                          \
            VEC vmax = P##_setzero_ps();                                                          \
            for (int64_t i = 0; i < nv; i += LANES) {                                             \
                const VEC v = P##_loadu_ps(g + i);                                                \
                bad = H##_nonfinite(bad, v);                                                      \
                vmax = P##_max_ps(vmax, H##_abs(v));                                              \
            }                                                                                     \
            float amax = H##_hmax(vmax); /* >= 0: vmax starts at 0 */                             \
            for (int64_t i = nv; i < n; i++) {                                                    \
                bads |= offq_is_nonfinite(g[i]);                                                  \
                const float a = fabsf(g[i]);                                                      \
                amax = a > amax ? a : amax;                                                       \
            }                                                                                     \
            if (bads || H##_any(bad)) {                                                           \
                return OFFQ_ERR_NONFINITE;                                                        \
            }                                                                                     \
            offq_quant_params_sym(amax, bits, clip, &scale, &zero);                               \
        } else {                                                                                  \
            VEC vmin = P##_set1_ps(g[0]), vmax = vmin;                                            \
            for (int64_t i = 0; i < nv; i += LANES) {                                             \
                const VEC v = P##_loadu_ps(g + i);                                                \
                bad = H##_nonfinite(bad, v);                                                      \
                vmin = P##_min_ps(vmin, v);                                                       \
                vmax = P##_max_ps(vmax, v);                                                       \
            }                                                                                     \
            float mn = H##_hmin(vmin), mx = H##_hmax(vmax);                                       \
            for (int64_t i = nv; i < n; i++) {                                                    \
                bads |= offq_is_nonfinite(g[i]);                                                  \
                mn = g[i] < mn ? g[i] : mn;                                                       \
                mx = g[i] > mx ? g[i] : mx;                                                       \
            }                                                                                     \
            if (bads || H##_any(bad)) {                                                           \
                return OFFQ_ERR_NONFINITE;                                                        \
            }                                                                                     \
            const offq_status st = offq_quant_params_asym(mn, mx, bits, clip, &scale, &zero);     \
            if (st != OFFQ_OK) {                                                                  \
                return st;                                                                        \
            }                                                                                     \
        }                                                                                         \
        const VEC vs = P##_set1_ps(scale), vz = P##_set1_ps(zero);                                \
        const VEC vlo = P##_setzero_ps(), vhi = P##_set1_ps(maxq);                                \
        VECI acc = H##_zeroi();                                                                   \
        for (int64_t i = 0; i < nv; i += LANES) {                                                 \
            VEC v = H##_round(P##_div_ps(P##_loadu_ps(g + i), vs));                               \
            v = P##_min_ps(P##_max_ps(P##_add_ps(v, vz), vlo), vhi);                              \
            const VECI c = P##_cvttps_epi32(v);                                                   \
            acc = P##_add_epi32(acc, c);                                                          \
            H##_store_codes(q + i, c);                                                            \
        }                                                                                         \
        *scale_out = scale;                                                                       \
        *zero_out = zero;                                                                         \
        *sum = H##_hsum(acc) + offq_quant_codes(g, nv, n, scale, zero, maxq, q);                  \
        return OFFQ_OK;                                                                           \
    }

DEFINE_QUANT_GROUP(quant_group_avx2, Q8, q8, _mm256, __m256, __m256i, 8)
/* 16 lanes: the same loop in half the instructions, reductions in registers (a prefill
 * quantizes every activation row at each of a layer's four inputs: ~5% of SmolLM2's prefill) */
DEFINE_QUANT_GROUP(quant_group_avx512, Q16, q16, _mm512, __m512, __m512i, 16)

__attribute__((target("avx2,fma"))) offq_status offq_quant_group_avx2(
    const float *restrict g, int64_t n, int bits, int symmetric, float clip, uint8_t *restrict q,
    float *scale_out, float *zero_out, int32_t *sum)
{
    return quant_group_avx2(g, n, bits, symmetric, clip, q, scale_out, zero_out, sum);
}

__attribute__((target("avx512f"))) offq_status offq_quant_group_avx512(
    const float *restrict g, int64_t n, int bits, int symmetric, float clip, uint8_t *restrict q,
    float *scale_out, float *zero_out, int32_t *sum)
{
    return quant_group_avx512(g, n, bits, symmetric, clip, q, scale_out, zero_out, sum);
}

OFFQ_DEFINE_QUANT_GROUPS(offq_quant_groups_avx2, __attribute__((target("avx2,fma"))),
                         quant_group_avx2)
OFFQ_DEFINE_QUANT_GROUPS(offq_quant_groups_avx512, __attribute__((target("avx512f"))),
                         quant_group_avx512)
#endif
