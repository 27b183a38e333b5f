/* x86/attention_avx2.c: offq_attend (steps: attention.c) with 8-wide float vectors.
 *
 * Cached rows are decoded in tiles of KT rows, once per block of queries. Scores are computed
 * 8 keys at a time: one accumulator per key (8 lanes of partial sums over the group's dims, one
 * fma chain each), then one transposing reduction turns the 8 accumulators into a vector holding
 * the 8 keys' dot products, so no horizontal sum is paid per key. exp runs 8 scores at a time
 * (a polynomial, offq_exp8 of exp_avx2.h). Every key's sums run in one fixed order (its lane's chain, then
 * the same reduction tree) whatever the block, so a token gets the same numbers in prefill and in
 * decode. Needs hd % 16 == 0 and group % 16 == 0; other shapes take the generic kernel. */
#include <math.h>
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/exp_avx2.h"

#define KT 32 /* cached rows per tile (OFFQ_ATTN_ROW_FLOATS sizes the scratch for it) */

/* Row j as floats (c - z), hd % 16 == 0, group % 16 == 0. */
__attribute__((target("avx2,fma"))) static inline void decode_row(const uint8_t *c,
                                                                  const float *z, int64_t hd,
                                                                  int64_t g, float *out)
{
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t i = 0; i < hd; i += 16) {
        const __m256 zv = _mm256_set1_ps(z[i / g]);
        const __m128i v = _mm_loadl_epi64((const __m128i *)(c + i / 2));
        const __m128i bytes =
            _mm_unpacklo_epi8(_mm_and_si128(v, m15), _mm_and_si128(_mm_srli_epi16(v, 4), m15));
        _mm256_storeu_ps(out + i,
                         _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), zv));
        _mm256_storeu_ps(out + i + 8,
                         _mm256_sub_ps(_mm256_cvtepi32_ps(
                                           _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))),
                                       zv));
    }
}

/* lanes k = sum of the 8 lanes of a[k], by one fixed tree: ((a0 + a1) + (a2 + a3)) +
 * ((a4 + a5) + (a6 + a7)) */
__attribute__((target("avx2,fma"))) static inline __m256 reduce8(const __m256 *a)
{
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                         _mm256_permute2f128_ps(h0, h1, 0x31));
}

/* Scores of query qt against the 8 decoded rows r[0..8) (hd floats each): per group, the 8
 * accumulators, their reduction, times the keys' scales ks8[gi][0..8), summed over groups. */
__attribute__((target("avx2,fma"))) static inline __m256 scores8(const float *qt, const float *r,
                                                               const float *ks8, int64_t hd,
                                                               int64_t g)
{
    __m256 s = _mm256_setzero_ps();
    for (int64_t i0 = 0; i0 < hd; i0 += g) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++) {
            acc[k] = _mm256_setzero_ps();
        }
        for (int64_t i = i0; i < i0 + g; i += 8) {
            const __m256 qv = _mm256_loadu_ps(qt + i);
            for (int k = 0; k < 8; k++) {
                acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r + k * hd + i), acc[k]);
            }
        }
        s = _mm256_fmadd_ps(_mm256_loadu_ps(ks8 + (i0 / g) * 8), reduce8(acc), s);
    }
    return s;
}

/* Softmax of query t's scores st[0..n) in place (exp(s - max), 8 at a time; the last partial 8
 * through a copy padded with -inf, whose exp is 0); returns their sum (8 lane sums, then the
 * reduce8 tree of lane 0). */
__attribute__((target("avx2,fma"))) static float softmax_row(float *st, int64_t n)
{
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(st + j));
    }
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
    for (j = 0; j + 8 <= n; j += 8) {
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
    const __m256 sums[8] = {den, den, den, den, den, den, den, den};
    return _mm256_cvtss_f32(reduce8(sums));
}

/* o[0 .. 8 nv) += sum_j (e_j * vs_j[group]) * r_j[0 .. 8 nv) over rows j < jt (stride hd) in j
 * order, the nv (1 or 8) output vectors held in registers; dims i0.. of the rows. */
__attribute__((target("avx2,fma"))) static inline void values_add(float *o, int nv, const float *r,
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

__attribute__((target("avx2,fma"))) void offq_attend_avx2(const offq_attn_args *a, int64_t nq,
                                                         const float *q, const int64_t *n,
                                                         float *s, float *const *out, float *tile)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    if (g % 16 != 0 || hd % 16 != 0) {
        offq_attend_generic(a, nq, q, n, s, out, tile);
        return;
    }
    int64_t nmax = 0;
    for (int64_t t = 0; t < nq; t++) {
        nmax = n[t] > nmax ? n[t] : nmax;
    }
    const int64_t ld = nmax + 1;
    float *ks8 = tile + KT * hd; /* [KT / 8][ng][8] key scales of the tile, zero-padded */
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        const int64_t jpad = (jn + 7) & ~(int64_t)7;
        for (int64_t jj = 0; jj < jpad; jj++) {
            float *row = tile + jj * hd;
            if (jj < jn) {
                decode_row(a->kc + (j0 + jj) * a->cstride, a->kz + (j0 + jj) * a->pstride, hd, g,
                           row);
            } else {
                memset(row, 0, (size_t)hd * sizeof(float));
            }
            for (int64_t gi = 0; gi < ng; gi++) {
                ks8[(jj / 8) * ng * 8 + gi * 8 + jj % 8] =
                    jj < jn ? a->ks[(j0 + jj) * a->pstride + gi] : 0.0f;
            }
        }
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn; /* keys query t sees here */
            for (int64_t k0 = 0; k0 < jt; k0 += 8) {
                const __m256 sv = scores8(q + t * hd, tile + k0 * hd, ks8 + (k0 / 8) * ng * 8,
                                          hd, g);
                if (k0 + 8 <= jt) {
                    _mm256_storeu_ps(s + t * ld + j0 + k0, sv);
                } else {
                    float tmp[8];
                    _mm256_storeu_ps(tmp, sv);
                    memcpy(s + t * ld + j0 + k0, tmp, (size_t)(jt - k0) * sizeof(float));
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
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            int64_t i0 = 0;
            for (; i0 + 64 <= hd; i0 += 64) {
                values_add(out[t] + i0, 8, tile + i0, hd, a->vs + j0 * a->pstride, a->pstride,
                           i0, g, s + t * ld + j0, jt);
            }
            for (; i0 < hd; i0 += 8) {
                values_add(out[t] + i0, 1, tile + i0, hd, a->vs + j0 * a->pstride, a->pstride,
                           i0, g, s + t * ld + j0, jt);
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
#endif
