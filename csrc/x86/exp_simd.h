/* x86/exp_simd.h: exp of 8 (AVX2) or 16 (AVX-512) float lanes for the SIMD kernels (attention's
 * softmax, SwiGLU). x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r (the classic
 * single-precision minimax coefficients, ~1 ulp), then 2^n through the exponent bits. Below -87
 * the result is 0 (e^-87 ~ 1.6e-38), above 88 it is +inf: both ends as a softmax or a sigmoid
 * needs them; NaN gives NaN. Both widths are one definition, so every lane runs the same
 * operations in the same order: offq_exp8 and offq_exp16 give the same bits. */
#ifndef OFFQ_X86_EXP_SIMD_H
#define OFFQ_X86_EXP_SIMD_H

#include <immintrin.h>
#include <math.h>

/* NAME(x) for vectors VEC of P (_mm256 / _mm512) intrinsics; MASK: the comparisons' result type
 * (a vector in AVX2, a lane mask in AVX-512), with CMP, ROUND (to nearest), ZERO_WHERE(m, y) and
 * INF_WHERE(m, y) the width's forms of those steps, CASTI its integer-to-float bit cast. */
#define OFFQ_DEFINE_EXP(NAME, TARGET, VEC, VECI, P, MASK, CMP, ROUND, CASTI, ZERO_WHERE, INF_WHERE) \
    __attribute__((target(TARGET))) static inline VEC NAME(VEC x)                                 \
    {                                                                                             \
        const VEC lo = P##_set1_ps(-87.0f), hi = P##_set1_ps(88.0f);                              \
        const MASK under = CMP(x, lo, _CMP_LT_OQ);                                                \
        const MASK over = CMP(x, hi, _CMP_GT_OQ);                                                 \
        /* max/min return their second operand when either is NaN: a NaN x stays NaN (a           \
         * clamp to lo would make a NaN score a zero softmax weight, dropped unseen) */           \
        x = P##_min_ps(hi, P##_max_ps(lo, x));                                                    \
        const VEC n = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)));                    \
        VEC r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x);                                   \
        r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                                    \
        VEC p = P##_set1_ps(1.9875691500e-4f);                                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f));                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f));                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f));                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f));                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f));                                    \
        p = P##_fmadd_ps(p, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.0f)));                  \
        const VECI e = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)), 23); \
        const VEC y = ZERO_WHERE(under, P##_mul_ps(p, CASTI(e)));                                 \
        return INF_WHERE(over, y);                                                                \
    }

#define OFFQ_EXP_ROUND8(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define OFFQ_EXP_ZERO8(m, y) _mm256_andnot_ps((m), (y))
#define OFFQ_EXP_INF8(m, y) _mm256_blendv_ps((y), _mm256_set1_ps(INFINITY), (m))
OFFQ_DEFINE_EXP(offq_exp8, "avx2,fma", __m256, __m256i, _mm256, __m256, _mm256_cmp_ps,
                OFFQ_EXP_ROUND8, _mm256_castsi256_ps, OFFQ_EXP_ZERO8, OFFQ_EXP_INF8)

#define OFFQ_EXP_ROUND16(v) _mm512_roundscale_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define OFFQ_EXP_ZERO16(m, y) _mm512_maskz_mov_ps((__mmask16)~(m), (y))
#define OFFQ_EXP_INF16(m, y) _mm512_mask_blend_ps((m), (y), _mm512_set1_ps(INFINITY))
OFFQ_DEFINE_EXP(offq_exp16, "avx512f", __m512, __m512i, _mm512, __mmask16, _mm512_cmp_ps_mask,
                OFFQ_EXP_ROUND16, _mm512_castsi512_ps, OFFQ_EXP_ZERO16, OFFQ_EXP_INF16)

#endif
