/* gguf_dequant.c: float32 values of the GGUF (ggml) block formats a checkpoint ships in most
 * often: Q4_0, Q4_1, Q8_0 (blocks of 32 values) and Q4_K, Q6_K (super-blocks of 256).
 *
 * The arithmetic is the gguf package's (its NumPy dequantizers are the tests' reference), in the
 * same order, so the values are the same bits: float16 fields widened exactly to float32, then
 * Q4_0  d * (q - 8)                     Q4_1  d * q + m            Q8_0  q * d
 * Q4_K  (d * sc) * q - (dmin * mn)      Q6_K  (d * sc) * (q - 32)
 * with q the stored integer (4, 6 or 8 bits) and sc, mn a sub-block's scale and minimum. Every
 * product of Q4_0, Q8_0, Q4_1 and Q4_K is exact in float32 (at most 21 significant bits), so only
 * Q4_1's and Q4_K's final sum rounds; Q6_K rounds its second product, as NumPy does.
 * (-ffp-contract=off keeps the compiler from fusing a multiply-add into one rounding.)
 *
 * Layouts (bytes of one block; ggml's definitions):
 *   Q4_0  18: d f16 | 16 bytes: value j in the low nibble of byte j, value j + 16 in its high one
 *   Q4_1  20: d f16 | m f16 | 16 bytes as Q4_0
 *   Q8_0  34: d f16 | 32 int8 values
 *   Q4_K 144: d f16 | dmin f16 | 12 bytes of eight 6-bit (scale, min) pairs | 128 bytes: four
 *             chunks of 32, chunk c holding sub-block 2c in its low and 2c + 1 in its high nibbles
 *   Q6_K 210: 128 bytes of low nibbles | 64 bytes of 2-bit high parts | 16 int8 scales (one per
 *             16 values) | d f16
 */
#include "kernels.h"

#include <string.h>

/* IEEE half -> float, exactly (subnormals, infinities and NaN included). */
static inline float half_to_float(const uint8_t *p)
{
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint32_t sign = (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1Fu) { /* inf / NaN */
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) { /* normal */
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) { /* zero */
        bits = sign;
    } else { /* subnormal: renormalise */
        exp = 113u;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void block_q4_0(const uint8_t *b, float *y)
{
    const float d = half_to_float(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static void block_q4_1(const uint8_t *b, float *y)
{
    const float d = half_to_float(b), m = half_to_float(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 0x0F) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void block_q8_0(const uint8_t *b, float *y)
{
    const float d = half_to_float(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) {
        y[j] = (float)qs[j] * d;
    }
}

/* Sub-block j's 6-bit scale and minimum from Q4_K's 12 packed bytes: bytes 0-3 hold the scales
 * of sub-blocks 0-3, bytes 4-7 their minimums (low 6 bits each); sub-blocks 4-7 take their low
 * 4 bits from bytes 8-11 (scale low nibble, minimum high nibble) and their top 2 bits from the
 * spare top bits of bytes 0-3 (scales) and 4-7 (minimums). */
static inline void q4_k_scale_min(const uint8_t *s, int j, int *sc, int *mn)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void block_q4_k(const uint8_t *b, float *y)
{
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int c = 0; c < 4; c++) {
        for (int half = 0; half < 2; half++) {
            int sc, mn;
            const int j = 2 * c + half;
            q4_k_scale_min(scales, j, &sc, &mn);
            const float ds = d * (float)sc, dm = dmin * (float)mn;
            for (int l = 0; l < 32; l++) {
                const int q = (qs[32 * c + l] >> (4 * half)) & 0x0F;
                y[32 * j + l] = ds * (float)q - dm;
            }
        }
    }
}

static void block_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = half_to_float(b + 208);
    for (int v = 0; v < 256; v++) {
        const int h = v / 128, r = v % 128;
        const int lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        const int hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        const float ds = d * (float)scales[v / 16];
        y[v] = ds * (float)((lo | (hi << 4)) - 32);
    }
}

/* Each format: its ggml type id, values and bytes per block, and its block dequantizer. */
static const struct {
    int qtype;
    int64_t values, bytes;
    void (*block)(const uint8_t *, float *);
} FORMATS[] = {
    {OFFQ_GGUF_Q4_0, 32, 18, block_q4_0},   {OFFQ_GGUF_Q4_1, 32, 20, block_q4_1},
    {OFFQ_GGUF_Q8_0, 32, 34, block_q8_0},   {OFFQ_GGUF_Q4_K, 256, 144, block_q4_k},
    {OFFQ_GGUF_Q6_K, 256, 210, block_q6_k},
};
#define N_FORMATS ((int)(sizeof FORMATS / sizeof FORMATS[0]))

static int format_index(int qtype)
{
    for (int i = 0; i < N_FORMATS; i++) {
        if (FORMATS[i].qtype == qtype) {
            return i;
        }
    }
    return -1;
}

int offq_gguf_block_shape(int qtype, int64_t *values, int64_t *bytes)
{
    const int f = format_index(qtype);
    if (f < 0) {
        return -1;
    }
    *values = FORMATS[f].values;
    *bytes = FORMATS[f].bytes;
    return 0;
}

void offq_gguf_dequantize(int qtype, const uint8_t *src, int64_t blocks, float *dst)
{
    const int f = format_index(qtype);
    if (f < 0) {
        return;
    }
    const int64_t values = FORMATS[f].values, bytes = FORMATS[f].bytes;
    void (*const block)(const uint8_t *, float *) = FORMATS[f].block;
#pragma omp parallel for schedule(static) if (blocks >= 4096)
    for (int64_t i = 0; i < blocks; i++) {
        block(src + i * bytes, dst + i * values);
    }
}
