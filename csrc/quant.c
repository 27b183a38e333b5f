/* quant.c: group-wise quantize / dequantize and code packing (format: offq.h).
 *
 * Every formula is evaluated in float32 exactly as offq.h states it, so a NumPy reference written
 * with float32 arrays and np.rint reproduces the codes bit for bit. The per-row kernel here is the
 * generic reference; x86/quant_avx2.c computes identical results with wider vectors. The group
 * parameters come from one shared scalar formula (kernels.h) in both.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* Rows per parallel region below which OpenMP is not worth starting. */
#define OFFQ_QUANT_PAR_MIN_ELEMS ((int64_t)1 << 15)

/* k / 2 + k % 2, not (k + 1) / 2: k may be a caller's INT64_MAX, reported in an error message */
int64_t offq_code_row_bytes(int64_t k, int bits) { return bits == 4 ? k / 2 + k % 2 : k; }

/* Quantize one group g[0..n) to codes q[0..n) (one per byte): the reference variant. */
offq_status offq_quant_group_generic(const float *restrict g, int64_t n, int bits, int symmetric,
                                     float clip, uint8_t *restrict q, float *scale_out,
                                     float *zero_out, int32_t *sum)
{
    const float maxq = (float)((1 << bits) - 1);
    int bad = 0;
    float scale, zero;
    if (symmetric) {
        float amax;
        if (offq_abs_max(g, n, &amax)) {
            return OFFQ_ERR_NONFINITE;
        }
        offq_quant_params_sym(amax, bits, clip, &scale, &zero);
    } else {
        float mn = g[0], mx = g[0];
        for (int64_t i = 0; i < n; i++) {
            const float v = g[i];
            bad |= offq_is_nonfinite(v);
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        if (bad) {
            return OFFQ_ERR_NONFINITE;
        }
        const offq_status st = offq_quant_params_asym(mn, mx, bits, clip, &scale, &zero);
        if (st != OFFQ_OK) {
            return st;
        }
    }
    const int32_t s = offq_quant_codes(g, 0, n, scale, zero, maxq, q);
    *scale_out = scale;
    *zero_out = zero;
    *sum = s;
    return OFFQ_OK;
}


OFFQ_DEFINE_QUANT_GROUPS(offq_quant_groups_generic, , offq_quant_group_generic)

/* One row: quantize all groups (through the dispatched variant) into `tmp` (4 bits, then
 * packed) or directly into `codes`. */
static offq_status quant_row(offq_quant_groups_fn groups_fn, const float *x, int64_t k, int bits,
                             int64_t group, int symmetric, float clip, uint8_t *codes,
                             float *scale, float *zero, int32_t *sums, uint8_t *tmp)
{
    uint8_t *dst = bits == 4 ? tmp : codes;
    const offq_status st =
        groups_fn(x, k / group, group, bits, symmetric, clip, dst, scale, zero, sums);
    if (st != OFFQ_OK) {
        return st;
    }
    if (bits == 4) {
        offq_pack_row4(tmp, k, codes);
    }
    return OFFQ_OK;
}

offq_status offq_quantize_f32(const float *x, int64_t rows, int64_t k, int bits, int64_t group,
                              int symmetric, float clip, uint8_t *codes, float *scale,
                              float *zero, int32_t *sums)
{
    const offq_quant_groups_fn groups_fn = offq_dispatch.quant_groups;
    const int64_t rb = offq_code_row_bytes(k, bits);
    const int64_t ng = k / group;
    int err = OFFQ_OK;
#pragma omp parallel if (rows * k >= OFFQ_QUANT_PAR_MIN_ELEMS) reduction(max : err)
    {
        uint8_t *tmp = bits == 4 ? malloc((size_t)k) : NULL;
        if (bits == 4 && tmp == NULL) {
            err = OFFQ_ERR_NOMEM;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const int e = (int)quant_row(groups_fn, x + r * k, k, bits, group, symmetric, clip,
                                             codes + r * rb, scale + r * ng, zero + r * ng,
                                             sums + r * ng, tmp);
                err = e > err ? e : err;
            }
        }
        free(tmp);
    }
    return (offq_status)err;
}

void offq_dequantize_f32(const uint8_t *codes, int64_t rows, int64_t k, int bits, int64_t group,
                         const float *scale, const float *zero, float *out)
{
    const int64_t rb = offq_code_row_bytes(k, bits);
    const int64_t ng = k / group;
#pragma omp parallel if (rows * k >= OFFQ_QUANT_PAR_MIN_ELEMS)
    {
        /* 4-bit rows are unpacked into a per-thread buffer first; a failed allocation falls back to
         * reading nibbles one by one. */
        uint8_t *tmp = bits == 4 ? malloc((size_t)k) : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *restrict o = out + r * k;
            const uint8_t *restrict c = codes + r * rb;
            if (bits == 4 && tmp != NULL) {
                offq_unpack_row4(c, k, tmp);
                c = tmp;
            }
            for (int64_t gi = 0; gi < ng; gi++) {
                const float s = scale[r * ng + gi], z = zero[r * ng + gi];
                for (int64_t i = gi * group; i < (gi + 1) * group; i++) {
                    const uint8_t q = (bits == 4 && tmp == NULL)
                                          ? (uint8_t)((c[i >> 1] >> ((i & 1) * 4)) & 15)
                                          : c[i];
                    o[i] = s * ((float)q - z);
                }
            }
        }
        free(tmp);
    }
}

offq_status offq_pack_codes(const uint8_t *codes, int64_t rows, int64_t k, int bits,
                            int64_t group, uint8_t *packed, int32_t *sums)
{
    const int64_t rb = offq_code_row_bytes(k, bits);
    const int64_t ng = k / group;
    const int maxq = (1 << bits) - 1;
    int err = OFFQ_OK;
#pragma omp parallel for schedule(static) if (rows * k >= OFFQ_QUANT_PAR_MIN_ELEMS) \
    reduction(max : err)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *restrict c = codes + r * k;
        int over = 0;
        for (int64_t gi = 0; gi < ng; gi++) {
            int32_t s = 0;
            for (int64_t i = 0; i < group; i++) {
                uint8_t v = c[gi * group + i];
                over |= v > maxq;
                s += v;
            }
            sums[r * ng + gi] = s;
        }
        if (over) {
            err = OFFQ_ERR_CODE;
            continue;
        }
        if (bits == 4) {
            offq_pack_row4(c, k, packed + r * rb);
        } else {
            memcpy(packed + r * rb, c, (size_t)k);
        }
    }
    return (offq_status)err;
}

void offq_unpack_codes(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *out)
{
    const int64_t rb = offq_code_row_bytes(k, bits);
#pragma omp parallel for schedule(static) if (rows * k >= OFFQ_QUANT_PAR_MIN_ELEMS)
    for (int64_t r = 0; r < rows; r++) {
        if (bits == 4) {
            offq_unpack_row4(packed + r * rb, k, out + r * k);
        } else {
            memcpy(out + r * k, packed + r * rb, (size_t)k);
        }
    }
}
