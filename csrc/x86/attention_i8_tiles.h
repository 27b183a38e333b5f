/* x86/attention_i8_tiles.h: the 8-bit attention (steps: attention_i8.c) in tiles of KT cached
 * rows, shared by the AVX2 and AVX-512 VNNI variants (x86/attention_i8_avx2.c,
 * x86/attention_i8_avx512.c). The includer defines AI8_TARGET, AI8_W (int32 lanes per vector),
 * the vector types and operations below, and AI8_DP(acc, u8, s8): acc + the sums of 4 adjacent
 * unsigned x signed byte products per int32 lane (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2,
 * whose 16-bit pair sums stay below 2 x 255 x 15 here: no saturation). Every integer sum is
 * exact and every float step is the reference's, lane by lane, so both variants give the
 * reference's numbers bar the softmax's exp (x86/exp_simd.h, shared with the float kernel).
 *
 * Layouts per tile (bytes): keys [hd / 4][KT][4] (lanes = keys, 4 dims per lane: the score's
 * dot product over dims), values [KT / 4][hd][4] (lanes = dims, 4 rows per lane: the values' sum
 * over rows), both unpacked from the cache's nibbles once per tile for every query of the block.
 * Needs hd % 16 == 0 and group % 16 == 0 (the entry points fall back to the generic otherwise).
 */
#ifndef OFFQ_X86_ATTENTION_I8_TILES_H
#define OFFQ_X86_ATTENTION_I8_TILES_H

#include <math.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"

#ifndef AI8_TARGET
#error "define AI8_TARGET and the vector macros before including attention_i8_tiles.h"
#endif
#define AI8_FN __attribute__((target(AI8_TARGET))) static inline
#define KT OFFQ_ATTN_TILE_ROWS

static inline int32_t ai8_word(const void *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The hd codes of a packed row as bytes (hd % 16 == 0); rows past the cache (row NULL): zero. */
AI8_FN void ai8_unpack_row(const uint8_t *row, int64_t hd, uint8_t *out)
{
    if (row == NULL) {
        memset(out, 0, (size_t)hd);
        return;
    }
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t i = 0; i < hd; i += 16) {
        const __m128i v = _mm_loadl_epi64((const __m128i *)(row + i / 2));
        _mm_storeu_si128((__m128i *)(out + i), _mm_unpacklo_epi8(_mm_and_si128(v, m15),
                                                                 _mm_and_si128(_mm_srli_epi16(v, 4), m15)));
    }
}

/* Keys jj .. jj + 4 of the tile into kt[b][jj + k][0..4) = codes 4b..4b+3 of key k: a 4 x 4
 * transpose of 32-bit words per 16 dims. */
AI8_FN void ai8_keys4(const uint8_t *r, int64_t hd, uint8_t *kt, int64_t jj)
{
    for (int64_t i = 0; i < hd; i += 16) {
        const __m128i r0 = _mm_loadu_si128((const __m128i *)(r + i));
        const __m128i r1 = _mm_loadu_si128((const __m128i *)(r + hd + i));
        const __m128i r2 = _mm_loadu_si128((const __m128i *)(r + 2 * hd + i));
        const __m128i r3 = _mm_loadu_si128((const __m128i *)(r + 3 * hd + i));
        const __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);
        const __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);
        uint8_t *o = kt + (i / 4) * KT * 4 + jj * 4;
        _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi64(t0, t1));
        _mm_storeu_si128((__m128i *)(o + KT * 4), _mm_unpackhi_epi64(t0, t1));
        _mm_storeu_si128((__m128i *)(o + 2 * KT * 4), _mm_unpacklo_epi64(t2, t3));
        _mm_storeu_si128((__m128i *)(o + 3 * KT * 4), _mm_unpackhi_epi64(t2, t3));
    }
}

/* Rows 4 jb .. 4 jb + 4 into vt[jb][i][0..4) = the four rows' codes of dim i: byte and word
 * interleaves per 16 dims. */
AI8_FN void ai8_values4(const uint8_t *r, int64_t hd, uint8_t *vt, int64_t jb)
{
    for (int64_t i = 0; i < hd; i += 16) {
        const __m128i a0 = _mm_loadu_si128((const __m128i *)(r + i));
        const __m128i a1 = _mm_loadu_si128((const __m128i *)(r + hd + i));
        const __m128i a2 = _mm_loadu_si128((const __m128i *)(r + 2 * hd + i));
        const __m128i a3 = _mm_loadu_si128((const __m128i *)(r + 3 * hd + i));
        const __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
        const __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
        uint8_t *o = vt + jb * hd * 4 + i * 4;
        _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi16(t0, t2));
        _mm_storeu_si128((__m128i *)(o + 16), _mm_unpackhi_epi16(t0, t2));
        _mm_storeu_si128((__m128i *)(o + 32), _mm_unpacklo_epi16(t1, t3));
        _mm_storeu_si128((__m128i *)(o + 48), _mm_unpackhi_epi16(t1, t3));
    }
}

/* One tile's rows [0, rows) of kc or vc (rows >= jn: zero) in the key or the value layout, and
 * their scales / integer zero-points per group ([ng][KT], 0 past jn). */
AI8_FN void ai8_tile(const offq_attn_args *a, const uint8_t *codes, const float *scale,
                     const float *zero, int64_t j0, int64_t jn, int64_t rows, int keys,
                     uint8_t *t8, float *ts, int32_t *tz, uint8_t *scratch)
{
    const int64_t hd = a->hd, ng = hd / a->group;
    for (int64_t jj = 0; jj < rows; jj += 4) {
        for (int k = 0; k < 4; k++) {
            ai8_unpack_row(jj + k < jn ? codes + (j0 + jj + k) * a->cstride : NULL, hd,
                           scratch + k * hd);
        }
        if (keys) {
            ai8_keys4(scratch, hd, t8, jj);
        } else {
            ai8_values4(scratch, hd, t8, jj / 4);
        }
    }
    for (int64_t jj = 0; jj < rows; jj++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            const int64_t at = (j0 + jj) * a->pstride + gi;
            ts[gi * KT + jj] = jj < jn ? scale[at] : 0.0f;
            tz[gi * KT + jj] = jj < jn ? offq_attn_i8_zero(zero[at]) : 0;
        }
    }
}

/* Scores of NQ (1..4) queries against NV (1 or 2) vectors of AI8_W keys from column k0 of the
 * tile: per group the int32 dot products, then (sq * ks) * (float)(dot - kz * qsum), summed over
 * groups in order (NQ, NV constants: the loops unroll into registers). */
#define AI8_SCORES(NQ, NV)                                                                        \
    do {                                                                                          \
        for (int64_t gi = 0; gi < ng; gi++) {                                                     \
            AI8_IV acc[NQ][NV];                                                                   \
            for (int t = 0; t < NQ; t++) {                                                        \
                for (int v = 0; v < NV; v++) {                                                    \
                    acc[t][v] = AI8_ZEROI();                                                      \
                }                                                                                 \
            }                                                                                     \
            for (int64_t b = gi * g / 4; b < (gi + 1) * g / 4; b++) {                             \
                const uint8_t *kr = kt + b * KT * 4 + k0 * 4;                                     \
                AI8_IV kv[NV];                                                                    \
                for (int v = 0; v < NV; v++) {                                                    \
                    kv[v] = AI8_LOADI(kr + 4 * AI8_W * v);                                        \
                }                                                                                 \
                for (int t = 0; t < NQ; t++) {                                                    \
                    const AI8_IV qb = AI8_SET1I(ai8_word(q8 + t * hd + 4 * b));                   \
                    for (int v = 0; v < NV; v++) {                                                \
                        acc[t][v] = AI8_DP(acc[t][v], kv[v], qb);                                 \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int t = 0; t < NQ; t++) {                                                        \
                const AI8_IV qs = AI8_SET1I(qsum[t * ng + gi]);                                   \
                const AI8_FV sqv = AI8_SET1F(sq[t * ng + gi]);                                    \
                for (int v = 0; v < NV; v++) {                                                    \
                    const int64_t c = gi * KT + k0 + AI8_W * v;                                   \
                    const AI8_IV d = AI8_SUBI(acc[t][v], AI8_MULLO(AI8_LOADI(kz + c), qs));       \
                    const AI8_FV term =                                                           \
                        AI8_MULF(AI8_MULF(sqv, AI8_LOADF(ks + c)), AI8_CVTF(d));                  \
                    AI8_STOREF(sb[t] + AI8_W * v,                                                 \
                               gi == 0 ? term : AI8_ADDF(AI8_LOADF(sb[t] + AI8_W * v), term));    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    } while (0)

AI8_FN void ai8_scores(int nq, int nv, const int8_t *q8, const float *sq, const int32_t *qsum,
                       int64_t hd, int64_t g, int64_t ng, const uint8_t *kt, int64_t k0,
                       const float *ks, const int32_t *kz, float (*sb)[2 * AI8_W])
{
    switch (nq * 2 + nv - 1) {
    case 2: AI8_SCORES(1, 1); break;
    case 3: AI8_SCORES(1, 2); break;
    case 4: AI8_SCORES(2, 1); break;
    case 5: AI8_SCORES(2, 2); break;
    case 6: AI8_SCORES(3, 1); break;
    case 7: AI8_SCORES(3, 2); break;
    case 8: AI8_SCORES(4, 1); break;
    default: AI8_SCORES(4, 2); break;
    }
}

/* Query t's 8-bit weights of rows [0, jt) of the tile (st: its e_j, vs: the rows' value scales,
 * [ng][nmax] from the tile's first row) into w8 [ng][KT], zero up to a multiple of 4 rows; zs[gi]
 * = sum_j w8_jg * vz_jg (tz: the tile's integer zero-points). 8 rows at a time in both variants
 * (the same products and roundings as offq_attn_i8_weight). */
AI8_FN void ai8_weights(const float *st, const float *vs, int64_t nmax, const int32_t *tz,
                        const float *winv, int64_t ng, int64_t jt, uint8_t *w8, int32_t *zs)
{
    const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
    for (int64_t gi = 0; gi < ng; gi++) {
        const __m256 wi = _mm256_set1_ps(winv[gi]);
        const float *v = vs + gi * nmax;
        uint8_t *w = w8 + gi * KT;
        __m256i zacc = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 8 <= jt; j += 8) {
            const __m256 x = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(st + j),
                                                         _mm256_loadu_ps(v + j)), wi);
            const __m256i c = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(x), zero), top);
            zacc = _mm256_add_epi32(zacc, _mm256_mullo_epi32(c, _mm256_loadu_si256(
                                                                    (const __m256i *)(tz + gi * KT + j))));
            const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(c),
                                                 _mm256_extracti128_si256(c, 1));
            _mm_storel_epi64((__m128i *)(w + j), _mm_packus_epi16(p16, p16));
        }
        int32_t lanes[8], z = 0;
        _mm256_storeu_si256((__m256i *)lanes, zacc);
        for (int k = 0; k < 8; k++) {
            z += lanes[k];
        }
        for (; j < jt; j++) {
            w[j] = offq_attn_i8_weight(st[j], v[j], winv[gi]);
            z += (int32_t)w[j] * tz[gi * KT + j];
        }
        for (; j % 4 != 0; j++) {
            w[j] = 0;
        }
        zs[gi] = z;
    }
}

/* o[0..hd) += wstep_g * (float)(sum_{rows} w8 * code - zs_g) over jb blocks of 4 rows of the
 * value tile vt; up to 4 vectors of dims at once, each weight word one broadcast. */
AI8_FN void ai8_values(float *o, const uint8_t *vt, const uint8_t *w8, const int32_t *zs,
                       const float *wstep, int64_t hd, int64_t g, int64_t jb)
{
    for (int64_t i0 = 0; i0 < hd; i0 += 4 * AI8_W) {
        const int nv = hd - i0 >= 4 * AI8_W ? 4 : (int)((hd - i0) / AI8_W);
        AI8_IV acc[4] = {AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI()};
        const uint8_t *wg[4];
        for (int v = 0; v < 4; v++) {
            wg[v] = w8 + (v < nv ? (i0 + AI8_W * v) / g : 0) * KT;
        }
        if (nv == 4 && wg[0] == wg[3]) { /* one group: one broadcast a block of 4 rows */
            for (int64_t b = 0; b < jb; b++) {
                const uint8_t *r = vt + b * hd * 4 + i0 * 4;
                const AI8_IV wb = AI8_SET1I(ai8_word(wg[0] + 4 * b));
                for (int v = 0; v < 4; v++) {
                    acc[v] = AI8_DP(acc[v], wb, AI8_LOADI(r + 4 * AI8_W * v));
                }
            }
        }
        for (int64_t b = 0; b < jb && !(nv == 4 && wg[0] == wg[3]); b++) {
            const uint8_t *r = vt + b * hd * 4 + i0 * 4;
            if (nv == 4) {
                for (int v = 0; v < 4; v++) {
                    acc[v] = AI8_DP(acc[v], AI8_SET1I(ai8_word(wg[v] + 4 * b)),
                                    AI8_LOADI(r + 4 * AI8_W * v));
                }
            } else {
                for (int v = 0; v < nv; v++) {
                    acc[v] = AI8_DP(acc[v], AI8_SET1I(ai8_word(wg[v] + 4 * b)),
                                    AI8_LOADI(r + 4 * AI8_W * v));
                }
            }
        }
        for (int v = 0; v < nv; v++) {
            const int64_t gi = (i0 + AI8_W * v) / g;
            float *dst = o + i0 + AI8_W * v;
            const AI8_FV part = AI8_MULF(AI8_SET1F(wstep[gi]),
                                         AI8_CVTF(AI8_SUBI(acc[v], AI8_SET1I(zs[gi]))));
            AI8_STOREF(dst, AI8_ADDF(AI8_LOADF(dst), part));
        }
    }
}

/* The kernel (steps: attention_i8.c) for hd % 16 == 0 and group % 16 == 0. */
AI8_FN void attend_i8_tiles(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                            float *s, float *const *out, float *tile, void *qwork,
                            float (*softmax)(float *, int64_t))
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    int64_t nmax = 0;
    for (int64_t t = 0; t < nq; t++) {
        nmax = n[t] > nmax ? n[t] : nmax;
    }
    const int64_t ld = nmax + 1;
    const offq_attn_i8_queries Q = offq_attn_i8_quantize(q, nq, hd, g, qwork);
    uint8_t *t8 = (uint8_t *)(void *)tile;                 /* [hd / 4][KT][4] or [KT / 4][hd][4] */
    float *ts = (float *)(void *)(t8 + KT * hd);           /* [ng][KT] the tile's scales */
    int32_t *tz = (int32_t *)(void *)(ts + ng * KT);       /* [ng][KT] its zero-points */
    uint8_t *w8 = (uint8_t *)(void *)(tz + ng * KT);       /* [ng][KT] a query's weights */
    int32_t *zs = (int32_t *)(void *)(w8 + ng * KT);       /* [ng] their zero-point sums */
    uint8_t *rows = (uint8_t *)(void *)(zs + (ng + 15) / 16 * 16); /* [4][hd] unpacked rows */
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        const int64_t jpad = (jn + AI8_W - 1) / AI8_W * AI8_W; /* whole vectors of keys */
        ai8_tile(a, a->kc, a->ks, a->kz, j0, jn, jpad, 1, t8, ts, tz, rows);
        for (int64_t t0 = 0; t0 < nq; t0 += 4) {
            const int bq = nq - t0 < 4 ? (int)(nq - t0) : 4;
            int64_t jt = 0;
            for (int b = 0; b < bq; b++) {
                const int64_t jb = n[t0 + b] - j0 < jn ? n[t0 + b] - j0 : jn;
                jt = jb > jt ? jb : jt;
            }
            for (int64_t k0 = 0; k0 < jt; k0 += 2 * AI8_W) {
                const int nv = jt - k0 > AI8_W ? 2 : 1;
                float sb[4][2 * AI8_W];
                ai8_scores(bq, nv, Q.q8 + t0 * hd, Q.sq + t0 * ng, Q.qsum + t0 * ng, hd, g, ng,
                           t8, k0, ts, tz, sb);
                for (int b = 0; b < bq; b++) { /* keep the scores of the keys query t sees */
                    const int64_t t = t0 + b;
                    const int64_t jb = n[t] - j0 < jn ? n[t] - j0 : jn;
                    const int64_t m = jb - k0 < AI8_W * nv ? jb - k0 : AI8_W * nv;
                    if (m > 0) {
                        memcpy(s + t * ld + j0 + k0, sb[b], (size_t)m * sizeof(float));
                    }
                }
            }
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        s[t * ld + nmax] = softmax(s + t * ld, n[t]);
        memset(out[t], 0, (size_t)hd * sizeof(float));
    }
    offq_attn_i8_value_scales(a, &Q, nmax);
    for (int64_t t = 0; t < nq; t++) { /* each query's weights' grid: the largest e_j * vs_j */
        const float *st = s + t * ld;
        for (int64_t gi = 0; gi < ng; gi++) {
            const float *v = Q.vs + gi * nmax;
            __m256 mv = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= n[t]; j += 8) {
                mv = _mm256_max_ps(mv, _mm256_mul_ps(_mm256_loadu_ps(st + j), _mm256_loadu_ps(v + j)));
            }
            float lanes[8], wmax = 0.0f;
            _mm256_storeu_ps(lanes, mv);
            for (int k = 0; k < 8; k++) {
                wmax = lanes[k] > wmax ? lanes[k] : wmax;
            }
            for (; j < n[t]; j++) {
                const float w = st[j] * v[j];
                wmax = w > wmax ? w : wmax;
            }
            offq_attn_i8_set_grid(&Q, t * ng + gi, wmax);
        }
    }
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        ai8_tile(a, a->vc, a->vs, a->vz, j0, jn, (jn + 3) / 4 * 4, 0, t8, ts, tz, rows);
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            if (jt <= 0) {
                continue;
            }
            ai8_weights(s + t * ld + j0, Q.vs + j0, nmax, tz, Q.winv + t * ng, ng, jt, w8, zs);
            ai8_values(out[t], t8, w8, zs, Q.wstep + t * ng, hd, g, (jt + 3) / 4);
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        const __m256 den = _mm256_set1_ps(s[t * ld + nmax]);
        for (int64_t i = 0; i < hd; i += 8) {
            _mm256_storeu_ps(out[t] + i, _mm256_div_ps(_mm256_loadu_ps(out[t] + i), den));
        }
    }
}

#endif
