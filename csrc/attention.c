/* attention.c: one query head over the packed 4-bit KV cache of its KV head (the generic reference;
 * x86/attention_avx2.c computes the same steps with wider vectors).
 *
 * Steps (offq/model/ops.py's attention on dequantized K and V, float32):
 *   s_j = sum_g ks_jg * sum_{i in g} q_i (c_ji - kz_jg)      (q already scaled by 1/sqrt(hd))
 *   e_j = exp(s_j - max s);  den = sum e_j
 *   out_i = sum_j (e_j * vs_jg) (c_ji - vz_jg) / den
 * (c - z) is exact in float32 (small integers), so each term is the dequantized value times the
 * weight up to one rounding; the sums run in a fixed order per variant.
 */
#include <math.h>

#include "kernels.h"

static inline int nibble(const uint8_t *c, int64_t i) { return (c[i >> 1] >> ((i & 1) * 4)) & 15; }

void offq_attend_generic(const offq_attn_args *a, const float *q, float *s, float *out)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    float mx = -INFINITY;
    for (int64_t j = 0; j < a->n; j++) {
        const uint8_t *c = a->kc + j * a->cstride;
        float sj = 0.0f;
        for (int64_t gi = 0; gi < ng; gi++) {
            const float z = a->kz[j * a->pstride + gi];
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                acc[i & 3] += q[i] * ((float)nibble(c, i) - z);
            }
            sj += a->ks[j * a->pstride + gi] * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
        }
        s[j] = sj;
        mx = sj > mx ? sj : mx;
    }
    float den = 0.0f;
    for (int64_t j = 0; j < a->n; j++) {
        s[j] = expf(s[j] - mx);
        den += s[j];
    }
    for (int64_t i = 0; i < hd; i++) {
        out[i] = 0.0f;
    }
    for (int64_t j = 0; j < a->n; j++) {
        const uint8_t *c = a->vc + j * a->cstride;
        for (int64_t gi = 0; gi < ng; gi++) {
            const float w = s[j] * a->vs[j * a->pstride + gi], z = a->vz[j * a->pstride + gi];
            for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                out[i] += w * ((float)nibble(c, i) - z);
            }
        }
    }
    for (int64_t i = 0; i < hd; i++) {
        out[i] = out[i] / den;
    }
}
