/* x86/hadamard_avx512.c: the Hadamard mix with 16-float vectors (x86/mix_simd.h), bit-identical
 * to the AVX2 mix it falls back to for short rows. The mix is a dense m x m product per row
 * (R4 over Qwen2.5's 8960 = 140 x 64 is 140^2 x 64 fused multiply-adds per token) that runs at
 * the core's float FMA peak, so only wider vectors make it faster: on CPUs with two full-width
 * 512-bit FMA pipes (Zen5, most Xeons) twice the AVX2 rate; on Zen4, which splits 512-bit
 * operations in two, about the same.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/mix_simd.h"

DEFINE_MIX_SIMD("avx512f", float, offq_mix_f32_avx512, offq_mix_f32_avx2, __m512, 16,
                _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
                _mm512_setzero_ps, _mm512_mul_ps)
DEFINE_MIX_SIMD("avx512f", double, offq_mix_f64_avx512, offq_mix_f64_avx2, __m512d, 8,
                _mm512_loadu_pd, _mm512_storeu_pd, _mm512_set1_pd, _mm512_fmadd_pd,
                _mm512_setzero_pd, _mm512_mul_pd)
#endif
