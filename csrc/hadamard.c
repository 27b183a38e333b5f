/* hadamard.c: in-place fast Walsh-Hadamard transforms (matrices: offq.h), generic reference
 * kernels and the row driver.
 *
 * A row of length n = m * 2^k is transformed in two steps, because H_m (x) H_p = (H_m (x) I_p)
 * (I_m (x) H_p) with p = 2^k:
 *   1. the power-of-two transform of each of the m contiguous sub-rows of length p (butterflies),
 *   2. the mix: y[c, :] = sum_a H_m[a, c] z[a, :] over the sub-rows z (a small dense +-1 product;
 *      skipped when m = 1).
 * The 1/sqrt(n) normalisation is folded into one of the passes. The SIMD variants are in
 * x86/hadamard_avx2.c; the driver takes them from offq_dispatch.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "hadamard_tables.h"
#include "kernels.h"

/* Rows are spread over threads only when there is enough work to pay for the fork. */
#define PARALLEL_MIN_ELEMS ((int64_t)1 << 17)

static int is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

static const offq_had_table *find_table(int64_t m)
{
    for (int i = 0; i < OFFQ_HAD_NUM_TABLES; i++) {
        if (offq_had_tables[i].order == m) {
            return &offq_had_tables[i];
        }
    }
    return NULL;
}

int64_t offq_hadamard_factor(int64_t n)
{
    if (n < 1) {
        return 0;
    }
    if (is_pow2(n)) {
        return 1;
    }
    for (int i = 0; i < OFFQ_HAD_NUM_TABLES; i++) { /* tables are sorted by order */
        const int64_t m = offq_had_tables[i].order;
        if (n % m == 0 && is_pow2(n / m)) {
            return m;
        }
    }
    return 0;
}

int64_t offq_hadamard_pow2_block(int64_t n)
{
    if (n < 1) {
        return 1;
    }
    return n & -n;
}

int offq_hadamard_num_orders(void) { return OFFQ_HAD_NUM_TABLES; }

int64_t offq_hadamard_order(int i)
{
    return (i >= 0 && i < OFFQ_HAD_NUM_TABLES) ? offq_had_tables[i].order : 0;
}

/* +1 or -1: entry (i, j) of the tabulated H_m. */
static int table_sign(const offq_had_table *t, int64_t i, int64_t j)
{
    const int64_t stride = (t->order + 7) / 8;
    return ((t->bits[i * stride + j / 8] >> (j % 8)) & 1) ? -1 : 1;
}

offq_status offq_hadamard_base(int64_t m, double *out)
{
    const offq_had_table *t = find_table(m);
    if (t == NULL) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < m; j++) {
            out[i * m + j] = (double)table_sign(t, i, j);
        }
    }
    return OFFQ_OK;
}

/* The transposed +-1 tables, ht[c * m + a] = H_m[a][c], expanded once per order and element type
 * on first use (lock-free: a racing duplicate is freed) and kept for the life of the process. */
#define DEFINE_UNIT_TABLE(T, NAME)                                                                \
    static _Atomic(T *) NAME##_cache[OFFQ_HAD_NUM_TABLES];                                       \
    static const T *NAME(const offq_had_table *t)                                                 \
    {                                                                                             \
        _Atomic(T *) *slot = &NAME##_cache[t - offq_had_tables];                                  \
        T *ht = atomic_load_explicit(slot, memory_order_acquire);                                 \
        if (ht != NULL) {                                                                         \
            return ht;                                                                            \
        }                                                                                         \
        const int64_t m = t->order;                                                               \
        ht = malloc((size_t)(m * m) * sizeof(T));                                                 \
        if (ht == NULL) {                                                                         \
            return NULL;                                                                          \
        }                                                                                         \
        for (int64_t c = 0; c < m; c++) {                                                         \
            for (int64_t a = 0; a < m; a++) {                                                     \
                ht[c * m + a] = (T)table_sign(t, a, c);                                           \
            }                                                                                     \
        }                                                                                         \
        T *expected = NULL;                                                                       \
        if (!atomic_compare_exchange_strong_explicit(slot, &expected, ht, memory_order_acq_rel,   \
                                                     memory_order_acquire)) {                     \
            free(ht);                                                                             \
            return expected;                                                                      \
        }                                                                                         \
        return ht;                                                                                \
    }

DEFINE_UNIT_TABLE(float, unit_table_f32)
DEFINE_UNIT_TABLE(double, unit_table_f64)

/* ---------------------------------------------------------------------------------------------
 * Generic C (the reference): radix-2 butterflies, stage by stage.
 * The kernels and the mix are written once as macros over the element type T, because float32 and
 * float64 (and the AVX2 clone of the mix) share the exact same arithmetic.
 * ------------------------------------------------------------------------------------------- */
#define DEFINE_POW2_GENERIC(T, NAME)                                                              \
    void NAME(T *restrict x, int64_t n, int normalize, T scale)                            \
    {                                                                                             \
        for (int64_t h = 1; h < n; h *= 2) {                                                      \
            for (int64_t i = 0; i < n; i += 2 * h) {                                              \
                for (int64_t j = i; j < i + h; j++) {                                             \
                    const T a = x[j];                                                             \
                    const T b = x[j + h];                                                         \
                    x[j] = a + b;                                                                 \
                    x[j + h] = a - b;                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        if (normalize) {                                                                          \
            for (int64_t i = 0; i < n; i++) {                                                     \
                x[i] *= scale;                                                                    \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_POW2_GENERIC(float, offq_pow2_f32_generic)
DEFINE_POW2_GENERIC(double, offq_pow2_f64_generic)

/* Step 2 on one row x = [m, p]: x[c, :] <- scale * sum_a ht[c * m + a] * x[a, :], with ht the
 * transposed H_m. Generic: accumulate into tmp (n values), axpy by axpy. */
#define DEFINE_MIX_GENERIC(T, NAME)                                                               \
    void NAME(T *restrict x, int64_t m, int64_t p, const T *restrict ht, T scale,          \
                     T *restrict tmp)                                                             \
    {                                                                                             \
        memset(tmp, 0, (size_t)(m * p) * sizeof(T));                                              \
        for (int64_t c = 0; c < m; c++) {                                                         \
            T *restrict y = tmp + c * p;                                                          \
            for (int64_t a = 0; a < m; a++) {                                                     \
                const T s = ht[c * m + a];                                                        \
                const T *restrict xa = x + a * p;                                                 \
                for (int64_t j = 0; j < p; j++) {                                                 \
                    y[j] += s * xa[j];                                                            \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t i = 0; i < m * p; i++) {                                                     \
            x[i] = tmp[i] * scale;                                                                \
        }                                                                                         \
    }

DEFINE_MIX_GENERIC(float, offq_mix_f32_generic)
DEFINE_MIX_GENERIC(double, offq_mix_f64_generic)


/* ---------------------------------------------------------------------------------------------
 * Row driver: dispatch once, then rows in parallel.
 * ------------------------------------------------------------------------------------------- */
/* One row r of x: the sub-row butterflies, then the mix (uses pow2, mix, ht, tmp of the caller). */
#define ROW_BODY(T)                                                                               \
    do {                                                                                          \
        T *row = x + r * n;                                                                       \
        if (m == 1) {                                                                             \
            pow2(row, n, normalize, scale);                                                       \
        } else {                                                                                  \
            for (int64_t a = 0; a < m; a++) {                                                     \
                pow2(row + a * p, p, 0, (T)1);                                                    \
            }                                                                                     \
            mix(row, m, p, ht, scale, tmp);                                                       \
        }                                                                                         \
    } while (0)

#define DEFINE_FWHT_ROWS(T, NAME, POW2, MIX, UNIT_TABLE)                                          \
    offq_status NAME(T *x, int64_t rows, int64_t n, int normalize)                                \
    {                                                                                             \
        const int64_t m = offq_hadamard_factor(n);                                                \
        if (m == 0) {                                                                             \
            return OFFQ_ERR_UNSUPPORTED;                                                          \
        }                                                                                         \
        const int64_t p = n / m;                                                                  \
        const offq_##POW2##_fn pow2 = offq_dispatch.POW2;                                         \
        const offq_##MIX##_fn mix = offq_dispatch.MIX;                                            \
        const T scale = normalize ? (T)(1.0 / sqrt((double)n)) : (T)1;                            \
        const T *ht = NULL;                                                                       \
        if (m > 1 && (ht = UNIT_TABLE(find_table(m))) == NULL) {                                  \
            return OFFQ_ERR_NOMEM;                                                                \
        }                                                                                         \
        const size_t tmp_bytes = (size_t)(n > m * OFFQ_MIX_W ? n : m * OFFQ_MIX_W) * sizeof(T);  \
        int failed = 0;                                                                           \
        if (rows == 1 || rows * n < PARALLEL_MIN_ELEMS) { /* small: no thread team at all */      \
            T *tmp = NULL;                                                                        \
            if (m > 1 && (tmp = malloc(tmp_bytes)) == NULL) {                                     \
                return OFFQ_ERR_NOMEM;                                                            \
            }                                                                                     \
            for (int64_t r = 0; r < rows; r++) {                                                  \
                ROW_BODY(T);                                                                      \
            }                                                                                     \
            free(tmp);                                                                            \
        } else {                                                                                  \
            _Pragma("omp parallel reduction(| : failed)")                                         \
            {                                                                                     \
                T *tmp = NULL;                                                                    \
                if (m > 1) {                                                                      \
                    tmp = malloc(tmp_bytes);                                                      \
                    failed |= (tmp == NULL);                                                      \
                }                                                                                 \
                _Pragma("omp for schedule(static)")                                               \
                for (int64_t r = 0; r < rows; r++) {                                              \
                    if (m == 1 || tmp != NULL) {                                                  \
                        ROW_BODY(T);                                                              \
                    }                                                                             \
                }                                                                                 \
                free(tmp);                                                                        \
            }                                                                                     \
        }                                                                                         \
        return failed ? OFFQ_ERR_NOMEM : OFFQ_OK;                                                 \
    }

DEFINE_FWHT_ROWS(float, offq_fwht_f32, pow2_f32, mix_f32, unit_table_f32)
DEFINE_FWHT_ROWS(double, offq_fwht_f64, pow2_f64, mix_f64, unit_table_f64)

/* ---------------------------------------------------------------------------------------------
 * One normalised float32 row at a time, for callers that run inside their own thread team (the
 * decoder): exactly the arithmetic of offq_fwht_f32(x, 1, n, 1).
 * ------------------------------------------------------------------------------------------- */
offq_status offq_fwht_row_plan_f32(int64_t n, offq_fwht_row_plan *pl)
{
    pl->n = n;
    pl->m = offq_hadamard_factor(n);
    if (pl->m == 0) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    pl->p = n / pl->m;
    pl->scale = (float)(1.0 / sqrt((double)n));
    pl->ht = NULL;
    if (pl->m > 1 && (pl->ht = unit_table_f32(find_table(pl->m))) == NULL) {
        return OFFQ_ERR_NOMEM;
    }
    pl->tmp_len = n > pl->m * OFFQ_MIX_W ? n : pl->m * OFFQ_MIX_W;
    return OFFQ_OK;
}

void offq_fwht_row_f32(float *row, const offq_fwht_row_plan *pl, float *tmp)
{
    const offq_pow2_f32_fn pow2 = offq_dispatch.pow2_f32;
    if (pl->m == 1) {
        pow2(row, pl->n, 1, pl->scale);
        return;
    }
    for (int64_t a = 0; a < pl->m; a++) {
        pow2(row + a * pl->p, pl->p, 0, 1.0f);
    }
    offq_dispatch.mix_f32(row, pl->m, pl->p, pl->ht, pl->scale, tmp);
}
