/* x86/attention_f32_avx2.c: the chunk of attention over a float32 KV cache (attention_f32.c)
 * with AVX2 + FMA, for head sizes that are a multiple of 8 (others: the generic kernel).
 *
 * Scores: four positions at a time, their K rows (in L1 from then on) shared by the queries of
 * a KV head; each score is an 8-lane multiply-add sum over the head, the four sums folded by one
 * horizontal-add tree. Softmax: the polynomial exp of exp_simd.h (about an ulp from libm's expf).
 * V sums: per query, blocks of up to 64 outputs held in eight accumulators across the chunk's
 * positions (independent chains, so the multiply-adds overlap). No software prefetch: the
 * hardware's, on a chunk read front to back, did better (SmolLM2 at 2000 cached positions, 2
 * threads: 10.7-11.0 ms a step without, 12.0-12.8 with K and V rows 8 positions ahead). */
#include <math.h>
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include "x86/exp_simd.h"
#include "x86/reduce_avx2.h"

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* scores[t * n + j] = q_t . k_j for every query t and position j < n. */
INLINE void chunk_scores(const float *q, int64_t nq, int64_t rep, int64_t hd, const float *k,
                         int64_t stride, int64_t n, float *scores)
{
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        for (int64_t t = 0; t < nq; t++) {
            const float *qt = q + t * hd, *k0 = k + j * stride + t / rep * hd;
            const float *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(qt + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
            }
            /* lanes (a0, a1, a2, a3) of each 128-bit half, then the halves added */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            _mm_storeu_ps(scores + t * n + j, _mm_add_ps(_mm256_castps256_ps128(h),
                                                         _mm256_extractf128_ps(h, 1)));
        }
    }
    for (; j < n; j++) {
        for (int64_t t = 0; t < nq; t++) {
            const float *kj = k + j * stride + t / rep * hd;
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < hd; i += 8) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + t * hd + i), _mm256_loadu_ps(kj + i), a);
            }
            scores[t * n + j] = offq_hsum8(a);
        }
    }
}

/* s[0..n) <- exp(s - max s); returns the sum, *mx the max. */
INLINE float softmax_weights(float *s, int64_t n, float *mx)
{
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
    }
    float m = offq_hmax8(vm);
    for (int64_t i = j; i < n; i++) {
        m = s[i] > m ? s[i] : m;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = offq_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (j < n) { /* the tail through a padded copy; padding lanes exp(-inf) = 0 */
        float pad[8];
        for (int i = 0; i < 8; i++) {
            pad[i] = j + i < n ? s[j + i] : -INFINITY;
        }
        const __m256 e = offq_exp8(_mm256_sub_ps(_mm256_loadu_ps(pad), mv));
        _mm256_storeu_ps(pad, e);
        sum = _mm256_add_ps(sum, e);
        for (int64_t i = 0; j + i < n; i++) {
            s[j + i] = pad[i];
        }
    }
    *mx = m;
    return offq_hsum8(sum);
}

/* acc[0 .. 8 NV) = sum_j p[j] * v_j[0 .. 8 NV). */
INLINE void weighted_rows(const float *p, const float *v, int64_t stride, int64_t n, float *acc,
                          const int NV)
{
    __m256 a[8];
    for (int u = 0; u < NV; u++) {
        a[u] = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < n; j++) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const float *vj = v + j * stride;
        for (int u = 0; u < NV; u++) {
            a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), a[u]);
        }
    }
    for (int u = 0; u < NV; u++) {
        _mm256_storeu_ps(acc + 8 * u, a[u]);
    }
}

void AVX2 offq_attend_f32_avx2(const float *q, int64_t nq, int64_t rep, int64_t hd,
                               const float *k, const float *v0, int64_t stride, int64_t n,
                               float *scores, float *rec, int64_t rstride)
{
    if (hd % 8 != 0) {
        offq_attend_f32_generic(q, nq, rep, hd, k, v0, stride, n, scores, rec, rstride);
        return;
    }
    chunk_scores(q, nq, rep, hd, k, stride, n, scores);
    for (int64_t t = 0; t < nq; t++) {
        const float *v = v0 + t / rep * hd;
        float *st = scores + t * n, *acc = rec + t * rstride, mx;
        const float den = softmax_weights(st, n, &mx);
        for (int64_t i0 = 0; i0 < hd; i0 += 64) {
            switch ((hd - i0) >= 64 ? 8 : (int)((hd - i0) / 8)) {
            case 8: weighted_rows(st, v + i0, stride, n, acc + i0, 8); break;
            case 7: weighted_rows(st, v + i0, stride, n, acc + i0, 7); break;
            case 6: weighted_rows(st, v + i0, stride, n, acc + i0, 6); break;
            case 5: weighted_rows(st, v + i0, stride, n, acc + i0, 5); break;
            case 4: weighted_rows(st, v + i0, stride, n, acc + i0, 4); break;
            case 3: weighted_rows(st, v + i0, stride, n, acc + i0, 3); break;
            case 2: weighted_rows(st, v + i0, stride, n, acc + i0, 2); break;
            default: weighted_rows(st, v + i0, stride, n, acc + i0, 1); break;
            }
        }
        acc[hd] = mx;
        acc[hd + 1] = den;
    }
}
#endif
