/* x86/wq_common.h: pieces shared by the AVX2 and AVX-512 rows of the weight-only matmul
 * (x86/matmul_wq_avx2.c, x86/wq_avx512_rows.h). */
#ifndef OFFQ_X86_WQ_COMMON_H
#define OFFQ_X86_WQ_COMMON_H

#include <immintrin.h>

#include "kernels.h"
#include "x86/reduce_avx2.h"

/* Software prefetch distance, in weight rows: a model's weights stream from DRAM, and the
 * hardware prefetcher alone left a 4096 x 4096 W4 product 10-15% slower than at 3 rows (1 and 2
 * threads; 1, 2 and 6 rows measured between). The rows' prefetches go to L2 (_MM_HINT_T1), and
 * the L1 prefetcher takes the lines on from there: into L1 they held that product, streamed from
 * DRAM, at 842-848 us against 605-616 at 1 thread and 542-618 against 436-490 at 2 (Zen 4,
 * alternating A/B). */
#define WQ_PF_ROWS 3

/* sum_g (scale_g * zero_g) * xs[g]: the zero-point term of an output (xs: the group sums of x). */
__attribute__((always_inline, target("avx2,fma"))) static inline float
offq_wq_zero_term(const float *sc, const float *zr, const float *xs, int64_t ng)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(zr + g));
        acc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + g), acc);
    }
    float t = offq_hsum8(acc);
    for (; g < ng; g++) {
        t += (sc[g] * zr[g]) * xs[g];
    }
    return t;
}

/* The body of a SIMD variant's rows entry (kernels.h; its parameters in scope): rows_bits(...,
 * bits, sub) with the bit width and the decode (sub: the subnormal one, unscale set) as
 * constants, so that each combination is a specialised copy. */
#define OFFQ_WQ_ROWS_CASES(rows_bits, b)                                                          \
    case 2 * (b):                                                                                 \
        rows_bits(w, xp, xsum, NULL, m, n0, n1, ldo, out, b, 0);                                  \
        break;                                                                                    \
    case 2 * (b) + 1:                                                                             \
        rows_bits(w, xp, xsum, unscale, m, n0, n1, ldo, out, b, 1);                               \
        break;
#define OFFQ_WQ_ROWS_SPECIALISED(rows_bits)                                                       \
    switch (w->bits * 2 + (unscale != NULL)) {                                                    \
        OFFQ_WQ_ROWS_CASES(rows_bits, 2)                                                          \
        OFFQ_WQ_ROWS_CASES(rows_bits, 3)                                                          \
        OFFQ_WQ_ROWS_CASES(rows_bits, 4)                                                          \
        OFFQ_WQ_ROWS_CASES(rows_bits, 8)                                                          \
    }

/* An output: the row kernel's dot (times 2^E_r when the subnormal decode ran) less the
 * zero-point term. */
__attribute__((always_inline, target("avx2,fma"))) static inline float
offq_wq_output(float dot, const float *unscale, int64_t r, const float *sc, const float *zr,
               const float *xsum, int64_t ng)
{
    const float d = unscale != NULL ? dot * unscale[r] : dot;
    return d - offq_wq_zero_term(sc, zr, xsum + r * ng, ng);
}

#endif
