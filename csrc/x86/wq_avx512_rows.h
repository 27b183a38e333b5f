/* x86/wq_avx512_rows.h: the AVX-512 decode rows of the weight-only matmul, written once for the
 * two translation units that compile them: x86/matmul_wq_avx512.c (AVX-512 F + BW) and
 * x86/matmul_wq_avx512vbmi.c (the same plus VBMI, whose byte permute decodes a 3-bit chunk in one
 * instruction instead of two). The decoding is described in x86/matmul_wq_avx512.c.
 *
 * The includer defines WQ512_TARGET (the target string), WQ512_ROWS (the entry point's name) and,
 * after the include, lanes3() (the 16 lanes of a 3-bit chunk, declared here).
 */
#ifndef OFFQ_X86_WQ_AVX512_ROWS_H
#define OFFQ_X86_WQ_AVX512_ROWS_H

#include <immintrin.h>

#include "kernels.h"
#include "x86/wq_common.h"

#define WQ512_ENTRY __attribute__((target(WQ512_TARGET)))
#define INLINE static inline __attribute__((always_inline, target(WQ512_TARGET)))

/* Bit offset of field j in lane L (3 bits: odd lanes start 4 bits higher; 8 bits: the top
 * field, which holds the sign bit in place, is shifted down to bit 0). */
INLINE int field_shift(int bits, int j, int lane)
{
    if (bits == 8) {
        return j == 3 ? 0 : 8 * j;
    }
    return bits * j + (bits == 3 && (lane & 1) ? 4 : 0);
}

/* Field j of the lanes, q * 2^t (masked in place, or the top 8-bit field shifted down). */
INLINE __m512i field_bits(__m512i v, const __m512i *m, const int bits, const int j)
{
    return bits == 8 && j == 3 ? _mm512_srli_epi32(v, 24) : _mm512_and_si512(v, m[j]);
}

INLINE __m512i field_mask(const int bits, const int j)
{
    int32_t v[16];
    for (int l = 0; l < 16; l++) {
        v[l] = ((1 << bits) - 1) << field_shift(bits, j, l);
    }
    return _mm512_loadu_si512(v);
}

/* The 16 lanes of the 3-bit chunk at p (24 bytes): lane L holds bytes floor(3L/2) and
 * floor(3L/2) + 1 in its low 16 bits (the fields' masks ignore the rest). `edge`: the chunk ends
 * the array, so nothing past its 24 bytes may be read (other chunks load 32). */
INLINE __m512i lanes3(const uint8_t *p, int edge);

/* The 24 bytes of a 3-bit chunk in the low 256 bits (the upper ones undefined). */
INLINE __m512i load24(const uint8_t *p, int edge)
{
    return edge ? _mm512_maskz_loadu_epi32(0x3f, p)
                : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
}

/* The lanes of the 64-code chunk at p (8 * bits bytes). */
INLINE __m512i chunk_lanes(const uint8_t *p, const int bits, int edge)
{
    if (bits == 4) {
        return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    }
    if (bits == 2) {
        return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    }
    if (bits == 8) {
        return _mm512_loadu_si512(p);
    }
    return lanes3(p, edge);
}

/* res[r] = sum_g scale_g * (sum of x * q over group g), r < R <= 2, for one packed row; `edge`:
 * the row ends the array; CPG: the chunks per group when a compile-time constant (the loop
 * unrolls), else 0. One accumulator per field and row. Blocks of 3-4 rows (as AVX2 has) measured
 * slower than blocks of 2, and a second accumulator set for two chunks in flight at R = 1 slower
 * than one. */
INLINE void dot_rows(const uint8_t *row, const float *sc, const float *xp, int64_t k,
                     int64_t group, const int bits, const int R, const int sub, const int CPG,
                     int edge, float *res)
{
    const int64_t pf = WQ_PF_ROWS * offq_wq_row_bytes(k, bits);
    const int64_t ng = k / group, cpg = CPG ? CPG : group / 64, last = k / 64 - 1;
    const __m512i m[4] = {field_mask(bits, 0), field_mask(bits, 1), field_mask(bits, 2),
                          field_mask(bits, 3)};
    __m512 tot[2];
    for (int r = 0; r < R; r++) {
        tot[r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 d[2][4];
        for (int r = 0; r < R; r++) {
            for (int j = 0; j < 4; j++) {
                d[r][j] = _mm512_setzero_ps();
            }
        }
        /* the group's bytes some rows ahead, one prefetch per 64 */
        for (int64_t b = 0; b < cpg * 8 * bits; b += 64) {
            _mm_prefetch((const char *)(row + g * cpg * 8 * bits + b + pf), _MM_HINT_T1);
        }
        for (int64_t i = 0; i < cpg; i++) {
            const int64_t c = g * cpg + i;
            const __m512i v = chunk_lanes(row + c * 8 * bits, bits, edge && c == last);
            const float *x0 = xp + c * 64;
            for (int j = 0; j < 4; j++) {
                const __m512i q = field_bits(v, m, bits, j);
                const __m512 f = sub ? _mm512_castsi512_ps(q) : _mm512_cvtepi32_ps(q);
                for (int r = 0; r < R; r++) {
                    d[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + r * k + 16 * j), f, d[r][j]);
                }
            }
        }
        const __m512 s = _mm512_set1_ps(sc[g]);
        for (int r = 0; r < R; r++) {
            const __m512 e = _mm512_add_ps(_mm512_add_ps(d[r][0], d[r][1]),
                                           _mm512_add_ps(d[r][2], d[r][3]));
            tot[r] = _mm512_fmadd_ps(s, e, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        res[r] = _mm512_reduce_add_ps(tot[r]);
    }
}

/* dot_rows at R = 1 (decode) for four consecutive weight rows at once: each activation vector is
 * loaded once for the four, and the rows stream as one prefetched run of 4 x 8 x bits bytes a
 * chunk. On a 151936 x 1536 W4 g128 weight (Qwen2.5's head) streamed by one Zen 4 core, a
 * scratch copy of the one-row loop ran at ~13 GB/s and of this one at ~19 GB/s; in offq the
 * product went from 10.7 to 8.4 ms (at two threads it is unchanged).
 * Each row's sums run as in dot_rows (per-field accumulators, the same adds), so every output
 * has dot_rows' bits. `edge`: the fourth row ends the array. */
INLINE void dot_four_rows(const uint8_t *row, int64_t rb, const float *sc, const float *xp,
                          int64_t k, int64_t group, const int bits, const int sub, const int CPG,
                          int edge, float *res)
{
    const int64_t pf = WQ_PF_ROWS * rb;
    const int64_t ng = k / group, cpg = CPG ? CPG : group / 64, last = k / 64 - 1;
    const int64_t cb = 8 * bits; /* bytes of a chunk of one row */
    const __m512i m[4] = {field_mask(bits, 0), field_mask(bits, 1), field_mask(bits, 2),
                          field_mask(bits, 3)};
    __m512 tot[4];
    for (int r = 0; r < 4; r++) {
        tot[r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 d[4][4];
        for (int r = 0; r < 4; r++) {
            for (int j = 0; j < 4; j++) {
                d[r][j] = _mm512_setzero_ps();
            }
        }
        for (int64_t i = 0; i < cpg; i++) {
            const int64_t c = g * cpg + i;
            /* the four rows' bytes of this chunk, WQ_PF_ROWS rows ahead, as one stream */
            for (int64_t b = 0; b < 4 * cb; b += 64) {
                _mm_prefetch((const char *)(row + 4 * pf + 4 * c * cb + b), _MM_HINT_T1);
            }
            __m512i v[4];
            for (int r = 0; r < 4; r++) {
                v[r] = chunk_lanes(row + r * rb + c * cb, bits, r == 3 && edge && c == last);
            }
            const float *x0 = xp + c * 64;
            for (int j = 0; j < 4; j++) {
                const __m512 xv = _mm512_loadu_ps(x0 + 16 * j);
                for (int r = 0; r < 4; r++) {
                    const __m512i q = field_bits(v[r], m, bits, j);
                    const __m512 f = sub ? _mm512_castsi512_ps(q) : _mm512_cvtepi32_ps(q);
                    d[r][j] = _mm512_fmadd_ps(xv, f, d[r][j]);
                }
            }
        }
        for (int r = 0; r < 4; r++) {
            const __m512 e = _mm512_add_ps(_mm512_add_ps(d[r][0], d[r][1]),
                                           _mm512_add_ps(d[r][2], d[r][3]));
            tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * ng + g]), e, tot[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        res[r] = _mm512_reduce_add_ps(tot[r]);
    }
}

INLINE void rows_bits(const offq_wq_operand *w, const float *xp, const float *xsum,
                      const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                      float *out, const int bits, const int sub)
{
    const int64_t k = w->k, group = w->group, ng = k / group, rb = offq_wq_row_bytes(k, bits);
    int64_t n = n0;
    for (; m == 1 && n + 4 <= n1; n += 4) { /* decode: weight rows four at a time */
        const uint8_t *row = w->packed + n * rb;
        const float *sc = w->scale + n * ng;
        const int edge = n + 3 == w->n - 1;
        float res[4];
        if (group == 128) {
            dot_four_rows(row, rb, sc, xp, k, group, bits, sub, 2, edge, res);
        } else if (group == 64) {
            dot_four_rows(row, rb, sc, xp, k, group, bits, sub, 1, edge, res);
        } else {
            dot_four_rows(row, rb, sc, xp, k, group, bits, sub, 0, edge, res);
        }
        for (int r = 0; r < 4; r++) {
            out[n + r] = offq_wq_output(res[r], unscale, 0, sc + r * ng, w->zero + (n + r) * ng,
                                        xsum, ng);
        }
    }
    for (; n < n1; n++) {
        const uint8_t *row = w->packed + n * rb;
        const float *sc = w->scale + n * ng, *zr = w->zero + n * ng;
        const int edge = n == w->n - 1;
        for (int64_t r0 = 0; r0 < m; r0 += 2) {
            const int rr = m - r0 >= 2 ? 2 : 1;
            float res[2];
            if (rr == 2) {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 2, sub, 0, edge, res);
            } else if (group == 128) { /* decode: the common groups unrolled */
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 2, edge, res);
            } else if (group == 64) {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 1, edge, res);
            } else {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 0, edge, res);
            }
            for (int r = 0; r < rr; r++) {
                out[(r0 + r) * ldo + n] = offq_wq_output(res[r], unscale, r0 + r, sc, zr, xsum, ng);
            }
        }
    }
}

void WQ512_ENTRY WQ512_ROWS(const offq_wq_operand *w, const float *xp, const float *xsum,
                            const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                            float *out)
{
    OFFQ_WQ_ROWS_SPECIALISED(rows_bits)
}
#endif
