/* x86/mix_simd.h: the Hadamard mix (hadamard.c, step 2) for one vector width, instantiated by
 * x86/hadamard_avx2.c (8 floats) and x86/hadamard_avx512.c (16 floats).
 *
 * Columns in chunks of 2 vectors staged in tmp (m x 2 vectors, at most m * OFFQ_MIX_W values),
 * 4 output sub-rows at a time (m is a multiple of 4) so that 8 independent FMA chains share each
 * staged load. Every output element is one FMA chain over a = 0 .. m-1 in order, then one
 * multiply by scale, whatever the width: the variants give bit-identical results. Rows shorter
 * than 2 vectors (p < 2 LANES) go to FALLBACK.
 */
#ifndef OFFQ_X86_MIX_SIMD_H
#define OFFQ_X86_MIX_SIMD_H

#define DEFINE_MIX_SIMD(TARGET, T, NAME, FALLBACK, VEC, LANES, LOAD, STORE, SET1, FMA, ZERO, MUL)         \
    __attribute__((target(TARGET))) void NAME(T *restrict x, int64_t m, int64_t p, const T *restrict ht,        \
                               T scale, T *restrict tmp)                                          \
    {                                                                                             \
        if (p < 2 * LANES) {                                                                      \
            FALLBACK(x, m, p, ht, scale, tmp);                                                     \
            return;                                                                               \
        }                                                                                         \
        const VEC vs = SET1(scale);                                                               \
        for (int64_t j0 = 0; j0 < p; j0 += 2 * LANES) {                                           \
            for (int64_t a = 0; a < m; a++) {                                                     \
                STORE(tmp + a * 2 * LANES, LOAD(x + a * p + j0));                                 \
                STORE(tmp + a * 2 * LANES + LANES, LOAD(x + a * p + j0 + LANES));                 \
            }                                                                                     \
            for (int64_t c = 0; c < m; c += 4) {                                                  \
                VEC y00 = ZERO(), y01 = ZERO(), y10 = ZERO(), y11 = ZERO();                       \
                VEC y20 = ZERO(), y21 = ZERO(), y30 = ZERO(), y31 = ZERO();                       \
                const T *h0 = ht + c * m, *h1 = h0 + m, *h2 = h1 + m, *h3 = h2 + m;               \
                for (int64_t a = 0; a < m; a++) {                                                 \
                    const VEC t0 = LOAD(tmp + a * 2 * LANES);                                     \
                    const VEC t1 = LOAD(tmp + a * 2 * LANES + LANES);                             \
                    const VEC s0 = SET1(h0[a]), s1 = SET1(h1[a]);                                 \
                    const VEC s2 = SET1(h2[a]), s3 = SET1(h3[a]);                                 \
                    y00 = FMA(s0, t0, y00);                                                       \
                    y01 = FMA(s0, t1, y01);                                                       \
                    y10 = FMA(s1, t0, y10);                                                       \
                    y11 = FMA(s1, t1, y11);                                                       \
                    y20 = FMA(s2, t0, y20);                                                       \
                    y21 = FMA(s2, t1, y21);                                                       \
                    y30 = FMA(s3, t0, y30);                                                       \
                    y31 = FMA(s3, t1, y31);                                                       \
                }                                                                                 \
                STORE(x + c * p + j0, MUL(y00, vs));                                               \
                STORE(x + c * p + j0 + LANES, MUL(y01, vs));                                       \
                STORE(x + (c + 1) * p + j0, MUL(y10, vs));                                         \
                STORE(x + (c + 1) * p + j0 + LANES, MUL(y11, vs));                                 \
                STORE(x + (c + 2) * p + j0, MUL(y20, vs));                                         \
                STORE(x + (c + 2) * p + j0 + LANES, MUL(y21, vs));                                 \
                STORE(x + (c + 3) * p + j0, MUL(y30, vs));                                         \
                STORE(x + (c + 3) * p + j0 + LANES, MUL(y31, vs));                                 \
            }                                                                                     \
        }                                                                                         \
    }

#endif
