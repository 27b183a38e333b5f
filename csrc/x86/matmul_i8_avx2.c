/* x86/matmul_i8_avx2.c: the few-rows int8-weight row kernel (matmul_i8.c) with 16-bit
 * activations: per 16 inputs one sign extension of the int8 weights to 16 bits, one vpmaddwd
 * against the activations and one 32-bit add; per group (or OFFQ_I8_CHUNK inputs) the 8 integer
 * lanes are converted and added to 8 float lanes times the group's combined scale, exactly the
 * generic kernel's lane sums and float operations. Four weight rows at a time share one
 * activation load (then the rest one by one: the same per-output operations either way). Groups
 * that are not a multiple of 16 take the generic kernel. */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/reduce_avx2.h"

/* 16 int8 weights times 16 int16 activations, as 8 int32 pair sums added to acc */
__attribute__((target("avx2,fma"))) static inline __m256i madd16(__m256i acc, const int8_t *w,
                                                                 __m256i xv)
{
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(wv, xv));
}

/* acc += float(lanes) * s: one group's (or chunk's) lane sums joining the float lanes */
__attribute__((target("avx2,fma"))) static inline __m256 join(__m256 acc, __m256i lanes, float s)
{
    return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s)));
}

__attribute__((target("avx2,fma"))) static float one_output(const int16_t *xr, const float *xs,
                                                            const int8_t *wr, const float *sc,
                                                            int64_t ng, int64_t group)
{
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const int64_t end = (g + 1) * group;
        for (int64_t c = g * group; c < end; c += OFFQ_I8_CHUNK) {
            const int64_t c1 = c + OFFQ_I8_CHUNK < end ? c + OFFQ_I8_CHUNK : end;
            __m256i l = _mm256_setzero_si256();
            for (int64_t i = c; i < c1; i += 16) {
                l = madd16(l, wr + i, _mm256_loadu_si256((const __m256i *)(xr + i)));
            }
            acc = join(acc, l, sc[g] * xs[g]);
        }
    }
    return offq_hsum8(acc);
}

/* Four weight rows against one row of x, each with one_output's operations, with a software
 * prefetch of the rows eight ahead (the stream is one block of columns per thread; the prefetch
 * measured 14-15 ms against 22-25 ms without it on Qwen2.5-1.5B's head with float activations). */
__attribute__((target("avx2,fma"))) static void four_outputs(const int16_t *xr, const float *xs,
                                                             const int8_t *w, int64_t k,
                                                             const float *sc, int64_t ng,
                                                             int64_t group, float *o)
{
    const int8_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t end = (g + 1) * group;
        for (int64_t c = g * group; c < end; c += OFFQ_I8_CHUNK) {
            const int64_t c1 = c + OFFQ_I8_CHUNK < end ? c + OFFQ_I8_CHUNK : end;
            __m256i l0 = _mm256_setzero_si256(), l1 = l0, l2 = l0, l3 = l0;
            for (int64_t i = c; i < c1; i += 16) {
                /* rows n+8..n+11 (contiguous with these): 64 bytes a step, two blocks ahead */
                _mm_prefetch((const char *)(w + 8 * k + 4 * i), _MM_HINT_T0);
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + i));
                l0 = madd16(l0, w0 + i, xv);
                l1 = madd16(l1, w1 + i, xv);
                l2 = madd16(l2, w2 + i, xv);
                l3 = madd16(l3, w3 + i, xv);
            }
            a0 = join(a0, l0, sc[g] * xs[g]);
            a1 = join(a1, l1, sc[ng + g] * xs[g]);
            a2 = join(a2, l2, sc[2 * ng + g] * xs[g]);
            a3 = join(a3, l3, sc[3 * ng + g] * xs[g]);
        }
    }
    o[0] = offq_hsum8(a0);
    o[1] = offq_hsum8(a1);
    o[2] = offq_hsum8(a2);
    o[3] = offq_hsum8(a3);
}

__attribute__((target("avx2,fma"))) void offq_i8_rows_avx2(const int16_t *xq, const float *xs,
                                                          int64_t m, int64_t k, const int8_t *w,
                                                          const float *scale, int64_t group,
                                                          int64_t n0, int64_t n1, int64_t ldo,
                                                          float *out)
{
    if (group % 16 != 0) {
        offq_i8_rows_generic(xq, xs, m, k, w, scale, group, n0, n1, ldo, out);
        return;
    }
    const int64_t ng = k / group;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        for (int64_t r = 0; r < m; r++) {
            float o[4];
            four_outputs(xq + r * k, xs + r * ng, w + n * k, k, scale + n * ng, ng, group, o);
            for (int j = 0; j < 4; j++) {
                out[r * ldo + n + j] = o[j];
            }
        }
    }
    for (; n < n1; n++) {
        for (int64_t r = 0; r < m; r++) {
            out[r * ldo + n] = one_output(xq + r * k, xs + r * ng, w + n * k, scale + n * ng, ng,
                                          group);
        }
    }
}
#endif
