/* hadamard.c: in-place fast Walsh-Hadamard transforms (see hadamard.h for the matrices).
 *
 * A row of length n = m * 2^k is transformed in two steps, because H_m (x) H_p = (H_m (x) I_p)
 * (I_m (x) H_p) with p = 2^k:
 *   1. the power-of-two transform of each of the m contiguous sub-rows of length p (butterflies),
 *   2. the mix: y[c, :] = sum_a H_m[a, c] z[a, :] over the sub-rows z (a small dense +-1 product;
 *      skipped when m = 1).
 * The 1/sqrt(n) normalisation is folded into one of the passes. Generic C is the reference; the
 * AVX2+FMA butterflies keep 3 stages inside each 8-float vector (permutes + sign FMAs) and do the
 * others as radix-8 passes over vectors held in registers, so a 4096-row makes 3 passes in L1.
 */
#include "hadamard.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "hadamard_tables.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OFFQ_HAVE_X86 1
#define OFFQ_AVX2 __attribute__((target("avx2,fma")))
#endif

/* Rows are spread over threads only when there is enough work to pay for the fork. */
#define PARALLEL_MIN_ELEMS ((int64_t)1 << 17)
/* The mix step (step 2) stages m * MIX_W values (AVX2) or a whole row (generic) per thread. */
#define MIX_W 16

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

int offq_hadamard_base(int64_t m, double *out)
{
    const offq_had_table *t = find_table(m);
    if (t == NULL) {
        return -1;
    }
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < m; j++) {
            out[i * m + j] = (double)table_sign(t, i, j);
        }
    }
    return 0;
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
    static void NAME(T *restrict x, int64_t n, int normalize, T scale)                            \
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

DEFINE_POW2_GENERIC(float, pow2_f32_generic)
DEFINE_POW2_GENERIC(double, pow2_f64_generic)

/* Step 2 on one row x = [m, p]: x[c, :] <- scale * sum_a ht[c * m + a] * x[a, :], with ht the
 * transposed H_m. Generic: accumulate into tmp (n values), axpy by axpy. */
#define DEFINE_MIX_GENERIC(T, NAME)                                                               \
    static void NAME(T *restrict x, int64_t m, int64_t p, const T *restrict ht, T scale,          \
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

DEFINE_MIX_GENERIC(float, mix_f32_generic)
DEFINE_MIX_GENERIC(double, mix_f64_generic)

#ifdef OFFQ_HAVE_X86
/* AVX2 mix: columns in chunks of 2 vectors staged in tmp (m x 2 vectors), 4 output sub-rows at a
 * time (m is a multiple of 4) so that 8 independent FMA chains share each staged load. */
#define DEFINE_MIX_AVX2(T, NAME, GENERIC, VEC, LANES, LOAD, STORE, SET1, FMA, ZERO, MUL)         \
    OFFQ_AVX2 static void NAME(T *restrict x, int64_t m, int64_t p, const T *restrict ht,        \
                               T scale, T *restrict tmp)                                          \
    {                                                                                             \
        if (p < 2 * LANES) {                                                                      \
            GENERIC(x, m, p, ht, scale, tmp);                                                     \
            return;                                                                               \
        }                                                                                         \
        const VEC vs = SET1(scale);                                                               \
        for (int64_t j0 = 0; j0 < p; j0 += 2 * LANES) {                                           \
            for (int64_t a = 0; a < m; a++) {                                                     \
                STORE(tmp + a * 2 * LANES, LOAD(x + a * p + j0));                                 \
                STORE(tmp + a * 2 * LANES + LANES, LOAD(x + a * p + j0 + LANES));                 \
            }                                                                                     \
            for (int64_t c = 0; c < m; c += 4) {                                                  \
                VEC y00 = ZERO(), y01 = ZERO(), y10 = ZERO(), y11 = ZERO();                       \
                VEC y20 = ZERO(), y21 = ZERO(), y30 = ZERO(), y31 = ZERO();                       \
                const T *h0 = ht + c * m, *h1 = h0 + m, *h2 = h1 + m, *h3 = h2 + m;               \
                for (int64_t a = 0; a < m; a++) {                                                 \
                    const VEC t0 = LOAD(tmp + a * 2 * LANES);                                     \
                    const VEC t1 = LOAD(tmp + a * 2 * LANES + LANES);                             \
                    const VEC s0 = SET1(h0[a]), s1 = SET1(h1[a]);                                 \
                    const VEC s2 = SET1(h2[a]), s3 = SET1(h3[a]);                                 \
                    y00 = FMA(s0, t0, y00);                                                       \
                    y01 = FMA(s0, t1, y01);                                                       \
                    y10 = FMA(s1, t0, y10);                                                       \
                    y11 = FMA(s1, t1, y11);                                                       \
                    y20 = FMA(s2, t0, y20);                                                       \
                    y21 = FMA(s2, t1, y21);                                                       \
                    y30 = FMA(s3, t0, y30);                                                       \
                    y31 = FMA(s3, t1, y31);                                                       \
                }                                                                                 \
                STORE(x + c * p + j0, MUL(y00, vs));                                               \
                STORE(x + c * p + j0 + LANES, MUL(y01, vs));                                       \
                STORE(x + (c + 1) * p + j0, MUL(y10, vs));                                         \
                STORE(x + (c + 1) * p + j0 + LANES, MUL(y11, vs));                                 \
                STORE(x + (c + 2) * p + j0, MUL(y20, vs));                                         \
                STORE(x + (c + 2) * p + j0 + LANES, MUL(y21, vs));                                 \
                STORE(x + (c + 3) * p + j0, MUL(y30, vs));                                         \
                STORE(x + (c + 3) * p + j0 + LANES, MUL(y31, vs));                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_MIX_AVX2(float, mix_f32_avx2, mix_f32_generic, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                _mm256_set1_ps, _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_mul_ps)
DEFINE_MIX_AVX2(double, mix_f64_avx2, mix_f64_generic, __m256d, 4, _mm256_loadu_pd,
                _mm256_storeu_pd, _mm256_set1_pd, _mm256_fmadd_pd, _mm256_setzero_pd, _mm256_mul_pd)

/* ---------------------------------------------------------------------------------------------
 * AVX2 + FMA butterflies.
 * ------------------------------------------------------------------------------------------- */
#define BFLY(ADD, SUB, a, b)                                                                      \
    do {                                                                                          \
        const __typeof__(a) t_ = (a);                                                             \
        (a) = ADD(t_, (b));                                                                       \
        (b) = SUB(t_, (b));                                                                       \
    } while (0)

/* Stages of stride 1, 2, 4 inside one 8-float vector: v * sign + swapped(v). */
OFFQ_AVX2 static inline __m256 inreg_f32(__m256 v, __m256 s1, __m256 s2, __m256 s4)
{
    v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
    v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
    v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
    return v;
}

/* Three stages of strides h, 2h, 4h (h a multiple of 8) over the whole row. */
OFFQ_AVX2 static void radix8_f32(float *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 8 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
            float *p = x + j;
            __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + h);
            __m256 a2 = _mm256_loadu_ps(p + 2 * h), a3 = _mm256_loadu_ps(p + 3 * h);
            __m256 a4 = _mm256_loadu_ps(p + 4 * h), a5 = _mm256_loadu_ps(p + 5 * h);
            __m256 a6 = _mm256_loadu_ps(p + 6 * h), a7 = _mm256_loadu_ps(p + 7 * h);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a6, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a5, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a3, a7);
            _mm256_storeu_ps(p, a0);
            _mm256_storeu_ps(p + h, a1);
            _mm256_storeu_ps(p + 2 * h, a2);
            _mm256_storeu_ps(p + 3 * h, a3);
            _mm256_storeu_ps(p + 4 * h, a4);
            _mm256_storeu_ps(p + 5 * h, a5);
            _mm256_storeu_ps(p + 6 * h, a6);
            _mm256_storeu_ps(p + 7 * h, a7);
        }
    }
}

/* One or two stages (strides h, and 2h when two) over the whole row. */
OFFQ_AVX2 static void radix4or2_f32(float *restrict x, int64_t n, int64_t h, int two)
{
    for (int64_t i = 0; i < n; i += (two ? 4 : 2) * h) {
        for (int64_t j = i; j < i + h; j += 8) {
            float *p = x + j;
            __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + h);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            if (two) {
                __m256 a2 = _mm256_loadu_ps(p + 2 * h), a3 = _mm256_loadu_ps(p + 3 * h);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
                BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
                _mm256_storeu_ps(p + 2 * h, a2);
                _mm256_storeu_ps(p + 3 * h, a3);
            }
            _mm256_storeu_ps(p, a0);
            _mm256_storeu_ps(p + h, a1);
        }
    }
}

OFFQ_AVX2 static void pow2_f32_avx2(float *restrict x, int64_t n, int normalize, float scale)
{
    if (n < 8) {
        pow2_f32_generic(x, n, normalize, scale);
        return;
    }
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    const __m256 vs = _mm256_set1_ps(normalize ? scale : 1.0f);
    int64_t h; /* first stride not yet done */
    if (n >= 64) {
        /* Pass A: 64 floats at a time, strides 1 .. 32 (6 stages) in registers. */
        for (int64_t i = 0; i < n; i += 64) {
            float *p = x + i;
            __m256 a0 = inreg_f32(_mm256_loadu_ps(p), s1, s2, s4);
            __m256 a1 = inreg_f32(_mm256_loadu_ps(p + 8), s1, s2, s4);
            __m256 a2 = inreg_f32(_mm256_loadu_ps(p + 16), s1, s2, s4);
            __m256 a3 = inreg_f32(_mm256_loadu_ps(p + 24), s1, s2, s4);
            __m256 a4 = inreg_f32(_mm256_loadu_ps(p + 32), s1, s2, s4);
            __m256 a5 = inreg_f32(_mm256_loadu_ps(p + 40), s1, s2, s4);
            __m256 a6 = inreg_f32(_mm256_loadu_ps(p + 48), s1, s2, s4);
            __m256 a7 = inreg_f32(_mm256_loadu_ps(p + 56), s1, s2, s4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a1);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a6, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a2);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a3);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a4, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a5, a7);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a0, a4);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a1, a5);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a2, a6);
            BFLY(_mm256_add_ps, _mm256_sub_ps, a3, a7);
            _mm256_storeu_ps(p, _mm256_mul_ps(a0, vs));
            _mm256_storeu_ps(p + 8, _mm256_mul_ps(a1, vs));
            _mm256_storeu_ps(p + 16, _mm256_mul_ps(a2, vs));
            _mm256_storeu_ps(p + 24, _mm256_mul_ps(a3, vs));
            _mm256_storeu_ps(p + 32, _mm256_mul_ps(a4, vs));
            _mm256_storeu_ps(p + 40, _mm256_mul_ps(a5, vs));
            _mm256_storeu_ps(p + 48, _mm256_mul_ps(a6, vs));
            _mm256_storeu_ps(p + 56, _mm256_mul_ps(a7, vs));
        }
        h = 64;
    } else {
        /* n = 8, 16, 32: in-register stages, then the remaining strides 8, 16 via radix-2/4. */
        for (int64_t i = 0; i < n; i += 8) {
            _mm256_storeu_ps(x + i, _mm256_mul_ps(inreg_f32(_mm256_loadu_ps(x + i), s1, s2, s4), vs));
        }
        h = 8;
    }
    while (h < n) {
        if (8 * h <= n) {
            radix8_f32(x, n, h);
            h *= 8;
        } else if (4 * h <= n) {
            radix4or2_f32(x, n, h, 1);
            h *= 4;
        } else {
            radix4or2_f32(x, n, h, 0);
            h *= 2;
        }
    }
}

/* float64: 4 lanes; strides 1, 2 inside a vector. */
OFFQ_AVX2 static inline __m256d inreg_f64(__m256d v, __m256d s1, __m256d s2)
{
    v = _mm256_fmadd_pd(v, s1, _mm256_permute_pd(v, 0x5));
    v = _mm256_fmadd_pd(v, s2, _mm256_permute2f128_pd(v, v, 0x01));
    return v;
}

OFFQ_AVX2 static void radix8_f64(double *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 8 * h) {
        for (int64_t j = i; j < i + h; j += 4) {
            double *p = x + j;
            __m256d a0 = _mm256_loadu_pd(p), a1 = _mm256_loadu_pd(p + h);
            __m256d a2 = _mm256_loadu_pd(p + 2 * h), a3 = _mm256_loadu_pd(p + 3 * h);
            __m256d a4 = _mm256_loadu_pd(p + 4 * h), a5 = _mm256_loadu_pd(p + 5 * h);
            __m256d a6 = _mm256_loadu_pd(p + 6 * h), a7 = _mm256_loadu_pd(p + 7 * h);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a1);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a2, a3);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a4, a5);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a6, a7);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a2);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a1, a3);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a4, a6);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a5, a7);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a4);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a1, a5);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a2, a6);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a3, a7);
            _mm256_storeu_pd(p, a0);
            _mm256_storeu_pd(p + h, a1);
            _mm256_storeu_pd(p + 2 * h, a2);
            _mm256_storeu_pd(p + 3 * h, a3);
            _mm256_storeu_pd(p + 4 * h, a4);
            _mm256_storeu_pd(p + 5 * h, a5);
            _mm256_storeu_pd(p + 6 * h, a6);
            _mm256_storeu_pd(p + 7 * h, a7);
        }
    }
}

OFFQ_AVX2 static void radix2_f64(double *restrict x, int64_t n, int64_t h)
{
    for (int64_t i = 0; i < n; i += 2 * h) {
        for (int64_t j = i; j < i + h; j += 4) {
            __m256d a0 = _mm256_loadu_pd(x + j), a1 = _mm256_loadu_pd(x + j + h);
            BFLY(_mm256_add_pd, _mm256_sub_pd, a0, a1);
            _mm256_storeu_pd(x + j, a0);
            _mm256_storeu_pd(x + j + h, a1);
        }
    }
}

OFFQ_AVX2 static void pow2_f64_avx2(double *restrict x, int64_t n, int normalize, double scale)
{
    if (n < 4) {
        pow2_f64_generic(x, n, normalize, scale);
        return;
    }
    const __m256d s1 = _mm256_setr_pd(1, -1, 1, -1);
    const __m256d s2 = _mm256_setr_pd(1, 1, -1, -1);
    const __m256d vs = _mm256_set1_pd(normalize ? scale : 1.0);
    for (int64_t i = 0; i < n; i += 4) {
        _mm256_storeu_pd(x + i, _mm256_mul_pd(inreg_f64(_mm256_loadu_pd(x + i), s1, s2), vs));
    }
    int64_t h = 4;
    while (h < n) {
        if (8 * h <= n) {
            radix8_f64(x, n, h);
            h *= 8;
        } else {
            radix2_f64(x, n, h);
            h *= 2;
        }
    }
}
#endif /* OFFQ_HAVE_X86 */

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

#define DEFINE_FWHT_ROWS(T, NAME, POW2_GENERIC, POW2_SIMD, MIX_GENERIC, MIX_SIMD, UNIT_TABLE)      \
    int NAME(T *x, int64_t rows, int64_t n, int normalize)                                        \
    {                                                                                             \
        const int64_t m = offq_hadamard_factor(n);                                                \
        if (m == 0) {                                                                             \
            return -1;                                                                            \
        }                                                                                         \
        const int64_t p = n / m;                                                                  \
        void (*pow2)(T *restrict, int64_t, int, T) = POW2_GENERIC;                                \
        void (*mix)(T *restrict, int64_t, int64_t, const T *restrict, T, T *restrict) = MIX_GENERIC; \
        if (offq_cpu_has_avx2()) {                                                                \
            pow2 = POW2_SIMD;                                                                     \
            mix = MIX_SIMD;                                                                       \
        }                                                                                         \
        const T scale = normalize ? (T)(1.0 / sqrt((double)n)) : (T)1;                            \
        const T *ht = NULL;                                                                       \
        if (m > 1 && (ht = UNIT_TABLE(find_table(m))) == NULL) {                                  \
            return -1;                                                                            \
        }                                                                                         \
        int failed = 0;                                                                           \
        if (rows == 1 || rows * n < PARALLEL_MIN_ELEMS) { /* small: no thread team at all */      \
            T *tmp = NULL;                                                                        \
            if (m > 1 && (tmp = malloc((size_t)(n > m * MIX_W ? n : m * MIX_W) * sizeof(T))) == NULL) { \
                return -1;                                                                        \
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
                    tmp = malloc((size_t)(n > m * MIX_W ? n : m * MIX_W) * sizeof(T));            \
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
        return failed ? -1 : 0;                                                                   \
    }

#ifdef OFFQ_HAVE_X86
DEFINE_FWHT_ROWS(float, offq_fwht_f32, pow2_f32_generic, pow2_f32_avx2, mix_f32_generic, mix_f32_avx2,
                 unit_table_f32)
DEFINE_FWHT_ROWS(double, offq_fwht_f64, pow2_f64_generic, pow2_f64_avx2, mix_f64_generic,
                 mix_f64_avx2, unit_table_f64)
#else
DEFINE_FWHT_ROWS(float, offq_fwht_f32, pow2_f32_generic, pow2_f32_generic, mix_f32_generic,
                 mix_f32_generic, unit_table_f32)
DEFINE_FWHT_ROWS(double, offq_fwht_f64, pow2_f64_generic, pow2_f64_generic, mix_f64_generic,
                 mix_f64_generic, unit_table_f64)
#endif
