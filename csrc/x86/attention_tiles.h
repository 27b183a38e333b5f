/* x86/attention_tiles.h: the tiled attention kernel (steps: attention.c) shared by the AVX2 and
 * AVX-512 variants (x86/attention_avx2.c, x86/attention_avx512.c), which define ATT_TARGET and
 * pass their own scores and value-pair functions; the AVX-512 one (ATT_AVX512) also decodes rows
 * and takes the softmax's exp 16 at a time; everything else runs 8-wide in both.
 *
 * Cached rows are decoded in tiles of KT rows, once per block of queries. Scores: the tile's keys
 * are decoded transposed (8 x 8 register transposes), so keys lie along a vector's lanes; up to
 * 4 queries x 2 vectors of keys are scored at once, each query element broadcast (one fma chain
 * per (query, key) over the dims in order, no cross-lane reduction). exp runs 8 scores at a time
 * (a polynomial, offq_exp8 of exp_simd.h). Values: dims along the lanes, two queries share each
 * row load, their per-row weights e_j * vs_j formed once per tile. Every (query, key) sum runs in
 * one fixed order whatever the block, the number of queries or the vector width, so a token
 * gets the same numbers in prefill and in decode, and both variants the same numbers. Needs
 * hd % 16 == 0 and group % 16 == 0 (the callers check).
 */
#ifndef OFFQ_X86_ATTENTION_TILES_H
#define OFFQ_X86_ATTENTION_TILES_H

#include <math.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"
#include "x86/exp_simd.h"

#ifndef ATT_TARGET
#error "define ATT_TARGET (the includer's target attribute) before including attention_tiles.h"
#endif
#define ATT_FN __attribute__((target(ATT_TARGET))) static inline

#define KT OFFQ_ATTN_TILE_ROWS /* cached rows per tile (kernels.h sizes the scratch for it) */

/* Makes GCC hold vector v in a register from here on: without it GCC folded a value row's load
 * into each of the fmas that read it (two loads for one, so the value loop waited on loads), and
 * turned the score copy below into `rep movsq`. An empty asm: no instruction is emitted. */
#define ATT_IN_REGISTER(v) __asm__("" : "+v"(v))

/* Scores of nq (1..4) queries against nv (1 or 2) vectors of keys of the transposed tile kt
 * ([hd][KT]) from column k0, their scales ks ([ng][KT]): sb[t][0 .. lanes nv). */
typedef void (*att_scores_fn)(int nq, int nv, const float *q, int64_t hd, int64_t g,
                              const float *kt, int64_t k0, const float *ks, int64_t ng,
                              float (*sb)[32]);
/* Values of two queries over rows j < jt (both see them), dims 0 .. vdims of r (row stride hd,
 * vdims fixed per variant) into oa, ob, with their weights wa, wb ([jt][ng], group gi). */
typedef void (*att_values_fn)(float *oa, float *ob, const float *r, int64_t hd, const float *wa,
                              const float *wb, int64_t ng, int64_t gi, int64_t jt);

/* Row j as floats (c - z), hd % 16 == 0, group % 16 == 0 (16 values share a zero-point; exact
 * small integers minus it, so both widths give the same bits). */
ATT_FN void decode_row(const uint8_t *c, const float *z, int64_t hd, int64_t g, float *out)
{
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t i = 0; i < hd; i += 16) {
        const __m128i v = _mm_loadl_epi64((const __m128i *)(c + i / 2));
        const __m128i bytes =
            _mm_unpacklo_epi8(_mm_and_si128(v, m15), _mm_and_si128(_mm_srli_epi16(v, 4), m15));
#ifdef ATT_AVX512
        _mm512_storeu_ps(out + i, _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)),
                                                _mm512_set1_ps(z[i / g])));
#else
        const __m256 zv = _mm256_set1_ps(z[i / g]);
        _mm256_storeu_ps(out + i,
                         _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), zv));
        _mm256_storeu_ps(out + i + 8,
                         _mm256_sub_ps(_mm256_cvtepi32_ps(
                                           _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))),
                                       zv));
#endif
    }
}

/* r[c] <- column c of the 8 x 8 block whose rows are r[0..8). */
ATT_FN void transpose8(__m256 *r)
{
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Keys jj0 .. jj0 + 8 of the tile, transposed: kt[i * KT + jj0 + k] = (c - z) of key k, dim i
 * (rows past the cache, k >= kn, are zero); rows is scratch for 8 decoded rows. */
ATT_FN void decode_keys_t(const offq_attn_args *a, int64_t j,
                                                             int64_t kn, float *rows, float *kt,
                                                             int64_t jj0)
{
    const int64_t hd = a->hd;
    for (int64_t k = 0; k < 8; k++) {
        if (k < kn) {
            decode_row(a->kc + (j + k) * a->cstride, a->kz + (j + k) * a->pstride, hd, a->group,
                       rows + k * hd);
        } else {
            memset(rows + k * hd, 0, (size_t)hd * sizeof(float));
        }
    }
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; k++) {
            r[k] = _mm256_loadu_ps(rows + k * hd + i);
        }
        transpose8(r);
        for (int c = 0; c < 8; c++) {
            _mm256_storeu_ps(kt + (i + c) * KT + jj0, r[c]);
        }
    }
}

/* Softmax of query t's scores st[0..n) in place (exp(s - max), 8 at a time; the last partial 8
 * through a copy padded with -inf, whose exp is 0); returns their sum (8 lane sums, then one
 * fixed tree over the lanes). */
ATT_FN float softmax_row(float *st, int64_t n)
{
    /* the maximum in four independent chains (one chain of vmaxps waited on its latency); each
     * score is the first operand, so a NaN score is skipped, as the scalar tail below skips it */
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(st + j), m0);
        m1 = _mm256_max_ps(_mm256_loadu_ps(st + j + 8), m1);
        m2 = _mm256_max_ps(_mm256_loadu_ps(st + j + 16), m2);
        m3 = _mm256_max_ps(_mm256_loadu_ps(st + j + 24), m3);
    }
    for (; j + 8 <= n; j += 8) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(st + j), m0);
    }
    const __m256 mv = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    float mx = -INFINITY, lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int k = 0; k < 8; k++) {
        mx = lanes[k] > mx ? lanes[k] : mx;
    }
    for (int64_t jj = j; jj < n; jj++) {
        mx = st[jj] > mx ? st[jj] : mx;
    }
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 den = _mm256_setzero_ps();
    j = 0;
#ifdef ATT_AVX512
    /* 16 at a time, the two halves added to den in the 8-wide loop's order: the same sums; the
     * last 1..15 scores through a mask, padded with -inf (exp 0): the halves then add what the
     * 8-wide loop and its padded tail add, and an all-padding half adds +0 */
    const __m512 m16 = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
    for (; j < n; j += 16) {
        const __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512 e = offq_exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, mk, st + j), m16));
        _mm512_mask_storeu_ps(st + j, mk, e);
        den = _mm256_add_ps(den, _mm512_castps512_ps256(e));
        den = _mm256_add_ps(den, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
#endif
    for (; j + 8 <= n; j += 8) {
        const __m256 e = offq_exp8(_mm256_sub_ps(_mm256_loadu_ps(st + j), m8));
        _mm256_storeu_ps(st + j, e);
        den = _mm256_add_ps(den, e);
    }
    if (j < n) { /* the tail through a zero-padded copy: padding lanes add exp(-inf) = 0 */
        float pad[8];
        for (int k = 0; k < 8; k++) {
            pad[k] = j + k < n ? st[j + k] : -INFINITY;
        }
        const __m256 e = offq_exp8(_mm256_sub_ps(_mm256_loadu_ps(pad), m8));
        _mm256_storeu_ps(pad, e);
        memcpy(st + j, pad, (size_t)(n - j) * sizeof(float));
        den = _mm256_add_ps(den, e);
    }
    /* the 8 lane sums by one fixed tree: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) */
    const __m256 h = _mm256_hadd_ps(den, den);
    const __m256 hh = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(hh), _mm256_extractf128_ps(hh, 1)));
}

/* o[0 .. 8 nv) += sum_j (e_j * vs_j[group]) * r_j[0 .. 8 nv) over rows j < jt (stride hd) in j
 * order, the nv (1 or 8) output vectors held in registers; dims i0.. of the rows. */
ATT_FN void values_add(float *o, int nv, const float *r,
                                                                 int64_t hd, const float *vs,
                                                                 int64_t pstride, int64_t i0,
                                                                 int64_t g, const float *e,
                                                                 int64_t jt)
{
    __m256 acc[8];
    for (int c = 0; c < nv; c++) {
        acc[c] = _mm256_loadu_ps(o + 8 * c);
    }
    for (int64_t j = 0; j < jt; j++) {
        for (int c = 0; c < nv; c++) {
            const __m256 w = _mm256_set1_ps(e[j] * vs[j * pstride + (i0 + 8 * c) / g]);
            acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + j * hd + 8 * c), acc[c]);
        }
    }
    for (int c = 0; c < nv; c++) {
        _mm256_storeu_ps(o + 8 * c, acc[c]);
    }
}

/* Value weights of one query over rows j < jt of a tile: w[j * ng + gi] = e_j * vt[j * ng + gi]
 * (vt: the tile's value scales, contiguous), the same products values_add forms, computed once
 * per row and group instead of once per vector. */
ATT_FN void value_weights(float *w, const float *e,
                                                                    const float *vt, int64_t ng,
                                                                    int64_t jt)
{
    if (ng == 1) {
        int64_t j = 0;
        for (; j + 8 <= jt; j += 8) {
            _mm256_storeu_ps(w + j, _mm256_mul_ps(_mm256_loadu_ps(e + j), _mm256_loadu_ps(vt + j)));
        }
        for (; j < jt; j++) {
            w[j] = e[j] * vt[j];
        }
        return;
    }
    for (int64_t j = 0; j < jt; j++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            w[j * ng + gi] = e[j] * vt[j * ng + gi];
        }
    }
}

/* The kernel (steps: attention.c) for hd % 16 == 0 and group % 16 == 0, with the vector width's
 * scores (`lanes` keys per vector, 2 vectors per call) and value pairs (`vdims` dims per call,
 * used when they divide the group; single queries otherwise). */
ATT_FN void attend_tiles(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                         float *s, float *const *out, float *tile, const int64_t lanes,
                         att_scores_fn scores, const int64_t vdims, att_values_fn values)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    const int64_t nmax = offq_attn_max_n(n, nq);
    const int64_t ld = nmax + 1;
    float *kt = tile;                      /* [hd][KT] the tile's keys, transposed */
    float *ks = tile + KT * hd;            /* [ng][KT] their scales, zero-padded */
    float *rows = ks + KT * ng;            /* [8][hd] decoded rows before the transpose */
    /* V phase: the tile's value scales and a query pair's value weights, [KT][ng] each */
    float *vt = rows, *wa = vt + KT * ng, *wb = wa + KT * ng;
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        const int64_t jpad = (jn + lanes - 1) / lanes * lanes; /* whole vectors of keys */
        for (int64_t jj = 0; jj < jpad; jj += 8) {
            decode_keys_t(a, j0 + jj, jn - jj, rows, kt, jj);
        }
        for (int64_t jj = 0; jj < jpad; jj++) {
            for (int64_t gi = 0; gi < ng; gi++) {
                ks[gi * KT + jj] = jj < jn ? a->ks[(j0 + jj) * a->pstride + gi] : 0.0f;
            }
        }
        for (int64_t t0 = 0; t0 < nq; t0 += 4) {
            const int bq = nq - t0 < 4 ? (int)(nq - t0) : 4;
            int64_t jt = 0; /* the most keys of this tile any of the bq queries sees */
            for (int b = 0; b < bq; b++) {
                const int64_t jb = n[t0 + b] - j0 < jn ? n[t0 + b] - j0 : jn;
                jt = jb > jt ? jb : jt;
            }
            for (int64_t k0 = 0; k0 < jt; k0 += 2 * lanes) {
                const int nv = jt - k0 > lanes ? 2 : 1;
                float sb[4][32];
                scores(bq, nv, q + t0 * hd, hd, g, kt, k0, ks, ng, sb);
                for (int b = 0; b < bq; b++) { /* keep the scores of the keys query t sees */
                    const int64_t t = t0 + b;
                    const int64_t jb = n[t] - j0 < jn ? n[t] - j0 : jn;
                    const int64_t m = jb - k0 < lanes * nv ? jb - k0 : lanes * nv;
                    /* vector moves: a memcpy (rep movs) per block of scores took ~10% of this
                     * driver's time (perf, SmolLM2 2048-token prefill, AVX-512) */
                    float *dst = s + t * ld + j0 + k0;
                    int64_t c = 0;
#ifdef ATT_AVX512
                    for (; c < m; c += 16) { /* the last partial vector through a mask */
                        const __mmask16 mk =
                            m - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - c)) - 1u);
                        _mm512_mask_storeu_ps(dst + c, mk, _mm512_maskz_loadu_ps(mk, sb[b] + c));
                    }
#endif
                    for (; c + 8 <= m; c += 8) {
                        __m256 v = _mm256_loadu_ps(sb[b] + c);
                        ATT_IN_REGISTER(v);
                        _mm256_storeu_ps(dst + c, v);
                    }
                    for (; c < m; c++) {
                        dst[c] = sb[b][c];
                    }
                }
            }
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        s[t * ld + nmax] = softmax_row(s + t * ld, n[t]);
        memset(out[t], 0, (size_t)hd * sizeof(float));
    }
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        for (int64_t jj = 0; jj < jn; jj++) {
            decode_row(a->vc + (j0 + jj) * a->cstride, a->vz + (j0 + jj) * a->pstride, hd, g,
                       tile + jj * hd);
        }
        const float *vs = a->vs + j0 * a->pstride;
        for (int64_t jj = 0; jj < jn; jj++) {
            for (int64_t gi = 0; gi < ng; gi++) {
                vt[jj * ng + gi] = vs[jj * a->pstride + gi];
            }
        }
        int64_t t = 0;
        /* query pairs over the rows both see, then the longer one's rest (when vdims | g: blocks
         * of vdims dims in one group) */
        for (; g % vdims == 0 && t + 1 < nq; t += 2) {
            const int64_t ja = n[t] - j0 < jn ? n[t] - j0 : jn;
            const int64_t jb = n[t + 1] - j0 < jn ? n[t + 1] - j0 : jn;
            const int64_t jc = ja < jb ? ja : jb;
            if (jc > 0) {
                value_weights(wa, s + t * ld + j0, vt, ng, jc);
                value_weights(wb, s + (t + 1) * ld + j0, vt, ng, jc);
                for (int64_t i0 = 0; i0 < hd; i0 += vdims) {
                    values(out[t] + i0, out[t + 1] + i0, tile + i0, hd, wa, wb, ng, i0 / g, jc);
                }
            }
            const int64_t j1 = jc > 0 ? jc : 0;
            const int64_t tl = ja > jb ? t : t + 1, jl = ja > jb ? ja : jb;
            for (int64_t i0 = 0; i0 < hd && jl > j1; i0 += 8) {
                values_add(out[tl] + i0, 1, tile + j1 * hd + i0, hd, vs + j1 * a->pstride,
                           a->pstride, i0, g, s + tl * ld + j0 + j1, jl - j1);
            }
        }
        for (; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            int64_t i0 = 0;
            for (; i0 + 64 <= hd; i0 += 64) {
                values_add(out[t] + i0, 8, tile + i0, hd, vs, a->pstride, i0, g, s + t * ld + j0,
                           jt);
            }
            for (; i0 < hd; i0 += 8) {
                values_add(out[t] + i0, 1, tile + i0, hd, vs, a->pstride, i0, g, s + t * ld + j0,
                           jt);
            }
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        const __m256 den = _mm256_set1_ps(s[t * ld + nmax]);
        for (int64_t i = 0; i < hd; i += 8) {
            _mm256_storeu_ps(out[t] + i, _mm256_div_ps(_mm256_loadu_ps(out[t] + i), den));
        }
    }
}

/* One vector width's pieces and its entry point `NAME`: scores of NQ (1..4) queries against NV
 * (1 or 2) vectors of LANES keys (one fma chain per (query, key) over the group's dims in order,
 * the query element broadcast, times the keys' scales, summed over groups in order: nothing is
 * reduced across lanes, so a pair's sums depend neither on NQ, NV, the block nor LANES), with NQ
 * and NV compile-time constants so the loops unroll into registers; value pairs over 4 LANES
 * dims (8 accumulators, each lane the fmas of values_add in its j order; the two queries share
 * each row load and each weight is one broadcast). */
#define DEFINE_ATTEND_WIDTH(NAME, TARGET, VEC, LANES, LOADU, STOREU, SET1, FMADD, SETZERO)        \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_scores_t(             \
        const int nq, const int nv, const float *q, int64_t hd, int64_t g, const float *kt,      \
        int64_t k0, const float *ks, int64_t ng, float (*sb)[32])                                 \
    {                                                                                             \
        for (int64_t gi = 0; gi < ng; gi++) {                                                     \
            VEC acc[4][2];                                                                        \
            for (int t = 0; t < nq; t++) {                                                        \
                for (int v = 0; v < nv; v++) {                                                    \
                    acc[t][v] = SETZERO();                                                        \
                }                                                                                 \
            }                                                                                     \
            for (int64_t i = gi * g; i < (gi + 1) * g; i++) {                                     \
                const float *kr = kt + i * KT + k0;                                               \
                const VEC k0v = LOADU(kr);                                                        \
                const VEC k1v = nv > 1 ? LOADU(kr + LANES) : k0v;                                 \
                for (int t = 0; t < nq; t++) {                                                    \
                    const VEC qb = SET1(q[t * hd + i]);                                           \
                    acc[t][0] = FMADD(qb, k0v, acc[t][0]);                                        \
                    if (nv > 1) {                                                                 \
                        acc[t][1] = FMADD(qb, k1v, acc[t][1]);                                    \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            for (int t = 0; t < nq; t++) {                                                        \
                for (int v = 0; v < nv; v++) {                                                    \
                    const VEC kv = LOADU(ks + gi * KT + k0 + LANES * v);                          \
                    const VEC prev = gi == 0 ? SETZERO() : LOADU(sb[t] + LANES * v);              \
                    STOREU(sb[t] + LANES * v, FMADD(kv, acc[t][v], prev));                        \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    __attribute__((target(TARGET))) static void NAME##_scores(                                    \
        int nq, int nv, const float *q, int64_t hd, int64_t g, const float *kt, int64_t k0,      \
        const float *ks, int64_t ng, float (*sb)[32])                                             \
    {                                                                                             \
        if (nq == 4 && nv == 2) { /* constants: the loops unroll */                           \
            NAME##_scores_t(4, 2, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 3 && nv == 2) { /* constants: the loops unroll */                           \
            NAME##_scores_t(3, 2, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 2 && nv == 2) { /* constants: the loops unroll */                           \
            NAME##_scores_t(2, 2, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 1 && nv == 2) { /* constants: the loops unroll */                           \
            NAME##_scores_t(1, 2, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 4 && nv == 1) { /* constants: the loops unroll */                           \
            NAME##_scores_t(4, 1, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 3 && nv == 1) { /* constants: the loops unroll */                           \
            NAME##_scores_t(3, 1, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 2 && nv == 1) { /* constants: the loops unroll */                           \
            NAME##_scores_t(2, 1, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
        if (nq == 1 && nv == 1) { /* constants: the loops unroll */                           \
            NAME##_scores_t(1, 1, q, hd, g, kt, k0, ks, ng, sb); return;                     \
        }                                                                                     \
    }                                                                                         \
    __attribute__((target(TARGET))) static void NAME##_values(                                    \
        float *oa, float *ob, const float *r, int64_t hd, const float *wa, const float *wb,      \
        int64_t ng, int64_t gi, int64_t jt)                                                       \
    {                                                                                             \
        VEC acc[8];                                                                               \
        for (int c = 0; c < 4; c++) {                                                             \
            acc[c] = LOADU(oa + LANES * c);                                                       \
            acc[c + 4] = LOADU(ob + LANES * c);                                                   \
        }                                                                                         \
        for (int64_t j = 0; j < jt; j++) {                                                        \
            const VEC xa = SET1(wa[j * ng + gi]), xb = SET1(wb[j * ng + gi]);                     \
            for (int c = 0; c < 4; c++) {                                                         \
                VEC rv = LOADU(r + j * hd + LANES * c);                                           \
                ATT_IN_REGISTER(rv); /* one load for both queries' fmas */                        \
                acc[c] = FMADD(xa, rv, acc[c]);                                                   \
                acc[c + 4] = FMADD(xb, rv, acc[c + 4]);                                           \
            }                                                                                     \
        }                                                                                         \
        for (int c = 0; c < 4; c++) {                                                             \
            STOREU(oa + LANES * c, acc[c]);                                                       \
            STOREU(ob + LANES * c, acc[c + 4]);                                                   \
        }                                                                                         \
    }                                                                                             \
    __attribute__((target(TARGET))) void NAME(const offq_attn_args *a, int64_t nq, const float *q, \
                                              const int64_t *n, float *s, float *const *out,     \
                                              float *tile)                                        \
    {                                                                                             \
        if (a->group % 16 != 0 || a->hd % 16 != 0) {                                              \
            offq_attend_generic(a, nq, q, n, s, out, tile);                                       \
            return;                                                                               \
        }                                                                                         \
        attend_tiles(a, nq, q, n, s, out, tile, LANES, NAME##_scores, 4 * LANES, NAME##_values); \
    }

#endif
