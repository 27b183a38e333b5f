/* attention_f32.c: attention over a float32 KV cache, split over chunks of positions
 * (contract: kernels.h, "attention over a float32 KV cache"). The generic reference; the AVX2
 * variant (x86/attention_f32_avx2.c) forms the same sums with vector lanes and a polynomial exp.
 *
 * Why chunks: a decode step has one query row and a few KV heads (SmolLM2: 3), so one work item
 * per KV head leaves threads idle, and reads the cache a head at a time, strided (a position
 * holds every head's K and V row). Fixed-size chunks of positions (OFFQ_ATTN_F32_CHUNK), each
 * taking all heads, give every thread work at any thread count, read the cache front to back,
 * and the partials
 * (the chunk's max score, its softmax sum and its weighted V sum) merge exactly the way one
 * softmax over all positions would (the flash-decoding split). The chunk size does not depend on
 * the thread count, so neither do the results. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* sum_i a[i] * b[i] in eight interleaved partial sums (the compiler keeps them in vector
 * lanes). */
static inline float dot_f32(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) {
            acc[j] += a[i + j] * b[i + j];
        }
    }
    for (; i < n; i++) {
        acc[0] += a[i] * b[i];
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void offq_attend_f32_generic(const float *q, int64_t nq, int64_t rep, int64_t hd, const float *k0,
                             const float *v0, int64_t stride, int64_t n, float *scores,
                             float *rec, int64_t rstride)
{
    for (int64_t t = 0; t < nq; t++) {
        const float *qt = q + t * hd;
        const float *k = k0 + t / rep * hd, *v = v0 + t / rep * hd;
        float *st = scores + t * n, *acc = rec + t * rstride, mx = -INFINITY, den = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            st[j] = dot_f32(qt, k + j * stride, hd);
            mx = st[j] > mx ? st[j] : mx;
        }
        for (int64_t j = 0; j < n; j++) {
            st[j] = expf(st[j] - mx);
            den += st[j];
        }
        memset(acc, 0, sizeof(float) * (size_t)hd);
        for (int64_t j = 0; j < n; j++) {
            const float p = st[j], *vj = v + j * stride;
            for (int64_t i = 0; i < hd; i++) {
                acc[i] += p * vj[i];
            }
        }
        acc[hd] = mx;
        acc[hd + 1] = den;
    }
}

void offq_attn_f32_merge(const float *rec, int64_t chunks, int64_t cstride, int64_t hd,
                         float *out)
{
    float mx = -INFINITY;
    for (int64_t c = 0; c < chunks; c++) {
        const float m = rec[c * cstride + hd];
        mx = m > mx ? m : mx;
    }
    float den = 0.0f;
    memset(out, 0, sizeof(float) * (size_t)hd);
    for (int64_t c = 0; c < chunks; c++) {
        const float *r = rec + c * cstride;
        const float w = expf(r[hd] - mx); /* exactly 1 for the chunk holding the max */
        den += w * r[hd + 1];
        for (int64_t i = 0; i < hd; i++) {
            out[i] += w * r[i];
        }
    }
    for (int64_t i = 0; i < hd; i++) {
        out[i] = out[i] / den;
    }
}

void offq_attend_f32_chunk(offq_attend_f32_fn attend, const float *q, int64_t nq,
                           int64_t kv_heads, int64_t hd, const float *kv, int64_t c, int64_t n,
                           float *scores, float *rec)
{
    const int64_t j0 = c * OFFQ_ATTN_F32_CHUNK, stride = 2 * kv_heads * hd;
    if (j0 >= n) {
        return;
    }
    const float *k = kv + j0 * stride;
    attend(q, nq, nq / kv_heads, hd, k, k + kv_heads * hd, stride,
           n - j0 < OFFQ_ATTN_F32_CHUNK ? n - j0 : OFFQ_ATTN_F32_CHUNK, scores, rec, hd + 2);
}

offq_status offq_attention_f32(const float *q, int64_t nq, int64_t kv_heads, int64_t hd,
                               const float *kv, int64_t n, float *out, offq_kernel kernel)
{
    const offq_attend_f32_fn attend =
        kernel == OFFQ_KERNEL_GENERIC ? offq_attend_f32_generic : offq_dispatch.attend_f32;
    const int64_t chunks = offq_attn_f32_chunks(n), rs = hd + 2;
    float *rec = malloc(sizeof(float) * (size_t)(chunks * nq * rs));
    float *scores = malloc(sizeof(float) * (size_t)(nq * OFFQ_ATTN_F32_CHUNK));
    if (rec == NULL || scores == NULL) {
        free(rec);
        free(scores);
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t c = 0; c < chunks; c++) {
        offq_attend_f32_chunk(attend, q, nq, kv_heads, hd, kv, c, n, scores, rec + c * nq * rs);
    }
    for (int64_t t = 0; t < nq; t++) {
        offq_attn_f32_merge(rec + t * rs, chunks, nq * rs, hd, out + t * hd);
    }
    free(rec);
    free(scores);
    return OFFQ_OK;
}
