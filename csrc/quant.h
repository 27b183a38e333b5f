/* quant.h: group-wise quantization, int4 packing and the W4A4 matmul.
 *
 * The one quantization format of offq (kernels, GPTQ, checkpoints, runtime):
 *
 *   x_hat = scale * (q - zero)      q: unsigned code in [0, 2^bits - 1]
 *
 * per group of `group` consecutive elements of a row (a row of K elements has G = K / group
 * groups; group must divide K). `zero` is an INTEGER-valued zero-point stored as float32; it may
 * lie outside [0, 2^bits - 1] (a group that is all offset keeps its full resolution). All
 * arithmetic is float32 with round half to even (rint in the default rounding mode):
 *
 *   asymmetric: lo = clip * min(g), hi = clip * max(g), scale = (hi - lo) / (2^bits - 1);
 *               if scale == 0: scale = |hi| if hi != 0 else 1   (constant groups are exact)
 *               zero = rint(-lo / scale)
 *   symmetric:  scale = clip * max|g| / (2^(bits-1) - 1) (if 0: 1), zero = 2^(bits-1)
 *   both:       q = clamp(rint(x / scale) + zero, 0, 2^bits - 1)
 *
 * Storage: bits == 4 -> two codes per byte, row length ceil(K / 2) bytes, element 2i in the LOW
 * nibble and 2i + 1 in the HIGH nibble (the high nibble of the last byte is 0 when K is odd);
 * bits in {2, 3, 8} -> one code per byte, row length K. code_sums (int32) holds the sum of the
 * codes of each group (the zero-point correction of the matmul needs them).
 *
 * All functions work on contiguous row-major arrays, run in parallel over rows (OpenMP) and never
 * touch Python objects. Sizes are int64_t.
 */
#ifndef OFFQ_QUANT_H
#define OFFQ_QUANT_H

#include <stdint.h>

enum {
    OFFQ_OK = 0,
    OFFQ_ERR_NONFINITE = 1, /* the input contains NaN or Inf */
    OFFQ_ERR_OVERFLOW = 2,  /* a group's range (max - min) overflows float32 */
    OFFQ_ERR_CODE = 3,      /* a code is >= 2^bits */
    OFFQ_ERR_NOMEM = 4,     /* temporary memory could not be allocated */
    OFFQ_ERR_UNSUPPORTED = 5, /* the requested SIMD variant is not available on this CPU */
};

/* Bytes per row of stored codes: ceil(k / 2) for 4 bits, k otherwise. */
int64_t offq_code_row_bytes(int64_t k, int bits);

/* Quantize x[rows][k] (float32) group-wise. Outputs: codes[rows][offq_code_row_bytes(k, bits)],
 * scale, zero [rows][k / group] (float32), sums [rows][k / group] (int32). bits in {2,3,4,8},
 * group divides k, 0 < clip <= 1 (checked by the caller). Returns OFFQ_OK, OFFQ_ERR_NONFINITE,
 * OFFQ_ERR_OVERFLOW or OFFQ_ERR_NOMEM; on error the outputs are unspecified. */
int offq_quantize_f32(const float *x, int64_t rows, int64_t k, int bits, int64_t group,
                      int symmetric, float clip, uint8_t *codes, float *scale, float *zero,
                      int32_t *sums);

/* out[rows][k] = scale * (q - zero), the exact inverse of the stored format. */
void offq_dequantize_f32(const uint8_t *codes, int64_t rows, int64_t k, int bits, int64_t group,
                         const float *scale, const float *zero, float *out);

/* Store one-code-per-byte codes[rows][k] (each < 2^bits) in the format above and compute the group
 * sums. Returns OFFQ_OK or OFFQ_ERR_CODE when a code is out of range. */
int offq_pack_codes(const uint8_t *codes, int64_t rows, int64_t k, int bits, int64_t group,
                    uint8_t *packed, int32_t *sums);

/* Inverse of offq_pack_codes: stored codes -> one code per byte, out[rows][k]. */
void offq_unpack_codes(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *out);

/* One 4-bit operand of the W4A4 matmul: rows x k codes in the stored format (ceil(k/2) bytes per
 * row), scale and zero [rows][k / group]. */
typedef struct {
    const uint8_t *codes;
    const float *scale;
    const float *zero;
    int64_t rows;
    int64_t group;
} offq_q4_operand;

/* out[M][N] = dequantize(a) @ dequantize(w)^T for a: M x k, w: N x k (4-bit), computed as exact
 * integer dot products per block (block = min of the two group sizes; one must divide the other,
 * checked by the caller) plus the zero-point corrections, per block
 *     sa * sw * (sum qa qw - zw sum qa - za sum qw + block * za * zw),
 * accumulated over blocks in float32. Generic C reference plus AVX2 and AVX-512 VNNI variants,
 * chosen at run time. Returns OFFQ_OK or OFFQ_ERR_NOMEM. */
int offq_matmul_w4a4(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k, float *out);

/* Kernel variants of offq_matmul_w4a4 (all compute identical results). */
enum {
    OFFQ_KERNEL_AUTO = -1, /* best available: VNNI, else AVX2, else generic */
    OFFQ_KERNEL_GENERIC = 0,
    OFFQ_KERNEL_AVX2 = 1,
    OFFQ_KERNEL_VNNI = 2,
};

/* Same as offq_matmul_w4a4 with an explicit variant (tests and benchmarks compare them). Returns
 * OFFQ_ERR_UNSUPPORTED when the CPU (or OFFQ_DISABLE_SIMD=1) does not allow the variant. */
int offq_matmul_w4a4_kernel(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k,
                            float *out, int kernel);

#endif
