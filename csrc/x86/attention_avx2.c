/* x86/attention_avx2.c: offq_attend (steps: attention.c) with 8-wide float vectors: each cached
 * row is widened once per block of queries (16 codes per step), dot products accumulate in two
 * vectors and the output in place. Needs group % 16 == 0; other shapes take the generic kernel.
 * The per-query sums run in one fixed order, whatever the block (prefill = decode). */
#include <math.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

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

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* head_dim 64 (SmolLM2, Llama 3.2): tiles of KT cached rows are decoded once into `tile`, then
 * each query runs over the tile with its query (K pass) or its output (V pass) held in eight
 * registers. The same operations in the same order as the general loop below, so the results are
 * identical; only loads and stores are saved. */
#define KT 32
__attribute__((target("avx2,fma"))) static void attend_hd64(const offq_attn_args *a, int64_t nq,
                                                            const float *q, const int64_t *n,
                                                            float *s, float *const *out,
                                                            float *tile, int64_t nmax)
{
    const int64_t g = a->group, ng = 64 / g, ld = nmax + 1;
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        for (int64_t jj = 0; jj < jn; jj++) {
            decode_row(a->kc + (j0 + jj) * a->cstride, a->kz + (j0 + jj) * a->pstride, 64, g,
                       tile + jj * 64);
        }
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            __m256 qv[8];
            for (int c = 0; c < 8; c++) {
                qv[c] = _mm256_loadu_ps(q + t * 64 + 8 * c);
            }
            for (int64_t jj = 0; jj < jt; jj++) {
                const float *r = tile + jj * 64;
                const float *ks = a->ks + (j0 + jj) * a->pstride;
                float sj = 0.0f;
                for (int64_t gi = 0; gi < ng; gi++) {
                    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
                    for (int64_t c = gi * g / 8; c < (gi + 1) * g / 8; c += 2) {
                        acc0 = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(r + 8 * c), acc0);
                        acc1 = _mm256_fmadd_ps(qv[c + 1], _mm256_loadu_ps(r + 8 * c + 8), acc1);
                    }
                    sj += ks[gi] * hsum8(_mm256_add_ps(acc0, acc1));
                }
                s[t * ld + j0 + jj] = sj;
            }
        }
    }
    offq_attn_softmax(s, ld, nq, n, nmax, out, 64);
    for (int64_t j0 = 0; j0 < nmax; j0 += KT) {
        const int64_t jn = nmax - j0 < KT ? nmax - j0 : KT;
        for (int64_t jj = 0; jj < jn; jj++) {
            decode_row(a->vc + (j0 + jj) * a->cstride, a->vz + (j0 + jj) * a->pstride, 64, g,
                       tile + jj * 64);
        }
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < jn ? n[t] - j0 : jn;
            if (jt <= 0) {
                continue;
            }
            __m256 o[8];
            for (int c = 0; c < 8; c++) {
                o[c] = _mm256_loadu_ps(out[t] + 8 * c);
            }
            for (int64_t jj = 0; jj < jt; jj++) {
                const float *r = tile + jj * 64;
                const float *vs = a->vs + (j0 + jj) * a->pstride;
                const float e = s[t * ld + j0 + jj];
                for (int c = 0; c < 8; c++) {
                    const __m256 w = _mm256_set1_ps(e * vs[8 * c / g]);
                    o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(r + 8 * c), o[c]);
                }
            }
            for (int c = 0; c < 8; c++) {
                _mm256_storeu_ps(out[t] + 8 * c, o[c]);
            }
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        const __m256 den = _mm256_set1_ps(s[t * ld + nmax]);
        for (int64_t i = 0; i < 64; i += 8) {
            _mm256_storeu_ps(out[t] + i, _mm256_div_ps(_mm256_loadu_ps(out[t] + i), den));
        }
    }
}

__attribute__((target("avx2,fma"))) void offq_attend_avx2(const offq_attn_args *a, int64_t nq,
                                                         const float *q, const int64_t *n,
                                                         float *s, float *const *out, float *row)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    if (g % 16 != 0) {
        offq_attend_generic(a, nq, q, n, s, out, row);
        return;
    }
    if (hd == 64) {
        int64_t nmax = 0;
        for (int64_t t = 0; t < nq; t++) {
            nmax = n[t] > nmax ? n[t] : nmax;
        }
        attend_hd64(a, nq, q, n, s, out, row, nmax);
        return;
    }
    int64_t nmax = 0;
    for (int64_t t = 0; t < nq; t++) {
        nmax = n[t] > nmax ? n[t] : nmax;
    }
    const int64_t ld = nmax + 1;
    for (int64_t j = 0; j < nmax; j++) {
        decode_row(a->kc + j * a->cstride, a->kz + j * a->pstride, hd, g, row);
        for (int64_t t = 0; t < nq; t++) {
            if (j >= n[t]) {
                continue;
            }
            const float *qt = q + t * hd;
            float sj = 0.0f;
            for (int64_t gi = 0; gi < ng; gi++) {
                __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
                for (int64_t i = gi * g; i < (gi + 1) * g; i += 16) {
                    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + i), _mm256_loadu_ps(row + i), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + i + 8),
                                           _mm256_loadu_ps(row + i + 8), acc1);
                }
                sj += a->ks[j * a->pstride + gi] * hsum8(_mm256_add_ps(acc0, acc1));
            }
            s[t * ld + j] = sj;
        }
    }
    offq_attn_softmax(s, ld, nq, n, nmax, out, hd);
    for (int64_t j = 0; j < nmax; j++) {
        decode_row(a->vc + j * a->cstride, a->vz + j * a->pstride, hd, g, row);
        for (int64_t t = 0; t < nq; t++) {
            if (j >= n[t]) {
                continue;
            }
            float *o = out[t];
            for (int64_t gi = 0; gi < ng; gi++) {
                const __m256 w = _mm256_set1_ps(s[t * ld + j] * a->vs[j * a->pstride + gi]);
                for (int64_t i = gi * g; i < (gi + 1) * g; i += 8) {
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(row + i),
                                                            _mm256_loadu_ps(o + i)));
                }
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
