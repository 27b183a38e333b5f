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
 * reuses it for every row strip of its task. Three variants of the micro-kernel compute identical
 * results: generic C (the reference), AVX2 and AVX-512 VNNI, selected at run time.
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

#define MR 6          /* rows per micro-kernel */
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
/* AVX2: one panel, MR x 16, 16-bit accumulation within chunks of 256 k. */
__attribute__((target("avx2,fma"))) static void ukernel_avx2(const uk_args *u, int panel,
                                                             float *restrict ct)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *restrict wp = u->wp[panel];
    const int64_t lda = u->lda;
    for (int64_t b = 0; b < u->nb; b++) {
        __m256i d[MR][2];
        for (int r = 0; r < MR; r++) {
            d[r][0] = d[r][1] = _mm256_setzero_si256();
        }
        const uint8_t *ab = u->a + b * u->bp;
        const uint8_t *wb = wp + b * u->bp * NRP;
        for (int64_t c0 = 0; c0 < u->bp; c0 += CHUNK) {
            const int64_t steps = (u->bp - c0 < CHUNK ? u->bp - c0 : CHUNK) / 4;
            __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                    s21 = s00, s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
            const uint8_t *wc = wb + c0 * NRP;
            const uint8_t *ac = ab + c0;
            for (int64_t t = 0; t < steps; t++) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(wc + t * 64));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(wc + t * 64 + 32));
                __m256i av;
#define OFFQ_ROW(r)                                                                              \
    av = _mm256_set1_epi32((int)load_u32(ac + (r) * lda + 4 * t));                               \
    s##r##0 = _mm256_add_epi16(s##r##0, _mm256_maddubs_epi16(w0, av));                          \
    s##r##1 = _mm256_add_epi16(s##r##1, _mm256_maddubs_epi16(w1, av));
                OFFQ_ROW(0)
                OFFQ_ROW(1)
                OFFQ_ROW(2)
                OFFQ_ROW(3)
                OFFQ_ROW(4)
                OFFQ_ROW(5)
#undef OFFQ_ROW
            }
#define OFFQ_WIDEN(r, h)                                                                         \
    {                                                                                            \
        __m256i x = _mm256_madd_epi16(s##r##h, ones);                                            \
        d[r][h] = _mm256_add_epi32(d[r][h], x);                                                  \
    }
            OFFQ_WIDEN(0, 0) OFFQ_WIDEN(0, 1) OFFQ_WIDEN(1, 0) OFFQ_WIDEN(1, 1)
            OFFQ_WIDEN(2, 0) OFFQ_WIDEN(2, 1) OFFQ_WIDEN(3, 0) OFFQ_WIDEN(3, 1)
            OFFQ_WIDEN(4, 0) OFFQ_WIDEN(4, 1) OFFQ_WIDEN(5, 0) OFFQ_WIDEN(5, 1)
#undef OFFQ_WIDEN
        }
        /* vpmaddubsw pairs (k0,k1),(k2,k3) of a column into adjacent 16-bit lanes, and vpmaddwd
         * with ones adds the pair: lane j of d[r][h] is column 8h + j. */
        const __m256 wz0 = _mm256_loadu_ps(u->wz[panel] + b * NRP);
        const __m256 wz1 = _mm256_loadu_ps(u->wz[panel] + b * NRP + 8);
        const __m256 wt0 = _mm256_loadu_ps(u->wT[panel] + b * NRP);
        const __m256 wt1 = _mm256_loadu_ps(u->wT[panel] + b * NRP + 8);
        const __m256 ws0 = _mm256_loadu_ps(u->ws[panel] + b * NRP);
        const __m256 ws1 = _mm256_loadu_ps(u->ws[panel] + b * NRP + 8);
        for (int r = 0; r < MR; r++) {
            const __m256 sa = _mm256_set1_ps(u->asum[r * u->ldp + b]);
            const __m256 za = _mm256_set1_ps(u->azero[r * u->ldp + b]);
            const __m256 xa = _mm256_set1_ps(u->ascale[r * u->ldp + b]);
            float *c = ct + r * 32 + panel * NRP;
            __m256 e0 = _mm256_cvtepi32_ps(d[r][0]), e1 = _mm256_cvtepi32_ps(d[r][1]);
            e0 = _mm256_fnmadd_ps(sa, wz0, e0);
            e1 = _mm256_fnmadd_ps(sa, wz1, e1);
            e0 = _mm256_fnmadd_ps(za, wt0, e0);
            e1 = _mm256_fnmadd_ps(za, wt1, e1);
            _mm256_storeu_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(xa, ws0), e0, _mm256_loadu_ps(c)));
            _mm256_storeu_ps(c + 8,
                             _mm256_fmadd_ps(_mm256_mul_ps(xa, ws1), e1, _mm256_loadu_ps(c + 8)));
        }
    }
}

/* AVX-512 VNNI: two panels, MR x 32, 32-bit accumulation (vpdpbusd). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) static void
ukernel_vnni(const uk_args *u, float *restrict ct)
{
    const uint8_t *restrict wp0 = u->wp[0];
    const uint8_t *restrict wp1 = u->wp[1];
    const int64_t lda = u->lda;
    for (int64_t b = 0; b < u->nb; b++) {
        __m512i s00 = _mm512_setzero_si512(), s01 = s00, s10 = s00, s11 = s00, s20 = s00,
                s21 = s00, s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
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
    s##r##0 = _mm512_dpbusd_epi32(s##r##0, w0, av);                                              \
    s##r##1 = _mm512_dpbusd_epi32(s##r##1, w1, av);
            OFFQ_ROW(0)
            OFFQ_ROW(1)
            OFFQ_ROW(2)
            OFFQ_ROW(3)
            OFFQ_ROW(4)
            OFFQ_ROW(5)
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
        _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(xa, ws0), e0, _mm512_loadu_ps(c)));    \
        _mm512_storeu_ps(c + 16,                                                                 \
                         _mm512_fmadd_ps(_mm512_mul_ps(xa, ws1), e1, _mm512_loadu_ps(c + 16)));  \
    }
        OFFQ_EPI(0) OFFQ_EPI(1) OFFQ_EPI(2) OFFQ_EPI(3) OFFQ_EPI(4) OFFQ_EPI(5)
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
    float *sums;     /* [nb] */
} workspace;

/* Unpack and lay out columns [n0, n0 + nc) of w into the workspace (zero codes/scales past N). */
static void pack_tile(const plan_t *pl, const offq_q4_operand *w, int64_t n0, int64_t nc,
                      workspace *ws)
{
    const int64_t rb = (pl->k + 1) / 2, gw = w->group, ngw = pl->k / gw;
    const int64_t kq = pl->kp / 4;
    for (int64_t p = 0; p < nc / NRP; p++) {
        uint8_t *panel = ws->panels + p * pl->kp * NRP;
        float *wz = ws->par + p * 3 * pl->nb * NRP, *wT = wz + pl->nb * NRP,
              *wsc = wT + pl->nb * NRP;
        for (int j = 0; j < NRP; j++) {
            const int64_t n = n0 + p * NRP + j;
            uint8_t *row = ws->rows + j * pl->kp;
            if (n >= pl->n) {
                memset(row, 0, (size_t)pl->kp);
                for (int64_t b = 0; b < pl->nb; b++) {
                    wz[b * NRP + j] = 0.0f;
                    wT[b * NRP + j] = 0.0f;
                    wsc[b * NRP + j] = 0.0f;
                }
                continue;
            }
            unpack_blocks(pl, w->codes + n * rb, row, ws->tmp, ws->sums, 1);
            for (int64_t b = 0; b < pl->nb; b++) {
                const int64_t g = b * pl->blk / gw;
                const float z = w->zero[n * ngw + g];
                wz[b * NRP + j] = z;
                wT[b * NRP + j] = ws->sums[b] - (float)pl->blk * z;
                wsc[b * NRP + j] = w->scale[n * ngw + g];
            }
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
            unpack_blocks(&pl, a->codes + m * rb, acodes + m * pl.kp, tmp, s, 1);
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
    while (nc < 256 && 2 * nc * pl.kp <= TILE_BYTES && (pl.n + 2 * nc - 1) / (2 * nc) >= 4 * nthreads) {
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

#pragma omp parallel reduction(max : err)
    {
        workspace ws;
        ws.panels = aligned_buf((size_t)(nc * pl.kp));
        ws.par = malloc(sizeof(float) * (size_t)(3 * pl.nb * nc));
        ws.rows = malloc((size_t)(NRP * pl.kp));
        ws.tmp = malloc((size_t)k);
        ws.sums = malloc(sizeof(float) * (size_t)pl.nb);
        int ok = ws.panels && ws.par && ws.rows && ws.tmp && ws.sums;
        if (!ok) {
            err = OFFQ_ERR_NOMEM;
        }
        int64_t packed_tile = -1;
        float ct[MR * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < ntasks; task++) {
            if (!ok) {
                continue;
            }
            const int64_t tile = task / mchunks, chunk = task % mchunks;
            const int64_t n0 = tile * nc;
            if (tile != packed_tile) {
                pack_tile(&pl, w, n0, nc, &ws);
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
                        ukernel_avx2(&u, 0, ct);
                        if (second) {
                            ukernel_avx2(&u, 1, ct);
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
        free(ws.sums);
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
