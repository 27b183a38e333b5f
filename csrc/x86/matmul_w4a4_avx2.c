/* matmul_w4a4.c: out = dequantize(a) @ dequantize(w)^T with 4-bit codes on both sides.
 *
 * Math. With block = min(a.group, w.group) (one divides the other) and, per block b of a row pair
 * (m, n), the integer sums D = sum qa*qw, Sa = sum qa, Sw = sum qw over the block's k,
 *
 *   out[m, n] = sum_b sa*sw * E_b,   E_b = sum (qa - za)(qw - zw) = D - zw*Sa - za*(Sw - block*zw)
 *
 * D is an exact integer dot product; E_b is formed in float32 with two FMAs (exact while the
 * integers stay below 2^24, i.e. for any zero-points of ordinary size), then scaled and summed over
 * blocks in float32, so the result equals the dequantized float product up to float32
 * accumulation order.
 *
 * Layout. Activations are unpacked once into bytes [Mp][Kp] (rows padded to MR, every block padded
 * with zero codes to a multiple of 4 so that 4-byte groups never straddle a block). Weights are
 * unpacked per tile of columns into panels of 16 columns: panel[k/4][16][4] bytes, i.e. the four
 * consecutive k of a column side by side, which is the operand layout of vpmaddubsw (AVX2: pairs
 * of u8*s8 products summed into 16-bit lanes) and vpdpbusd (AVX-512 VNNI: quads into 32-bit
 * lanes). A micro-kernel broadcasts 4 activation bytes of a row and multiplies them against a
 * panel vector, accumulating an MR x 16 (AVX2) or MR x 32 (VNNI) tile of integer sums over one
 * block; the block's float epilogue then adds sa*sw*E_b into a float tile. AVX2's 16-bit lanes
 * hold at most 64 steps of 2 * 15 * 15 = 450 (28800 < 32767), so longer blocks are summed in
 * chunks of 256 k and widened to 32 bits.
 *
 * Parallelism: OpenMP over tasks = (column tile, row chunk); a thread packs a weight tile once and
 * reuses it for every 8-row strip of its task. Three variants of the micro-kernel compute
 * identical results: generic C (the reference), AVX2 (2 x 4 rows x 16 columns) and AVX-512 VNNI
 * (8 rows x 32 columns), selected at run time (offq_cpu_has_avx512_vnni / offq_cpu_has_avx2).
 *
 * Small M (decode: M <= 4 and block % 64 == 0 on AVX2, M <= 8 and block % 128 == 0 on VNNI):
 * repacking the weights would cost more than the product, so the kernel reads the packed nibbles
 * directly (gemv_group_avx2 / gemv_group_vnni), parallel over groups of 8 output columns. When every activation zero-point of
 * the rows is an integer in [-112, 127] (ordinary tokens) it is folded into the codes as int8
 * (qa - za), so E_b = sum qw (qa - za) - zw sum (qa - za) needs no weight block sums; otherwise
 * (massive-outlier tokens) the block sums of the weights are formed from the same nibbles. Both
 * give the generic result exactly while the integer terms stay below 2^24.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OFFQ_X86 1
#endif

#define MR 8          /* rows per strip (VNNI micro-kernel; AVX2 runs two of 4 rows) */
#define NRP 16        /* columns per weight panel */
#define CHUNK 256     /* k per 16-bit accumulation chunk (AVX2) */
#define TILE_BYTES ((int64_t)256 * 1024) /* target size of a packed weight tile */

#define KIND_GENERIC OFFQ_KERNEL_GENERIC
#define KIND_AVX2 OFFQ_KERNEL_AVX2
#define KIND_VNNI OFFQ_KERNEL_VNNI

typedef struct {
    int64_t m, n, k;
    int64_t blk, bp, nb, kp, mp; /* block, padded block, blocks per row, padded k, padded rows */
} plan_t;

static inline uint32_t load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void unpack_row4(const uint8_t *restrict p, int64_t k, uint8_t *restrict c)
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

/* Unpack one packed row into the block-padded layout dst[nb * bp] and write the block sums to
 * sums[b * sum_stride]. tmp: k bytes of scratch (used only when blk != bp). */
static void unpack_blocks(const plan_t *pl, const uint8_t *packed, uint8_t *restrict dst,
                          uint8_t *restrict tmp, float *sums, int64_t sum_stride)
{
    if (pl->blk == pl->bp) {
        unpack_row4(packed, pl->k, dst);
    } else {
        unpack_row4(packed, pl->k, tmp);
        for (int64_t b = 0; b < pl->nb; b++) {
            memcpy(dst + b * pl->bp, tmp + b * pl->blk, (size_t)pl->blk);
            memset(dst + b * pl->bp + pl->blk, 0, (size_t)(pl->bp - pl->blk));
        }
    }
    for (int64_t b = 0; b < pl->nb; b++) {
        const uint8_t *s = dst + b * pl->bp;
        int32_t acc = 0;
        for (int64_t i = 0; i < pl->blk; i++) {
            acc += s[i];
        }
        sums[b * sum_stride] = (float)acc;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Micro-kernels. Common arguments:
 *   a      activation bytes of MR rows, row stride lda (= kp)
 *   asum, azero, ascale: per row and block, [MR][ldp] (ldp = nb)
 *   wp     panel(s) [kp/4][16][4]; wz, wT, ws: per panel [nb][16]: zw, Sw - blk*zw, sw
 *   ct     float tile [MR][32] accumulated in place (only the first 16 columns for 1-panel kernels)
 */
typedef struct {
    const uint8_t *a;
    int64_t lda;
    const float *asum, *azero, *ascale;
    int64_t ldp;
    const uint8_t *wp[2];
    const float *wz[2], *wT[2], *ws[2];
    int64_t nb, bp;
} uk_args;

/* Generic reference: one panel (16 columns). */
static void ukernel_generic(const uk_args *u, int panel, float *restrict ct)
{
    const uint8_t *restrict wp = u->wp[panel];
    for (int64_t b = 0; b < u->nb; b++) {
        for (int r = 0; r < MR; r++) {
            const uint8_t *restrict ar = u->a + r * u->lda + b * u->bp;
            int32_t d[NRP] = {0};
            for (int64_t t = 0; t < u->bp / 4; t++) {
                const uint8_t *restrict wv = wp + (b * u->bp / 4 + t) * 64;
                for (int j = 0; j < NRP; j++) {
                    d[j] += wv[4 * j] * ar[4 * t] + wv[4 * j + 1] * ar[4 * t + 1] +
                            wv[4 * j + 2] * ar[4 * t + 2] + wv[4 * j + 3] * ar[4 * t + 3];
                }
            }
            const float sa = u->asum[r * u->ldp + b], za = u->azero[r * u->ldp + b],
                        xa = u->ascale[r * u->ldp + b];
            for (int j = 0; j < NRP; j++) {
                float e = (float)d[j];
                e = fmaf(-sa, u->wz[panel][b * NRP + j], e);
                e = fmaf(-za, u->wT[panel][b * NRP + j], e);
                float sc = xa * u->ws[panel][b * NRP + j];
                ct[r * 32 + panel * NRP + j] = fmaf(sc, e, ct[r * 32 + panel * NRP + j]);
            }
        }
    }
}

#ifdef OFFQ_X86
/* AVX2: one panel, rows r0..r0+3 (MR_AVX2) x 16 columns, 16-bit accumulation within chunks of
 * 256 k: 8 accumulators + 2 weight vectors + 1 broadcast fit the 16 ymm registers. */
#define MR_AVX2 4
__attribute__((target("avx2,fma"))) static void ukernel_avx2(const uk_args *u, int panel, int r0,
                                                             float *restrict ct)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *restrict wp = u->wp[panel];
    const int64_t lda = u->lda;
    const uint8_t *a0 = u->a + r0 * lda;
    for (int64_t b = 0; b < u->nb; b++) {
        __m256i d00 = _mm256_setzero_si256(), d01 = d00, d10 = d00, d11 = d00, d20 = d00,
                d21 = d00, d30 = d00, d31 = d00;
        const uint8_t *ab = a0 + b * u->bp;
        const uint8_t *wb = wp + b * u->bp * NRP;
        for (int64_t c0 = 0; c0 < u->bp; c0 += CHUNK) {
            const int64_t steps = (u->bp - c0 < CHUNK ? u->bp - c0 : CHUNK) / 4;
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
    av = _mm256_set1_epi32((int)load_u32(ac + (r) * lda + 4 * t));                               \
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
            d00 = _mm256_add_epi32(d00, _mm256_madd_epi16(s00, ones));
            d01 = _mm256_add_epi32(d01, _mm256_madd_epi16(s01, ones));
            d10 = _mm256_add_epi32(d10, _mm256_madd_epi16(s10, ones));
            d11 = _mm256_add_epi32(d11, _mm256_madd_epi16(s11, ones));
            d20 = _mm256_add_epi32(d20, _mm256_madd_epi16(s20, ones));
            d21 = _mm256_add_epi32(d21, _mm256_madd_epi16(s21, ones));
            d30 = _mm256_add_epi32(d30, _mm256_madd_epi16(s30, ones));
            d31 = _mm256_add_epi32(d31, _mm256_madd_epi16(s31, ones));
        }
        const __m256 wz0 = _mm256_loadu_ps(u->wz[panel] + b * NRP);
        const __m256 wz1 = _mm256_loadu_ps(u->wz[panel] + b * NRP + 8);
        const __m256 wt0 = _mm256_loadu_ps(u->wT[panel] + b * NRP);
        const __m256 wt1 = _mm256_loadu_ps(u->wT[panel] + b * NRP + 8);
        const __m256 ws0 = _mm256_loadu_ps(u->ws[panel] + b * NRP);
        const __m256 ws1 = _mm256_loadu_ps(u->ws[panel] + b * NRP + 8);
#define OFFQ_EPI(r)                                                                              \
    {                                                                                            \
        const int64_t pi = (r0 + (r)) * u->ldp + b;                                              \
        const __m256 sa = _mm256_set1_ps(u->asum[pi]);                                           \
        const __m256 za = _mm256_set1_ps(u->azero[pi]);                                          \
        const __m256 xa = _mm256_set1_ps(u->ascale[pi]);                                         \
        float *c = ct + (r0 + (r)) * 32 + panel * NRP;                                           \
        __m256 e0 = _mm256_cvtepi32_ps(d##r##0), e1 = _mm256_cvtepi32_ps(d##r##1);               \
        e0 = _mm256_fnmadd_ps(sa, wz0, e0);                                                      \
        e1 = _mm256_fnmadd_ps(sa, wz1, e1);                                                      \
        e0 = _mm256_fnmadd_ps(za, wt0, e0);                                                      \
        e1 = _mm256_fnmadd_ps(za, wt1, e1);                                                      \
        _mm256_store_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(xa, ws0), e0, _mm256_load_ps(c)));      \
        _mm256_store_ps(c + 8,                                                                   \
                        _mm256_fmadd_ps(_mm256_mul_ps(xa, ws1), e1, _mm256_load_ps(c + 8)));     \
    }
        OFFQ_EPI(0) OFFQ_EPI(1) OFFQ_EPI(2) OFFQ_EPI(3)
#undef OFFQ_EPI
    }
}

/* acc += dot4(u8 w, s8 a) per 32-bit lane, in place (inline asm keeps GCC from shuffling the
 * accumulators between registers every iteration). */
#define OFFQ_DPBUSD(acc, w, a) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(a))

/* AVX-512 VNNI: two panels, MR (8) rows x 32 columns, 32-bit accumulation (vpdpbusd). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) static void
ukernel_vnni(const uk_args *u, float *restrict ct)
{
    const uint8_t *restrict wp0 = u->wp[0];
    const uint8_t *restrict wp1 = u->wp[1];
    const int64_t lda = u->lda;
    for (int64_t b = 0; b < u->nb; b++) {
        __m512i s00 = _mm512_setzero_si512(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                s21 = s00, s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00,
                s60 = s00, s61 = s00, s70 = s00, s71 = s00;
        const uint8_t *ab = u->a + b * u->bp;
        const uint8_t *w0p = wp0 + b * u->bp * NRP;
        const uint8_t *w1p = wp1 + b * u->bp * NRP;
        const int64_t steps = u->bp / 4;
        for (int64_t t = 0; t < steps; t++) {
            const __m512i w0 = _mm512_load_si512((const void *)(w0p + t * 64));
            const __m512i w1 = _mm512_load_si512((const void *)(w1p + t * 64));
            __m512i av;
#define OFFQ_ROW(r)                                                                              \
    av = _mm512_set1_epi32((int)load_u32(ab + (r) * lda + 4 * t));                               \
    OFFQ_DPBUSD(s##r##0, w0, av);                                                                \
    OFFQ_DPBUSD(s##r##1, w1, av);
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
        const __m512 wz0 = _mm512_loadu_ps(u->wz[0] + b * NRP);
        const __m512 wz1 = _mm512_loadu_ps(u->wz[1] + b * NRP);
        const __m512 wt0 = _mm512_loadu_ps(u->wT[0] + b * NRP);
        const __m512 wt1 = _mm512_loadu_ps(u->wT[1] + b * NRP);
        const __m512 ws0 = _mm512_loadu_ps(u->ws[0] + b * NRP);
        const __m512 ws1 = _mm512_loadu_ps(u->ws[1] + b * NRP);
#define OFFQ_EPI(r)                                                                              \
    {                                                                                            \
        const __m512 sa = _mm512_set1_ps(u->asum[(r) * u->ldp + b]);                             \
        const __m512 za = _mm512_set1_ps(u->azero[(r) * u->ldp + b]);                            \
        const __m512 xa = _mm512_set1_ps(u->ascale[(r) * u->ldp + b]);                           \
        float *c = ct + (r) * 32;                                                                \
        __m512 e0 = _mm512_cvtepi32_ps(s##r##0), e1 = _mm512_cvtepi32_ps(s##r##1);               \
        e0 = _mm512_fnmadd_ps(sa, wz0, e0);                                                      \
        e1 = _mm512_fnmadd_ps(sa, wz1, e1);                                                      \
        e0 = _mm512_fnmadd_ps(za, wt0, e0);                                                      \
        e1 = _mm512_fnmadd_ps(za, wt1, e1);                                                      \
        _mm512_store_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(xa, ws0), e0, _mm512_load_ps(c)));      \
        _mm512_store_ps(c + 16,                                                                  \
                        _mm512_fmadd_ps(_mm512_mul_ps(xa, ws1), e1, _mm512_load_ps(c + 16)));    \
    }
        OFFQ_EPI(0) OFFQ_EPI(1) OFFQ_EPI(2) OFFQ_EPI(3)
        OFFQ_EPI(4) OFFQ_EPI(5) OFFQ_EPI(6) OFFQ_EPI(7)
#undef OFFQ_EPI
    }
}
#endif

/* ---------------------------------------------------------------------------------------------
 * Driver. */

/* Per-thread workspace: a packed weight tile of nc columns and its per-block parameters. */
typedef struct {
    uint8_t *panels; /* [nc/16][kp/4][16][4] */
    float *par;      /* per panel: wz [nb][16], wT [nb][16], ws [nb][16] */
    uint8_t *rows;   /* [16][kp] unpacked rows of one panel */
    uint8_t *tmp;    /* k bytes */
    float *psums;    /* [16][nb] block sums of the rows of one panel */
} workspace;

#ifdef OFFQ_X86
/* One panel (16 weight rows starting at n, rows past N read as row N - 1; their scales are zeroed
 * by the caller) straight from packed nibbles: each 32-element chunk of a row is unpacked to one
 * ymm (8 groups of 4 k), eight rows are transposed as an 8 x 8 dword matrix, and block sums are
 * taken with vpsadbw. sums[j * nb + b] = sum of the codes of row j in block b. Needs
 * blk % 32 == 0 (then blk == bp and no block padding exists). */
__attribute__((target("avx2,fma"))) static void pack_panel_avx2(const plan_t *pl,
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
#endif

#ifdef OFFQ_X86
/* unpack_blocks for blk % 32 == 0 (no padding): 16 packed bytes -> 32 codes per step. */
__attribute__((target("avx2,fma"))) static void unpack_blocks_avx2(const plan_t *pl,
                                                                   const uint8_t *packed,
                                                                   uint8_t *restrict dst,
                                                                   float *sums)
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
#endif

/* Unpack and lay out columns [n0, n0 + nc) of w into the workspace (zero codes/scales past N). */
static void pack_tile(const plan_t *pl, const offq_q4_operand *w, int64_t n0, int64_t nc,
                      workspace *ws, int kind)
{
    const int64_t rb = (pl->k + 1) / 2, gw = w->group, ngw = pl->k / gw;
    const int64_t kq = pl->kp / 4;
    for (int64_t p = 0; p < nc / NRP; p++) {
        uint8_t *panel = ws->panels + p * pl->kp * NRP;
        float *wz = ws->par + p * 3 * pl->nb * NRP, *wT = wz + pl->nb * NRP,
              *wsc = wT + pl->nb * NRP;
        int done = 0;
#ifdef OFFQ_X86
        if (kind != KIND_GENERIC && pl->blk % 32 == 0) {
            pack_panel_avx2(pl, w, n0 + p * NRP, panel, ws->psums);
            done = 1;
        }
#endif
        for (int j = 0; j < NRP; j++) {
            const int64_t n = n0 + p * NRP + j;
            float *sums = ws->psums + j * pl->nb;
            if (n >= pl->n) {
                if (!done) {
                    memset(ws->rows + j * pl->kp, 0, (size_t)pl->kp);
                }
                for (int64_t b = 0; b < pl->nb; b++) {
                    wz[b * NRP + j] = 0.0f;
                    wT[b * NRP + j] = 0.0f;
                    wsc[b * NRP + j] = 0.0f;
                }
                continue;
            }
            if (!done) {
                unpack_blocks(pl, w->codes + n * rb, ws->rows + j * pl->kp, ws->tmp, sums, 1);
            }
            for (int64_t b = 0; b < pl->nb; b++) {
                const int64_t g = b * pl->blk / gw;
                const float z = w->zero[n * ngw + g];
                wz[b * NRP + j] = z;
                wT[b * NRP + j] = sums[b] - (float)pl->blk * z;
                wsc[b * NRP + j] = w->scale[n * ngw + g];
            }
        }
        if (done) {
            continue;
        }
        /* transpose 4-byte groups: panel[t][j] = rows[j][t] */
        uint32_t *dst = (uint32_t *)panel;
        for (int64_t t = 0; t < kq; t++) {
            for (int j = 0; j < NRP; j++) {
                dst[t * NRP + j] = load_u32(ws->rows + j * pl->kp + 4 * t);
            }
        }
    }
}

static void *aligned_buf(size_t bytes)
{
    size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

/* ---------------------------------------------------------------------------------------------
 * Small M (decode, M <= MS) on AVX2: no weight repacking. A weight row is read as packed bytes,
 * 32 bytes = 64 elements per step; the low nibbles are the even elements and the high nibbles the
 * odd ones, so the activations of each 64-element chunk are laid out as [32 even | 32 odd] bytes
 * (ap) and multiplied with vpmaddubsw against the masked nibbles. Weight block sums come from the
 * same nibbles (byte adds, then vpsadbw). Eight weight rows are reduced together (a transposing
 * horizontal add), so the float epilogue runs on 8 columns at once and matches the generic
 * reference bit for bit. Needs block % 64 == 0. */
#define MS 8
#ifndef SMALL_M_MAX
#define SMALL_M_MAX 4 /* larger M: the GEMM path is faster (16 accumulators would spill) */
#endif
#ifndef SMALL_M_MAX_VNNI
#define SMALL_M_MAX_VNNI 8 /* with 32 zmm registers the VNNI kernel holds 8 rows */
#endif

#ifdef OFFQ_X86
/* Lane i of the result = sum of the 8 int32 lanes of v[i]. */
__attribute__((target("avx2,fma"))) static inline __m256i hsum8x8(const __m256i *v)
{
    __m256i a = _mm256_hadd_epi32(v[0], v[1]);
    __m256i b = _mm256_hadd_epi32(v[2], v[3]);
    __m256i c = _mm256_hadd_epi32(v[4], v[5]);
    __m256i d = _mm256_hadd_epi32(v[6], v[7]);
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20),
                            _mm256_permute2x128_si256(ab, cd, 0x31));
}

typedef struct {
    const plan_t *pl;
    const offq_q4_operand *w;
    const uint8_t *ap; /* [mrows][k], chunks of 64 (AVX2) or 128 (VNNI) as [even | odd] */
    const float *asum, *azero, *ascale; /* [mrows][nb] */
    float *out;
} gemv_args;

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
gemv_group_avx2(const gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    const plan_t *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2, gw = g->w->group, ngw = pl->k / gw;
    const int64_t cpb = pl->blk / 64;
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256 blkf = _mm256_set1_ps((float)pl->blk);
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
    int64_t last_gi = -1;
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
                    const __m256i lo = _mm256_and_si256(wv, m15);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m15);
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
        const int64_t gi = b * pl->blk / gw;
        if (gi != last_gi) { /* weight group changed (every block unless per-channel weights) */
            last_gi = gi;
            float zb[8], sb[8];
            for (int j = 0; j < 8; j++) {
                zb[j] = g->w->zero[nidx[j] * ngw + gi];
                sb[j] = g->w->scale[nidx[j] * ngw + gi];
            }
            zw = _mm256_loadu_ps(zb);
            sw = _mm256_loadu_ps(sb);
            bzw = _mm256_mul_ps(blkf, zw);
        }
        const __m256 wT =
            folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(hsum8x8(vs)), bzw);
        _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
            __m256 e = _mm256_cvtepi32_ps(hsum8x8(vd[m]));
            /* folded: D' = sum qw (qa - za), asum = sum (qa - za): E = D' - zw * asum */
            e = _mm256_fnmadd_ps(_mm256_set1_ps(g->asum[m * pl->nb + b]), zw, e);
            if (!folded) {
                e = _mm256_fnmadd_ps(_mm256_set1_ps(g->azero[m * pl->nb + b]), wT, e);
            }
            const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(g->ascale[m * pl->nb + b]), sw);
            acc[m] = _mm256_fmadd_ps(sc, e, acc[m]);
        }
    }
    const int64_t cols = pl->n - n0 < 8 ? pl->n - n0 : 8;
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[m]);
        memcpy(g->out + m * pl->n + n0, tmp, sizeof(float) * (size_t)cols);
    }
}

/* The same with AVX-512 VNNI: 64 packed bytes = 128 elements per step (activations laid out in
 * chunks of 128 as [64 even | 64 odd]), vpdpbusd sums four u8 x s8 products into 32-bit lanes, so
 * there is no 16-bit stage; weight block sums (general path) are vpdpbusd of lo + hi with ones.
 * Needs block % 128 == 0. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline
    __attribute__((always_inline)) void
    gemv_group_vnni(const gemv_args *g, int64_t n0, const int mrows, const int folded)
{
    const plan_t *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2, gw = g->w->group, ngw = pl->k / gw;
    const int64_t cpb = pl->blk / 128;
    const __m512i m15 = _mm512_set1_epi8(15), ones8 = _mm512_set1_epi8(1);
    const __m256 blkf = _mm256_set1_ps((float)pl->blk);
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
    int64_t last_gi = -1;
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
        const int64_t gi = b * pl->blk / gw;
        if (gi != last_gi) {
            last_gi = gi;
            float zb[8], sb[8];
            for (int j = 0; j < 8; j++) {
                zb[j] = g->w->zero[nidx[j] * ngw + gi];
                sb[j] = g->w->scale[nidx[j] * ngw + gi];
            }
            zw = _mm256_loadu_ps(zb);
            sw = _mm256_loadu_ps(sb);
            bzw = _mm256_mul_ps(blkf, zw);
        }
        const __m256 wT =
            folded ? bzw : _mm256_sub_ps(_mm256_cvtepi32_ps(hsum8x8(vs)), bzw);
        _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
            __m256 e = _mm256_cvtepi32_ps(hsum8x8(vd[m]));
            e = _mm256_fnmadd_ps(_mm256_set1_ps(g->asum[m * pl->nb + b]), zw, e);
            if (!folded) {
                e = _mm256_fnmadd_ps(_mm256_set1_ps(g->azero[m * pl->nb + b]), wT, e);
            }
            const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(g->ascale[m * pl->nb + b]), sw);
            acc[m] = _mm256_fmadd_ps(sc, e, acc[m]);
        }
    }
    const int64_t cols = pl->n - n0 < 8 ? pl->n - n0 : 8;
    _Pragma("GCC unroll 8") for (int m = 0; m < mrows; m++) {
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[m]);
        memcpy(g->out + m * pl->n + n0, tmp, sizeof(float) * (size_t)cols);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static void
gemv_vnni(const gemv_args *g, int mrows, int folded) /* 1 <= mrows <= MS = 8 */
{
    const int64_t groups = (g->pl->n + 7) / 8;
    const int parallel = groups > 1 && mrows * g->pl->n * g->pl->k >= ((int64_t)1 << 21);
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
    for (int64_t i = 0; i < groups; i++) {
#define OFFQ_CASE(r)                                                                             \
    case r:                                                                                      \
        if (folded) {                                                                            \
            gemv_group_vnni(g, i * 8, r, 1);                                                     \
        } else {                                                                                 \
            gemv_group_vnni(g, i * 8, r, 0);                                                     \
        }                                                                                        \
        break;
        switch (mrows) {
            OFFQ_CASE(1)
            OFFQ_CASE(2)
            OFFQ_CASE(3)
            OFFQ_CASE(4)
            OFFQ_CASE(5)
            OFFQ_CASE(6)
            OFFQ_CASE(7)
        default:
            OFFQ_CASE(8)
        }
#undef OFFQ_CASE
    }
}

__attribute__((target("avx2,fma"))) static void gemv_avx2(const gemv_args *g, int mrows,
                                                          int folded) /* 1 <= mrows <= MS = 8 */
{
    const int64_t groups = (g->pl->n + 7) / 8;
    const int parallel = groups > 1 && mrows * g->pl->n * g->pl->k >= ((int64_t)1 << 21);
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
    for (int64_t i = 0; i < groups; i++) {
#define OFFQ_CASE(r)                                                                             \
    case r:                                                                                      \
        if (folded) {                                                                            \
            gemv_group_avx2(g, i * 8, r, 1);                                                     \
        } else {                                                                                 \
            gemv_group_avx2(g, i * 8, r, 0);                                                     \
        }                                                                                        \
        break;
        switch (mrows) {
            OFFQ_CASE(1)
            OFFQ_CASE(2)
            OFFQ_CASE(3)
            OFFQ_CASE(4)
            OFFQ_CASE(5)
            OFFQ_CASE(6)
            OFFQ_CASE(7)
        default:
            OFFQ_CASE(8)
        }
#undef OFFQ_CASE
    }
}

/* The small-M path: activations to [even | odd] chunk layout, then gemv_avx2 per M <= MS rows. */
static int small_m(const plan_t *pl, const offq_q4_operand *a, const offq_q4_operand *w,
                   float *out, int kind)
{
    /* VNNI steps over 128 elements (activation chunks [64 even | 64 odd]), AVX2 over 64 */
    const int vnni = kind == KIND_VNNI && pl->blk % 128 == 0;
    const int64_t ch = vnni ? 128 : 64;
    const int64_t k = pl->k, rb = (k + 1) / 2, nga = k / a->group;
    uint8_t *ap = aligned_buf((size_t)(MS * k));
    float *par = malloc(sizeof(float) * (size_t)(3 * MS * pl->nb));
    if (ap == NULL || par == NULL) {
        free(ap);
        free(par);
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t m0 = 0; m0 < pl->m; m0 += MS) {
        const int mrows = (int)(pl->m - m0 < MS ? pl->m - m0 : MS);
        /* Fold the activation zero-points into the codes (qa - za as int8) when every za of these
         * rows is an integer in [-112, 127]: then E = sum qw (qa - za) - zw sum (qa - za) needs
         * no weight block sums (ordinary tokens; massive-outlier rows take the general path). */
        int folded = 1;
        for (int m = 0; m < mrows; m++) {
            for (int64_t gi = 0; gi < nga; gi++) {
                const float z = a->zero[(m0 + m) * nga + gi];
                folded &= z >= -112.0f && z <= 127.0f && z == (float)(int)z;
            }
        }
        for (int m = 0; m < mrows; m++) {
            const uint8_t *p = a->codes + (m0 + m) * rb;
            uint8_t *d = ap + m * k;
            for (int64_t b = 0; b < pl->nb; b++) {
                const int64_t gi = b * pl->blk / a->group;
                const float zf = a->zero[(m0 + m) * nga + gi];
                const int z = folded ? (int)zf : 0;
                int32_t acc = 0;
                for (int64_t c = b * pl->blk / ch; c < (b + 1) * pl->blk / ch; c++) {
                    const uint8_t *pc = p + c * ch / 2;
                    for (int64_t j = 0; j < ch / 2; j++) {
                        const int lo = (pc[j] & 15) - z, hi = (pc[j] >> 4) - z;
                        d[c * ch + j] = (uint8_t)(int8_t)lo;
                        d[c * ch + ch / 2 + j] = (uint8_t)(int8_t)hi;
                        acc += lo + hi;
                    }
                }
                par[m * pl->nb + b] = (float)acc;
                par[(MS + m) * pl->nb + b] = zf;
                par[(2 * MS + m) * pl->nb + b] = a->scale[(m0 + m) * nga + gi];
            }
        }
        gemv_args g = {pl, w, ap, par, par + MS * pl->nb, par + 2 * MS * pl->nb, out + m0 * pl->n};
        if (vnni) {
            gemv_vnni(&g, mrows, folded);
        } else {
            gemv_avx2(&g, mrows, folded);
        }
    }
    free(ap);
    free(par);
    return OFFQ_OK;
}
#endif

static int matmul_impl(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k, float *out,
                       int kind)
{
    plan_t pl;
    pl.m = a->rows;
    pl.n = w->rows;
    pl.k = k;
    pl.blk = a->group < w->group ? a->group : w->group;
    pl.bp = (pl.blk + 3) / 4 * 4;
    pl.nb = k / pl.blk;
    pl.kp = pl.nb * pl.bp;
    pl.mp = (pl.m + MR - 1) / MR * MR;
    if (pl.m == 0 || pl.n == 0) {
        return OFFQ_OK;
    }
#ifdef OFFQ_X86
    const int small_vnni = kind == KIND_VNNI && pl.m <= SMALL_M_MAX_VNNI && pl.blk % 128 == 0;
    if (kind != KIND_GENERIC && pl.blk % 64 == 0 && (pl.m <= SMALL_M_MAX || small_vnni)) {
        return small_m(&pl, a, w, out, kind);
    }
#endif
    const int64_t rb = (k + 1) / 2;
    const int64_t nga = k / a->group;

    /* 1. activations: unpack once, per-block sums, zero-points and scales per row. */
    uint8_t *acodes = aligned_buf((size_t)(pl.mp * pl.kp));
    float *apar = malloc(sizeof(float) * (size_t)(3 * pl.mp * pl.nb));
    if (acodes == NULL || apar == NULL) {
        free(acodes);
        free(apar);
        return OFFQ_ERR_NOMEM;
    }
    float *asum = apar, *azero = apar + pl.mp * pl.nb, *ascale = apar + 2 * pl.mp * pl.nb;
    int err = OFFQ_OK;
#pragma omp parallel if (pl.m * k >= 65536) reduction(max : err)
    {
        uint8_t *tmp = malloc((size_t)k);
        if (tmp == NULL) {
            err = OFFQ_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < pl.mp; m++) {
            if (tmp == NULL) {
                continue;
            }
            float *s = asum + m * pl.nb, *z = azero + m * pl.nb, *x = ascale + m * pl.nb;
            if (m >= pl.m) {
                memset(acodes + m * pl.kp, 0, (size_t)pl.kp);
                for (int64_t b = 0; b < pl.nb; b++) {
                    s[b] = z[b] = x[b] = 0.0f;
                }
                continue;
            }
#ifdef OFFQ_X86
            if (kind != KIND_GENERIC && pl.blk % 32 == 0) {
                unpack_blocks_avx2(&pl, a->codes + m * rb, acodes + m * pl.kp, s);
            } else
#endif
            {
                unpack_blocks(&pl, a->codes + m * rb, acodes + m * pl.kp, tmp, s, 1);
            }
            for (int64_t b = 0; b < pl.nb; b++) {
                const int64_t g = b * pl.blk / a->group;
                z[b] = a->zero[m * nga + g];
                x[b] = a->scale[m * nga + g];
            }
        }
        free(tmp);
    }
    if (err != OFFQ_OK) {
        free(acodes);
        free(apar);
        return err;
    }

    /* 2. tiles of columns (multiple of 32 = two panels), split rows when there are few tiles. */
    const int nthreads = omp_get_max_threads();
    int64_t nc = 32;
    while (nc < 256 && 2 * nc * pl.kp <= TILE_BYTES &&
           (pl.n + 2 * nc - 1) / (2 * nc) >= 4 * nthreads) {
        nc *= 2;
    }
    const int64_t ntiles = (pl.n + nc - 1) / nc;
    const int64_t strips = pl.mp / MR;
    int64_t mchunks = 1;
    if (ntiles < 4 * nthreads) {
        mchunks = (4 * nthreads + ntiles - 1) / ntiles;
        mchunks = mchunks > strips ? strips : mchunks;
    }
    const int64_t strips_per_chunk = (strips + mchunks - 1) / mchunks;
    const int64_t ntasks = ntiles * mchunks;

    const int parallel = ntasks > 1 && pl.m * pl.n * pl.k >= ((int64_t)1 << 22);
#pragma omp parallel if (parallel) reduction(max : err)
    {
        workspace ws;
        ws.panels = aligned_buf((size_t)(nc * pl.kp));
        ws.par = malloc(sizeof(float) * (size_t)(3 * pl.nb * nc));
        ws.rows = malloc((size_t)(NRP * pl.kp));
        ws.tmp = malloc((size_t)k);
        ws.psums = malloc(sizeof(float) * (size_t)(NRP * pl.nb));
        int ok = ws.panels && ws.par && ws.rows && ws.tmp && ws.psums;
        if (!ok) {
            err = OFFQ_ERR_NOMEM;
        }
        int64_t packed_tile = -1;
        float ct[MR * 32] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; task++) {
            if (!ok) {
                continue;
            }
            const int64_t tile = task / mchunks, chunk = task % mchunks;
            const int64_t n0 = tile * nc;
            if (tile != packed_tile) {
                pack_tile(&pl, w, n0, nc, &ws, kind);
                packed_tile = tile;
            }
            const int64_t s_begin = chunk * strips_per_chunk;
            const int64_t s_end = s_begin + strips_per_chunk < strips ? s_begin + strips_per_chunk
                                                                      : strips;
            for (int64_t st = s_begin; st < s_end; st++) {
                const int64_t m0 = st * MR;
                uk_args u;
                u.a = acodes + m0 * pl.kp;
                u.lda = pl.kp;
                u.asum = asum + m0 * pl.nb;
                u.azero = azero + m0 * pl.nb;
                u.ascale = ascale + m0 * pl.nb;
                u.ldp = pl.nb;
                u.nb = pl.nb;
                u.bp = pl.bp;
                for (int64_t p = 0; p < nc / NRP; p += 2) {
                    const int64_t c0 = n0 + p * NRP;
                    if (c0 >= pl.n) {
                        break;
                    }
                    for (int h = 0; h < 2; h++) {
                        u.wp[h] = ws.panels + (p + h) * pl.kp * NRP;
                        u.wz[h] = ws.par + (p + h) * 3 * pl.nb * NRP;
                        u.wT[h] = u.wz[h] + pl.nb * NRP;
                        u.ws[h] = u.wT[h] + pl.nb * NRP;
                    }
                    memset(ct, 0, sizeof ct);
                    const int second = c0 + NRP < pl.n;
#ifdef OFFQ_X86
                    if (kind == KIND_VNNI) {
                        ukernel_vnni(&u, ct);
                    } else if (kind == KIND_AVX2) {
                        for (int r0 = 0; r0 < MR; r0 += MR_AVX2) {
                            ukernel_avx2(&u, 0, r0, ct);
                            if (second) {
                                ukernel_avx2(&u, 1, r0, ct);
                            }
                        }
                    } else
#endif
                    {
                        ukernel_generic(&u, 0, ct);
                        if (second) {
                            ukernel_generic(&u, 1, ct);
                        }
                    }
                    const int64_t rows = pl.m - m0 < MR ? pl.m - m0 : MR;
                    const int64_t cols = pl.n - c0 < 32 ? pl.n - c0 : 32;
                    for (int64_t r = 0; r < rows; r++) {
                        memcpy(out + (m0 + r) * pl.n + c0, ct + r * 32,
                               sizeof(float) * (size_t)cols);
                    }
                }
            }
        }
        free(ws.panels);
        free(ws.par);
        free(ws.rows);
        free(ws.tmp);
        free(ws.psums);
    }
    free(acodes);
    free(apar);
    return err;
}

int offq_matmul_w4a4_kernel(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k,
                            float *out, int kernel)
{
    const int vnni = offq_cpu_has_avx512_vnni(), avx2 = offq_cpu_has_avx2();
    if (kernel == OFFQ_KERNEL_AUTO) {
        kernel = vnni ? KIND_VNNI : avx2 ? KIND_AVX2 : KIND_GENERIC;
    }
#ifdef OFFQ_X86
    if ((kernel == KIND_VNNI && !vnni) || (kernel == KIND_AVX2 && !avx2))
#else
    if (kernel != KIND_GENERIC)
#endif
    {
        return OFFQ_ERR_UNSUPPORTED;
    }
    if (kernel != KIND_GENERIC && kernel != KIND_AVX2 && kernel != KIND_VNNI) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    return matmul_impl(a, w, k, out, kernel);
}

int offq_matmul_w4a4(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k, float *out)
{
    return offq_matmul_w4a4_kernel(a, w, k, out, OFFQ_KERNEL_AUTO);
}
