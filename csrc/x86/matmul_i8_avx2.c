/* x86/matmul_i8_avx2.c: the few-rows int8 x float32 row kernel (matmul_i8.c) with 8-wide vectors:
 * 8 int8 weights widened to float per step, two accumulators per group, the group scale applied
 * with one FMA per group; four weight rows at a time (then the rest one by one), every output
 * formed by the same operations in the same order either way. Groups that are not a multiple of
 * 16 take the generic kernel. */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/reduce_avx2.h"

__attribute__((target("avx2,fma"))) static inline __m256 widen8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* One output (row r of x, weight row n): per group two 8-lane FMA chains over 16 inputs a step,
 * then one FMA with the group scale; the order every output is formed in, alone or beside others.
 */
__attribute__((target("avx2,fma"))) static float one_output(const float *xr, const int8_t *wr,
                                                            const float *sc, int64_t ng,
                                                            int64_t group)
{
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 d0 = _mm256_setzero_ps(), d1 = d0;
        for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
            d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), widen8(wr + i), d0);
            d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 8), widen8(wr + i + 8), d1);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[g]), _mm256_add_ps(d0, d1), acc);
    }
    return offq_hsum8(acc);
}

/* Four weight rows against one row of x, each with one_output's operations in its order (eight
 * FMA chains in flight instead of two), with a software prefetch of the rows after them. Measured
 * on Qwen2.5-1.5B's head (151936 x 1536, int8, one Zen3 core): one row at a time without the
 * prefetch 22-25 ms, four rows without it the same, one row with it 18-21 ms, four rows with it
 * 14-15 ms; from DRAM the kernel was waiting on memory (in cache it ran ~18 GB/s). */
__attribute__((target("avx2,fma"))) static void four_outputs(const float *xr, const int8_t *w,
                                                             int64_t k, const float *sc,
                                                             int64_t ng, int64_t group,
                                                             float *o)
{
    const int8_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0; g < ng; g++) {
        __m256 d00 = _mm256_setzero_ps(), d01 = d00, d10 = d00, d11 = d00, d20 = d00, d21 = d00,
               d30 = d00, d31 = d00;
        for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
            /* rows n+8..n+11 (contiguous with these): 64 bytes a step, two blocks (8 k) ahead */
            _mm_prefetch((const char *)(w + 8 * k + 4 * i), _MM_HINT_T0);
            const __m256 x0 = _mm256_loadu_ps(xr + i), x1 = _mm256_loadu_ps(xr + i + 8);
            d00 = _mm256_fmadd_ps(x0, widen8(w0 + i), d00);
            d01 = _mm256_fmadd_ps(x1, widen8(w0 + i + 8), d01);
            d10 = _mm256_fmadd_ps(x0, widen8(w1 + i), d10);
            d11 = _mm256_fmadd_ps(x1, widen8(w1 + i + 8), d11);
            d20 = _mm256_fmadd_ps(x0, widen8(w2 + i), d20);
            d21 = _mm256_fmadd_ps(x1, widen8(w2 + i + 8), d21);
            d30 = _mm256_fmadd_ps(x0, widen8(w3 + i), d30);
            d31 = _mm256_fmadd_ps(x1, widen8(w3 + i + 8), d31);
        }
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(sc[g]), _mm256_add_ps(d00, d01), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(sc[ng + g]), _mm256_add_ps(d10, d11), a1);
        a2 = _mm256_fmadd_ps(_mm256_set1_ps(sc[2 * ng + g]), _mm256_add_ps(d20, d21), a2);
        a3 = _mm256_fmadd_ps(_mm256_set1_ps(sc[3 * ng + g]), _mm256_add_ps(d30, d31), a3);
    }
    o[0] = offq_hsum8(a0);
    o[1] = offq_hsum8(a1);
    o[2] = offq_hsum8(a2);
    o[3] = offq_hsum8(a3);
}

__attribute__((target("avx2,fma"))) void offq_i8_rows_avx2(const float *x, int64_t m, int64_t k,
                                                          const int8_t *w, const float *scale,
                                                          int64_t group, int64_t n0, int64_t n1,
                                                          int64_t ldo, float *out)
{
    if (group % 16 != 0) {
        offq_i8_rows_generic(x, m, k, w, scale, group, n0, n1, ldo, out);
        return;
    }
    const int64_t ng = k / group;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        for (int64_t r = 0; r < m; r++) {
            float o[4];
            four_outputs(x + r * k, w + n * k, k, scale + n * ng, ng, group, o);
            for (int j = 0; j < 4; j++) {
                out[r * ldo + n + j] = o[j];
            }
        }
    }
    for (; n < n1; n++) {
        for (int64_t r = 0; r < m; r++) {
            out[r * ldo + n] = one_output(x + r * k, w + n * k, scale + n * ng, ng, group);
        }
    }
}
#endif
