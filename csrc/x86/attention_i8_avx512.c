/* x86/attention_i8_avx512.c: offq_attend_i8 (steps: attention_i8.c) with 16 int32 lanes and
 * AVX-512 VNNI dot products (vpdpbusd: 64 byte products a instruction, four times the float
 * kernel's 16 multiply-adds). Same numbers as the AVX2 variant (exact integer sums, the same
 * float steps lane by lane). */
#include "kernels.h"

#ifdef OFFQ_X86
#define AI8_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define AI8_W 16
#define AI8_NV 4 /* key vectors per score block: 4 queries x 4 = 16 accumulators of 32 zmm */
#define AI8_IV __m512i
#define AI8_FV __m512
#define AI8_ZEROI() _mm512_setzero_si512()
#define AI8_LOADI(p) _mm512_loadu_si512((const void *)(p))
#define AI8_SET1I(x) _mm512_set1_epi32(x)
#define AI8_CVTF(a) _mm512_cvtepi32_ps(a)
#define AI8_SET1F(x) _mm512_set1_ps(x)
#define AI8_LOADF(p) _mm512_loadu_ps(p)
#define AI8_STOREF(p, v) _mm512_storeu_ps(p, v)
#define AI8_FNMADDF(a, b, c) _mm512_fnmadd_ps(a, b, c) /* c - a * b, one rounding */
#define AI8_MULF(a, b) _mm512_mul_ps(a, b)
#define AI8_ADDF(a, b) _mm512_add_ps(a, b)
#define AI8_MAXF(a, b) _mm512_max_ps(a, b)
#define AI8_DIVF(a, b) _mm512_div_ps(a, b)
#define AI8_ABSF(a) _mm512_abs_ps(a)
#define AI8_ADDI(a, b) _mm512_add_epi32(a, b)
#define AI8_MAXI(a, b) _mm512_max_epi32(a, b)
#define AI8_MINI(a, b) _mm512_min_epi32(a, b)
#define AI8_CVTI(a) _mm512_cvtps_epi32(a)
#define AI8_STOREI(p, v) _mm512_storeu_si512((void *)(p), v)
#define AI8_DP(acc, u8, s8) _mm512_dpbusd_epi32(acc, u8, s8)
/* one span a whole group (no group reaches 2^20 blocks): the partial sums are the int32 sums */
#define AI8_SPAN_S (INT64_C(1) << 20)
#define AI8_SPAN_V (INT64_C(1) << 20)
#define AI8_SPAN_START(acc) (acc) /* a span adds to the int32 sums themselves */
/* in place, as one asm instruction: as the intrinsic GCC copied every accumulator to another
 * register each step of the values' loop (16 vmovdqa64 a step beside 8 vpdpbusd); register
 * operands only (letting the signed one be a memory operand measured 10% slower) */
#define AI8_DP_PART(p, u8, s8)                                                                    \
    __extension__({                                                                               \
        __m512i p_ = (p);                                                                         \
        __asm__("vpdpbusd %[b], %[a], %[sum]" : [sum] "+v"(p_) : [a] "v"(u8), [b] "v"(s8));      \
        p_;                                                                                       \
    })
#define AI8_WIDEN(acc, p) (p)
#include "x86/attention_i8_tiles.h"

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void
offq_attend_i8_avx512vnni(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                          float *s, float *const *out, float *tile, void *qwork)
{
    if (!offq_attn_i8_tiled(a->hd, a->group)) {
        offq_attend_i8_generic(a, nq, q, n, s, out, tile, qwork);
        return;
    }
    attend_i8_tiles(a, nq, q, n, s, out, tile, qwork);
}
#endif
