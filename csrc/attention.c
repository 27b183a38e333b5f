/* attention.c: query heads over the packed 4-bit KV cache of their KV head (the generic reference;
 * x86/attention_avx2.c computes the same steps with wider vectors).
 *
 * For each query q (already scaled by 1/sqrt(hd)) that sees positions 0..n_q-1
 * (offq/model/ops.py's attention on dequantized K and V, float32):
 *   s_j = sum_g ks_jg * sum_{i in g} q_i (c_ji - kz_jg)
 *   e_j = exp(s_j - max s);  den = sum e_j
 *   out_i = sum_j (e_j * vs_jg) (c_ji - vz_jg) / den
 * (c - z) is exact in float32 (small integers). A block of queries (the query heads of a KV head
 * over a few positions: prefill) decodes each cached row once; every query's sums run in the same
 * order whatever the block, so a token gets the same numbers in prefill and in decode.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* Row j of the cache as floats (c - z) per group: the K or V row the sums read. */
static void decode_row(const uint8_t *c, const float *z, int64_t hd, int64_t g, float *out)
{
    for (int64_t i = 0; i < hd; i += 2) {
        const float zi = z[i / g];
        out[i] = (float)(c[i >> 1] & 15) - zi;
        out[i + 1] = (float)(c[i >> 1] >> 4) - zi;
    }
}

void offq_attend_generic(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                         float *s, float *const *out, float *row)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    const int64_t nmax = offq_attn_max_n(n, nq);
    const int64_t ld = nmax + 1; /* a query's weights, then their sum */
    for (int64_t j = 0; j < nmax; j++) {
        decode_row(a->kc + j * a->cstride, a->kz + j * a->pstride, hd, g, row);
        for (int64_t t = 0; t < nq; t++) {
            if (j >= n[t]) {
                continue;
            }
            const float *qt = q + t * hd;
            float sj = 0.0f;
            for (int64_t gi = 0; gi < ng; gi++) {
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                    acc[i & 3] += qt[i] * row[i];
                }
                sj += a->ks[j * a->pstride + gi] * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
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
            for (int64_t gi = 0; gi < ng; gi++) {
                const float w = s[t * ld + j] * a->vs[j * a->pstride + gi];
                for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                    out[t][i] += w * row[i];
                }
            }
        }
    }
    for (int64_t t = 0; t < nq; t++) {
        const float den = s[t * ld + nmax];
        for (int64_t i = 0; i < hd; i++) {
            out[t][i] = out[t][i] / den;
        }
    }
}

offq_status offq_attention_kv4(const float *q, int64_t nq, int64_t hd, int64_t group,
                               const uint8_t *codes, const float *scale, const float *zero,
                               int64_t npos, const int64_t *n, int int8, float *out,
                               offq_kernel kernel)
{
    const int generic = kernel == OFFQ_KERNEL_GENERIC;
    const int64_t ng = hd / group;
    const int64_t nmax = offq_attn_max_n(n, nq);
    float *s = malloc(sizeof(float) * (size_t)(nq * (nmax + 1)));
    float *tile = malloc(sizeof(float) * (size_t)OFFQ_ATTN_ROW_FLOATS(hd));
    void *qwork = malloc((size_t)OFFQ_ATTN_I8_QBYTES(nq, hd, ng, nmax));
    float **rows = malloc(sizeof(float *) * (size_t)nq);
    offq_status st = OFFQ_ERR_NOMEM;
    if (s != NULL && tile != NULL && qwork != NULL && rows != NULL) {
        for (int64_t t = 0; t < nq; t++) {
            rows[t] = out + t * hd;
        }
        const offq_attn_args a = {.kc = codes,
                                  .vc = codes + hd / 2,
                                  .ks = scale,
                                  .kz = zero,
                                  .vs = scale + ng,
                                  .vz = zero + ng,
                                  .cstride = hd,
                                  .pstride = 2 * ng,
                                  .hd = hd,
                                  .group = group};
        if (int8) {
            (generic ? offq_attend_i8_generic : offq_dispatch.attend_i8)(&a, nq, q, n, s, rows,
                                                                          tile, qwork);
        } else {
            (generic ? offq_attend_generic : offq_dispatch.attend)(&a, nq, q, n, s, rows, tile);
        }
        st = OFFQ_OK;
    }
    free(s);
    free(tile);
    free(qwork);
    free(rows);
    return st;
}
