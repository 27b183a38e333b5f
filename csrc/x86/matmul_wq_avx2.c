/* x86/matmul_wq_avx2.c: the weight-only matmul (matmul_wq.c) with AVX2 + FMA, for groups that are
 * a multiple of 32.
 *
 * Decoding: a chunk of 32 codes (4 * bits bytes of the packed row) becomes one vector of 8 int32
 * lanes, lane l holding codes 4l .. 4l+3 in its fields j = 0..3 at bits [bits*j, bits*(j+1)):
 *   4 bits: 16 bytes zero-extended 16 -> 32 bits (vpmovzxwd);
 *   2 bits:  8 bytes zero-extended  8 -> 32 bits (vpmovzxbd);
 *   3 bits: 12 bytes (16 loaded where the array goes on), each lane's 12 bits gathered by a byte
 *           shuffle and shifted right by 0 or 4.
 * Field j is masked in place, (lane & (mask << bits*j)) = q * 2^(bits*j), and converted to float
 * (exact: at most 24 significant bits). The 2^(bits*j) is undone in the activations instead: prep
 * reorders each 32-column chunk of x as xp[8j + l] = x[4l + j] * 2^-(bits*j) (exact unless the
 * product underflows, |x| < 2^-114), so xp[8j + l] * float(field j of lane l) = x * q exactly as
 * the generic kernel forms it. Per group: four accumulators a row (one per field), then
 * tot = fma(scale, sum, tot); the zero-point term sum_g scale*zero*xsum is subtracted at the end.
 * A block of up to 4 rows of x shares each decoded chunk (two accumulators a row then).
 *
 * Dequantization (the panels of the many-rows path): the field q = (lane & mask_j) * 2^-(bits*j),
 * then scale * (q - zero) (the reference's float32 operations), stored in the same reordered
 * column order, which prep(scaled = 0) applies to x.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* The lanes of the chunk at p. 3 bits: 12 bytes; `edge` (the last chunk of the array) reads
 * exactly them, other chunks load 16 bytes (the next 4 belong to the array) straight into both
 * 128-bit halves. */
INLINE __m256i chunk_lanes(const uint8_t *p, const int bits, int edge)
{
    if (bits == 4) {
        return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    }
    if (bits == 2) {
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    }
    __m256i b;
    if (edge) {
        __m128i v = _mm_loadl_epi64((const __m128i *)p);
        v = _mm_insert_epi32(v, (int)offq_load_u32(p + 8), 2);
        b = _mm256_broadcastsi128_si256(v);
    } else {
        b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    }
    const __m256i ctrl = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,
                                          6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    return _mm256_srlv_epi32(_mm256_shuffle_epi8(b, ctrl), shifts);
}

INLINE float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

void AVX2 offq_wq_prep_avx2(const float *x, int64_t m, int64_t k, int bits, int scaled, float *xp)
{
    const float f[4] = {1.0f, scaled ? 1.0f / (float)(1 << bits) : 1.0f,
                        scaled ? 1.0f / (float)(1 << (2 * bits)) : 1.0f,
                        scaled ? 1.0f / (float)(1 << (3 * bits)) : 1.0f};
    for (int64_t r = 0; r < m; r++) {
        for (int64_t c = 0; c < k; c += 32) {
            const float *s = x + r * k + c;
            float *d = xp + r * k + c;
            for (int j = 0; j < 4; j++) {
                for (int l = 0; l < 8; l++) {
                    d[8 * j + l] = s[4 * l + j] * f[j];
                }
            }
        }
    }
}

/* res[r] = sum_g scale_g * (sum of x * q over group g), r < R, for one packed row; `edge`: the
 * row ends the array. Accumulators: one per field for R <= 2, two (even, odd fields) for more
 * rows, so that the 16 ymm registers hold them, the running totals and two decoded fields. */
INLINE void dot_rows(const uint8_t *row, const float *sc, const float *xp, int64_t k,
                     int64_t group, const int bits, const int R, int edge, float *res)
{
    const int A = R <= 2 ? 4 : 2;
    const int64_t ng = k / group, cpg = group / 32, cb = 4 * bits, last = k / 32 - 1;
    const int mask = (1 << bits) - 1;
    const __m256i m0 = _mm256_set1_epi32(mask), m1 = _mm256_set1_epi32(mask << bits),
                  m2 = _mm256_set1_epi32(mask << (2 * bits)),
                  m3 = _mm256_set1_epi32(mask << (3 * bits));
    __m256 tot[4];
    for (int r = 0; r < R; r++) {
        tot[r] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m256 d[4][4];
        for (int r = 0; r < R; r++) {
            for (int j = 0; j < A; j++) {
                d[r][j] = _mm256_setzero_ps();
            }
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
            const __m256i v = chunk_lanes(row + c * cb, bits, edge && c == last);
            const float *x0 = xp + c * 32;
            __m256 fa = _mm256_cvtepi32_ps(_mm256_and_si256(v, m0));
            __m256 fb = _mm256_cvtepi32_ps(_mm256_and_si256(v, m1));
            for (int r = 0; r < R; r++) {
                d[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k), fa, d[r][0]);
                d[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 8), fb, d[r][1]);
            }
            fa = _mm256_cvtepi32_ps(_mm256_and_si256(v, m2));
            fb = _mm256_cvtepi32_ps(_mm256_and_si256(v, m3));
            for (int r = 0; r < R; r++) {
                d[r][2 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 16), fa, d[r][2 % A]);
                d[r][3 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 24), fb, d[r][3 % A]);
            }
        }
        const __m256 s = _mm256_set1_ps(sc[g]);
        for (int r = 0; r < R; r++) {
            __m256 e = _mm256_add_ps(d[r][0], d[r][1]);
            if (A == 4) {
                e = _mm256_add_ps(e, _mm256_add_ps(d[r][2], d[r][3]));
            }
            tot[r] = _mm256_fmadd_ps(s, e, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        res[r] = hsum8(tot[r]);
    }
}

/* sum_g (scale_g * zero_g) * xs[g] */
INLINE float zero_term(const float *sc, const float *zr, const float *xs, int64_t ng)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(zr + g));
        acc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + g), acc);
    }
    float t = hsum8(acc);
    for (; g < ng; g++) {
        t += (sc[g] * zr[g]) * xs[g];
    }
    return t;
}

INLINE void rows_bits(const offq_wq_operand *w, const float *xp, const float *xsum, int64_t m,
                      int64_t n0, int64_t n1, int64_t ldo, float *out, const int bits)
{
    const int64_t k = w->k, group = w->group, ng = k / group, rb = offq_wq_row_bytes(k, bits);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->packed + n * rb;
        const float *sc = w->scale + n * ng, *zr = w->zero + n * ng;
        const int edge = n == w->n - 1;
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            const int64_t left = m - r0;
            const float *xb = xp + r0 * k;
            float res[4];
            switch (left >= 4 ? 4 : left) {
            case 1:
                dot_rows(row, sc, xb, k, group, bits, 1, edge, res);
                break;
            case 2:
                dot_rows(row, sc, xb, k, group, bits, 2, edge, res);
                break;
            case 3:
                dot_rows(row, sc, xb, k, group, bits, 3, edge, res);
                break;
            default:
                dot_rows(row, sc, xb, k, group, bits, 4, edge, res);
                break;
            }
            const int rr = left >= 4 ? 4 : (int)left;
            for (int r = 0; r < rr; r++) {
                out[(r0 + r) * ldo + n] = res[r] - zero_term(sc, zr, xsum + (r0 + r) * ng, ng);
            }
        }
    }
}

void AVX2 offq_wq_rows_avx2(const offq_wq_operand *w, const float *xp, const float *xsum,
                            int64_t m, int64_t n0, int64_t n1, int64_t ldo, float *out)
{
    switch (w->bits) {
    case 2:
        rows_bits(w, xp, xsum, m, n0, n1, ldo, out, 2);
        break;
    case 3:
        rows_bits(w, xp, xsum, m, n0, n1, ldo, out, 3);
        break;
    default:
        rows_bits(w, xp, xsum, m, n0, n1, ldo, out, 4);
        break;
    }
}

INLINE void dequant_bits(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf,
                         const int bits)
{
    const int64_t k = w->k, group = w->group, ng = k / group, cpg = group / 32;
    const int64_t rb = offq_wq_row_bytes(k, bits), cb = 4 * bits;
    const int mask = (1 << bits) - 1;
    const __m256i m[4] = {_mm256_set1_epi32(mask), _mm256_set1_epi32(mask << bits),
                          _mm256_set1_epi32(mask << (2 * bits)),
                          _mm256_set1_epi32(mask << (3 * bits))};
    const __m256 inv[4] = {_mm256_set1_ps(1.0f), _mm256_set1_ps(1.0f / (float)(1 << bits)),
                           _mm256_set1_ps(1.0f / (float)(1 << (2 * bits))),
                           _mm256_set1_ps(1.0f / (float)(1 << (3 * bits)))};
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->packed + n * rb;
        float *o = buf + (n - n0) * k;
        for (int64_t g = 0; g < ng; g++) {
            const __m256 s = _mm256_set1_ps(w->scale[n * ng + g]);
            const __m256 z = _mm256_set1_ps(w->zero[n * ng + g]);
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                const __m256i v = chunk_lanes(row + c * cb, bits, n == w->n - 1 && c == k / 32 - 1);
                for (int j = 0; j < 4; j++) {
                    const __m256 q =
                        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m[j])), inv[j]);
                    _mm256_storeu_ps(o + c * 32 + 8 * j, _mm256_mul_ps(s, _mm256_sub_ps(q, z)));
                }
            }
        }
    }
}

void AVX2 offq_wq_dequant_avx2(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf)
{
    switch (w->bits) {
    case 2:
        dequant_bits(w, n0, n1, buf, 2);
        break;
    case 3:
        dequant_bits(w, n0, n1, buf, 3);
        break;
    default:
        dequant_bits(w, n0, n1, buf, 4);
        break;
    }
}
#endif
