/* x86/matmul_wq_avx512.c: the weight-only matmul's decode rows (matmul_wq.c) with AVX-512 F + BW,
 * for groups that are a multiple of 64 (the rows themselves: x86/wq_avx512_rows.h; with VBMI:
 * x86/matmul_wq_avx512vbmi.c).
 *
 * The same decoding as the AVX2 variant (x86/matmul_wq_avx2.c), on 16 lanes: a chunk of 64 codes
 * (8 * bits bytes) becomes one vector of 16 int32 lanes, lane L holding codes 4L .. 4L+3 in its
 * fields j = 0..3, so each masked field converts to 16 floats at once and an AVX2 chunk's
 * and + convert + multiply-add now covers twice the codes. The lanes:
 *   4 bits: 32 bytes zero-extended 16 -> 32 bits; 2 bits: 16 bytes zero-extended 8 -> 32 bits;
 *   8 bits: the 64 bytes as they are (the top field shifted down rather than masked, as in AVX2);
 *   3 bits: 24 bytes, each lane's two bytes brought in by a dword permute and a byte shuffle
 *           (lanes3 below; with VBMI one byte permute); odd lanes' fields start 4 bits higher,
 *           as in AVX2.
 * prep(scaled = 1) reorders each 64-column chunk of x to match: xp[16j + L] = x[4L + j] * 2^-t,
 * t the field's bit offset in its lane (exact unless that underflows, as in AVX2), times the row
 * factor of the subnormal decode (kernels.h) when it runs. A variant's
 * dequantized panels (the many-rows path) are the AVX2 variant's: prep(scaled = 0) delegates.
 * At M = 1 the product is compute bound (its time per weight row is the same for L2- and
 * DRAM-sized weights), which is why the wider vectors pay.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#define WQ512_TARGET "avx512f,avx512bw,avx2,fma"
#define WQ512_ROWS offq_wq_rows_avx512
#include "x86/wq_avx512_rows.h"

/* The 4 lanes of 128-bit block i need bytes 6i .. 6i + 5, which one dword permute brings into the
 * block (dwords 0,1 | 1,2 | 3,4 | 4,5, so they start at byte 0, 2, 0, 2 of it) and one in-block
 * byte shuffle spreads over its lanes. */
INLINE __m512i lanes3(const uint8_t *p, int edge)
{
    const __m512i blocks = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 1, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 4, 5, 0, 0), load24(p, edge));
#define L3(o) o, o + 1, -1, -1, o + 1, o + 2, -1, -1, o + 3, o + 4, -1, -1, o + 4, o + 5, -1, -1
    static const int8_t ctrl[64] = {L3(0), L3(2), L3(0), L3(2)};
#undef L3
    return _mm512_shuffle_epi8(blocks, _mm512_loadu_si512(ctrl));
}

void WQ512_ENTRY offq_wq_prep_avx512(const float *x, int64_t m, int64_t k, int bits, int scaled,
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

#endif
