/* attention_i8.c: the opt-in 8-bit attention over the packed 4-bit KV cache (the generic
 * reference; x86/attention_i8_tiles.h computes the same integers and the same float operations
 * with AVX2 or AVX-512 VNNI dot products). The float kernel (attention.c) stays the default.
 *
 * For each query q (scaled by 1/sqrt(hd)) that sees positions 0..n_q-1, per KV group g:
 *   sq_g = max_{i in g} |q_i| / 127,  q8_i = rint(q_i / sq_g)  (-127..127),  Q_g = sum_{i in g} q8_i
 *   s_j  = sum_g (sq_g * ks_jg) * (float)(sum_{i in g} q8_i c_ji  -  kz_jg Q_g)   (int32 exact)
 *   e_j  = exp(s_j - max s);  den = sum e_j
 *   per tile T of OFFQ_ATTN_TILE_ROWS rows (from row 0) the query sees:
 *   wmax_gT = max_{j in T} e_j vs_jg,  w8_jg = rint(e_j vs_jg * 255 / wmax_gT)  (0..255)
 *   out_i = (sum over tiles T, in order, of
 *            (wmax_gT / 255) * (float)(sum_{j in T} w8_jg (c_ji - vz_jg))) / den
 * The zero-points are the grids' integers, so every sum over i or j is an exact int32 (at most
 * 127 * 15 * hd and 255 * 15 * 64 in magnitude) and only the float steps written above round:
 * every variant gives the same numbers up to the softmax's exp (a polynomial in the SIMD ones),
 * and a query's numbers do not depend on the block it is computed in (prefill = decode).
 * Quantizing q is what integer dot products need (VNNI multiplies unsigned by signed bytes);
 * quantizing e_j vs_j per query keeps the value sums integer although each row has its own scale,
 * and a grid per tile keeps the small weights of the tiles far from the softmax's peak (one grid
 * for the whole row rounds every weight below max / 510 to 0): SmolLM2-135M W4A4KV4, 32
 * WikiText-2 windows of 2048, perplexity +0.76% over the float attention with one grid a row,
 * +0.29% with a grid a tile (-0.85% with the SIMD exp of f05b5bc: inside that model's +-1%).
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

int offq_attn_i8_fits(const float *scale, const float *zero, int64_t n)
{
    /* on the bits, with no ordered float comparison, so that the loop vectorises (a decode step
     * checks every cached grid of each layer): a zero-point fits when its bits are those of a
     * value in [-0, 15] (the sign bit and NaN fail) and rounding it to an integer (adding and
     * subtracting 2^23) leaves it unchanged; a scale when its bits are those of a value in
     * [-0, +inf) */
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t s, u;
        memcpy(&s, scale + i, sizeof s);
        memcpy(&u, zero + i, sizeof u);
        const float z = zero[i];
        const int z_ok = ((u <= 0x41700000u) | (u == 0x80000000u)) &
                         ((z + 8388608.0f) - 8388608.0f == z);
        const int s_ok = (s < 0x7f800000u) | (s == 0x80000000u);
        bad |= !(z_ok & s_ok);
    }
    return !bad;
}

offq_attn_i8_queries offq_attn_i8_layout(int64_t nq, int64_t hd, int64_t group, void *qwork)
{
    const int64_t ng = hd / group;
    offq_attn_i8_queries Q;
    uint8_t *p = (uint8_t *)qwork;
    Q.q8 = (int8_t *)p;
    p += (nq * hd + 63) / 64 * 64;
    Q.sq = (float *)(void *)p;
    Q.qsum = (int32_t *)(void *)(Q.sq + nq * ng);
    Q.winv = (float *)(void *)(Q.qsum + nq * ng);
    Q.wstep = Q.winv + nq * ng;
    Q.vs = Q.wstep + nq * ng;
    return Q;
}

offq_attn_i8_queries offq_attn_i8_quantize(const float *q, int64_t nq, int64_t hd, int64_t group,
                                           void *qwork)
{
    const int64_t ng = hd / group;
    const offq_attn_i8_queries Q = offq_attn_i8_layout(nq, hd, group, qwork);
    for (int64_t t = 0; t < nq; t++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            const float *x = q + t * hd + gi * group;
            int8_t *c = Q.q8 + t * hd + gi * group;
            float amax = 0.0f;
            for (int64_t i = 0; i < group; i++) {
                const float v = fabsf(x[i]);
                amax = v > amax ? v : amax;
            }
            const float sq = amax / 127.0f;
            int32_t sum = 0;
            for (int64_t i = 0; i < group; i++) {
                float v = sq > 0.0f ? rintf(x[i] / sq) : 0.0f;
                v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
                c[i] = (int8_t)v;
                sum += c[i];
            }
            Q.sq[t * ng + gi] = sq;
            Q.qsum[t * ng + gi] = sum;
        }
    }
    return Q;
}

void offq_attn_i8_value_scales(const offq_attn_args *a, const offq_attn_i8_queries *Q,
                               int64_t nmax)
{
    const int64_t ng = a->hd / a->group;
    for (int64_t j = 0; j < nmax; j++) {
        for (int64_t gi = 0; gi < ng; gi++) {
            Q->vs[gi * nmax + j] = a->vs[j * a->pstride + gi];
        }
    }
}

/* Code i of a packed cache row (two per byte, the even one in the low nibble). */
static inline int32_t code_at(const uint8_t *row, int64_t i)
{
    return (int32_t)((row[i >> 1] >> ((i & 1) * 4)) & 15);
}

void offq_attend_i8_generic(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                            float *s, float *const *out, float *tile, void *qwork)
{
    const int64_t hd = a->hd, g = a->group, ng = hd / g;
    const int64_t nmax = offq_attn_max_n(n, nq);
    const int64_t ld = nmax + 1;
    const offq_attn_i8_queries Q = offq_attn_i8_quantize(q, nq, hd, g, qwork);
    for (int64_t j = 0; j < nmax; j++) {
        const uint8_t *kc = a->kc + j * a->cstride;
        const float *ks = a->ks + j * a->pstride, *kz = a->kz + j * a->pstride;
        for (int64_t t = 0; t < nq; t++) {
            if (j >= n[t]) {
                continue;
            }
            float sj = 0.0f;
            for (int64_t gi = 0; gi < ng; gi++) {
                const int8_t *q8 = Q.q8 + t * hd;
                int32_t dot = 0;
                for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                    dot += (int32_t)q8[i] * code_at(kc, i);
                }
                const int32_t d = dot - offq_attn_i8_zero(kz[gi]) * Q.qsum[t * ng + gi];
                const float term = (Q.sq[t * ng + gi] * ks[gi]) * (float)d;
                sj = gi == 0 ? term : sj + term;
            }
            s[t * ld + j] = sj;
        }
    }
    offq_attn_softmax(s, ld, nq, n, nmax, out, hd);
    offq_attn_i8_value_scales(a, &Q, nmax);
    /* tile: hd int32 value sums, then ng int32 zero-point sums */
    int32_t *acc = (int32_t *)(void *)tile, *zs = acc + hd;
    for (int64_t j0 = 0; j0 < nmax; j0 += OFFQ_ATTN_TILE_ROWS) {
        for (int64_t t = 0; t < nq; t++) {
            const int64_t jt = n[t] - j0 < OFFQ_ATTN_TILE_ROWS ? n[t] - j0 : OFFQ_ATTN_TILE_ROWS;
            if (jt <= 0) {
                continue;
            }
            memset(acc, 0, sizeof(int32_t) * (size_t)(hd + ng));
            for (int64_t gi = 0; gi < ng; gi++) { /* the tile's grid: its largest e_j vs_j */
                float wmax = 0.0f;
                for (int64_t j = j0; j < j0 + jt; j++) {
                    const float w = s[t * ld + j] * Q.vs[gi * nmax + j];
                    wmax = w > wmax ? w : wmax;
                }
                offq_attn_i8_set_grid(Q.winv + t * ng + gi, Q.wstep + t * ng + gi, wmax);
            }
            for (int64_t j = j0; j < j0 + jt; j++) {
                const uint8_t *vc = a->vc + j * a->cstride;
                for (int64_t gi = 0; gi < ng; gi++) {
                    const int32_t w = offq_attn_i8_weight(s[t * ld + j], Q.vs[gi * nmax + j],
                                                          Q.winv[t * ng + gi]);
                    zs[gi] += w * offq_attn_i8_zero(a->vz[j * a->pstride + gi]);
                    for (int64_t i = gi * g; i < (gi + 1) * g; i++) {
                        acc[i] += w * code_at(vc, i);
                    }
                }
            }
            for (int64_t i = 0; i < hd; i++) {
                const int64_t gi = i / g;
                out[t][i] += Q.wstep[t * ng + gi] * (float)(acc[i] - zs[gi]);
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
