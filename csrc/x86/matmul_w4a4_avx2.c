/* x86/matmul_w4a4_avx2.c: the AVX2 pieces of the W4A4 matmul (driver, layout and math:
 * matmul_w4a4.c): the 8 x 32 tile micro-kernel, weight panels and activation rows straight from
 * packed nibbles, and the small-M (decode) gemv. The AVX-512 VNNI variant reuses the packing and,
 * for blocks that are not a multiple of 128, this gemv.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>

#include "x86/gemv_common.h"

#define MR OFFQ_MM_MR
#define NRP OFFQ_MM_NRP
#define MS OFFQ_MM_MS
#define CHUNK 256 /* k per 16-bit accumulation chunk */

/* AVX2: one panel, rows r0..r0+3 (MR_AVX2) x 16 columns, 16-bit accumulation within chunks of
 * 256 k: 8 accumulators + 2 weight vectors + 1 broadcast fit the 16 ymm registers. `one_chunk`
 * (a constant: copies are compiled) is for blocks within one 16-bit stage (at most CHUNK k, or
 * the folded span below), the usual groups of 64 or 128: the widened sums (plus ainit when
 * folded) are then the block's, with no 32-bit running total to keep (spilled) across the inner
 * loop; at 64 k a block that saves ~8% of the unfolded product.
 * `folded` (a constant) is tile_folded (kernels.h): int8 codes minus their zero-point against a
 * weight with one zero-point, each block's int32 sums started from ainit, and the epilogue a
 * conversion and one FMA per vector instead of five operations. A pair of folded products is at
 * most 2 * 15 * fold_max, so the 16-bit sums are widened every 32767 / (30 * fold_max) steps of
 * 4 k (72 for ordinary tokens, whose zero-points lie in [0, 15]; 8 at the extreme 127). */
#define MR_AVX2 4
/* k per 16-bit stage of folded codes whose largest |qa - za| is fold_max */
#define OFFQ_FOLD_SPAN(fold_max) (4 * (32767 / (30 * (int64_t)(fold_max))))
__attribute__((target("avx2,fma"), always_inline)) static inline void
panel_avx2_t(const offq_mm_tile_args *u, int panel, int r0, float *restrict ct, int64_t ldc,
             const int one_chunk, const int folded)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256 zero = _mm256_setzero_ps();
    const uint8_t *restrict wp = u->wp[panel];
    const int64_t lda = u->lda;
    const uint8_t *a0 = u->a + r0 * lda;
    /* k per 16-bit stage: whole chunks, or the folded codes' bound */
    const int64_t span = one_chunk ? u->bp : folded ? OFFQ_FOLD_SPAN(u->fold_max) : CHUNK;
    for (int64_t b = 0; b < u->nb; b++) {
#define OFFQ_INIT(r)                                                                             \
    __m256i d##r##0 = folded && !one_chunk                                                       \
                          ? _mm256_set1_epi32(u->ainit[(r0 + (r)) * u->ldp + b])                 \
                          : _mm256_setzero_si256(),                                              \
            d##r##1 = d##r##0;
        OFFQ_INIT(0) OFFQ_INIT(1) OFFQ_INIT(2) OFFQ_INIT(3)
#undef OFFQ_INIT
        const uint8_t *ab = a0 + b * u->bp;
        const uint8_t *wb = wp + b * u->bp * NRP;
        for (int64_t c0 = 0; c0 < u->bp; c0 += span) {
            const int64_t steps = (u->bp - c0 < span ? u->bp - c0 : span) / 4;
            __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                    s21 = s00, s30 = s00, s31 = s00;
            const uint8_t *wc = wb + c0 * NRP;
            const uint8_t *ac = ab + c0;
            for (int64_t t = 0; t < steps; t++) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(wc + t * 64));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(wc + t * 64 + 32));
                __m256i av;
                __m256i p0, p1;
/* s += maddubs(w, a) in place; inline asm keeps GCC from copying/spilling accumulators */
#define OFFQ_ROW(r)                                                                              \
    av = _mm256_set1_epi32((int)offq_load_u32(ac + (r) * lda + 4 * t));                               \
    __asm__("vpmaddubsw %[a], %[w0], %[p0]\n\t"                                                 \
            "vpmaddubsw %[a], %[w1], %[p1]\n\t"                                                 \
            "vpaddw %[p0], %[s0], %[s0]\n\t"                                                    \
            "vpaddw %[p1], %[s1], %[s1]"                                                         \
            : [s0] "+x"(s##r##0), [s1] "+x"(s##r##1), [p0] "=&x"(p0), [p1] "=&x"(p1)            \
            : [w0] "x"(w0), [w1] "x"(w1), [a] "x"(av));
                OFFQ_ROW(0)
                OFFQ_ROW(1)
                OFFQ_ROW(2)
                OFFQ_ROW(3)
#undef OFFQ_ROW
            }
            /* vpmaddubsw summed the pairs (k0,k1),(k2,k3) of a column into adjacent 16-bit
             * lanes; vpmaddwd with ones adds them: lane j of d_r,h is column 8h + j. */
#define OFFQ_WIDEN(d, s, r)                                                                      \
    d = !one_chunk ? _mm256_add_epi32(d, _mm256_madd_epi16(s, ones))                             \
        : folded   ? _mm256_add_epi32(_mm256_set1_epi32(u->ainit[(r0 + (r)) * u->ldp + b]),     \
                                      _mm256_madd_epi16(s, ones))                               \
                   : _mm256_madd_epi16(s, ones);
            OFFQ_WIDEN(d00, s00, 0) OFFQ_WIDEN(d01, s01, 0) OFFQ_WIDEN(d10, s10, 1)
            OFFQ_WIDEN(d11, s11, 1) OFFQ_WIDEN(d20, s20, 2) OFFQ_WIDEN(d21, s21, 2)
            OFFQ_WIDEN(d30, s30, 3) OFFQ_WIDEN(d31, s31, 3)
#undef OFFQ_WIDEN
        }
        __m256 wz0 = zero, wz1 = zero, wt0 = zero, wt1 = zero;
        if (!folded) {
            wz0 = _mm256_loadu_ps(u->wz[panel] + b * NRP);
            wz1 = _mm256_loadu_ps(u->wz[panel] + b * NRP + 8);
            wt0 = _mm256_loadu_ps(u->wT[panel] + b * NRP);
            wt1 = _mm256_loadu_ps(u->wT[panel] + b * NRP + 8);
        }
        const __m256 ws0 = _mm256_loadu_ps(u->ws[panel] + b * NRP);
        const __m256 ws1 = _mm256_loadu_ps(u->ws[panel] + b * NRP + 8);
#define OFFQ_EPI(r)                                                                              \
    {                                                                                            \
        const int64_t pi = (r0 + (r)) * u->ldp + b;                                              \
        const __m256 xa = _mm256_set1_ps(u->ascale[pi]);                                         \
        float *c = ct + (r0 + (r)) * ldc + panel * NRP;                                          \
        __m256 e0 = _mm256_cvtepi32_ps(d##r##0), e1 = _mm256_cvtepi32_ps(d##r##1);               \
        if (!folded) {                                                                           \
            const __m256 sa = _mm256_set1_ps(u->asum[pi]);                                       \
            const __m256 za = _mm256_set1_ps(u->azero[pi]);                                      \
            e0 = _mm256_fnmadd_ps(sa, wz0, e0);                                                  \
            e1 = _mm256_fnmadd_ps(sa, wz1, e1);                                                  \
            e0 = _mm256_fnmadd_ps(za, wt0, e0);                                                  \
            e1 = _mm256_fnmadd_ps(za, wt1, e1);                                                  \
        }                                                                                        \
        const __m256 c0 = b ? _mm256_loadu_ps(c) : zero, c1 = b ? _mm256_loadu_ps(c + 8) : zero; \
        _mm256_storeu_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(xa, ws0), e0, c0));                    \
        _mm256_storeu_ps(c + 8, _mm256_fmadd_ps(_mm256_mul_ps(xa, ws1), e1, c1));                \
    }
        OFFQ_EPI(0) OFFQ_EPI(1) OFFQ_EPI(2) OFFQ_EPI(3)
#undef OFFQ_EPI
    }
}

__attribute__((target("avx2,fma"))) static void panel_avx2_one_chunk(const offq_mm_tile_args *u,
                                                                     int panel, int r0, float *ct,
                                                                     int64_t ldc)
{
    panel_avx2_t(u, panel, r0, ct, ldc, 1, 0);
}

__attribute__((target("avx2,fma"))) static void panel_avx2_chunks(const offq_mm_tile_args *u,
                                                                  int panel, int r0, float *ct,
                                                                  int64_t ldc)
{
    panel_avx2_t(u, panel, r0, ct, ldc, 0, 0);
}

__attribute__((target("avx2,fma"))) static void panel_avx2_folded_chunks(
    const offq_mm_tile_args *u, int panel, int r0, float *ct, int64_t ldc)
{
    panel_avx2_t(u, panel, r0, ct, ldc, 0, 1);
}

__attribute__((target("avx2,fma"))) static void panel_avx2_folded_one_chunk(
    const offq_mm_tile_args *u, int panel, int r0, float *ct, int64_t ldc)
{
    panel_avx2_t(u, panel, r0, ct, ldc, 1, 1);
}

/* Folded blocks within one 16-bit stage (the usual groups of 64 or 128 with ordinary tokens)
 * take the one-chunk copy: the block's int32 sums are then formed after its products, from
 * ainit and the widened 16-bit sums, instead of being held (spilled: 8 + 8 accumulators do not
 * fit 16 ymm beside the weights) across a loop over chunks that runs once. */
__attribute__((target("avx2,fma"))) static void panel_avx2_folded(const offq_mm_tile_args *u,
                                                                  int panel, int r0, float *ct,
                                                                  int64_t ldc)
{
    if (u->bp <= OFFQ_FOLD_SPAN(u->fold_max)) {
        panel_avx2_folded_one_chunk(u, panel, r0, ct, ldc);
    } else {
        panel_avx2_folded_chunks(u, panel, r0, ct, ldc);
    }
}

__attribute__((target("avx2,fma"))) static void panel_avx2(const offq_mm_tile_args *u, int panel,
                                                           int r0, float *ct, int64_t ldc)
{
    if (u->bp <= CHUNK) {
        panel_avx2_one_chunk(u, panel, r0, ct, ldc);
    } else {
        panel_avx2_chunks(u, panel, r0, ct, ldc);
    }
}

__attribute__((target("avx2,fma"))) void offq_mm_tile_avx2(const offq_mm_tile_args *u, int second,
                                                          float *ct, int64_t ldc)
{
    for (int r0 = 0; r0 < MR; r0 += MR_AVX2) {
        panel_avx2(u, 0, r0, ct, ldc);
        if (second) {
            panel_avx2(u, 1, r0, ct, ldc);
        }
    }
}

__attribute__((target("avx2,fma"))) void offq_mm_tile_folded_avx2(const offq_mm_tile_args *u,
                                                                 int second, float *ct,
                                                                 int64_t ldc)
{
    for (int r0 = 0; r0 < MR; r0 += MR_AVX2) {
        panel_avx2_folded(u, 0, r0, ct, ldc);
        if (second) {
            panel_avx2_folded(u, 1, r0, ct, ldc);
        }
    }
}

/* One panel (16 weight rows starting at n, rows past N read as row N - 1; their scales are zeroed
 * by the caller) straight from packed nibbles: each 32-element chunk of a row is unpacked to one
 * ymm (8 groups of 4 k), eight rows are transposed as an 8 x 8 dword matrix, and block sums are
 * taken with vpsadbw. sums[j * nb + b] = sum of the codes of row j in block b. Needs
 * blk % 32 == 0 (then blk == bp and no block padding exists). */
__attribute__((target("avx2,fma"))) void offq_mm_pack_panel_avx2(const offq_mm_plan *pl,
                                                                const offq_q4_operand *w,
                                                                int64_t n, uint8_t *panel,
                                                                float *sums)
{
    const int64_t rb = (pl->k + 1) / 2, cpb = pl->blk / 32;
    const __m128i m15 = _mm_set1_epi8(15);
    const uint8_t *src[NRP];
    for (int j = 0; j < NRP; j++) {
        src[j] = w->codes + (n + j < pl->n ? n + j : pl->n - 1) * rb;
    }
    for (int64_t b = 0; b < pl->nb; b++) {
        __m256i acc[NRP];
        for (int j = 0; j < NRP; j++) {
            acc[j] = _mm256_setzero_si256();
        }
        for (int64_t c = b * cpb; c < (b + 1) * cpb; c++) {
            for (int h = 0; h < 2; h++) {
                __m256i r[8];
                for (int j = 0; j < 8; j++) {
                    if ((c & 3) == 0) { /* one prefetch per 64-byte line, 8 lines ahead */
                        _mm_prefetch((const char *)(src[8 * h + j] + 16 * c + 512), _MM_HINT_T0);
                    }
                    const __m128i v = _mm_loadu_si128((const __m128i *)(src[8 * h + j] + 16 * c));
                    const __m128i lo = _mm_and_si128(v, m15);
                    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
                    r[j] = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                    acc[8 * h + j] = _mm256_add_epi64(
                        acc[8 * h + j], _mm256_sad_epu8(r[j], _mm256_setzero_si256()));
                }
                const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]);
                const __m256i t1 = _mm256_unpackhi_epi32(r[0], r[1]);
                const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]);
                const __m256i t3 = _mm256_unpackhi_epi32(r[2], r[3]);
                const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]);
                const __m256i t5 = _mm256_unpackhi_epi32(r[4], r[5]);
                const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]);
                const __m256i t7 = _mm256_unpackhi_epi32(r[6], r[7]);
                const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);
                const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);
                const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);
                const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);
                const __m256i u4 = _mm256_unpacklo_epi64(t4, t6);
                const __m256i u5 = _mm256_unpackhi_epi64(t4, t6);
                const __m256i u6 = _mm256_unpacklo_epi64(t5, t7);
                const __m256i u7 = _mm256_unpackhi_epi64(t5, t7);
                uint8_t *d = panel + c * 8 * 64 + 32 * h; /* group t = 8c + i at d + 64 i */
                _mm256_store_si256((__m256i *)(d + 0 * 64),
                                   _mm256_permute2x128_si256(u0, u4, 0x20));
                _mm256_store_si256((__m256i *)(d + 1 * 64),
                                   _mm256_permute2x128_si256(u1, u5, 0x20));
                _mm256_store_si256((__m256i *)(d + 2 * 64),
                                   _mm256_permute2x128_si256(u2, u6, 0x20));
                _mm256_store_si256((__m256i *)(d + 3 * 64),
                                   _mm256_permute2x128_si256(u3, u7, 0x20));
                _mm256_store_si256((__m256i *)(d + 4 * 64),
                                   _mm256_permute2x128_si256(u0, u4, 0x31));
                _mm256_store_si256((__m256i *)(d + 5 * 64),
                                   _mm256_permute2x128_si256(u1, u5, 0x31));
                _mm256_store_si256((__m256i *)(d + 6 * 64),
                                   _mm256_permute2x128_si256(u2, u6, 0x31));
                _mm256_store_si256((__m256i *)(d + 7 * 64),
                                   _mm256_permute2x128_si256(u3, u7, 0x31));
            }
        }
        for (int j = 0; j < NRP; j++) {
            const __m128i q = _mm_add_epi64(_mm256_castsi256_si128(acc[j]),
                                            _mm256_extracti128_si256(acc[j], 1));
            sums[j * pl->nb + b] = (float)(_mm_cvtsi128_si64(q) + _mm_extract_epi64(q, 1));
        }
    }
}

/* unpack_blocks for blk % 32 == 0 (no padding): 16 packed bytes -> 32 codes per step. */
__attribute__((target("avx2,fma"))) void offq_mm_unpack_blocks_avx2(const offq_mm_plan *pl,
                                                                   const uint8_t *packed,
                                                                   uint8_t *dst, float *sums)
{
    const int64_t cpb = pl->blk / 32;
    const __m128i m15 = _mm_set1_epi8(15);
    for (int64_t b = 0; b < pl->nb; b++) {
        __m256i acc = _mm256_setzero_si256();
        for (int64_t c = b * cpb; c < (b + 1) * cpb; c++) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(packed + 16 * c));
            const __m128i lo = _mm_and_si128(v, m15);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
            const __m256i r =
                _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
            _mm256_storeu_si256((__m256i *)(dst + 32 * c), r);
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(r, _mm256_setzero_si256()));
        }
        const __m128i q =
            _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        sums[b] = (float)(_mm_cvtsi128_si64(q) + _mm_extract_epi64(q, 1));
    }
}

/* Small M (decode, M <= 4) without weight repacking. A weight row is read as packed bytes,
 * 32 bytes = 64 elements per step; the low nibbles are the even elements and the high nibbles the
 * odd ones, so the activations of each 64-element chunk are laid out as [32 even | 32 odd] bytes
 * (ap) and multiplied with vpmaddubsw against the masked nibbles. Weight block sums come from the
 * same nibbles (byte adds, then vpsadbw). Eight weight rows are reduced together (a transposing
 * horizontal add), so the float epilogue runs on 8 columns at once and matches the generic
 * reference bit for bit. Needs block % 64 == 0. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
gemv_group_cpb_avx2(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded,
                    const int64_t fixed_cpb)
{
    const offq_mm_plan *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2;
    const int64_t cpb = fixed_cpb ? fixed_cpb : pl->blk / 64;
    const __m256i ones = _mm256_set1_epi16(1);
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
            __m256i d32[MS];
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                d32[m] = _mm256_setzero_si256();
            }
            __m256i s64 = _mm256_setzero_si256();
            const uint8_t *wb = wr[j] + b * pl->blk / 2;
            const uint8_t *ab = g->ap + b * pl->blk;
            /* sub-chunks of 8 steps: byte sums <= 8 * 30, 16-bit lanes <= 8 * 900; folded: 4 steps
             * of |lane| <= 2 * 2 * 15 * 127 = 7620 */
            const int64_t sub = folded ? 4 : 8;
            for (int64_t c0 = 0; c0 < cpb; c0 += sub) {
                const int64_t c1 = c0 + sub < cpb ? c0 + sub : cpb;
                __m256i s16[MS];
                _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                    s16[m] = _mm256_setzero_si256();
                }
                __m256i su8 = _mm256_setzero_si256();
                for (int64_t c = c0; c < c1; c++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
                    __m256i lo, hi;
                    offq_nibbles(wv, &lo, &hi);
                    if (!folded) {
                        su8 = _mm256_add_epi8(su8, _mm256_add_epi8(lo, hi));
                    }
                    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                        const uint8_t *am = ab + m * pl->k + 64 * c;
                        const __m256i pe = _mm256_maddubs_epi16(
                            lo, _mm256_loadu_si256((const __m256i *)am));
                        const __m256i po = _mm256_maddubs_epi16(
                            hi, _mm256_loadu_si256((const __m256i *)(am + 32)));
                        s16[m] = _mm256_add_epi16(s16[m], _mm256_add_epi16(pe, po));
                    }
                }
                _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                    d32[m] = _mm256_add_epi32(d32[m], _mm256_madd_epi16(s16[m], ones));
                }
                if (!folded) {
                    s64 = _mm256_add_epi64(s64, _mm256_sad_epu8(su8, _mm256_setzero_si256()));
                }
            }
            _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
                vd[m][j] = d32[m];
            }
            vs[j] = s64; /* 4 x u64 small sums: as int32 lanes, the odd lanes are 0 */
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

/* Any block that is a multiple of 64 (its chunk count known at run time). */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
gemv_group_avx2(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    gemv_group_cpb_avx2(g, n0, mrows, folded, 0);
}

/* Groups [i0, i1) of 8 columns, 1 <= mrows <= MS = 8 (the caller splits groups over threads).
 * One token with blocks of 64 or 128 (the default activation groups) gets copies with the
 * block's chunk count constant, so the chunk loops unroll: the run-time loops over 1-2 chunks
 * took ~40% of the product at 1 x 4096 x 4096. */
__attribute__((target("avx2,fma"))) void offq_mm_gemv_range_avx2(const offq_mm_gemv_args *g,
                                                              int mrows, int folded, int64_t i0,
                                                              int64_t i1)
{
    if (mrows == 1 && (g->pl->blk == 64 || g->pl->blk == 128)) {
        const int64_t cpb = g->pl->blk / 64;
        for (int64_t i = i0; i < i1; i++) {
            /* every argument a constant in each call: four specialised copies */
            if (cpb == 2 && folded) {
                gemv_group_cpb_avx2(g, 8 * i, 1, 1, 2);
            } else if (cpb == 2) {
                gemv_group_cpb_avx2(g, 8 * i, 1, 0, 2);
            } else if (folded) {
                gemv_group_cpb_avx2(g, 8 * i, 1, 1, 1);
            } else {
                gemv_group_cpb_avx2(g, 8 * i, 1, 0, 1);
            }
        }
        return;
    }
    OFFQ_GEMV_RANGE8(gemv_group_avx2)
}
/* Small M on the decode layout (offq.h): one contiguous stream of 32-byte vectors per group of 8
 * columns; each vector is 4 consecutive k of the 8 columns (low nibbles) and the next 4 (high
 * nibbles), multiplied with vpmaddubsw against those 4 activation bytes broadcast, so the 16-bit
 * pair sums of the 8 columns stay side by side and one vpmaddwd per 4 vectors widens them: no
 * horizontal reduction. Activations in plain order, folded (qa - za as int8) when `folded`, else
 * plain codes with the weight block sums formed from the same nibbles. 16-bit lanes: a vector adds
 * at most 2 * 2 * 15 * 127 = 7620, so 4 vectors (30480) are summed before widening. The float
 * epilogue is the one of gemv_group_avx2 (same operations, same order: identical results). */
#define DEC_SUB 4 /* vectors per 16-bit accumulation */
/* `whole` (a constant: two copies are compiled): every block is a whole number of DEC_SUB-vector
 * sub-chunks (blocks of a multiple of 32 k: every activation group offq uses). The loop over a
 * sub-chunk's vectors then has a constant trip count and unrolls, with its two prefetches taken
 * before it instead of a parity test per vector. With offq_gemv_wgroup (a division only where a
 * weight group starts, not per block), 6-11% less time a token product (16384 x 4096
 * and Qwen2.5's 17920 x 1536 streamed from DRAM, 1 and 2 threads, against the row-major kernel
 * in the same process, three alternated runs on a Zen3). */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
dec_group_t(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded,
            const int whole)
{
    const offq_mm_plan *pl = g->pl;
    const int64_t k = pl->k, vpb = pl->blk / 8;
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const uint8_t *wg = g->w->dec + n0 * (k / 2); /* group n0 / 8: k / 8 vectors of 32 bytes */
    int64_t nidx[8];
    for (int j = 0; j < 8; j++) {
        nidx[j] = n0 + j < pl->n ? n0 + j : pl->n - 1;
    }
    __m256 acc[4];
    _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) { acc[m] = _mm256_setzero_ps(); }
    int64_t group_end = 0; /* first k past the current weight group */
    __m256 zw = _mm256_setzero_ps(), sw = zw, bzw = zw;
    for (int64_t b = 0; b < pl->nb; b++) {
        __m256i d[4], wsum = _mm256_setzero_si256();
        _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) { d[m] = _mm256_setzero_si256(); }
        for (int64_t c0 = b * vpb; c0 < (b + 1) * vpb; c0 += DEC_SUB) {
            const int64_t n = whole ? DEC_SUB
                                    : (c0 + DEC_SUB < (b + 1) * vpb ? DEC_SUB : (b + 1) * vpb - c0);
            __m256i s16[4], su8 = _mm256_setzero_si256();
            _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
                s16[m] = _mm256_setzero_si256();
            }
            if (whole) { /* one line per 2 vectors, DEC_PREFETCH bytes ahead */
                _mm_prefetch((const char *)(wg + 32 * c0 + DEC_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(wg + 32 * c0 + 64 + DEC_PREFETCH), _MM_HINT_T0);
            }
            _Pragma("GCC unroll 4") for (int64_t u = 0; u < n; u++) {
                const int64_t c = c0 + u;
                if (!whole && (c & 1) == 0) {
                    _mm_prefetch((const char *)(wg + 32 * c + DEC_PREFETCH), _MM_HINT_T0);
                }
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + 32 * c));
                __m256i lo, hi;
                offq_nibbles(v, &lo, &hi);
                if (!folded) {
                    su8 = _mm256_add_epi8(su8, _mm256_add_epi8(lo, hi));
                }
                _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
                    const uint8_t *am = g->ap + m * k + 8 * c;
                    const __m256i a0 = _mm256_set1_epi32((int)offq_load_u32(am));
                    const __m256i a1 = _mm256_set1_epi32((int)offq_load_u32(am + 4));
                    s16[m] = _mm256_add_epi16(s16[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0),
                                                                       _mm256_maddubs_epi16(hi, a1)));
                }
            }
            _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
                d[m] = _mm256_add_epi32(d[m], _mm256_madd_epi16(s16[m], ones16));
            }
            if (!folded) { /* byte sums <= 4 * 30: pairs, then quads of each column */
                wsum = _mm256_add_epi32(
                    wsum, _mm256_madd_epi16(_mm256_maddubs_epi16(su8, ones8), ones16));
            }
        }
        offq_gemv_wgroup(g, nidx, b, &group_end, &zw, &sw, &bzw);
        const __m256 wT = folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(wsum), bzw);
        _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
            acc[m] = offq_gemv_epilogue(g, m, b, folded, d[m], zw, sw, wT, acc[m]);
        }
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < mrows; m++) {
        offq_gemv_store(g, m, n0, acc[m]);
    }
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
dec_group_whole_avx2(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    dec_group_t(g, n0, mrows, folded, 1);
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
dec_group_avx2(const offq_mm_gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    dec_group_t(g, n0, mrows, folded, 0);
}

/* Groups [i0, i1) of 8 columns on the decode layout, 1 <= mrows <= 4. (Copies with the block's
 * vector count constant, as the row-major gemv has, were no faster here: 206-262 against 195-216
 * us at 1 x 4096 x 4096, in cache; the constant sub-chunk of `whole` is, measured streamed
 * against a control kernel in the same process.) */
__attribute__((target("avx2,fma"))) void offq_mm_gemv_dec_range_avx2(const offq_mm_gemv_args *g,
                                                                  int mrows, int folded,
                                                                  int64_t i0, int64_t i1)
{
    if (g->pl->blk % (8 * DEC_SUB) == 0) {
        OFFQ_GEMV_RANGE4(dec_group_whole_avx2)
    } else {
        OFFQ_GEMV_RANGE4(dec_group_avx2)
    }
}
#endif
