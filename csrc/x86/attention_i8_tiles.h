/* x86/attention_i8_tiles.h: the 8-bit attention (steps: attention_i8.c) in tiles of KT cached
 * rows, shared by the AVX2 and AVX-512 VNNI variants (x86/attention_i8_avx2.c,
 * x86/attention_i8_avx512.c). The includer defines AI8_TARGET, AI8_W (int32 lanes per vector),
 * the vector types and operations below, and AI8_DP(acc, u8, s8): acc + the sums of 4 adjacent
 * unsigned x signed byte products per int32 lane (vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2,
 * whose 16-bit pair sums stay below 2 x 255 x 15 here: no saturation). The hot loops sum partial
 * dot products with AI8_DP_PART over spans of AI8_SPAN_S (scores) / AI8_SPAN_V (values) blocks
 * of 4, each from AI8_SPAN_START(acc), and add them to the int32 sums with AI8_WIDEN: on AVX2 the
 * partial sums start from 0 in 16-bit lanes (vpmaddubsw + vpaddw, one vpmaddwd a span: 8 spans
 * of pair sums <= 3810, 4 of <= 7650, below 32767); with VNNI a span is a whole group and
 * starts from the int32 sums themselves (one set of accumulators).
 * Every integer sum is exact and every float step is the reference's, lane by lane, so both
 * variants give the same numbers, the reference's bar the softmax's exp (a polynomial here:
 * ai8_exp8/16).
 *
 * Layouts per tile (bytes): keys [hd / 4][KT][4] (lanes = keys, 4 dims per lane: the score's
 * dot product over dims), values minus their zero-points [KT / 4][hd][4] (lanes = dims, 4 rows per
 * lane: the values' sum over rows), both unpacked from the cache's nibbles once per tile for every
 * query of the block, or once per prefill step for all its blocks (ai8_pretile, a->tiles).
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

/* The hd codes of a packed row as bytes (hd % 16 == 0), minus the row's integer zero-points z
 * (one per group; NULL: none) as signed bytes (-15..15); rows past the cache (row NULL): zero. */
AI8_FN void ai8_unpack_row(const uint8_t *row, int64_t hd, int64_t g, const float *z,
                           uint8_t *out)
{
    if (row == NULL) {
        memset(out, 0, (size_t)hd);
        return;
    }
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t i0 = 0; i0 < hd; i0 += g) { /* one zero-point a group (g % 16 == 0) */
        const __m128i zb = _mm_set1_epi8(z != NULL ? (char)offq_attn_i8_zero(z[i0 / g]) : 0);
        for (int64_t i = i0; i < i0 + g; i += 16) {
            const __m128i v = _mm_loadl_epi64((const __m128i *)(row + i / 2));
            const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(v, m15),
                                                _mm_and_si128(_mm_srli_epi16(v, 4), m15));
            _mm_storeu_si128((__m128i *)(out + i), _mm_sub_epi8(c, zb));
        }
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

/* One tile's rows [0, rows) of kc or vc (rows >= jn: zero) in the key layout (codes 0..15) or
 * the value layout (codes minus their zero-point, -15..15: the values' sums then need no
 * zero-point term); for keys also their scales and integer zero-points (as floats) per group
 * ([ng][KT], 0 past jn). */
AI8_FN void ai8_tile(const offq_attn_args *a, const uint8_t *codes, const float *scale,
                     const float *zero, int64_t j0, int64_t jn, int64_t rows, int keys,
                     uint8_t *t8, float *ts, float *tz, uint8_t *scratch)
{
    const int64_t hd = a->hd, ng = hd / a->group;
    for (int64_t jj = 0; jj < rows; jj += 4) {
        for (int k = 0; k < 4; k++) {
            const int in = jj + k < jn;
            ai8_unpack_row(in ? codes + (j0 + jj + k) * a->cstride : NULL, hd, a->group,
                           in && !keys ? zero + (j0 + jj + k) * a->pstride : NULL,
                           scratch + k * hd);
        }
        if (keys) {
            ai8_keys4(scratch, hd, t8, jj);
        } else {
            ai8_values4(scratch, hd, t8, jj / 4);
        }
    }
    for (int64_t jj = 0; jj < rows && keys; jj++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            const int64_t at = (j0 + jj) * a->pstride + gi;
            ts[gi * KT + jj] = jj < jn ? scale[at] : 0.0f;
            tz[gi * KT + jj] = jj < jn ? (float)offq_attn_i8_zero(zero[at]) : 0.0f;
        }
    }
}

/* The low byte of each of the AI8_W int32 lanes of v (lanes already within a byte's range, 0..255
 * or -127..127) into dst[0 .. AI8_W). */
AI8_FN void ai8_store_bytes(void *dst, AI8_IV v)
{
#if AI8_W == 16
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(v));
#else
    const __m256i low = _mm256_shuffle_epi8( /* bytes 0, 4, 8, 12 of each half first */
        v, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8,
                            12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    _mm_storel_epi64((__m128i *)dst, _mm_unpacklo_epi32(_mm256_castsi256_si128(low),
                                                       _mm256_extracti128_si256(low, 1)));
#endif
}

/* x[0..NQ)[0..NV) = 0 */
#define AI8_CLEAR(x, NQ, NV)                                                                      \
    for (int t_ = 0; t_ < (NQ); t_++) {                                                           \
        for (int v_ = 0; v_ < (NV); v_++) {                                                       \
            (x)[t_][v_] = AI8_ZEROI();                                                            \
        }                                                                                         \
    }

/* The largest lane of v and 0, NaN lanes ignored (a maximum with 0 first turns them into 0: the
 * second operand is what vmaxps returns for NaN), then a tree of maxima over halves: every lane
 * is then a number >= 0, so any order gives the same value. The weights' grid and the query
 * scale take their maxima so. */
AI8_FN float ai8_lane_max0(AI8_FV v)
{
    v = AI8_MAXF(v, AI8_SET1F(0.0f));
#if AI8_W == 16
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#else
    const __m256 h = v;
#endif
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Scores of NQ (1..4) queries against NV (1 .. AI8_NV) vectors of AI8_W keys from column k0 of the
 * tile into sb[t][0 .. NV * AI8_W): per group the int32 dot products, then (sq * ks) *
 * (float)(dot - kz * qsum), summed over groups in order (NQ, NV constants: the loops unroll into
 * registers). The difference is one float FMA, (float)dot - (float)kz * (float)qsum: both terms
 * are integers below 127 * 15 * g <= 2^24 (the entry points take g <= 4096), exact in float32,
 * and so is their difference, the integer subtraction's result. */
#define AI8_SCORES(NQ, NV)                                                                        \
    do {                                                                                          \
        for (int64_t gi = 0; gi < ng; gi++) {                                                     \
            AI8_IV acc[NQ][NV];                                                                   \
            AI8_CLEAR(acc, NQ, NV);                                                               \
            const int64_t bend = (gi + 1) * g / 4;                                                \
            for (int64_t c0 = gi * g / 4; c0 < bend; c0 += AI8_SPAN_S) {                          \
                const int64_t c1 = c0 + AI8_SPAN_S < bend ? c0 + AI8_SPAN_S : bend;               \
                AI8_IV p[NQ][NV];                                                                 \
                for (int t = 0; t < NQ; t++) {                                                    \
                    for (int v = 0; v < NV; v++) {                                                \
                        p[t][v] = AI8_SPAN_START(acc[t][v]);                                      \
                    }                                                                             \
                }                                                                                 \
                for (int64_t b = c0; b < c1; b++) {                                               \
                    const uint8_t *kr = kt + b * KT * 4 + k0 * 4;                                 \
                    AI8_IV kv[NV];                                                                \
                    for (int v = 0; v < NV; v++) {                                                \
                        kv[v] = AI8_LOADI(kr + 4 * AI8_W * v);                                    \
                    }                                                                             \
                    for (int t = 0; t < NQ; t++) {                                                \
                        const AI8_IV qb = AI8_SET1I(ai8_word(q8 + t * hd + 4 * b));               \
                        for (int v = 0; v < NV; v++) {                                            \
                            p[t][v] = AI8_DP_PART(p[t][v], kv[v], qb);                            \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
                for (int t = 0; t < NQ; t++) {                                                    \
                    for (int v = 0; v < NV; v++) {                                                \
                        acc[t][v] = AI8_WIDEN(acc[t][v], p[t][v]);                                \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int t = 0; t < NQ; t++) {                                                        \
                const AI8_FV qs = AI8_SET1F((float)qsum[t * ng + gi]);                            \
                const AI8_FV sqv = AI8_SET1F(sq[t * ng + gi]);                                    \
                for (int v = 0; v < NV; v++) {                                                    \
                    const int64_t c = gi * KT + k0 + AI8_W * v;                                   \
                    const AI8_FV d = AI8_FNMADDF(AI8_LOADF(kz + c), qs, AI8_CVTF(acc[t][v]));     \
                    const AI8_FV term = AI8_MULF(AI8_MULF(sqv, AI8_LOADF(ks + c)), d);            \
                    AI8_STOREF(sb[t] + AI8_W * v,                                                 \
                               gi == 0 ? term : AI8_ADDF(AI8_LOADF(sb[t] + AI8_W * v), term));    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    } while (0)

#if AI8_NV == 4
#define AI8_SCORES_NV(NQ)                                                                         \
    switch (nv) {                                                                                 \
    case 1: AI8_SCORES(NQ, 1); break;                                                             \
    case 2: AI8_SCORES(NQ, 2); break;                                                             \
    case 3: AI8_SCORES(NQ, 3); break;                                                             \
    default: AI8_SCORES(NQ, 4); break;                                                            \
    }
#else
#define AI8_SCORES_NV(NQ)                                                                         \
    switch (nv) {                                                                                 \
    case 1: AI8_SCORES(NQ, 1); break;                                                             \
    default: AI8_SCORES(NQ, 2); break;                                                            \
    }
#endif

AI8_FN void ai8_scores(int nq, int nv, const int8_t *q8, const float *sq, const int32_t *qsum,
                       int64_t hd, int64_t g, int64_t ng, const uint8_t *kt, int64_t k0,
                       const float *ks, const float *kz, float *const *sb)
{
    switch (nq) {
    case 1: AI8_SCORES_NV(1); break;
    case 2: AI8_SCORES_NV(2); break;
    case 3: AI8_SCORES_NV(3); break;
    default: AI8_SCORES_NV(4); break;
    }
}

/* dst[0..m) = src[0..m) with vector moves (a memcpy per block of scores took 6% of an 8-bit
 * pp2048 prefill, perf). */
AI8_FN void ai8_copy(float *dst, const float *src, int64_t m)
{
    int64_t c = 0;
#if AI8_W == 16
    for (; c < m; c += 16) { /* the last partial vector through a mask */
        const __mmask16 mk = m - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - c)) - 1u);
        _mm512_mask_storeu_ps(dst + c, mk, _mm512_maskz_loadu_ps(mk, src + c));
    }
#endif
    for (; c + 8 <= m; c += 8) {
        _mm256_storeu_ps(dst + c, _mm256_loadu_ps(src + c));
    }
    for (; c < m; c++) {
        dst[c] = src[c];
    }
}

/* The largest e_j vs_j of rows [0, jt) (vectors of AI8_W rows, then one by one): each vector of
 * products is vmaxps's second operand, and the lanes' maximum with 0 then the scalar rows, as
 * offq_attn_i8_set_grid's callers take it. v NULL: st holds the products already. */
AI8_FN float ai8_wmax(const float *st, const float *v, int64_t jt)
{
    AI8_FV mv = AI8_SET1F(0.0f);
    int64_t j = 0;
    for (; j + AI8_W <= jt; j += AI8_W) { /* a maximum: the same in any order */
        const AI8_FV x = AI8_LOADF(st + j);
        mv = AI8_MAXF(mv, v != NULL ? AI8_MULF(x, AI8_LOADF(v + j)) : x);
    }
    float wmax = ai8_lane_max0(mv);
    for (; j < jt; j++) {
        const float x = v != NULL ? st[j] * v[j] : st[j];
        wmax = x > wmax ? x : wmax;
    }
    return wmax;
}

/* Rows [0, jt) of a query's e_j vs_j (st, v; v NULL: st holds the products) on its grid winv as
 * 8-bit weights into w, zero from there up to row `fill`: AI8_W rows at a time, each lane the
 * products and rounding of offq_attn_i8_weight. */
AI8_FN void ai8_weight_codes(const float *st, const float *v, float winv, int64_t jt,
                             int64_t fill, uint8_t *w)
{
    const AI8_FV wi = AI8_SET1F(winv);
    int64_t j = 0;
    for (; j + AI8_W <= jt; j += AI8_W) {
        const AI8_FV e = AI8_LOADF(st + j);
        const AI8_FV x = AI8_MULF(v != NULL ? AI8_MULF(e, AI8_LOADF(v + j)) : e, wi);
        ai8_store_bytes(w + j, AI8_MINI(AI8_MAXI(AI8_CVTI(x), AI8_ZEROI()), AI8_SET1I(255)));
    }
    for (; j < jt; j++) { /* (p * 1) * winv = p * winv exactly */
        w[j] = offq_attn_i8_weight(st[j], v != NULL ? v[j] : 1.0f, winv);
    }
    for (j = j > 0 ? j : 0; j < fill; j++) {
        w[j] = 0;
    }
}

/* Query t's 8-bit weights of rows [0, jt) of the tile (st: its e_j, vs: the rows' value scales,
 * [ng][nmax] from the tile's first row) into w8 [ng][KT], zero from there up to row `fill` (a
 * multiple of 4), on the tile's grid per group: wmax = the largest e_j vs_j of these rows,
 * winv = 255 / wmax, wstep = wmax / 255 (offq_attn_i8_set_grid). */
AI8_FN void ai8_weights(const float *st, const float *vs, int64_t nmax, float *winv, float *wstep,
                        int64_t ng, int64_t jt, int64_t fill, uint8_t *w8)
{
    for (int64_t gi = 0; gi < ng; gi++) {
        const float *v = vs + gi * nmax;
        offq_attn_i8_set_grid(winv + gi, wstep + gi, ai8_wmax(st, v, jt));
        ai8_weight_codes(st, v, winv[gi], jt, fill, w8 + gi * KT);
    }
}

/* o[0..hd) += wstep_g * (float)(sum_{rows} w8 * (code - zero)) over jb blocks of 4 rows of the
 * value tile vt; up to 4 vectors of dims at once, each weight word one broadcast. */
AI8_FN void ai8_values(float *o, const uint8_t *vt, const uint8_t *w8, const float *wstep,
                       int64_t hd, int64_t g, int64_t jb)
{
    for (int64_t i0 = 0; i0 < hd; i0 += 4 * AI8_W) {
        const int nv = hd - i0 >= 4 * AI8_W ? 4 : (int)((hd - i0) / AI8_W);
        AI8_IV acc[4] = {AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI()};
        const uint8_t *wg[4];
        for (int v = 0; v < 4; v++) {
            wg[v] = w8 + (v < nv ? (i0 + AI8_W * v) / g : 0) * KT;
        }
        if (nv == 4 && wg[0] == wg[3]) { /* one group: one broadcast a block of 4 rows */
            for (int64_t c0 = 0; c0 < jb; c0 += AI8_SPAN_V) {
                const int64_t c1 = c0 + AI8_SPAN_V < jb ? c0 + AI8_SPAN_V : jb;
                AI8_IV p[4] = {AI8_SPAN_START(acc[0]), AI8_SPAN_START(acc[1]),
                               AI8_SPAN_START(acc[2]), AI8_SPAN_START(acc[3])};
                for (int64_t b = c0; b < c1; b++) {
                    const uint8_t *r = vt + b * hd * 4 + i0 * 4;
                    const AI8_IV wb = AI8_SET1I(ai8_word(wg[0] + 4 * b));
                    for (int v = 0; v < 4; v++) {
                        p[v] = AI8_DP_PART(p[v], wb, AI8_LOADI(r + 4 * AI8_W * v));
                    }
                }
                for (int v = 0; v < 4; v++) {
                    acc[v] = AI8_WIDEN(acc[v], p[v]);
                }
            }
        } else { /* groups narrower than 4 vectors, or the last 1-3 vectors: a broadcast each */
            for (int64_t b = 0; b < jb; b++) {
                const uint8_t *r = vt + b * hd * 4 + i0 * 4;
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
                                         AI8_CVTF(acc[v]));
            AI8_STOREF(dst, AI8_ADDF(AI8_LOADF(dst), part));
        }
    }
}

/* ai8_values for two queries at once (hd and the group multiples of 4 * AI8_W): each value load
 * feeds both queries' accumulators. */
AI8_FN void ai8_values2(float *oa, float *ob, const uint8_t *vt, const uint8_t *wa,
                        const uint8_t *wb, const float *sa, const float *sb, int64_t hd, int64_t g,
                        int64_t jb)
{
    for (int64_t i0 = 0; i0 < hd; i0 += 4 * AI8_W) {
        const int64_t gi = i0 / g;
        const uint8_t *ua = wa + gi * KT, *ub = wb + gi * KT;
        AI8_IV a[4] = {AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI()};
        AI8_IV b[4] = {AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI(), AI8_ZEROI()};
        for (int64_t c0 = 0; c0 < jb; c0 += AI8_SPAN_V) {
            const int64_t c1 = c0 + AI8_SPAN_V < jb ? c0 + AI8_SPAN_V : jb;
            AI8_IV pa[4] = {AI8_SPAN_START(a[0]), AI8_SPAN_START(a[1]), AI8_SPAN_START(a[2]),
                            AI8_SPAN_START(a[3])};
            AI8_IV pb[4] = {AI8_SPAN_START(b[0]), AI8_SPAN_START(b[1]), AI8_SPAN_START(b[2]),
                            AI8_SPAN_START(b[3])};
            for (int64_t k = c0; k < c1; k++) {
                const uint8_t *r = vt + k * hd * 4 + i0 * 4;
                const AI8_IV xa = AI8_SET1I(ai8_word(ua + 4 * k));
                const AI8_IV xb = AI8_SET1I(ai8_word(ub + 4 * k));
                for (int v = 0; v < 4; v++) {
                    const AI8_IV rv = AI8_LOADI(r + 4 * AI8_W * v);
                    pa[v] = AI8_DP_PART(pa[v], xa, rv);
                    pb[v] = AI8_DP_PART(pb[v], xb, rv);
                }
            }
            for (int v = 0; v < 4; v++) {
                a[v] = AI8_WIDEN(a[v], pa[v]);
                b[v] = AI8_WIDEN(b[v], pb[v]);
            }
        }
        for (int v = 0; v < 4; v++) {
            float *da = oa + i0 + AI8_W * v, *db = ob + i0 + AI8_W * v;
            AI8_STOREF(da, AI8_ADDF(AI8_LOADF(da), AI8_MULF(AI8_SET1F(sa[gi]), AI8_CVTF(a[v]))));
            AI8_STOREF(db, AI8_ADDF(AI8_LOADF(db), AI8_MULF(AI8_SET1F(sb[gi]), AI8_CVTF(b[v]))));
        }
    }
}

/* offq_attn_i8_quantize's steps AI8_W dims at a time (the same division and rounding per lane,
 * exact int32 sums): a scalar division per element took 2.7% of an 8-bit pp2048 prefill. */
AI8_FN offq_attn_i8_queries ai8_quantize(const float *q, int64_t nq, int64_t hd, int64_t g,
                                         void *qwork)
{
    const int64_t ng = hd / g;
    const offq_attn_i8_queries Q = offq_attn_i8_layout(nq, hd, g, qwork);
    for (int64_t t = 0; t < nq; t++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            const float *x = q + t * hd + gi * g;
            int8_t *c = Q.q8 + t * hd + gi * g;
            AI8_FV mv = AI8_SET1F(0.0f);
            for (int64_t i = 0; i < g; i += AI8_W) {
                mv = AI8_MAXF(mv, AI8_ABSF(AI8_LOADF(x + i)));
            }
            const float amax = ai8_lane_max0(mv);
            const float sq = amax / 127.0f;
            AI8_IV sum = AI8_ZEROI();
            for (int64_t i = 0; i < g; i += AI8_W) {
                AI8_IV v = AI8_ZEROI();
                if (sq > 0.0f) {
                    v = AI8_MINI(AI8_MAXI(AI8_CVTI(AI8_DIVF(AI8_LOADF(x + i), AI8_SET1F(sq))),
                                          AI8_SET1I(-127)), AI8_SET1I(127));
                }
                sum = AI8_ADDI(sum, v);
                ai8_store_bytes(c + i, v);
            }
            int32_t il[AI8_W], total = 0;
            AI8_STOREI(il, sum);
            for (int k = 0; k < AI8_W; k++) {
                total += il[k];
            }
            Q.sq[t * ng + gi] = sq;
            Q.qsum[t * ng + gi] = total;
        }
    }
    return Q;
}

/* e^x for the softmax's x = s - max <= 0, 8 or 16 lanes, through 2^y with y = x log2(e): y
 * clamped at -126 (2^-126 ~ 1.2e-38, which no 8-bit weight can hold; NaN, a corrupt cache, is
 * clamped like -inf), y = n + f with n = rint(y), |f| <= 1/2, then 2^f = 1 + f (c1 + f (c2 +
 * f (c3 + f c4))) (coefficients fitted to 2^f's relative error on [-1/2, 1/2]: < 3e-6 in float32
 * arithmetic, far below the weights' 8 bits) times 2^n: 9 operations with AVX-512, 12 with
 * AVX2. 2^n is one vscalefps with AVX-512 and the exponent bits times p on AVX2; for n >= -126
 * both are p * 2^n rounded once, so both widths give the same bits lane by lane. */
#define AI8_EXP_POLY(P, f)                                                                        \
    P##_fmadd_ps(                                                                                 \
        P##_fmadd_ps(P##_fmadd_ps(P##_fmadd_ps(P##_set1_ps(9.58282e-3f), f,                        \
                                               P##_set1_ps(5.590637e-2f)),                        \
                                  f, P##_set1_ps(0.24024099f)),                                   \
                     f, P##_set1_ps(0.6931242f)),                                                 \
        f, P##_set1_ps(1.0f))
__attribute__((target("avx2,fma"))) static inline __m256 ai8_exp8(__m256 x)
{
    const __m256 y = _mm256_max_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, n);
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(AI8_EXP_POLY(_mm256, f), _mm256_castsi256_ps(e));
}
#if AI8_W == 16
__attribute__((target("avx512f"))) static inline __m512 ai8_exp16(__m512 x)
{
    const __m512 y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(AI8_EXP_POLY(_mm512, _mm512_sub_ps(y, n)), n);
}
#endif

/* The block of 8 scores at p of which m are real, in place: e = exp(p[i] - max) for i < m,
 * the last 1..7 through a padded copy whose padding's lanes are 0; returns the 8 lanes (0 past m,
 * all 0 for m <= 0). */
__attribute__((target("avx2,fma"))) static inline __m256 ai8_exp_block(float *p, int64_t m,
                                                                        __m256 m8, float mx)
{
    if (m >= 8) {
        const __m256 e = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m8));
        _mm256_storeu_ps(p, e);
        return e;
    }
    if (m <= 0) {
        return _mm256_setzero_ps();
    }
    float pad[8];
    for (int k = 0; k < 8; k++) {
        pad[k] = k < m ? p[k] : mx;
    }
    __m256 e = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(pad), m8));
    e = _mm256_blendv_ps(_mm256_setzero_ps(), e,
                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                             _mm256_set1_epi32((int)m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
    _mm256_storeu_ps(pad, e);
    for (int k = 0; k < m; k++) {
        p[k] = pad[k];
    }
    return e;
}

/* Query t's softmax in place, st[j] = e_j = exp(st[j] - max) for j < n, returning their sum
 * (blocks of 8, the last padded with zeros, into 4 lane-wise sums by block number, then one fixed
 * tree: the same sum in both variants). `scaled` (a constant): st[j] = e_j * vs[j] instead, the
 * products the weights are rounded from (one value group a row), formed here while e_j is in a
 * register; the sum is still that of the e_j. */
__attribute__((target(AI8_TARGET), always_inline)) static inline float
ai8_softmax_t(float *st, int64_t n, const float *vs, const int scaled)
{
    /* the maximum in four independent chains, each score as vmaxps's first operand: for a NaN
     * score (a corrupt cache) vmaxps returns the chain's value, so NaN is ignored as the scalar
     * comparisons ignore it (as the second operand it replaced the chain, and the scores before
     * it in its lane were lost: a maximum too small, exp overflowing); the maximum of the rest is
     * exact in any order, the same in both variants */
    AI8_FV m0 = AI8_SET1F(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 4 * AI8_W <= n; j += 4 * AI8_W) {
        m0 = AI8_MAXF(AI8_LOADF(st + j), m0);
        m1 = AI8_MAXF(AI8_LOADF(st + j + AI8_W), m1);
        m2 = AI8_MAXF(AI8_LOADF(st + j + 2 * AI8_W), m2);
        m3 = AI8_MAXF(AI8_LOADF(st + j + 3 * AI8_W), m3);
    }
    for (; j + AI8_W <= n; j += AI8_W) {
        m0 = AI8_MAXF(AI8_LOADF(st + j), m0);
    }
    float lanes[AI8_W], mx = -INFINITY;
    AI8_STOREF(lanes, AI8_MAXF(AI8_MAXF(m0, m1), AI8_MAXF(m2, m3)));
    for (int k = 0; k < AI8_W; k++) {
        mx = lanes[k] > mx ? lanes[k] : mx;
    }
    for (int64_t jj = j; jj < n; jj++) {
        mx = st[jj] > mx ? st[jj] : mx;
    }
    /* block b of 8 scores goes to den[b % 4]: four independent chains (one chain of adds was
     * latency-bound), the same blocks in both variants */
    __m256 den[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    j = 0;
#if AI8_W == 16
    /* chains 0 and 1 as the halves of one vector, 2 and 3 of another: the same lane-wise sums */
    const __m512 m16 = _mm512_set1_ps(mx);
    __m512 den01 = _mm512_setzero_ps(), den23 = _mm512_setzero_ps();
    for (; j + 32 <= n; j += 32) {
        const __m512 e0 = ai8_exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j), m16));
        const __m512 e1 = ai8_exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j + 16), m16));
        _mm512_storeu_ps(st + j, scaled ? _mm512_mul_ps(e0, _mm512_loadu_ps(vs + j)) : e0);
        _mm512_storeu_ps(st + j + 16,
                         scaled ? _mm512_mul_ps(e1, _mm512_loadu_ps(vs + j + 16)) : e1);
        den01 = _mm512_add_ps(den01, e0);
        den23 = _mm512_add_ps(den23, e1);
    }
    den[0] = _mm512_castps512_ps256(den01);
    den[1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(den01), 1));
    den[2] = _mm512_castps512_ps256(den23);
    den[3] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(den23), 1));
#endif
    const __m256 m8 = _mm256_set1_ps(mx);
    /* (AVX2) four blocks a step, one per chain: every index constant, so the chains stay in
     * registers (indexed by j / 8, GCC kept them on the stack: a store and a load per block) */
    for (; j + 32 <= n; j += 32) {
        const __m256 e0 = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j), m8));
        const __m256 e1 = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j + 8), m8));
        const __m256 e2 = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j + 16), m8));
        const __m256 e3 = ai8_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j + 24), m8));
#define AI8_STORE_E(k, e)                                                                         \
    _mm256_storeu_ps(st + j + 8 * (k),                                                            \
                     scaled ? _mm256_mul_ps(e, _mm256_loadu_ps(vs + j + 8 * (k))) : (e))
        AI8_STORE_E(0, e0);
        AI8_STORE_E(1, e1);
        AI8_STORE_E(2, e2);
        AI8_STORE_E(3, e3);
#undef AI8_STORE_E
        den[0] = _mm256_add_ps(den[0], e0);
        den[1] = _mm256_add_ps(den[1], e1);
        den[2] = _mm256_add_ps(den[2], e2);
        den[3] = _mm256_add_ps(den[3], e3);
    }
    /* the last 0..31 scores (j is a multiple of 32 in both variants): block k to chain k */
    for (int k = 0; k < 4; k++) {
        den[k] = _mm256_add_ps(den[k], ai8_exp_block(st + j + 8 * k, n - j - 8 * k, m8, mx));
    }
    for (int64_t jj = j; scaled && jj < n; jj++) {
        st[jj] *= vs[jj];
    }
    const __m256 d = _mm256_add_ps(_mm256_add_ps(den[0], den[1]), _mm256_add_ps(den[2], den[3]));
    const __m256 h = _mm256_hadd_ps(d, d);
    const __m256 hh = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(hh), _mm256_extractf128_ps(hh, 1)));
}

AI8_FN float ai8_softmax(float *st, int64_t n) { return ai8_softmax_t(st, n, NULL, 0); }
AI8_FN float ai8_softmax_scaled(float *st, int64_t n, const float *vs)
{
    return ai8_softmax_t(st, n, vs, 1);
}

/* One value group a row: the weights' grid of every tile T < tiles of a query whose products
 * p_j = e_j vs_j (ai8_softmax_scaled) fill rows [0, n): wmax = the largest p_j of the tile's rows
 * below n (0 past them), winv[T] and wstep[T] from it (offq_attn_i8_set_grid), all before the
 * value phase, whose tiles then need no pass for their maxima and no division in their chain. */
AI8_FN void ai8_tile_grids(const float *p, int64_t n, int64_t tiles, float *winv, float *wstep)
{
    for (int64_t T = 0; T < tiles; T++) {
        const int64_t j0 = T * KT, jt = n - j0 < KT ? n - j0 : KT;
        offq_attn_i8_set_grid(winv + T, wstep + T, ai8_wmax(p + (jt > 0 ? j0 : 0), NULL, jt));
    }
}

/* Rows [j0, j0 + KT) of a's cache (zero from jn on) into dst in the layouts the kernel unpacks
 * a tile into (offq_attn_i8_pretile_fn): keys [hd / 4][KT][4], values [KT / 4][hd][4], the keys'
 * scales and zero-points [ng][KT] each. hd <= OFFQ_ATTN_I8_PRETILE_MAX_HD. */
AI8_FN void ai8_pretile(const offq_attn_args *a, int64_t j0, int64_t jn, uint8_t *dst)
{
    const int64_t hd = a->hd, ng = hd / a->group;
    uint8_t rows[4 * OFFQ_ATTN_I8_PRETILE_MAX_HD];
    float *ts = (float *)(void *)(dst + 2 * KT * hd), *tz = ts + ng * KT;
    ai8_tile(a, a->kc, a->ks, a->kz, j0, jn, KT, 1, dst, ts, tz, rows);
    ai8_tile(a, a->vc, a->vs, a->vz, j0, jn, KT, 0, dst + KT * hd, ts, tz, rows);
}

/* The kernel (steps: attention_i8.c) for hd % 16 == 0 and group % 16 == 0. */
AI8_FN void attend_i8_tiles(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                            float *s, float *const *out, float *tile, void *qwork)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    const int64_t nmax = offq_attn_max_n(n, nq);
    const int64_t ld = nmax + 1;
    const offq_attn_i8_queries Q = ai8_quantize(q, nq, hd, g, qwork);
    uint8_t *t8 = (uint8_t *)(void *)tile;                 /* [hd / 4][KT][4] or [KT / 4][hd][4] */
    float *ts = (float *)(void *)(t8 + KT * hd);           /* [ng][KT] the tile's scales */
    float *tz = ts + ng * KT;                              /* [ng][KT] its zero-points */
    uint8_t *w8 = (uint8_t *)(void *)(tz + ng * KT);       /* [ng][KT] a query's weights */
    uint8_t *w8b = w8 + ng * KT;                           /* [ng][KT] its pair's */
    uint8_t *rows = w8b + ng * KT;                         /* [4][hd] unpacked rows */
    const int pairs = hd % (4 * AI8_W) == 0 && g % (4 * AI8_W) == 0;
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        const int64_t jpad = (jn + AI8_W - 1) / AI8_W * AI8_W; /* whole vectors of keys */
        /* the keys, their scales and zero-points: unpacked here, or once for all calls
         * (a->tiles, ai8_pretile; a tile's rows past this call's nmax then hold cached rows, not
         * zeros: no query stores the scores of keys it does not see, and its weights there are 0) */
        const uint8_t *kt8 = t8;
        const float *kts = ts, *ktz = tz;
        if (a->tiles != NULL) {
            kt8 = a->tiles + j0 / KT * OFFQ_ATTN_I8_TILE_BYTES(hd, ng);
            kts = (const float *)(const void *)(kt8 + 2 * KT * hd);
            ktz = kts + ng * KT;
        } else {
            ai8_tile(a, a->kc, a->ks, a->kz, j0, jn, jpad, 1, t8, ts, tz, rows);
        }
        for (int64_t t0 = 0; t0 < nq; t0 += 4) {
            const int bq = nq - t0 < 4 ? (int)(nq - t0) : 4;
            int64_t jt = 0;
            for (int b = 0; b < bq; b++) {
                const int64_t jb = n[t0 + b] - j0 < jn ? n[t0 + b] - j0 : jn;
                jt = jb > jt ? jb : jt;
            }
            for (int64_t k0 = 0; k0 < jt; k0 += AI8_NV * AI8_W) {
                const int64_t left = (jt - k0 + AI8_W - 1) / AI8_W;
                const int nv = left < AI8_NV ? (int)left : AI8_NV;
                /* a query that sees every key of the block gets its scores in place; the others
                 * through a buffer, keeping those of the keys they see */
                float buf[4][AI8_NV * AI8_W], *dst[4];
                int64_t m[4];
                for (int b = 0; b < bq; b++) {
                    const int64_t t = t0 + b;
                    const int64_t jb = n[t] - j0 < jn ? n[t] - j0 : jn;
                    m[b] = jb - k0 < AI8_W * nv ? jb - k0 : AI8_W * nv;
                    dst[b] = m[b] == AI8_W * nv ? s + t * ld + j0 + k0 : buf[b];
                }
                ai8_scores(bq, nv, Q.q8 + t0 * hd, Q.sq + t0 * ng, Q.qsum + t0 * ng, hd, g, ng,
                           kt8, k0, kts, ktz, dst);
                for (int b = 0; b < bq; b++) {
                    if (m[b] > 0 && dst[b] == buf[b]) {
                        ai8_copy(s + (t0 + b) * ld + j0 + k0, buf[b], m[b]);
                    }
                }
            }
        }
    }
    offq_attn_i8_value_scales(a, &Q, nmax);
    /* one value group a row (the usual KV group = head_dim): the softmax leaves e_j vs_j, and
     * every tile's grid is set before the value phase, [nq][tiles] after the value scales */
    const int64_t tiles = (nmax + KT - 1) / KT;
    float *const gwinv = ng == 1 ? Q.vs + nmax : NULL, *const gwstep = gwinv + nq * tiles;
    for (int64_t t = 0; t < nq; t++) {
        if (ng == 1) {
            s[t * ld + nmax] = ai8_softmax_scaled(s + t * ld, n[t], Q.vs);
            ai8_tile_grids(s + t * ld, n[t], tiles, gwinv + t * tiles, gwstep + t * tiles);
        } else {
            s[t * ld + nmax] = ai8_softmax(s + t * ld, n[t]);
        }
        memset(out[t], 0, (size_t)hd * sizeof(float));
    }
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        const uint8_t *vt8 = t8;
        if (a->tiles != NULL) {
            vt8 = a->tiles + j0 / KT * OFFQ_ATTN_I8_TILE_BYTES(hd, ng) + KT * hd;
        } else {
            ai8_tile(a, a->vc, a->vs, a->vz, j0, jn, (jn + 3) / 4 * 4, 0, t8, ts, tz, rows);
        }
        int64_t t = 0;
        /* query pairs share each value load (8 accumulators: twice the chains in flight) where
         * every 4 vectors of dims lie in one group; the shorter one's weights are zero past its
         * rows, so each query's integer sums are what it gets alone */
        for (; pairs && t + 1 < nq; t += 2) {
            const int64_t ja = n[t] - j0 < jn ? n[t] - j0 : jn;
            const int64_t jb = n[t + 1] - j0 < jn ? n[t + 1] - j0 : jn;
            const int64_t jl = ja > jb ? ja : jb;
            if (jl <= 0) {
                continue;
            }
            const int64_t fill = (jl + 3) / 4 * 4;
            if (ng == 1) { /* the grids are set, s holds the products */
                const int64_t ta = t * tiles + j0 / KT, tb = ta + tiles;
                ai8_weight_codes(s + t * ld + j0, NULL, gwinv[ta], ja, fill, w8);
                ai8_weight_codes(s + (t + 1) * ld + j0, NULL, gwinv[tb], jb, fill, w8b);
                ai8_values2(out[t], out[t + 1], vt8, w8, w8b, gwstep + ta, gwstep + tb, hd, g,
                            fill / 4);
                continue;
            }
            ai8_weights(s + t * ld + j0, Q.vs + j0, nmax, Q.winv + t * ng, Q.wstep + t * ng, ng,
                        ja, fill, w8);
            ai8_weights(s + (t + 1) * ld + j0, Q.vs + j0, nmax, Q.winv + (t + 1) * ng,
                        Q.wstep + (t + 1) * ng, ng, jb, fill, w8b);
            ai8_values2(out[t], out[t + 1], vt8, w8, w8b, Q.wstep + t * ng, Q.wstep + (t + 1) * ng,
                        hd, g, fill / 4);
        }
        for (; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            if (jt <= 0) {
                continue;
            }
            if (ng == 1) {
                const int64_t at = t * tiles + j0 / KT;
                ai8_weight_codes(s + t * ld + j0, NULL, gwinv[at], jt, (jt + 3) / 4 * 4, w8);
                ai8_values(out[t], vt8, w8, gwstep + at, hd, g, (jt + 3) / 4);
                continue;
            }
            ai8_weights(s + t * ld + j0, Q.vs + j0, nmax, Q.winv + t * ng, Q.wstep + t * ng, ng,
                        jt, (jt + 3) / 4 * 4, w8);
            ai8_values(out[t], vt8, w8, Q.wstep + t * ng, hd, g, (jt + 3) / 4);
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
