/* x86/matmul_wq_avx2.c: the weight-only matmul (matmul_wq.c) with AVX2 + FMA, for groups that are
 * a multiple of 32.
 *
 * Decoding: a chunk of 32 codes (4 * bits bytes of the packed row) becomes one vector of 8 int32
 * lanes, lane l holding codes 4l .. 4l+3 in its fields j = 0..3 at bits [bits*j, bits*(j+1)):
 *   4 bits: 16 bytes zero-extended 16 -> 32 bits (vpmovzxwd);
 *   2 bits:  8 bytes zero-extended  8 -> 32 bits (vpmovzxbd);
 *   8 bits: the 32 bytes as they are;
 *   3 bits: 12 bytes (16 loaded where the array goes on), each lane's two bytes gathered by one
 *           byte shuffle; odd lanes' 12 bits then start at bit 4 (shift e(l) = 4), even lanes' at 0.
 * Field j of lane l sits at bit t = bits*j + e(l) (e = 0 for 2, 4 and 8 bits); it is masked in
 * place, (lane & (mask << t)) = q * 2^t, and converted to float (exact: at most 24 significant
 * bits). The top 8-bit field (bits 24..31, the sign bit among them) is shifted down instead: t = 0.
 * The 2^t is undone in the activations instead: prep reorders each 32-column chunk of x as
 * xp[8j + l] = x[4l + j] * 2^-t (exact unless that underflows,
 * |x| < 2^-113, 2^-110 at 8 bits), so
 * xp[8j + l] * float(field j of lane l) = x * q exactly as the generic kernel forms it. The
 * subnormal decode (kernels.h) skips the conversion: the masked lane, read as a float32, is the
 * subnormal q * 2^(t - 149), and prep's row factor 2^(149 - E) makes the product x * q * 2^-E
 * (one multiply-add per field instead of a conversion and a multiply-add: 4.3 -> 3.0 cycles a
 * 32-code chunk on Zen 5, a scratch loop). Per group: four accumulators a row (one per field),
 * then tot = fma(scale, sum, tot); the zero-point term sum_g scale*zero*xsum is subtracted at the
 * end.
 * A block of up to 4 rows of x shares each decoded chunk (two accumulators a row then).
 *
 * Dequantization (the panels of the many-rows path): the field q = (lane & mask_jl) * 2^-t,
 * then scale * (q - zero) (the reference's float32 operations), stored in the same reordered
 * column order, which prep(scaled = 0) applies to x.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/wq_common.h"

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* Bit offset of field j in lane l (8 bits: the top field is shifted down to bit 0, since in
 * place it would hold the sign bit). */
INLINE int field_shift(int bits, int j, int l)
{
    if (bits == 8) {
        return j == 3 ? 0 : 8 * j;
    }
    return bits * j + (bits == 3 && (l & 1) ? 4 : 0);
}

/* The masks of field j in each lane. */
INLINE __m256i field_mask(const int bits, const int j)
{
    const int q = (1 << bits) - 1;
    return _mm256_setr_epi32(q << field_shift(bits, j, 0), q << field_shift(bits, j, 1),
                             q << field_shift(bits, j, 2), q << field_shift(bits, j, 3),
                             q << field_shift(bits, j, 4), q << field_shift(bits, j, 5),
                             q << field_shift(bits, j, 6), q << field_shift(bits, j, 7));
}

/* 2^-t for field j in each lane. */
INLINE __m256 field_unscale(const int bits, const int j)
{
    float f[8];
    for (int l = 0; l < 8; l++) {
        f[l] = 1.0f / (float)(1 << field_shift(bits, j, l));
    }
    return _mm256_loadu_ps(f);
}

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
    if (bits == 8) {
        return _mm256_loadu_si256((const __m256i *)p);
    }
    __m256i b;
    if (edge) {
        __m128i v = _mm_loadl_epi64((const __m128i *)p);
        v = _mm_insert_epi32(v, (int)offq_load_u32(p + 8), 2);
        b = _mm256_broadcastsi128_si256(v);
    } else {
        b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    }
    /* lane l <- bytes floor(3l/2), floor(3l/2) + 1 (lanes 4..7 from the upper copy) */
    const __m256i ctrl = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,
                                          6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    return _mm256_shuffle_epi8(b, ctrl);
}

void AVX2 offq_wq_prep_avx2(const float *x, int64_t m, int64_t k, int bits, int scaled,
                            const float *rowmul, float *xp)
{
    float f[4][8];
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 8; l++) {
            f[j][l] = scaled ? 1.0f / (float)(1 << field_shift(bits, j, l)) : 1.0f;
        }
    }
    for (int64_t r = 0; r < m; r++) {
        float fr[4][8]; /* powers of two: their products are exact */
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 8; l++) {
                fr[j][l] = f[j][l] * (rowmul != NULL ? rowmul[r] : 1.0f);
            }
        }
        for (int64_t c = 0; c < k; c += 32) {
            const float *s = x + r * k + c;
            float *d = xp + r * k + c;
            for (int j = 0; j < 4; j++) {
                for (int l = 0; l < 8; l++) {
                    d[8 * j + l] = s[4 * l + j] * fr[j][l];
                }
            }
        }
    }
}

/* Field j of the lanes, q * 2^t: masked in place by m[j], or for the top 8-bit field shifted
 * down. */
INLINE __m256i field_bits(__m256i v, const __m256i *m, const int bits, const int j)
{
    return bits == 8 && j == 3 ? _mm256_srli_epi32(v, 24) : _mm256_and_si256(v, m[j]);
}

/* Field j as floats: converted, or (sub) its bits themselves, the subnormal q * 2^(t - 149)
 * (kernels.h; the 8-bit field at t = 16 reaches bit 23, the lowest exponent bit, where the float
 * read is still exactly q * 2^(t - 149): the encoding runs on from the subnormals without a gap). */
INLINE __m256 field_float(__m256i v, const __m256i *m, const int bits, const int j, const int sub)
{
    const __m256i q = field_bits(v, m, bits, j);
    return sub ? _mm256_castsi256_ps(q) : _mm256_cvtepi32_ps(q);
}

/* One chunk c into the accumulators: field j of row r goes to d[r][j % A]. */
INLINE void chunk_fma(const uint8_t *row, const float *xp, int64_t k, int64_t c, const int bits,
                      const int R, const int A, const int sub, int edge, const __m256i *m,
                      __m256 (*d)[4])
{
    const __m256i v = chunk_lanes(row + c * 4 * bits, bits, edge);
    const float *x0 = xp + c * 32;
    __m256 fa = field_float(v, m, bits, 0, sub);
    __m256 fb = field_float(v, m, bits, 1, sub);
    for (int r = 0; r < R; r++) {
        d[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k), fa, d[r][0]);
        d[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 8), fb, d[r][1]);
    }
    fa = field_float(v, m, bits, 2, sub);
    fb = field_float(v, m, bits, 3, sub);
    for (int r = 0; r < R; r++) {
        d[r][2 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 16), fa, d[r][2 % A]);
        d[r][3 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + r * k + 24), fb, d[r][3 % A]);
    }
}

/* res[r] = sum_g scale_g * (sum of x * q over group g), r < R, for one packed row; `edge`: the
 * row ends the array; CPG: the chunks per group when a compile-time constant (the chunk loop then
 * unrolls: a run-time loop of 2-4 iterations cost 5-15% at one row), else 0. Accumulators: one
 * per field for R <= 2, two a row (even, odd fields) for 3-4 rows, so that the 16 ymm registers
 * hold them, the running totals and two decoded fields (8 accumulators for one row, two chunks in
 * flight, measured slower). */
INLINE void dot_rows(const uint8_t *row, const float *sc, const float *xp, int64_t k,
                     int64_t group, const int bits, const int R, const int sub, const int CPG,
                     int edge, float *res)
{
    const int A = R <= 2 ? 4 : 2;
    const int64_t pf = WQ_PF_ROWS * offq_wq_row_bytes(k, bits);
    const int64_t ng = k / group, cpg = CPG ? CPG : group / 32, last = k / 32 - 1;
    const __m256i m[4] = {field_mask(bits, 0), field_mask(bits, 1), field_mask(bits, 2),
                          field_mask(bits, 3)};
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
        /* the group's bytes some rows ahead, one prefetch per 64 (a group of 128 codes is one
         * cache line at 4 bits, two at 8) */
        for (int64_t b = 0; b < cpg * 4 * bits; b += 64) {
            _mm_prefetch((const char *)(row + g * cpg * 4 * bits + b + pf), _MM_HINT_T1);
        }
        for (int64_t i = 0; i < cpg; i++) {
            const int64_t c = g * cpg + i;
            chunk_fma(row, xp, k, c, bits, R, A, sub, edge && c == last, m, d);
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
        res[r] = offq_hsum8(tot[r]);
    }
}

INLINE void rows_bits(const offq_wq_operand *w, const float *xp, const float *xsum,
                      const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                      float *out, const int bits, const int sub)
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
            if (left == 1 && group == 128) { /* decode: the common groups unrolled */
                dot_rows(row, sc, xb, k, group, bits, 1, sub, 4, edge, res);
            } else if (left == 1 && group == 64) {
                dot_rows(row, sc, xb, k, group, bits, 1, sub, 2, edge, res);
            } else {
                switch (left >= 4 ? 4 : left) {
                case 1:
                    dot_rows(row, sc, xb, k, group, bits, 1, sub, 0, edge, res);
                    break;
                case 2:
                    dot_rows(row, sc, xb, k, group, bits, 2, sub, 0, edge, res);
                    break;
                case 3:
                    dot_rows(row, sc, xb, k, group, bits, 3, sub, 0, edge, res);
                    break;
                default:
                    dot_rows(row, sc, xb, k, group, bits, 4, sub, 0, edge, res);
                    break;
                }
            }
            const int rr = left >= 4 ? 4 : (int)left;
            for (int r = 0; r < rr; r++) {
                out[(r0 + r) * ldo + n] = offq_wq_output(res[r], unscale, r0 + r, sc, zr, xsum, ng);
            }
        }
    }
}

void AVX2 offq_wq_rows_avx2(const offq_wq_operand *w, const float *xp, const float *xsum,
                            const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                            float *out)
{
    OFFQ_WQ_ROWS_SPECIALISED(rows_bits)
}

INLINE void dequant_bits(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf,
                         const int bits)
{
    const int64_t k = w->k, group = w->group, ng = k / group, cpg = group / 32;
    const int64_t rb = offq_wq_row_bytes(k, bits), cb = 4 * bits;
    const __m256i m[4] = {field_mask(bits, 0), field_mask(bits, 1), field_mask(bits, 2),
                          field_mask(bits, 3)};
    const __m256 inv[4] = {field_unscale(bits, 0), field_unscale(bits, 1), field_unscale(bits, 2),
                           field_unscale(bits, 3)};
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
                        _mm256_mul_ps(_mm256_cvtepi32_ps(field_bits(v, m, bits, j)), inv[j]);
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
    case 8:
        dequant_bits(w, n0, n1, buf, 8);
        break;
    default:
        dequant_bits(w, n0, n1, buf, 4);
        break;
    }
}
#endif
