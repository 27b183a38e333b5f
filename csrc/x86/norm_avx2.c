/* x86/norm_avx2.c: offq_residual_norm_row (norm.c) 8 and 16 lanes wide, one body written with
 * GCC vector types and compiled for each target. The eight float64 sums of squares sit in the
 * lanes of two 4-double vectors (one 8-double vector, wider than AVX2, made GCC keep it on the
 * stack and move it through general registers every step: 3% of an AVX2 prefill): lane j adds
 * the elements i = j (mod 8) in order, as the
 * reference does, and h * h in float64 is exact for float inputs, so a multiply then an add gives
 * the reference's sums; the division and the weight product are IEEE operations per element.
 * Both widths give the reference's bits. Rows whose d the width does not divide go one width
 * down (16 -> 8 -> the reference). */
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

/* NAME: W floats a step in the float vector type VF; FALLBACK: the next narrower variant. */
#define DEFINE_RESIDUAL_NORM_ROW(NAME, TARGET, W, VF, FALLBACK)                                   \
    __attribute__((target(TARGET))) void NAME(float *h, const float *y, const float *w,           \
                                              int64_t d, float eps, float *out)                  \
    {                                                                                             \
        if (d % (W) != 0) {                                                                       \
            FALLBACK(h, y, w, d, eps, out);                                                       \
            return;                                                                               \
        }                                                                                         \
        v4d s0 = {0.0, 0.0, 0.0, 0.0}, s1 = s0; /* sums 0..3 and 4..7 */                        \
        for (int64_t i = 0; i < d; i += (W)) {                                                    \
            VF v, t;                                                                              \
            memcpy(&v, h + i, sizeof v);                                                          \
            if (y != NULL) {                                                                      \
                memcpy(&t, y + i, sizeof t);                                                      \
                v = v + t;                                                                        \
                memcpy(h + i, &v, sizeof v);                                                      \
            }                                                                                     \
            for (int e = 0; e < (W); e += 8) { /* elements i + e .. i + e + 7 into sums 0..7 */ \
                v4f f0, f1;                                                                       \
                memcpy(&f0, h + i + e, sizeof f0);                                                \
                memcpy(&f1, h + i + e + 4, sizeof f1);                                            \
                const v4d x0 = __builtin_convertvector(f0, v4d);                                  \
                const v4d x1 = __builtin_convertvector(f1, v4d);                                  \
                s0 = s0 + x0 * x0;                                                                \
                s1 = s1 + x1 * x1;                                                                \
            }                                                                                     \
        }                                                                                         \
        double part[8];                                                                           \
        memcpy(part, &s0, sizeof s0);                                                             \
        memcpy(part + 4, &s1, sizeof s1);                                                         \
        const float r = offq_norm_root(part, d, eps);                                             \
        for (int64_t i = 0; i < d; i += (W)) {                                                    \
            VF v, q;                                                                              \
            memcpy(&v, h + i, sizeof v);                                                          \
            q = v / r;                                                                            \
            if (w != NULL) {                                                                      \
                VF g;                                                                             \
                memcpy(&g, w + i, sizeof g);                                                      \
                q = q * g;                                                                        \
            }                                                                                     \
            memcpy(out + i, &q, sizeof q);                                                        \
        }                                                                                         \
    }

DEFINE_RESIDUAL_NORM_ROW(offq_residual_norm_row_avx2, "avx2,fma", 8, v8f,
                         offq_residual_norm_row_generic)
DEFINE_RESIDUAL_NORM_ROW(offq_residual_norm_row_avx512, "avx512f", 16, v16f,
                         offq_residual_norm_row_avx2)
#endif
