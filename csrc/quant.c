/* quant.c: group-wise quantize / dequantize and code packing (format: see quant.h).
 *
 * Every formula is evaluated in float32 exactly as quant.h states it, so a NumPy reference written
 * with float32 arrays and np.rint reproduces the codes bit for bit. The per-row kernel is one
 * inline body compiled twice: the generic (baseline x86-64 / any CPU) version and an AVX2 version
 * for wider vectors; both compute identical results.
 */
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* Rows per parallel region below which OpenMP is not worth starting. */
#define OFFQ_QUANT_PAR_MIN_ELEMS ((int64_t)1 << 15)

int64_t offq_code_row_bytes(int64_t k, int bits) { return bits == 4 ? (k + 1) / 2 : k; }

/* Round half to even, equal to rintf() in the default rounding mode, written so that it
 * vectorises without SSE4.1: for |v| < 2^23, |v| + 2^23 lands in [2^23, 2^24) where the spacing of
 * floats is 1, so the addition itself rounds to the nearest integer (ties to even); larger |v| are
 * already integers. */
static inline float round_half_even(float v)
{
    const float two23 = 8388608.0f;
    float t = fabsf(v);
    float r = (t < two23) ? (t + two23) - two23 : t;
    return copysignf(r, v);
}

static inline int is_nonfinite(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x7f800000u) == 0x7f800000u;
}

/* Quantize one group g[0..n) to codes q[0..n) (one per byte). Returns an error code. */
static inline __attribute__((always_inline)) int quant_group_body(const float *restrict g,
                                                                  int64_t n, int bits,
                                                                  int symmetric, float clip,
                                                                  uint8_t *restrict q,
                                                                  float *scale_out,
                                                                  float *zero_out, int32_t *sum)
{
    const float maxq = (float)((1 << bits) - 1);
    int bad = 0;
    float scale, zero;
    if (symmetric) {
        float amax = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            float a = fabsf(g[i]);
            bad |= is_nonfinite(g[i]);
            amax = a > amax ? a : amax;
        }
        if (bad) {
            return OFFQ_ERR_NONFINITE;
        }
        scale = (clip * amax) / (float)((1 << (bits - 1)) - 1);
        if (scale == 0.0f) {
            scale = 1.0f;
        }
        zero = (float)(1 << (bits - 1));
    } else {
        float mn = g[0], mx = g[0];
        for (int64_t i = 0; i < n; i++) {
            float v = g[i];
            bad |= is_nonfinite(v);
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        if (bad) {
            return OFFQ_ERR_NONFINITE;
        }
        float lo = clip * mn, hi = clip * mx;
        scale = (hi - lo) / maxq;
        if (scale == 0.0f) {
            scale = hi != 0.0f ? fabsf(hi) : 1.0f;
        }
        if (is_nonfinite(scale)) {
            return OFFQ_ERR_OVERFLOW;
        }
        zero = round_half_even(-lo / scale) + 0.0f; /* + 0: no negative zero */
    }
    int32_t s = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = round_half_even(g[i] / scale) + zero;
        v = v < 0.0f ? 0.0f : v;
        v = v > maxq ? maxq : v;
        uint8_t c = (uint8_t)(int32_t)v;
        q[i] = c;
        s += c;
    }
    *scale_out = scale;
    *zero_out = zero;
    *sum = s;
    return OFFQ_OK;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* quant_group_body with explicit AVX2: same formulas, same float32 operations (vdivps is the
 * IEEE division, vroundps with round-to-nearest-even is rint), so the results are identical. */
__attribute__((target("avx2,fma"))) static int quant_group_avx2(const float *restrict g, int64_t n,
                                                                int bits, int symmetric,
                                                                float clip, uint8_t *restrict q,
                                                                float *scale_out, float *zero_out,
                                                                int32_t *sum)
{
    const float maxq = (float)((1 << bits) - 1);
    const int64_t n8 = n / 8 * 8;
    const __m256i expmask = _mm256_set1_epi32(0x7f800000);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i bad = _mm256_setzero_si256();
    int bads = 0;
    float scale, zero;
    if (symmetric) {
        __m256 vmax = _mm256_setzero_ps();
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v),
                                                                           expmask), expmask));
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
        }
        float buf[8];
        _mm256_storeu_ps(buf, vmax);
        float amax = 0.0f;
        for (int j = 0; j < 8; j++) {
            amax = buf[j] > amax ? buf[j] : amax;
        }
        for (int64_t i = n8; i < n; i++) {
            bads |= is_nonfinite(g[i]);
            const float a = fabsf(g[i]);
            amax = a > amax ? a : amax;
        }
        if (bads || !_mm256_testz_si256(bad, bad)) {
            return OFFQ_ERR_NONFINITE;
        }
        scale = (clip * amax) / (float)((1 << (bits - 1)) - 1);
        if (scale == 0.0f) {
            scale = 1.0f;
        }
        zero = (float)(1 << (bits - 1));
    } else {
        __m256 vmin = _mm256_set1_ps(g[0]), vmax = vmin;
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v),
                                                                           expmask), expmask));
            vmin = _mm256_min_ps(vmin, v);
            vmax = _mm256_max_ps(vmax, v);
        }
        float bmin[8], bmax[8];
        _mm256_storeu_ps(bmin, vmin);
        _mm256_storeu_ps(bmax, vmax);
        float mn = g[0], mx = g[0];
        for (int j = 0; j < 8; j++) {
            mn = bmin[j] < mn ? bmin[j] : mn;
            mx = bmax[j] > mx ? bmax[j] : mx;
        }
        for (int64_t i = n8; i < n; i++) {
            bads |= is_nonfinite(g[i]);
            mn = g[i] < mn ? g[i] : mn;
            mx = g[i] > mx ? g[i] : mx;
        }
        if (bads || !_mm256_testz_si256(bad, bad)) {
            return OFFQ_ERR_NONFINITE;
        }
        const float lo = clip * mn, hi = clip * mx;
        scale = (hi - lo) / maxq;
        if (scale == 0.0f) {
            scale = hi != 0.0f ? fabsf(hi) : 1.0f;
        }
        if (is_nonfinite(scale)) {
            return OFFQ_ERR_OVERFLOW;
        }
        zero = round_half_even(-lo / scale) + 0.0f;
    }
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero);
    const __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_set1_ps(maxq);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(g + i), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), vlo), vhi);
        const __m256i c = _mm256_cvttps_epi32(v);
        acc = _mm256_add_epi32(acc, c);
        const __m128i c16 =
            _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packus_epi16(c16, c16));
    }
    int32_t buf[8];
    _mm256_storeu_si256((__m256i *)buf, acc);
    int32_t s = buf[0] + buf[1] + buf[2] + buf[3] + buf[4] + buf[5] + buf[6] + buf[7];
    for (int64_t i = n8; i < n; i++) {
        float v = round_half_even(g[i] / scale) + zero;
        v = v < 0.0f ? 0.0f : v;
        v = v > maxq ? maxq : v;
        const uint8_t c = (uint8_t)(int32_t)v;
        q[i] = c;
        s += c;
    }
    *scale_out = scale;
    *zero_out = zero;
    *sum = s;
    return OFFQ_OK;
}
#endif

/* Pack one row of k codes (one per byte) into nibbles: element 2i low, 2i + 1 high. */
static inline __attribute__((always_inline)) void pack_row4(const uint8_t *restrict c, int64_t k,
                                                            uint8_t *restrict p)
{
    int64_t half = k / 2;
    for (int64_t i = 0; i < half; i++) {
        p[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    }
    if (k & 1) {
        p[half] = c[k - 1];
    }
}

static inline __attribute__((always_inline)) void unpack_row4(const uint8_t *restrict p, int64_t k,
                                                              uint8_t *restrict c)
{
    int64_t half = k / 2;
    for (int64_t i = 0; i < half; i++) {
        c[2 * i] = p[i] & 15;
        c[2 * i + 1] = p[i] >> 4;
    }
    if (k & 1) {
        c[k - 1] = p[half] & 15;
    }
}

/* One row: quantize all groups into `tmp` (k codes) or directly into `codes`, then pack. */
static inline __attribute__((always_inline)) int quant_row_body(
    const float *restrict x, int64_t k, int bits, int64_t group, int symmetric, float clip,
    uint8_t *restrict codes, float *restrict scale, float *restrict zero, int32_t *restrict sums,
    uint8_t *restrict tmp)
{
    uint8_t *dst = bits == 4 ? tmp : codes;
    int64_t ng = k / group;
    for (int64_t gi = 0; gi < ng; gi++) {
        int err = quant_group_body(x + gi * group, group, bits, symmetric, clip, dst + gi * group,
                                   scale + gi, zero + gi, sums + gi);
        if (err != OFFQ_OK) {
            return err;
        }
    }
    if (bits == 4) {
        pack_row4(tmp, k, codes);
    }
    return OFFQ_OK;
}

static int quant_row_generic(const float *x, int64_t k, int bits, int64_t group, int symmetric,
                             float clip, uint8_t *codes, float *scale, float *zero, int32_t *sums,
                             uint8_t *tmp)
{
    return quant_row_body(x, k, bits, group, symmetric, clip, codes, scale, zero, sums, tmp);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static int quant_row_avx2(const float *x, int64_t k, int bits,
                                                              int64_t group, int symmetric,
                                                              float clip, uint8_t *codes,
                                                              float *scale, float *zero,
                                                              int32_t *sums, uint8_t *tmp)
{
    uint8_t *dst = bits == 4 ? tmp : codes;
    const int64_t ng = k / group;
    for (int64_t gi = 0; gi < ng; gi++) {
        int err = quant_group_avx2(x + gi * group, group, bits, symmetric, clip, dst + gi * group,
                                   scale + gi, zero + gi, sums + gi);
        if (err != OFFQ_OK) {
            return err;
        }
    }
    if (bits == 4) {
        pack_row4(tmp, k, codes);
    }
    return OFFQ_OK;
}
#endif

int offq_quantize_f32(const float *x, int64_t rows, int64_t k, int bits, int64_t group,
                      int symmetric, float clip, uint8_t *codes, float *scale, float *zero,
                      int32_t *sums)
{
    int (*row_fn)(const float *, int64_t, int, int64_t, int, float, uint8_t *, float *, float *,
                  int32_t *, uint8_t *) = quant_row_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (offq_cpu_has_avx2()) {
        row_fn = quant_row_avx2;
    }
#endif
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
                int e = row_fn(x + r * k, k, bits, group, symmetric, clip, codes + r * rb,
                               scale + r * ng, zero + r * ng, sums + r * ng, tmp);
                err = e > err ? e : err;
            }
        }
        free(tmp);
    }
    return err;
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
                unpack_row4(c, k, tmp);
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

int offq_pack_codes(const uint8_t *codes, int64_t rows, int64_t k, int bits, int64_t group,
                    uint8_t *packed, int32_t *sums)
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
            pack_row4(c, k, packed + r * rb);
        } else {
            memcpy(packed + r * rb, c, (size_t)k);
        }
    }
    return err;
}

void offq_unpack_codes(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *out)
{
    const int64_t rb = offq_code_row_bytes(k, bits);
#pragma omp parallel for schedule(static) if (rows * k >= OFFQ_QUANT_PAR_MIN_ELEMS)
    for (int64_t r = 0; r < rows; r++) {
        if (bits == 4) {
            unpack_row4(packed + r * rb, k, out + r * k);
        } else {
            memcpy(out + r * k, packed + r * rb, (size_t)k);
        }
    }
}
