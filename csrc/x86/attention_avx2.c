/* x86/attention_avx2.c: offq_attend (steps: attention.c) with 8-wide float vectors: the tiled
 * kernel of x86/attention_tiles.h with 8 keys per score vector and 4 x 8 dims per value pair. */
#include "kernels.h"

#ifdef OFFQ_X86
#define ATT_TARGET "avx2,fma"
#include "x86/attention_tiles.h"

/* Scores of NQ (1..4) queries q[t * hd ..] against 8 NV (1 or 2) keys of the transposed tile
 * from column k0: per group, one fma chain per (query, key) over the group's dims in order (the
 * query element broadcast, 8 keys per vector), times the keys' scales, summed over groups in
 * order. Nothing is reduced across lanes, and a (query, key) pair's sums do not depend on NQ,
 * NV or the block, so a token gets the same numbers in prefill and in decode. sb[t][0 .. 8 NV)
 * receives the scores. */
__attribute__((target("avx2,fma"), always_inline)) static inline void scores_t(
    const int nq, const int nv, const float *q, int64_t hd, int64_t g, const float *kt,
    int64_t k0, const float *ks, int64_t ng, float (*sb)[32])
{
    for (int64_t gi = 0; gi < ng; gi++) {
        __m256 acc[4][2];
        for (int t = 0; t < nq; t++) {
            for (int v = 0; v < nv; v++) {
                acc[t][v] = _mm256_setzero_ps();
            }
        }
        for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
            const float *kr = kt + i * KT + k0;
            const __m256 k0v = _mm256_loadu_ps(kr);
            const __m256 k1v = nv > 1 ? _mm256_loadu_ps(kr + 8) : k0v;
            for (int t = 0; t < nq; t++) {
                const __m256 qb = _mm256_broadcast_ss(q + t * hd + i);
                acc[t][0] = _mm256_fmadd_ps(qb, k0v, acc[t][0]);
                if (nv > 1) {
                    acc[t][1] = _mm256_fmadd_ps(qb, k1v, acc[t][1]);
                }
            }
        }
        for (int t = 0; t < nq; t++) {
            for (int v = 0; v < nv; v++) {
                const __m256 kv = _mm256_loadu_ps(ks + gi * KT + k0 + 8 * v);
                const __m256 prev = gi == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(sb[t] + 8 * v);
                _mm256_storeu_ps(sb[t] + 8 * v, _mm256_fmadd_ps(kv, acc[t][v], prev));
            }
        }
    }
}

/* scores_t with NQ and NV as compile-time constants (the loops unroll into registers). */
__attribute__((target("avx2,fma"))) static void scores_block(int nq, int nv, const float *q,
                                                            int64_t hd, int64_t g,
                                                            const float *kt, int64_t k0,
                                                            const float *ks, int64_t ng,
                                                            float (*sb)[32])
{
#define SCORES_CASE(NQ, NV)                                                                       \
    if (nq == NQ && nv == NV) {                                                                   \
        scores_t(NQ, NV, q, hd, g, kt, k0, ks, ng, sb);                                          \
        return;                                                                                   \
    }
    SCORES_CASE(4, 2) SCORES_CASE(3, 2) SCORES_CASE(2, 2) SCORES_CASE(1, 2)
    SCORES_CASE(4, 1) SCORES_CASE(3, 1) SCORES_CASE(2, 1) SCORES_CASE(1, 1)
#undef SCORES_CASE
}

/* values_add for two queries at once over rows j < jt (both see them), their weights wa, wb
 * from value_weights: outputs oa, ob, dims i0 .. i0 + 32 in registers (8 accumulators). Per
 * query the same fmas in the same j order as values_add; the two share each row load, and each
 * weight is one broadcast load (32 | g: the block is in one group gi). */
__attribute__((target("avx2,fma"))) static void values_pair32(float *oa, float *ob,
                                                                    const float *r, int64_t hd,
                                                                    const float *wa,
                                                                    const float *wb, int64_t ng,
                                                                    int64_t gi, int64_t jt)
{
    __m256 acc[8];
    for (int c = 0; c < 4; c++) {
        acc[c] = _mm256_loadu_ps(oa + 8 * c);
        acc[c + 4] = _mm256_loadu_ps(ob + 8 * c);
    }
    for (int64_t j = 0; j < jt; j++) {
        const __m256 xa = _mm256_broadcast_ss(wa + j * ng + gi);
        const __m256 xb = _mm256_broadcast_ss(wb + j * ng + gi);
        for (int c = 0; c < 4; c++) {
            const __m256 rv = _mm256_loadu_ps(r + j * hd + 8 * c);
            acc[c] = _mm256_fmadd_ps(xa, rv, acc[c]);
            acc[c + 4] = _mm256_fmadd_ps(xb, rv, acc[c + 4]);
        }
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(oa + 8 * c, acc[c]);
        _mm256_storeu_ps(ob + 8 * c, acc[c + 4]);
    }
}

__attribute__((target("avx2,fma"))) void offq_attend_avx2(const offq_attn_args *a, int64_t nq,
                                                         const float *q, const int64_t *n,
                                                         float *s, float *const *out, float *tile)
{
    if (a->group % 16 != 0 || a->hd % 16 != 0) {
        offq_attend_generic(a, nq, q, n, s, out, tile);
        return;
    }
    attend_tiles(a, nq, q, n, s, out, tile, 8, scores_block, 32, values_pair32);
}
#endif
