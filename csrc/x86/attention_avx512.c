/* x86/attention_avx512.c: offq_attend with 16-wide float vectors where the work is: the tiled
 * kernel of x86/attention_tiles.h with 16 keys per score vector and 4 x 16 dims per value pair.
 * Each lane runs the same fma chain as in x86/attention_avx2.c, so both variants give the same
 * numbers bit for bit; on CPUs with full-width 512-bit FMA pipes (Zen5, most Xeons) the scores
 * and values run at twice the AVX2 rate. */
#include "kernels.h"

#ifdef OFFQ_X86
#define ATT_TARGET "avx512f,avx2,fma"
#include "x86/attention_tiles.h"

/* scores_block of attention_avx2.c with 16 keys per vector. */
__attribute__((target("avx512f,avx2,fma"), always_inline)) static inline void scores_t16(
    const int nq, const int nv, const float *q, int64_t hd, int64_t g, const float *kt,
    int64_t k0, const float *ks, int64_t ng, float (*sb)[32])
{
    for (int64_t gi = 0; gi < ng; gi++) {
        __m512 acc[4][2];
        for (int t = 0; t < nq; t++) {
            for (int v = 0; v < nv; v++) {
                acc[t][v] = _mm512_setzero_ps();
            }
        }
        for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
            const float *kr = kt + i * KT + k0;
            const __m512 k0v = _mm512_loadu_ps(kr);
            const __m512 k1v = nv > 1 ? _mm512_loadu_ps(kr + 16) : k0v;
            for (int t = 0; t < nq; t++) {
                const __m512 qb = _mm512_set1_ps(q[t * hd + i]);
                acc[t][0] = _mm512_fmadd_ps(qb, k0v, acc[t][0]);
                if (nv > 1) {
                    acc[t][1] = _mm512_fmadd_ps(qb, k1v, acc[t][1]);
                }
            }
        }
        for (int t = 0; t < nq; t++) {
            for (int v = 0; v < nv; v++) {
                const __m512 kv = _mm512_loadu_ps(ks + gi * KT + k0 + 16 * v);
                const __m512 prev = gi == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(sb[t] + 16 * v);
                _mm512_storeu_ps(sb[t] + 16 * v, _mm512_fmadd_ps(kv, acc[t][v], prev));
            }
        }
    }
}

__attribute__((target("avx512f,avx2,fma"))) static void scores_block16(
    int nq, int nv, const float *q, int64_t hd, int64_t g, const float *kt, int64_t k0,
    const float *ks, int64_t ng, float (*sb)[32])
{
#define SCORES_CASE(NQ, NV)                                                                       \
    if (nq == NQ && nv == NV) {                                                                   \
        scores_t16(NQ, NV, q, hd, g, kt, k0, ks, ng, sb);                                        \
        return;                                                                                   \
    }
    SCORES_CASE(4, 2) SCORES_CASE(3, 2) SCORES_CASE(2, 2) SCORES_CASE(1, 2)
    SCORES_CASE(4, 1) SCORES_CASE(3, 1) SCORES_CASE(2, 1) SCORES_CASE(1, 1)
#undef SCORES_CASE
}

/* values_pair32 of attention_avx2.c over 64 dims: 4 x 16 per query (8 accumulators). */
__attribute__((target("avx512f,avx2,fma"))) static void values_pair64_16(
    float *oa, float *ob, const float *r, int64_t hd, const float *wa, const float *wb,
    int64_t ng, int64_t gi, int64_t jt)
{
    __m512 acc[8];
    for (int c = 0; c < 4; c++) {
        acc[c] = _mm512_loadu_ps(oa + 16 * c);
        acc[c + 4] = _mm512_loadu_ps(ob + 16 * c);
    }
    for (int64_t j = 0; j < jt; j++) {
        const __m512 xa = _mm512_set1_ps(wa[j * ng + gi]);
        const __m512 xb = _mm512_set1_ps(wb[j * ng + gi]);
        for (int c = 0; c < 4; c++) {
            const __m512 rv = _mm512_loadu_ps(r + j * hd + 16 * c);
            acc[c] = _mm512_fmadd_ps(xa, rv, acc[c]);
            acc[c + 4] = _mm512_fmadd_ps(xb, rv, acc[c + 4]);
        }
    }
    for (int c = 0; c < 4; c++) {
        _mm512_storeu_ps(oa + 16 * c, acc[c]);
        _mm512_storeu_ps(ob + 16 * c, acc[c + 4]);
    }
}

__attribute__((target("avx512f,avx2,fma"))) void offq_attend_avx512(const offq_attn_args *a,
                                                                   int64_t nq, const float *q,
                                                                   const int64_t *n, float *s,
                                                                   float *const *out, float *tile)
{
    if (a->group % 16 != 0 || a->hd % 16 != 0) {
        offq_attend_generic(a, nq, q, n, s, out, tile);
        return;
    }
    attend_tiles(a, nq, q, n, s, out, tile, 16, scores_block16, 64, values_pair64_16);
}
#endif
