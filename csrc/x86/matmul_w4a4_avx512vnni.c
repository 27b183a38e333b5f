/* x86/matmul_w4a4_avx512vnni.c: the AVX-512 VNNI pieces of the W4A4 matmul (driver, layout and
 * math: matmul_w4a4.c): the 8 x 32 tile micro-kernel (vpdpbusd, 32-bit accumulation, no 16-bit
 * stage) and the small-M gemv over 128-element steps.
 */
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/gemv_common.h"

#define MR OFFQ_MM_MR
#define NRP OFFQ_MM_NRP
#define MS OFFQ_MM_MS


/* AVX-512 VNNI: two panels, MR (8) rows x 32 columns, 32-bit accumulation (vpdpbusd). Both
 * panels are always computed: a panel past N has zero scales and adds zeros. `folded` (a
 * constant: two copies are compiled) is tile_folded (kernels.h): the activations are codes minus
 * their zero-point (int8) against a weight with one zero-point Z, each block's sums start from
 * ainit = -Z * (the folded codes' sum), so they are E itself and the float epilogue is a
 * conversion and one FMA per vector instead of five operations (the epilogue shares the multiply
 * pipes with vpdpbusd; in SmolLM2's pp512 profile, groups of 64, the folded tile's share of the
 * samples implies ~9% less time than the unfolded one). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"), always_inline)) static inline void
tile_t(const offq_mm_tile_args *u, float *ct, int64_t ldc, const int folded)
{
    const __m512 zero = _mm512_setzero_ps();
    const uint8_t *restrict wp0 = u->wp[0];
    const uint8_t *restrict wp1 = u->wp[1];
    const int64_t lda = u->lda;
    for (int64_t b = 0; b < u->nb; b++) {
#define OFFQ_INIT(r)                                                                             \
    __m512i s##r##0 = folded ? _mm512_set1_epi32(u->ainit[(r) * u->ldp + b])                     \
                             : _mm512_setzero_si512(),                                          \
            s##r##1 = s##r##0;
        OFFQ_INIT(0) OFFQ_INIT(1) OFFQ_INIT(2) OFFQ_INIT(3)
        OFFQ_INIT(4) OFFQ_INIT(5) OFFQ_INIT(6) OFFQ_INIT(7)
#undef OFFQ_INIT
        const uint8_t *ab = u->a + b * u->bp;
        const uint8_t *w0p = wp0 + b * u->bp * NRP;
        const uint8_t *w1p = wp1 + b * u->bp * NRP;
        const int64_t steps = u->bp / 4;
        for (int64_t t = 0; t < steps; t++) {
            const __m512i w0 = _mm512_load_si512((const void *)(w0p + t * 64));
            const __m512i w1 = _mm512_load_si512((const void *)(w1p + t * 64));
            /* acc += dot4(u8 w, s8 a) per 32-bit lane, in place (inline asm keeps GCC from
             * shuffling the accumulators between registers every step), the row's 4 activation
             * bytes read as the broadcast memory operand ({1to16}): no vpbroadcastd, 8 of 26
             * instructions a step fewer, the same bits */
#define OFFQ_ROW(r)                                                                              \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(s##r##0) : "v"(w0),                           \
            "m"(*(const int32_t *)(const void *)(ab + (r) * lda + 4 * t)));                      \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(s##r##1) : "v"(w1),                           \
            "m"(*(const int32_t *)(const void *)(ab + (r) * lda + 4 * t)));
            OFFQ_ROW(0)
            OFFQ_ROW(1)
            OFFQ_ROW(2)
            OFFQ_ROW(3)
            OFFQ_ROW(4)
            OFFQ_ROW(5)
            OFFQ_ROW(6)
            OFFQ_ROW(7)
#undef OFFQ_ROW
        }
        const __m512 ws0 = _mm512_loadu_ps(u->ws[0] + b * NRP);
        const __m512 ws1 = _mm512_loadu_ps(u->ws[1] + b * NRP);
        __m512 wz0 = zero, wz1 = zero, wt0 = zero, wt1 = zero;
        if (!folded) {
            wz0 = _mm512_loadu_ps(u->wz[0] + b * NRP);
            wz1 = _mm512_loadu_ps(u->wz[1] + b * NRP);
            wt0 = _mm512_loadu_ps(u->wT[0] + b * NRP);
            wt1 = _mm512_loadu_ps(u->wT[1] + b * NRP);
        }
#define OFFQ_EPI(r)                                                                              \
    {                                                                                            \
        const __m512 xa = _mm512_set1_ps(u->ascale[(r) * u->ldp + b]);                           \
        float *c = ct + (r) * ldc;                                                               \
        __m512 e0 = _mm512_cvtepi32_ps(s##r##0), e1 = _mm512_cvtepi32_ps(s##r##1);               \
        if (!folded) {                                                                           \
            const __m512 sa = _mm512_set1_ps(u->asum[(r) * u->ldp + b]);                         \
            const __m512 za = _mm512_set1_ps(u->azero[(r) * u->ldp + b]);                        \
            e0 = _mm512_fnmadd_ps(sa, wz0, e0);                                                  \
            e1 = _mm512_fnmadd_ps(sa, wz1, e1);                                                  \
            e0 = _mm512_fnmadd_ps(za, wt0, e0);                                                  \
            e1 = _mm512_fnmadd_ps(za, wt1, e1);                                                  \
        }                                                                                        \
        const __m512 c0 = b ? _mm512_loadu_ps(c) : zero, c1 = b ? _mm512_loadu_ps(c + 16) : zero; \
        _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(xa, ws0), e0, c0));                    \
        _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(_mm512_mul_ps(xa, ws1), e1, c1));               \
    }
        OFFQ_EPI(0) OFFQ_EPI(1) OFFQ_EPI(2) OFFQ_EPI(3)
        OFFQ_EPI(4) OFFQ_EPI(5) OFFQ_EPI(6) OFFQ_EPI(7)
#undef OFFQ_EPI
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void
offq_mm_tile_avx512vnni(const offq_mm_tile_args *u, int second, float *ct, int64_t ldc)
{
    (void)second; /* both panels are always computed */
    tile_t(u, ct, ldc, 0);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void
offq_mm_tile_folded_avx512vnni(const offq_mm_tile_args *u, int second, float *ct, int64_t ldc)
{
    (void)second;
    tile_t(u, ct, ldc, 1);
}

/* Small M: 64 packed bytes = 128 elements per step (activations laid out in
 * chunks of 128 as [64 even | 64 odd]), vpdpbusd sums four u8 x s8 products into 32-bit lanes, so
 * there is no 16-bit stage; weight block sums (general path) are vpdpbusd of lo + hi with ones.
 * Needs block % 128 == 0. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline
    __attribute__((always_inline)) void
    gemv_group_vnni(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    const offq_mm_plan *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2;
    const int64_t cpb = pl->blk / 128;
    const __m512i m15 = _mm512_set1_epi8(15), ones8 = _mm512_set1_epi8(1);
    const uint8_t *wr[8];
    int64_t nidx[8];
    for (int j = 0; j < 8; j++) {
        int64_t n = n0 + j < pl->n ? n0 + j : pl->n - 1;
        nidx[j] = n;
        wr[j] = g->w->codes + n * rb;
    }
    __m256 acc[MS];
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        acc[m] = _mm256_setzero_ps();
    }
    int64_t group_end = 0; /* first k past the current weight group */
    __m256 zw = _mm256_setzero_ps(), sw = zw, bzw = zw;
    for (int64_t b = 0; b < pl->nb; b++) {
        __m256i vd[MS][8], vs[8];
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
            __m512i d[MS];
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                d[m] = _mm512_setzero_si512();
            }
            __m512i sacc = _mm512_setzero_si512();
            const uint8_t *wb = wr[j] + b * pl->blk / 2;
            const uint8_t *ab = g->ap + b * pl->blk;
            for (int64_t c = 0; c < cpb; c++) {
                const __m512i wv = _mm512_loadu_si512((const void *)(wb + 64 * c));
                const __m512i lo = _mm512_and_si512(wv, m15);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m15);
                if (!folded) {
                    sacc = _mm512_dpbusd_epi32(sacc, _mm512_add_epi8(lo, hi), ones8);
                }
                _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                    const uint8_t *am = ab + m * pl->k + 128 * c;
                    d[m] = _mm512_dpbusd_epi32(d[m], lo, _mm512_loadu_si512((const void *)am));
                    d[m] = _mm512_dpbusd_epi32(d[m], hi,
                                               _mm512_loadu_si512((const void *)(am + 64)));
                }
            }
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                vd[m][j] = _mm256_add_epi32(_mm512_castsi512_si256(d[m]),
                                            _mm512_extracti64x4_epi64(d[m], 1));
            }
            vs[j] = _mm256_add_epi32(_mm512_castsi512_si256(sacc),
                                     _mm512_extracti64x4_epi64(sacc, 1));
        }
        offq_gemv_wgroup(g, nidx, b, &group_end, &zw, &sw, &bzw);
        const __m256 wT =
            folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(offq_hsum8x8(vs)), bzw);
        _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
            acc[m] = offq_gemv_epilogue(g, m, b, folded, offq_hsum8x8(vd[m]), zw, sw, wT, acc[m]);
        }
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        offq_gemv_store(g, m, n0, acc[m]);
    }
}

/* Small M with blocks of a multiple of 64 (activation groups of 64, e.g. d = 576): the AVX2
 * gemv's layout (chunks of 64 as [32 even | 32 odd], 32 packed bytes per step) with 256-bit
 * vpdpbusd (AVX-512 VL + VNNI) summing four u8 x s8 products into 32-bit lanes: no 16-bit stage,
 * no sub-chunks. Exact integer sums, the same float epilogue: results equal the other variants. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline
    __attribute__((always_inline)) void
    gemv64_group_vnni(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    const offq_mm_plan *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2;
    const int64_t cpb = pl->blk / 64;
    const __m256i ones8 = _mm256_set1_epi8(1);
    const uint8_t *wr[8];
    int64_t nidx[8];
    for (int j = 0; j < 8; j++) {
        int64_t n = n0 + j < pl->n ? n0 + j : pl->n - 1;
        nidx[j] = n;
        wr[j] = g->w->codes + n * rb;
    }
    __m256 acc[MS];
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        acc[m] = _mm256_setzero_ps();
    }
    int64_t group_end = 0; /* first k past the current weight group */
    __m256 zw = _mm256_setzero_ps(), sw = zw, bzw = zw;
    for (int64_t b = 0; b < pl->nb; b++) {
        __m256i vd[MS][8], vs[8];
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
            __m256i d[MS];
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                d[m] = _mm256_setzero_si256();
            }
            __m256i sacc = _mm256_setzero_si256();
            const uint8_t *wb = wr[j] + b * pl->blk / 2;
            const uint8_t *ab = g->ap + b * pl->blk;
            for (int64_t c = 0; c < cpb; c++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
                __m256i lo, hi;
                offq_nibbles(wv, &lo, &hi);
                if (!folded) {
                    sacc = _mm256_dpbusd_epi32(sacc, _mm256_add_epi8(lo, hi), ones8);
                }
                _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                    const uint8_t *am = ab + m * pl->k + 64 * c;
                    d[m] = _mm256_dpbusd_epi32(d[m], lo, _mm256_loadu_si256((const __m256i *)am));
                    d[m] = _mm256_dpbusd_epi32(d[m], hi,
                                               _mm256_loadu_si256((const __m256i *)(am + 32)));
                }
            }
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                vd[m][j] = d[m];
            }
            vs[j] = sacc;
        }
        offq_gemv_wgroup(g, nidx, b, &group_end, &zw, &sw, &bzw);
        const __m256 wT =
            folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(offq_hsum8x8(vs)), bzw);
        _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
            acc[m] = offq_gemv_epilogue(g, m, b, folded, offq_hsum8x8(vd[m]), zw, sw, wT, acc[m]);
        }
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        offq_gemv_store(g, m, n0, acc[m]);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void
offq_mm_gemv64_range_avx512vnni(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                int64_t i1)
{
    OFFQ_GEMV_RANGE4(gemv64_group_vnni)
}

/* Groups [i0, i1) of 8 columns, 1 <= mrows <= MS = 8 (the caller splits groups over threads). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void offq_mm_gemv_range_avx512vnni(const offq_mm_gemv_args *g,
                                                              int mrows, int folded, int64_t i0,
                                                              int64_t i1)
{
    OFFQ_GEMV_RANGE8(gemv_group_vnni)
}
/* Small M on the decode layout (offq.h; the AVX2 kernel's comment): 256-bit vpdpbusd sums the four
 * u8 x s8 products of each column straight into 32-bit lanes, so no 16-bit stage and no widening.
 * Same integer sums and float epilogue as the other variants. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline
    __attribute__((always_inline)) void
    dec_group_vnni(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    const offq_mm_plan *pl = g->pl;
    const int64_t k = pl->k, vpb = pl->blk / 8;
    const __m256i ones8 = _mm256_set1_epi8(1);
    const uint8_t *wg = g->w->dec + n0 * (k / 2); /* group n0 / 8: 4 k bytes */
    int64_t nidx[8];
    for (int j = 0; j < 8; j++) {
        nidx[j] = n0 + j < pl->n ? n0 + j : pl->n - 1;
    }
    __m256 acc[4];
    _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) { acc[m] = _mm256_setzero_ps(); }
    int64_t group_end = 0; /* first k past the current weight group */
    __m256 zw = _mm256_setzero_ps(), sw = zw, bzw = zw;
    for (int64_t b = 0; b < pl->nb; b++) {
        /* four independent vpdpbusd chains per row (low / high nibbles of even / odd vectors):
         * one chain would wait out the instruction's latency at every step */
        __m256i d[4][4], wsum = _mm256_setzero_si256();
        _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
            for (int u = 0; u < 4; u++) {
                d[m][u] = _mm256_setzero_si256();
            }
        }
        const int64_t c_end = (b + 1) * vpb;
        for (int64_t c = b * vpb; c < c_end; c += 2) {
            _mm_prefetch((const char *)(wg + 32 * c + DEC_PREFETCH), _MM_HINT_T0);
            const int two = c + 1 < c_end;
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                if (h == 1 && !two) {
                    break;
                }
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 32 * (c + h)));
                __m256i lo, hi;
                offq_nibbles(v, &lo, &hi);
                if (!folded) {
                    wsum = _mm256_dpbusd_epi32(wsum, _mm256_add_epi8(lo, hi), ones8);
                }
                _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
                    const uint8_t *am = g->ap + m * k + 8 * (c + h);
                    d[m][2 * h] = _mm256_dpbusd_epi32(d[m][2 * h], lo,
                                                      _mm256_set1_epi32((int)offq_load_u32(am)));
                    d[m][2 * h + 1] = _mm256_dpbusd_epi32(
                        d[m][2 * h + 1], hi, _mm256_set1_epi32((int)offq_load_u32(am + 4)));
                }
            }
        }
        offq_gemv_wgroup(g, nidx, b, &group_end, &zw, &sw, &bzw);
        const __m256 wT = folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(wsum), bzw);
        _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
            const __m256i dm = _mm256_add_epi32(_mm256_add_epi32(d[m][0], d[m][1]),
                                                _mm256_add_epi32(d[m][2], d[m][3]));
            acc[m] = offq_gemv_epilogue(g, m, b, folded, dm, zw, sw, wT, acc[m]);
        }
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
        offq_gemv_store(g, m, n0, acc[m]);
    }
}

/* Groups [i0, i1) of 8 columns on the decode layout, 1 <= mrows <= 4. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void
offq_mm_gemv_dec_range_avx512vnni(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                  int64_t i1)
{
    OFFQ_GEMV_RANGE4(dec_group_vnni)
}
#endif
