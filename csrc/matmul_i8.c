/* matmul_i8.c: out = x_hat @ w_hat^T, the LM head stored in 8 bits. w_hat[n, i] =
 * scale[n, i / group] * w[n, i] (int8 weights, one float scale per group of `group` consecutive
 * inputs of a row); x_hat is x rounded to 16 bits per group of the same inputs (below).
 *
 * Why 16-bit activations: widening an int8 weight to float costs two conversions per 8 weights
 * (then one FMA), which made the few-rows kernel compute-bound where AVX2 runs at half width
 * (Zen 1: 6 GB/s a core, 9-10 GB/s with this kernel); with int16 activations one sign extension
 * and one vpmaddwd handle 16 weights. The rounding is at most 2^-16 of a group's largest
 * activation, far below the int8 weights' own (benchmarks/bench_lm_head_bits.py).
 *
 * Activation rounding (offq_i8_quantize_x, shared by every path): per row r and group g of x,
 * xs[r, g] = max|x_group| / 32767 and xq = clamp(rint(x / xs), -32767, 32767); a group whose
 * xs is 0 (all zero, or too small to divide by) is all zero. NaN or Inf: OFFQ_ERR_NONFINITE.
 *
 * Few rows (decode, m <= OFFQ_I8_SMALL_M): the dispatched row kernel (generic here, AVX2 in
 * x86/matmul_i8_avx2.c) reads the int8 weights once, OpenMP over blocks of output columns. Per
 * output (r, n) and group g: 8 int32 lane sums of xq * w (lane j holds the inputs i with
 * i mod 16 in {2j, 2j + 1}, what vpmaddwd forms; restarted every OFFQ_I8_CHUNK inputs so they
 * cannot overflow), each added as float(lane) * (scale[n, g] * xs[r, g]) to 8 float lanes, which
 * end in one fixed horizontal sum. Integer sums do not depend on their order, so the generic and
 * AVX2 kernels agree bit for bit. Many rows (perplexity over every position): x_hat = xs * xq in
 * float32, and each block of weight rows dequantized to float32 once and multiplied by sgemm.
 */
#include <omp.h>
#include <stdlib.h>

#include <cblas.h>

#include "kernels.h"

#define BLOCK_N 64 /* output columns per task / per dequantized block */

offq_status offq_i8_quantize_x(const float *x, int64_t m, int64_t k, int64_t group, int16_t *xq,
                               float *xs)
{
    const int64_t ng = k / group;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < ng; g++) {
            const float *xg = x + r * k + g * group;
            int16_t *qg = xq + r * k + g * group;
            float amax;
            if (offq_abs_max(xg, group, &amax)) {
                return OFFQ_ERR_NONFINITE;
            }
            const float s = amax / 32767.0f;
            xs[r * ng + g] = s;
            for (int64_t i = 0; i < group; i++) {
                float v = s > 0.0f ? offq_round_half_even(xg[i] / s) : 0.0f;
                v = v > 32767.0f ? 32767.0f : (v < -32767.0f ? -32767.0f : v);
                qg[i] = (int16_t)v;
            }
        }
    }
    return OFFQ_OK;
}

/* The fixed order of the 8 float lanes' sum (that of offq_hsum8, x86/reduce_avx2.h). */
static float sum8(const float *l)
{
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

void offq_i8_rows_generic(const int16_t *xq, const float *xs, int64_t m, int64_t k,
                          const int8_t *w, const float *scale, int64_t group, int64_t n0,
                          int64_t n1, int64_t ldo, float *out)
{
    const int64_t ng = k / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        for (int64_t r = 0; r < m; r++) {
            const int16_t *xr = xq + r * k;
            float acc[8] = {0};
            for (int64_t g = 0; g < ng; g++) {
                const float s = scale[n * ng + g] * xs[r * ng + g];
                const int64_t end = (g + 1) * group;
                for (int64_t c = g * group; c < end; c += OFFQ_I8_CHUNK) {
                    const int64_t c1 = c + OFFQ_I8_CHUNK < end ? c + OFFQ_I8_CHUNK : end;
                    int32_t lane[8] = {0};
                    for (int64_t i = c; i < c1; i++) {
                        lane[((i - c) & 15) >> 1] += (int32_t)xr[i] * (int32_t)wr[i];
                    }
                    for (int j = 0; j < 8; j++) {
                        acc[j] = acc[j] + (float)lane[j] * s;
                    }
                }
            }
            out[r * ldo + n] = sum8(acc);
        }
    }
}

/* Few rows: the row kernel over blocks of output columns. */
static void few_rows(const int16_t *xq, const float *xs, int64_t m, int64_t k, const int8_t *w,
                     const float *scale, int64_t n, int64_t group, float *out, int generic)
{
    const int64_t blocks = (n + BLOCK_N - 1) / BLOCK_N;
    const offq_i8_rows_fn rows = generic ? offq_i8_rows_generic : offq_dispatch.i8_rows;
#pragma omp parallel for schedule(dynamic, 8) if (blocks > 1 && m * n * k >= ((int64_t)1 << 22))
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n1 = (b + 1) * BLOCK_N < n ? (b + 1) * BLOCK_N : n;
        rows(xq, xs, m, k, w, scale, group, b * BLOCK_N, n1, n, out);
    }
}

/* Many rows: x_hat in float32, then sgemm against blocks of dequantized weight rows. */
static offq_status many_rows(const int16_t *xq, const float *xs, int64_t m, int64_t k,
                             const int8_t *w, const float *scale, int64_t n, int64_t group,
                             float *out)
{
    const int64_t ng = k / group;
    float *xh = malloc(sizeof(float) * (size_t)(m * k));
    float *buf = malloc(sizeof(float) * (size_t)(BLOCK_N * k));
    if (xh == NULL || buf == NULL) {
        free(xh);
        free(buf);
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t r = 0; r < m; r++) {
        for (int64_t i = 0; i < k; i++) {
            xh[r * k + i] = xs[r * ng + i / group] * (float)xq[r * k + i];
        }
    }
    for (int64_t n0 = 0; n0 < n; n0 += BLOCK_N) {
        const int64_t nn = (n0 + BLOCK_N < n ? n0 + BLOCK_N : n) - n0;
        for (int64_t j = 0; j < nn; j++) {
            const int8_t *wr = w + (n0 + j) * k;
            for (int64_t i = 0; i < k; i++) {
                buf[j * k + i] = scale[(n0 + j) * ng + i / group] * (float)wr[i];
            }
        }
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)nn, (int)k, 1.0f,
                          xh, (int)k, buf, (int)k, 0.0f, out + n0, (int)n);
    }
    free(xh);
    free(buf);
    return OFFQ_OK;
}

offq_status offq_matmul_i8(const float *x, int64_t m, int64_t k, const int8_t *w,
                           const float *scale, int64_t n, int64_t group, float *out, int generic)
{
    if (m == 0 || n == 0) {
        return OFFQ_OK;
    }
    const int64_t ng = k / group;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * ng));
    offq_status st = xq == NULL || xs == NULL ? OFFQ_ERR_NOMEM : OFFQ_OK;
    if (st == OFFQ_OK) {
        st = offq_i8_quantize_x(x, m, k, group, xq, xs);
    }
    if (st == OFFQ_OK) {
        if (m <= OFFQ_I8_SMALL_M) {
            few_rows(xq, xs, m, k, w, scale, n, group, out, generic);
        } else {
            st = many_rows(xq, xs, m, k, w, scale, n, group, out);
        }
    }
    free(xq);
    free(xs);
    return st;
}
