/* x86/quant_avx2.c: the quantize group kernel with explicit AVX2, and AVX-512 (reference:
 * quant.c).
 *
 * Same formulas, same float32 operations (vdivps is the IEEE division, vroundps / vrndscaleps
 * with round-to-nearest-even is rint, the group parameters come from the shared scalar formula),
 * so the results are identical to the generic kernel; minima, maxima and code sums do not depend
 * on their order.
 */
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

__attribute__((target("avx2,fma"), always_inline)) static inline offq_status quant_group_avx2(
    const float *restrict g, int64_t n, int bits, int symmetric, float clip, uint8_t *restrict q,
    float *scale_out, float *zero_out, int32_t *sum)
{
    const float maxq = (float)((1 << bits) - 1);
    const int64_t n8 = n / 8 * 8;
    const __m256i expmask = _mm256_set1_epi32(0x7f800000);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i bad = _mm256_setzero_si256();
    int bads = 0;
    float scale, zero;
    if (symmetric) {
        __m256 vmax = _mm256_setzero_ps();
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v),
                                                                           expmask), expmask));
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
        }
        float buf[8];
        _mm256_storeu_ps(buf, vmax);
        float amax = 0.0f;
        for (int j = 0; j < 8; j++) {
            amax = buf[j] > amax ? buf[j] : amax;
        }
        for (int64_t i = n8; i < n; i++) {
            bads |= offq_is_nonfinite(g[i]);
            const float a = fabsf(g[i]);
            amax = a > amax ? a : amax;
        }
        if (bads || !_mm256_testz_si256(bad, bad)) {
            return OFFQ_ERR_NONFINITE;
        }
        offq_quant_params_sym(amax, bits, clip, &scale, &zero);
    } else {
        __m256 vmin = _mm256_set1_ps(g[0]), vmax = vmin;
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v),
                                                                           expmask), expmask));
            vmin = _mm256_min_ps(vmin, v);
            vmax = _mm256_max_ps(vmax, v);
        }
        float bmin[8], bmax[8];
        _mm256_storeu_ps(bmin, vmin);
        _mm256_storeu_ps(bmax, vmax);
        float mn = g[0], mx = g[0];
        for (int j = 0; j < 8; j++) {
            mn = bmin[j] < mn ? bmin[j] : mn;
            mx = bmax[j] > mx ? bmax[j] : mx;
        }
        for (int64_t i = n8; i < n; i++) {
            bads |= offq_is_nonfinite(g[i]);
            mn = g[i] < mn ? g[i] : mn;
            mx = g[i] > mx ? g[i] : mx;
        }
        if (bads || !_mm256_testz_si256(bad, bad)) {
            return OFFQ_ERR_NONFINITE;
        }
        const offq_status st = offq_quant_params_asym(mn, mx, bits, clip, &scale, &zero);
        if (st != OFFQ_OK) {
            return st;
        }
    }
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero);
    const __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_set1_ps(maxq);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(g + i), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), vlo), vhi);
        const __m256i c = _mm256_cvttps_epi32(v);
        acc = _mm256_add_epi32(acc, c);
        const __m128i c16 =
            _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packus_epi16(c16, c16));
    }
    int32_t buf[8];
    _mm256_storeu_si256((__m256i *)buf, acc);
    const int32_t s = buf[0] + buf[1] + buf[2] + buf[3] + buf[4] + buf[5] + buf[6] + buf[7] +
                      offq_quant_codes(g, n8, n, scale, zero, maxq, q);
    *scale_out = scale;
    *zero_out = zero;
    *sum = s;
    return OFFQ_OK;
}

/* 16 lanes: the loops above in half the instructions, reductions in registers (a prefill
 * quantizes every activation row at each of a layer's four inputs: ~5% of SmolLM2's prefill). */
__attribute__((target("avx512f"), always_inline)) static inline offq_status quant_group_avx512(
    const float *restrict g, int64_t n, int bits, int symmetric, float clip, uint8_t *restrict q,
    float *scale_out, float *zero_out, int32_t *sum)
{
    const float maxq = (float)((1 << bits) - 1);
    const int64_t n16 = n / 16 * 16;
    const __m512i expmask = _mm512_set1_epi32(0x7f800000);
    __mmask16 bad = 0;
    int bads = 0;
    float scale, zero;
    if (symmetric) {
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t i = 0; i < n16; i += 16) {
            const __m512 v = _mm512_loadu_ps(g + i);
            bad |= _mm512_cmpeq_epi32_mask(
                _mm512_and_si512(_mm512_castps_si512(v), expmask), expmask);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
        float amax = _mm512_reduce_max_ps(vmax); /* >= 0: vmax starts at 0 */
        for (int64_t i = n16; i < n; i++) {
            bads |= offq_is_nonfinite(g[i]);
            const float a = fabsf(g[i]);
            amax = a > amax ? a : amax;
        }
        if (bads || bad) {
            return OFFQ_ERR_NONFINITE;
        }
        offq_quant_params_sym(amax, bits, clip, &scale, &zero);
    } else {
        __m512 vmin = _mm512_set1_ps(g[0]), vmax = vmin;
        for (int64_t i = 0; i < n16; i += 16) {
            const __m512 v = _mm512_loadu_ps(g + i);
            bad |= _mm512_cmpeq_epi32_mask(
                _mm512_and_si512(_mm512_castps_si512(v), expmask), expmask);
            vmin = _mm512_min_ps(vmin, v);
            vmax = _mm512_max_ps(vmax, v);
        }
        float mn = _mm512_reduce_min_ps(vmin), mx = _mm512_reduce_max_ps(vmax);
        for (int64_t i = n16; i < n; i++) {
            bads |= offq_is_nonfinite(g[i]);
            mn = g[i] < mn ? g[i] : mn;
            mx = g[i] > mx ? g[i] : mx;
        }
        if (bads || bad) {
            return OFFQ_ERR_NONFINITE;
        }
        const offq_status st = offq_quant_params_asym(mn, mx, bits, clip, &scale, &zero);
        if (st != OFFQ_OK) {
            return st;
        }
    }
    const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero);
    const __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_set1_ps(maxq);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < n16; i += 16) {
        __m512 v = _mm512_div_ps(_mm512_loadu_ps(g + i), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), vlo), vhi);
        const __m512i c = _mm512_cvttps_epi32(v);
        acc = _mm512_add_epi32(acc, c);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(c));
    }
    *scale_out = scale;
    *zero_out = zero;
    *sum = _mm512_reduce_add_epi32(acc) + offq_quant_codes(g, n16, n, scale, zero, maxq, q);
    return OFFQ_OK;
}

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
