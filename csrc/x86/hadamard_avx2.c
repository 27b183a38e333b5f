/* x86/hadamard_avx2.c: AVX2+FMA variants of the Walsh-Hadamard kernels (reference: hadamard.c).
 *
 * Butterflies keep 3 stages inside each 8-float vector (permutes + sign FMAs) and do the others
 * as radix-8 passes over vectors held in registers, so a 4096-row makes 3 passes in L1. The mix
 * stages columns in chunks of 2 vectors and forms 4 output sub-rows per pass.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/mix_simd.h"

#define OFFQ_AVX2 __attribute__((target("avx2,fma")))

DEFINE_MIX_SIMD("avx2,fma", float, offq_mix_f32_avx2, offq_mix_f32_generic, __m256, 8, _mm256_loadu_ps,
                _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_mul_ps)
DEFINE_MIX_SIMD("avx2,fma", double, offq_mix_f64_avx2, offq_mix_f64_generic, __m256d, 4, _mm256_loadu_pd,
                _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_setzero_pd, _mm256_mul_pd)

/* ---------------------------------------------------------------------------------------------
 * AVX2 + FMA butterflies.
 * ------------------------------------------------------------------------------------------- */
#define BFLY(ADD, SUB, a, b)                                                                      \
    do {                                                                                          \
        const __typeof__(a) t_ = (a);                                                             \
        (a) = ADD(t_, (b));                                                                       \
        (b) = SUB(t_, (b));                                                                       \
    } while (0)

/* Stages of stride 1, 2, 4 inside one 8-float vector: v * sign + swapped(v). */
OFFQ_AVX2 static inline __m256 inreg_f32(__m256 v, __m256 s1, __m256 s2, __m256 s4)
{
    v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
    v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
    v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
    return v;
}

/* Three stages of strides h, 2h, 4h (h a multiple of 8) over the whole row. */
OFFQ_AVX2 static void radix8_f32(float *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 8 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
            float *p = x + j;
            __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + h);
            __m256 a2 = _mm256_loadu_ps(p + 2 * h), a3 = _mm256_loadu_ps(p + 3 * h);
            __m256 a4 = _mm256_loadu_ps(p + 4 * h), a5 = _mm256_loadu_ps(p + 5 * h);
            __m256 a6 = _mm256_loadu_ps(p + 6 * h), a7 = _mm256_loadu_ps(p + 7 * h);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a6, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a5, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a3, a7);
            _mm256_storeu_ps(p, a0);
            _mm256_storeu_ps(p + h, a1);
            _mm256_storeu_ps(p + 2 * h, a2);
            _mm256_storeu_ps(p + 3 * h, a3);
            _mm256_storeu_ps(p + 4 * h, a4);
            _mm256_storeu_ps(p + 5 * h, a5);
            _mm256_storeu_ps(p + 6 * h, a6);
            _mm256_storeu_ps(p + 7 * h, a7);
        }
    }
}

/* One or two stages (strides h, and 2h when two) over the whole row. */
OFFQ_AVX2 static void radix4or2_f32(float *restrict x, int64_t n, int64_t h, int two)
{
    for (int64_t i = 0; i < n; i += (two ? 4 : 2) * h) {
        for (int64_t j = i; j < i + h; j += 8) {
            float *p = x + j;
            __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + h);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            if (two) {
                __m256 a2 = _mm256_loadu_ps(p + 2 * h), a3 = _mm256_loadu_ps(p + 3 * h);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
                _mm256_storeu_ps(p + 2 * h, a2);
                _mm256_storeu_ps(p + 3 * h, a3);
            }
            _mm256_storeu_ps(p, a0);
            _mm256_storeu_ps(p + h, a1);
        }
    }
}

OFFQ_AVX2 void offq_pow2_f32_avx2(float *restrict x, int64_t n, int normalize, float scale)
{
    if (n < 8) {
        offq_pow2_f32_generic(x, n, normalize, scale);
        return;
    }
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    const __m256 vs = _mm256_set1_ps(normalize ? scale : 1.0f);
    int64_t h; /* first stride not yet done */
    if (n >= 64) {
        /* Pass A: 64 floats at a time, strides 1 .. 32 (6 stages) in registers. */
        for (int64_t i = 0; i < n; i += 64) {
            float *p = x + i;
            __m256 a0 = inreg_f32(_mm256_loadu_ps(p), s1, s2, s4);
            __m256 a1 = inreg_f32(_mm256_loadu_ps(p + 8), s1, s2, s4);
            __m256 a2 = inreg_f32(_mm256_loadu_ps(p + 16), s1, s2, s4);
            __m256 a3 = inreg_f32(_mm256_loadu_ps(p + 24), s1, s2, s4);
            __m256 a4 = inreg_f32(_mm256_loadu_ps(p + 32), s1, s2, s4);
            __m256 a5 = inreg_f32(_mm256_loadu_ps(p + 40), s1, s2, s4);
            __m256 a6 = inreg_f32(_mm256_loadu_ps(p + 48), s1, s2, s4);
            __m256 a7 = inreg_f32(_mm256_loadu_ps(p + 56), s1, s2, s4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a6, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a5, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a3, a7);
            _mm256_storeu_ps(p, _mm256_mul_ps(a0, vs));
            _mm256_storeu_ps(p + 8, _mm256_mul_ps(a1, vs));
            _mm256_storeu_ps(p + 16, _mm256_mul_ps(a2, vs));
            _mm256_storeu_ps(p + 24, _mm256_mul_ps(a3, vs));
            _mm256_storeu_ps(p + 32, _mm256_mul_ps(a4, vs));
            _mm256_storeu_ps(p + 40, _mm256_mul_ps(a5, vs));
            _mm256_storeu_ps(p + 48, _mm256_mul_ps(a6, vs));
            _mm256_storeu_ps(p + 56, _mm256_mul_ps(a7, vs));
        }
        h = 64;
    } else {
        /* n = 8, 16, 32: in-register stages, then the remaining strides 8, 16 via radix-2/4. */
        for (int64_t i = 0; i < n; i += 8) {
            _mm256_storeu_ps(x + i, _mm256_mul_ps(inreg_f32(_mm256_loadu_ps(x + i), s1, s2, s4), vs));
        }
        h = 8;
    }
    while (h < n) {
        if (8 * h <= n) {
            radix8_f32(x, n, h);
            h *= 8;
        } else if (4 * h <= n) {
            radix4or2_f32(x, n, h, 1);
            h *= 4;
        } else {
            radix4or2_f32(x, n, h, 0);
            h *= 2;
        }
    }
}

/* float64: 4 lanes; strides 1, 2 inside a vector. */
OFFQ_AVX2 static inline __m256d inreg_f64(__m256d v, __m256d s1, __m256d s2)
{
    v = _mm256_fmadd_pd(v, s1, _mm256_permute_pd(v, 0x5));
    v = _mm256_fmadd_pd(v, s2, _mm256_permute2f128_pd(v, v, 0x01));
    return v;
}

OFFQ_AVX2 static void radix8_f64(double *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 8 * h) {
        for (int64_t j = i; j < i + h; j += 4) {
            double *p = x + j;
            __m256d a0 = _mm256_loadu_pd(p), a1 = _mm256_loadu_pd(p + h);
            __m256d a2 = _mm256_loadu_pd(p + 2 * h), a3 = _mm256_loadu_pd(p + 3 * h);
            __m256d a4 = _mm256_loadu_pd(p + 4 * h), a5 = _mm256_loadu_pd(p + 5 * h);
            __m256d a6 = _mm256_loadu_pd(p + 6 * h), a7 = _mm256_loadu_pd(p + 7 * h);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a1);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a2, a3);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a4, a5);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a6, a7);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a2);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a1, a3);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a4, a6);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a5, a7);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a4);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a1, a5);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a2, a6);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a3, a7);
            _mm256_storeu_pd(p, a0);
            _mm256_storeu_pd(p + h, a1);
            _mm256_storeu_pd(p + 2 * h, a2);
            _mm256_storeu_pd(p + 3 * h, a3);
            _mm256_storeu_pd(p + 4 * h, a4);
            _mm256_storeu_pd(p + 5 * h, a5);
            _mm256_storeu_pd(p + 6 * h, a6);
            _mm256_storeu_pd(p + 7 * h, a7);
        }
    }
}

OFFQ_AVX2 static void radix2_f64(double *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 2 * h) {
        for (int64_t j = i; j < i + h; j += 4) {
            __m256d a0 = _mm256_loadu_pd(x + j), a1 = _mm256_loadu_pd(x + j + h);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a1);
            _mm256_storeu_pd(x + j, a0);
            _mm256_storeu_pd(x + j + h, a1);
        }
    }
}

OFFQ_AVX2 void offq_pow2_f64_avx2(double *restrict x, int64_t n, int normalize, double scale)
{
    if (n < 4) {
        offq_pow2_f64_generic(x, n, normalize, scale);
        return;
    }
    const __m256d s1 = _mm256_setr_pd(1, -1, 1, -1);
    const __m256d s2 = _mm256_setr_pd(1, 1, -1, -1);
    const __m256d vs = _mm256_set1_pd(normalize ? scale : 1.0);
    for (int64_t i = 0; i < n; i += 4) {
        _mm256_storeu_pd(x + i, _mm256_mul_pd(inreg_f64(_mm256_loadu_pd(x + i), s1, s2), vs));
    }
    int64_t h = 4;
    while (h < n) {
        if (8 * h <= n) {
            radix8_f64(x, n, h);
            h *= 8;
        } else {
            radix2_f64(x, n, h);
            h *= 2;
        }
    }
}
#endif
