/* matmul_wq.c: out = x @ w_hat^T for float32 activations and packed 2-, 3-, 4- or 8-bit weights
 * (format: offq.h), dequantized on the fly: what a weight-only model (float activations) runs.
 *
 * Few rows (decode, m <= OFFQ_WQ_SMALL_M): OpenMP over blocks of output columns; each thread reads
 * the packed weights of its columns once and, per group, forms the float32 dot product of the
 * inputs and the integer codes, then
 *     out[r][n] = sum_g scale_g * dot_g  -  sum_g (scale_g * zero_g) * xsum[r][g]
 * (xsum: the group's input sum, computed once per call in float64 and rounded). This equals
 * x @ w_hat^T up to float32 summation order (the zero-point term is an exact rewrite of
 * sum_i x_i * scale * (q_i - zero)). Many rows (prefill, perplexity): panels of weight rows are
 * dequantized to float32 (bit for bit the values scale * (q - zero) of the reference) and
 * multiplied by OpenBLAS sgemm (threading: panels()).
 *
 * The variant (generic here, AVX2 in x86/matmul_wq_avx2.c) comes from offq_dispatch.wq; a
 * variant's prep step may permute (and scale by powers of two) the columns of x to match the
 * order in which its row kernel decodes the codes, see kernels.h.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include <cblas.h>

#include "kernels.h"

#define WQ_BLOCK_N 16                    /* output columns per task of the small-M path */
#define WQ_PAR_MIN ((int64_t)1 << 21) /* fewer multiply-adds than this: one thread (below ~2M,
                                       * waking a sleeping OpenMP team costs more than it saves:
                                       * 576 x 3072 W4 67 us on one thread, 76 on two) */
#define WQ_PANEL_FLOATS ((int64_t)1 << 20) /* about 4 MiB of dequantized weights per panel */

int64_t offq_wq_row_bytes(int64_t k, int bits) { return (k * bits + 7) / 8; }

offq_status offq_pack_wq(const uint8_t *codes, int64_t rows, int64_t k, int bits, uint8_t *packed)
{
    const int64_t rb = offq_wq_row_bytes(k, bits);
    const uint32_t lim = 1u << bits;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * k;
        uint8_t *p = packed + r * rb;
        memset(p, 0, (size_t)rb);
        for (int64_t i = 0; i < k; i++) {
            const uint32_t q = c[i];
            if (q >= lim) {
                return OFFQ_ERR_CODE;
            }
            const int64_t bit = i * bits, byte = bit >> 3;
            const uint32_t v = q << (bit & 7);
            p[byte] |= (uint8_t)(v & 0xffu);
            if (v > 0xffu) { /* a 3-bit code crossing into the next byte */
                p[byte + 1] |= (uint8_t)(v >> 8);
            }
        }
    }
    return OFFQ_OK;
}

void offq_unpack_wq(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *codes)
{
    const int64_t rb = offq_wq_row_bytes(k, bits);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < k; i++) {
            codes[r * k + i] = (uint8_t)offq_wq_code(packed + r * rb, rb, i, bits);
        }
    }
}

void offq_wq_rows_generic(const offq_wq_operand *w, const float *xp, const float *xsum,
                          const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                          float *out)
{
    (void)unscale; /* never set: the generic variant has no prep */
    const int64_t k = w->k, group = w->group, ng = k / group;
    const int bits = w->bits;
    const int64_t rb = offq_wq_row_bytes(k, bits);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->packed + n * rb;
        const float *sc = w->scale + n * ng, *zr = w->zero + n * ng;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = xp + r * k;
            float acc = 0.0f, corr = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                float d[8] = {0};
                for (int64_t i = g * group; i < (g + 1) * group; i++) {
                    d[i & 7] += xr[i] * (float)offq_wq_code(row, rb, i, bits);
                }
                const float dot = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
                acc += sc[g] * dot;
                corr += (sc[g] * zr[g]) * xsum[r * ng + g];
            }
            out[r * ldo + n] = acc - corr;
        }
    }
}

void offq_wq_dequant_generic(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf)
{
    const int64_t k = w->k, group = w->group, ng = k / group;
    const int64_t rb = offq_wq_row_bytes(k, w->bits);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w->packed + n * rb;
        float *o = buf + (n - n0) * k;
        for (int64_t g = 0; g < ng; g++) {
            const float s = w->scale[n * ng + g], z = w->zero[n * ng + g];
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                o[i] = s * ((float)offq_wq_code(row, rb, i, w->bits) - z);
            }
        }
    }
}

/* The subnormal decode's row factors (kernels.h): rowmul[r] = 2^(149 - E_r), unscale[r] = 2^E_r
 * with E_r = 22 + max(e, 0), 2^e > max_i |x[r][i]|. Then xp = x * 2^-t * rowmul stays below 2^127,
 * each product xp * (q * 2^(t - 149)) is exactly x * q * 2^-E_r, and every sum the row kernel
 * forms is the conversion decode's sum times 2^-E_r, rounded the same, as long as no term falls
 * below 2^-126 (products x * q under 2^(E_r - 126), at least 2^-104 and at most 2^-44 of the row's
 * largest |x|: beyond float32's precision, but not bit-identical; likewise, at 8 bits, entries
 * |x| < 2^-110, whose prepared input x * 2^-16 for field 2 is subnormal on the conversion path
 * only). Returns 0 (convert instead) when a row's max |x| is not finite, at least 2^100, or
 * below 2^-40. */
static int subnormal_factors(const float *x, int64_t m, int64_t k, float *rowmul, float *unscale)
{
    for (int64_t r = 0; r < m; r++) {
        float mx = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            const float a = fabsf(x[r * k + i]);
            if (a != a) {
                return 0;
            }
            mx = a > mx ? a : mx;
        }
        if (!(mx < 0x1p100f) || mx < 0x1p-40f) {
            return 0;
        }
        int e;
        frexpf(mx, &e); /* mx < 2^e */
        const int E = 22 + (e > 0 ? e : 0);
        rowmul[r] = ldexpf(1.0f, 149 - E);
        unscale[r] = ldexpf(1.0f, E);
    }
    return 1;
}

int64_t offq_wq_input_floats(int64_t m, int64_t k, int64_t group)
{
    return m * (k / group) + 2 * m;
}

const float *offq_wq_prepare(const offq_wq_ops *ops, const float *x, int64_t m, int64_t k,
                             int64_t group, int bits, float *xsum, float *xp)
{
    const int64_t ng = k / group;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < ng; g++) {
            double s = 0.0;
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                s += (double)x[r * k + i];
            }
            xsum[r * ng + g] = (float)s;
        }
    }
    float *rowmul = xsum + m * ng, *unscale = rowmul + m;
    if (ops->prep == NULL || !offq_dispatch.wq_subnormal ||
        !subnormal_factors(x, m, k, rowmul, unscale)) {
        rowmul = unscale = NULL;
    }
    if (ops->prep != NULL) {
        ops->prep(x, m, k, bits, 1, rowmul, xp);
    }
    return unscale;
}

/* Whether the scales and zero points of weight rows n0..n1 are all finite (a branch-free loop
 * the compiler vectorises). */
static int rows_finite(const offq_wq_operand *w, int64_t n0, int64_t n1)
{
    const int64_t ng = w->k / w->group, len = (n1 - n0) * ng;
    const float *s = w->scale + n0 * ng, *z = w->zero + n0 * ng;
    int bad = 0;
    for (int64_t i = 0; i < len; i++) {
        bad |= !isfinite(s[i]) | !isfinite(z[i]);
    }
    return !bad;
}

/* Output columns b * WQ_BLOCK_N .. of the small-M path (the rows entry under the subnormal
 * decode's MXCSR when it runs), after checking their scales and zero points (which the block is
 * about to read anyway: a decode product's 4096 x 4096 W4 g128 weight carries 1 MiB of them, and
 * scanning them in the binding first was 15% of the product). 0 when one is not finite. */
static int row_block(const offq_wq_ops *ops, const offq_wq_operand *w, const float *xin,
                     const float *xsum, const float *unscale, int64_t m, int64_t b, float *out)
{
    const int64_t n = w->n, n0 = b * WQ_BLOCK_N, n1 = n0 + WQ_BLOCK_N < n ? n0 + WQ_BLOCK_N : n;
    if (!rows_finite(w, n0, n1)) {
        return 0;
    }
    const unsigned csr = unscale != NULL ? offq_daz_clear() : 0; /* 0: nothing to restore */
    ops->rows(w, xin, xsum, unscale, m, n0, n1, n, out);
    offq_csr_restore(csr);
    return 1;
}

static offq_status small_m(const float *x, int64_t m, const offq_wq_operand *w, float *out,
                           const offq_wq_ops *ops)
{
    const int64_t n = w->n, k = w->k;
    float *xsum = malloc(sizeof(float) * (size_t)offq_wq_input_floats(m, k, w->group));
    /* 64-byte aligned: the row kernels' vector loads of xp then never straddle a cache line
     * (16-byte aligned ones cost the one-row product 15-25%) */
    float *xp = ops->prep != NULL ? offq_alloc64(sizeof(float) * (size_t)(m * k)) : NULL;
    if (xsum == NULL || (ops->prep != NULL && xp == NULL)) {
        free(xsum);
        free(xp);
        return OFFQ_ERR_NOMEM;
    }
    const float *unscale = offq_wq_prepare(ops, x, m, k, w->group, w->bits, xsum, xp);
    const float *xin = xp != NULL ? xp : x;
    const int64_t blocks = (n + WQ_BLOCK_N - 1) / WQ_BLOCK_N;
    const int parallel = blocks > 1 && m * n * k >= WQ_PAR_MIN;
    int bad = 0;
    if (m == 1) {
        /* decode: one contiguous run of rows per thread, so that each thread's prefetches (some
         * rows ahead of its loads) land in rows it reads itself; with tasks handed out
         * dynamically, the first rows of every task arrived unprefetched (a scratch copy of the
         * AVX-512 loop, 4096 x 4096 W4 g128 streamed from DRAM, Zen 4, 2 threads: 344 -> 280 us,
         * medians of 8 rounds) */
#pragma omp parallel for schedule(static) if (parallel) reduction(| : bad)
        for (int64_t b = 0; b < blocks; b++) {
            bad |= !row_block(ops, w, xin, xsum, unscale, m, b, out);
        }
    } else {
#pragma omp parallel for schedule(dynamic, 4) if (parallel) reduction(| : bad)
        for (int64_t b = 0; b < blocks; b++) {
            bad |= !row_block(ops, w, xin, xsum, unscale, m, b, out);
        }
    }
    free(xsum);
    free(xp);
    return bad ? OFFQ_ERR_NONFINITE : OFFQ_OK;
}

/* Many rows: panels of at most WQ_PANEL_FLOATS dequantized weights, each multiplied by sgemm.
 * With OpenBLAS multi-threaded (a direct call), the panels run one after another: the
 * dequantization split over the OpenMP team, sgemm with OpenBLAS's threads. With OpenBLAS held to
 * one thread (inside offq's model forward, which parallelises the rest itself: offq/model/
 * parallel.py) that would leave sgemm, nearly all of the work, on one core, so each thread of the
 * team takes whole panels (at most a 1/team share of N each), dequantizes them into its own buffer
 * and runs sgemm on them (single-threaded, concurrent calls: OpenBLAS is thread-safe). */
static offq_status panels(const float *x, int64_t m, const offq_wq_operand *w, float *out,
                          const offq_wq_ops *ops)
{
    const int64_t n = w->n, k = w->k;
    if (!rows_finite(w, 0, n)) { /* next to the sgemm, one pass over them is nothing */
        return OFFQ_ERR_NONFINITE;
    }
    const int team = omp_get_max_threads();
    const int own = team > 1 && scipy_openblas_get_num_threads() == 1 && n > 16;
    const int nbuf = own ? team : 1;
    int64_t p = (WQ_PANEL_FLOATS / k) / 16 * 16;
    p = p < 16 ? 16 : p;
    if (own) {
        const int64_t share = ((n + team - 1) / team + 15) / 16 * 16;
        p = p > share ? share : p;
    }
    p = p > n ? n : p;
    float *buf = malloc(sizeof(float) * (size_t)(p * k) * (size_t)nbuf);
    float *xp = ops->prep != NULL ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
    if (buf == NULL || (ops->prep != NULL && xp == NULL)) {
        free(buf);
        free(xp);
        return OFFQ_ERR_NOMEM;
    }
    if (xp != NULL) {
        ops->prep(x, m, k, w->bits, 0, NULL, xp);
    }
    const float *xin = xp != NULL ? xp : x;
    const int64_t count = (n + p - 1) / p;
    if (own) {
#pragma omp parallel num_threads(team)
        {
            float *mine = buf + (int64_t)omp_get_thread_num() * p * k;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < count; i++) {
                const int64_t n0 = i * p, nn = n0 + p < n ? p : n - n0;
                ops->dequant(w, n0, n0 + nn, mine);
                scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)nn,
                                  (int)k, 1.0f, xin, (int)k, mine, (int)k, 0.0f, out + n0,
                                  (int)n);
            }
        }
    } else {
        for (int64_t i = 0; i < count; i++) {
            const int64_t n0 = i * p, nn = n0 + p < n ? p : n - n0;
#pragma omp parallel for schedule(static) if (nn * k >= ((int64_t)1 << 15))
            for (int64_t j = 0; j < nn; j++) {
                ops->dequant(w, n0 + j, n0 + j + 1, buf + j * k);
            }
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)nn, (int)k,
                              1.0f, xin, (int)k, buf, (int)k, 0.0f, out + n0, (int)n);
        }
    }
    free(buf);
    free(xp);
    return OFFQ_OK;
}

const offq_wq_ops *offq_wq_select(int64_t group, offq_kernel kernel)
{
    const offq_kernel kv = kernel == OFFQ_KERNEL_AUTO ? offq_dispatch.wq_best : kernel;
    if (kv < 0 || kv >= OFFQ_KERNEL_COUNT || offq_dispatch.wq[kv] == NULL) {
        return NULL;
    }
    const offq_wq_ops *ops = offq_dispatch.wq[kv];
    if (group % ops->align != 0) {
        /* a group the variant cannot chunk: auto takes the widest variant that can (AVX-512's 64
         * codes, then AVX2's 32), a variant asked for by name the generic one */
        ops = offq_dispatch.wq[OFFQ_KERNEL_GENERIC];
        for (int v = kv; kernel == OFFQ_KERNEL_AUTO && v > OFFQ_KERNEL_GENERIC; v--) {
            const offq_wq_ops *o = offq_dispatch.wq[v];
            if (o != NULL && group % o->align == 0) {
                ops = o;
                break;
            }
        }
    }
    return ops;
}

offq_status offq_matmul_wq(const float *x, int64_t m, const offq_wq_operand *w, float *out,
                           offq_kernel kernel)
{
    const offq_wq_ops *ops = offq_wq_select(w->group, kernel);
    if (ops == NULL) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    if (m == 0 || w->n == 0) {
        return OFFQ_OK;
    }
    return m <= OFFQ_WQ_SMALL_M ? small_m(x, m, w, out, ops) : panels(x, m, w, out, ops);
}
