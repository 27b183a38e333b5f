/* x86/matmul_wq_avx512.c: the weight-only matmul's decode rows (matmul_wq.c) with AVX-512 F + BW,
 * for groups that are a multiple of 64.
 *
 * The same decoding as the AVX2 variant (x86/matmul_wq_avx2.c), on 16 lanes: a chunk of 64 codes
 * (8 * bits bytes) becomes one vector of 16 int32 lanes, lane L holding codes 4L .. 4L+3 in its
 * fields j = 0..3, so each masked field converts to 16 floats at once and an AVX2 chunk's
 * and + convert + multiply-add now covers twice the codes. The lanes:
 *   4 bits: 32 bytes zero-extended 16 -> 32 bits; 2 bits: 16 bytes zero-extended 8 -> 32 bits;
 *   3 bits: 24 bytes, each lane's two bytes brought in by a dword permute and a byte shuffle
 *           (chunk_lanes); odd lanes' fields start 4 bits higher, as in AVX2.
 * prep(scaled = 1) reorders each 64-column chunk of x to match: xp[16j + L] = x[4L + j] * 2^-t,
 * t the field's bit offset in its lane (exact unless that underflows, as in AVX2), times the row
 * factor of the subnormal decode (kernels.h) when it runs. A variant's
 * dequantized panels (the many-rows path) are the AVX2 variant's: prep(scaled = 0) delegates.
 * At M = 1 the product is compute bound (its time per weight row is the same for L2- and
 * DRAM-sized weights), which is why the wider vectors pay.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/wq_common.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx2,fma")))

/* Bit offset of field j in lane L (3 bits: odd lanes start 4 bits higher). */
INLINE int field_shift(int bits, int j, int lane)
{
    return bits * j + (bits == 3 && (lane & 1) ? 4 : 0);
}

INLINE __m512i field_mask(const int bits, const int j)
{
    int32_t v[16];
    for (int l = 0; l < 16; l++) {
        v[l] = ((1 << bits) - 1) << field_shift(bits, j, l);
    }
    return _mm512_loadu_si512(v);
}

/* The lanes of the 64-code chunk at p (8 * bits bytes). 3 bits: lane L needs bytes floor(3L/2)
 * and floor(3L/2) + 1; the 4 lanes of 128-bit block i need bytes 6i .. 6i + 5, which one dword
 * permute brings into the block (dwords 0,1 | 1,2 | 3,4 | 4,5, so they start at byte 0, 2, 0, 2
 * of it) and one in-block byte shuffle spreads over its lanes. The 24 bytes are read by a masked
 * load, which never touches the 8 after them (the end of the array at the last chunk). */
INLINE __m512i chunk_lanes(const uint8_t *p, const int bits)
{
    if (bits == 4) {
        return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    }
    if (bits == 2) {
        return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    }
    const __m512i d = _mm512_maskz_loadu_epi32(0x3f, p);
    const __m512i blocks = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 1, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 4, 5, 0, 0), d);
#define L3(o) o, o + 1, -1, -1, o + 1, o + 2, -1, -1, o + 3, o + 4, -1, -1, o + 4, o + 5, -1, -1
    static const int8_t ctrl[64] = {L3(0), L3(2), L3(0), L3(2)};
#undef L3
    return _mm512_shuffle_epi8(blocks, _mm512_loadu_si512(ctrl));
}

void AVX512 offq_wq_prep_avx512(const float *x, int64_t m, int64_t k, int bits, int scaled,
                                const float *rowmul, float *xp)
{
    if (!scaled) { /* the panels are the AVX2 variant's */
        offq_wq_prep_avx2(x, m, k, bits, scaled, rowmul, xp);
        return;
    }
    float f[4][16];
    for (int j = 0; j < 4; j++) {
        for (int l = 0; l < 16; l++) {
            f[j][l] = 1.0f / (float)(1 << field_shift(bits, j, l));
        }
    }
    for (int64_t r = 0; r < m; r++) {
        float fr[4][16]; /* powers of two: their products are exact */
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 16; l++) {
                fr[j][l] = f[j][l] * (rowmul != NULL ? rowmul[r] : 1.0f);
            }
        }
        for (int64_t c = 0; c < k; c += 64) {
            const float *s = x + r * k + c;
            float *d = xp + r * k + c;
            for (int j = 0; j < 4; j++) {
                for (int l = 0; l < 16; l++) {
                    d[16 * j + l] = s[4 * l + j] * fr[j][l];
                }
            }
        }
    }
}

/* res[r] = sum_g scale_g * (sum of x * q over group g), r < R <= 2, for one packed row; CPG: the
 * chunks per group when a compile-time constant (the loop unrolls), else 0. One accumulator per
 * field and row. Blocks of 3-4 rows (as AVX2 has) measured slower than blocks of 2, and a second
 * accumulator set for two chunks in flight at R = 1 slower than one. */
INLINE void dot_rows(const uint8_t *row, const float *sc, const float *xp, int64_t k,
                     int64_t group, const int bits, const int R, const int sub, const int CPG,
                     float *res)
{
    const int64_t pf = WQ_PF_ROWS * offq_wq_row_bytes(k, bits);
    const int64_t ng = k / group, cpg = CPG ? CPG : group / 64;
    const __m512i m[4] = {field_mask(bits, 0), field_mask(bits, 1), field_mask(bits, 2),
                          field_mask(bits, 3)};
    __m512 tot[2];
    for (int r = 0; r < R; r++) {
        tot[r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 d[2][4];
        for (int r = 0; r < R; r++) {
            for (int j = 0; j < 4; j++) {
                d[r][j] = _mm512_setzero_ps();
            }
        }
        /* the group's bytes some rows ahead, one prefetch per 64 */
        for (int64_t b = 0; b < cpg * 8 * bits; b += 64) {
            _mm_prefetch((const char *)(row + g * cpg * 8 * bits + b + pf), _MM_HINT_T0);
        }
        for (int64_t i = 0; i < cpg; i++) {
            const int64_t c = g * cpg + i;
            const __m512i v = chunk_lanes(row + c * 8 * bits, bits);
            const float *x0 = xp + c * 64;
            for (int j = 0; j < 4; j++) {
                const __m512i q = _mm512_and_si512(v, m[j]);
                const __m512 f = sub ? _mm512_castsi512_ps(q) : _mm512_cvtepi32_ps(q);
                for (int r = 0; r < R; r++) {
                    d[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + r * k + 16 * j), f, d[r][j]);
                }
            }
        }
        const __m512 s = _mm512_set1_ps(sc[g]);
        for (int r = 0; r < R; r++) {
            const __m512 e = _mm512_add_ps(_mm512_add_ps(d[r][0], d[r][1]),
                                           _mm512_add_ps(d[r][2], d[r][3]));
            tot[r] = _mm512_fmadd_ps(s, e, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        res[r] = _mm512_reduce_add_ps(tot[r]);
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
        for (int64_t r0 = 0; r0 < m; r0 += 2) {
            const int rr = m - r0 >= 2 ? 2 : 1;
            float res[2];
            if (rr == 2) {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 2, sub, 0, res);
            } else if (group == 128) { /* decode: the common groups unrolled */
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 2, res);
            } else if (group == 64) {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 1, res);
            } else {
                dot_rows(row, sc, xp + r0 * k, k, group, bits, 1, sub, 0, res);
            }
            for (int r = 0; r < rr; r++) {
                const float dot = sub ? res[r] * unscale[r0 + r] : res[r];
                out[(r0 + r) * ldo + n] =
                    dot - offq_wq_zero_term(sc, zr, xsum + (r0 + r) * ng, ng);
            }
        }
    }
}

/* The decode (convert or subnormal) times the bit width, each a specialised copy. */
INLINE void rows_decode(const offq_wq_operand *w, const float *xp, const float *xsum,
                        const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                        float *out, const int sub)
{
    switch (w->bits) {
    case 2:
        rows_bits(w, xp, xsum, unscale, m, n0, n1, ldo, out, 2, sub);
        break;
    case 3:
        rows_bits(w, xp, xsum, unscale, m, n0, n1, ldo, out, 3, sub);
        break;
    default:
        rows_bits(w, xp, xsum, unscale, m, n0, n1, ldo, out, 4, sub);
        break;
    }
}

void AVX512 offq_wq_rows_avx512(const offq_wq_operand *w, const float *xp, const float *xsum,
                                const float *unscale, int64_t m, int64_t n0, int64_t n1,
                                int64_t ldo, float *out)
{
    if (unscale == NULL) {
        rows_decode(w, xp, xsum, NULL, m, n0, n1, ldo, out, 0);
        return;
    }
    const unsigned csr = offq_wq_clear_daz();
    rows_decode(w, xp, xsum, unscale, m, n0, n1, ldo, out, 1);
    offq_wq_restore_csr(csr);
}
#endif
