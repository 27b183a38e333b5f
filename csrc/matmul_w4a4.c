/* matmul_w4a4.c: out = dequantize(a) @ dequantize(w)^T with 4-bit codes on both sides: the driver,
 * the operand layout and the generic micro-kernel (the reference).
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
 * reuses it for every 8-row strip of its task. Three variants compute identical results: generic
 * C (here), x86/matmul_w4a4_avx2.c (2 x 4 rows x 16 columns) and x86/matmul_w4a4_avx512vnni.c
 * (8 rows x 32 columns); the driver takes the pieces of one variant (offq_mm_ops) from
 * offq_dispatch, or the variant forced by the caller.
 *
 * Small M (decode: M <= 4 and block % 64 == 0 on AVX2, M <= 8 and block % 128 == 0 on VNNI):
 * repacking the weights would cost more than the product, so the kernel reads the packed nibbles
 * directly (offq_mm_gemv_*), parallel over groups of 8 output columns. When every activation
 * zero-point of the rows is an integer in [-112, 127] (ordinary tokens) it is folded into the codes as int8
 * (qa - za), so E_b = sum qw (qa - za) - zw sum (qa - za) needs no weight block sums; otherwise
 * (massive-outlier tokens) the block sums of the weights are formed from the same nibbles. Both
 * give the generic result exactly while the integer terms stay below 2^24. A weight given in the
 * decode layout too (offq.h; the decoder's plans build it) takes a faster small-M path first
 * (M <= 4, block % 8 == 0): 8 columns side by side in every 32-byte load, activations in plain
 * order, the same folding and the same float epilogue.
 *
 * Folded GEMM strips (ops->tile_folded, every variant; the driver below and the decoder's
 * prefill): when a weight's zero-points are all one integer Z (symmetric weights: 8) and a strip's
 * activation zero-points fold as above, E_b = sum (qw - Z)(qa - za) = D' - Z * S' with D' and S'
 * the folded codes' dot product and sum: the tile starts each block's integer sums at -Z * S' and
 * its epilogue is a conversion and one FMA, the same exact E_b, so the same bits as the unfolded
 * tile. AVX2 sums the folded products in 16-bit lanes for as many steps as the strip's largest
 * |qa - za| allows (offq_mm_fold_max). SmolLM2-135M's shapes (K = 576 or 1536, groups of 64,
 * M = 512, one thread, Zen 4): +2-4% AVX2, +4% VNNI, folding included.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define MR OFFQ_MM_MR
#define NRP OFFQ_MM_NRP
#define MS OFFQ_MM_MS
#define TILE_BYTES ((int64_t)256 * 1024) /* target size of a packed weight tile */

/* Unpack one packed row into the block-padded layout dst[nb * bp] and write the block sums to
 * sums[b]. tmp: k bytes of scratch (used only when blk != bp). */
static void unpack_blocks(const offq_mm_plan *pl, const uint8_t *packed, uint8_t *restrict dst,
                          uint8_t *restrict tmp, float *sums)
{
    if (pl->blk == pl->bp) {
        offq_unpack_row4(packed, pl->k, dst);
    } else {
        offq_unpack_row4(packed, pl->k, tmp);
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
        sums[b] = (float)acc;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Micro-kernels. Common arguments:
 *   a      activation bytes of MR rows, row stride lda (= kp)
 *   asum, azero, ascale: per row and block, [MR][ldp] (ldp = nb)
 *   wp     panel(s) [kp/4][16][4]; wz, wT, ws: per panel [nb][16]: zw, Sw - blk*zw, sw
 *   ct     float tile [MR][32] accumulated in place
 */

/* Generic reference: one panel (16 columns). */
static void panel_generic(const offq_mm_tile_args *u, int panel, float *restrict ct, int64_t ldc)
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
                float *c = ct + r * ldc + panel * NRP + j;
                *c = fmaf(sc, e, b ? *c : 0.0f);
            }
        }
    }
}

void offq_mm_tile_generic(const offq_mm_tile_args *u, int second, float *ct, int64_t ldc)
{
    panel_generic(u, 0, ct, ldc);
    if (second) {
        panel_generic(u, 1, ct, ldc);
    }
}

/* Generic reference of tile_folded: a holds int8 codes minus their zero-point, and each block's
 * sums start from ainit = -Z * (their sum), so d is E itself. */
static void panel_folded_generic(const offq_mm_tile_args *u, int panel, float *restrict ct,
                                 int64_t ldc)
{
    const uint8_t *restrict wp = u->wp[panel];
    for (int64_t b = 0; b < u->nb; b++) {
        for (int r = 0; r < MR; r++) {
            const int8_t *restrict ar = (const int8_t *)u->a + r * u->lda + b * u->bp;
            const int32_t d0 = u->ainit[r * u->ldp + b];
            int32_t d[NRP];
            for (int j = 0; j < NRP; j++) {
                d[j] = d0;
            }
            for (int64_t t = 0; t < u->bp / 4; t++) {
                const uint8_t *restrict wv = wp + (b * u->bp / 4 + t) * 64;
                for (int j = 0; j < NRP; j++) {
                    d[j] += wv[4 * j] * ar[4 * t] + wv[4 * j + 1] * ar[4 * t + 1] +
                            wv[4 * j + 2] * ar[4 * t + 2] + wv[4 * j + 3] * ar[4 * t + 3];
                }
            }
            const float xa = u->ascale[r * u->ldp + b];
            for (int j = 0; j < NRP; j++) {
                const float sc = xa * u->ws[panel][b * NRP + j];
                float *c = ct + r * ldc + panel * NRP + j;
                *c = fmaf(sc, (float)d[j], b ? *c : 0.0f);
            }
        }
    }
}

void offq_mm_tile_folded_generic(const offq_mm_tile_args *u, int second, float *ct, int64_t ldc)
{
    panel_folded_generic(u, 0, ct, ldc);
    if (second) {
        panel_folded_generic(u, 1, ct, ldc);
    }
}

/* Small-M reference on plain codes: per output column and block, the integer sums D and Sw, then
 * the float steps of panel_generic in the same order (so every variant agrees bit for bit). */
void offq_mm_gemv_range_generic(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                int64_t i1)
{
    (void)folded; /* plain codes are never folded */
    const offq_mm_plan *pl = g->pl;
    const int64_t rb = (pl->k + 1) / 2, gw = g->w->group, ngw = pl->k / gw;
    const int64_t n1 = 8 * i1 < pl->n ? 8 * i1 : pl->n;
    for (int64_t n = 8 * i0; n < n1; n++) {
        const uint8_t *restrict wr = g->w->codes + n * rb;
        for (int m = 0; m < mrows; m++) {
            const uint8_t *restrict ar = g->ap + m * pl->k;
            float acc = 0.0f;
            for (int64_t b = 0; b < pl->nb; b++) {
                int32_t d = 0, sw = 0;
                for (int64_t i = b * pl->blk; i < (b + 1) * pl->blk; i++) {
                    const int q = (wr[i >> 1] >> ((i & 1) * 4)) & 15;
                    d += q * ar[i];
                    sw += q;
                }
                const int64_t gi = b * pl->blk / gw;
                const float zw = g->w->zero[n * ngw + gi], scw = g->w->scale[n * ngw + gi];
                const float wT = (float)sw - (float)pl->blk * zw;
                float e = (float)d;
                e = fmaf(-g->asum[m * pl->nb + b], zw, e);
                e = fmaf(-g->azero[m * pl->nb + b], wT, e);
                acc = fmaf(g->ascale[m * pl->nb + b] * scw, e, acc);
            }
            g->out[m * pl->n + n] = acc;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * The decode layout (offq.h): rows in groups of 8, 32 bytes per chunk of 8 k. */

int64_t offq_w4_decode_bytes(int64_t n, int64_t k) { return (n + 7) / 8 * 8 * (k / 2); }

void offq_w4_decode_pack(const uint8_t *codes, int64_t n, int64_t k, uint8_t *dst)
{
    const int64_t rb = k / 2, chunks = k / 8, groups = (n + 7) / 8;
#pragma omp parallel for schedule(static) if (n * k >= ((int64_t)1 << 22))
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t c = 0; c < chunks; c++) {
            uint8_t *d = dst + (g * chunks + c) * 32;
            for (int64_t j = 0; j < 8; j++) {
                const int64_t row = 8 * g + j;
                if (row >= n) {
                    memset(d + 4 * j, 0, 4);
                    continue;
                }
                /* bytes 4c .. 4c+3 of the row hold elements 8c .. 8c+7 as (even, odd) nibbles */
                const uint8_t *src = codes + row * rb + 4 * c;
                for (int i = 0; i < 4; i++) {
                    const int e_lo = i, e_hi = 4 + i; /* elements 8c + i and 8c + 4 + i */
                    const int lo = (src[e_lo / 2] >> (4 * (e_lo & 1))) & 15;
                    const int hi = (src[e_hi / 2] >> (4 * (e_hi & 1))) & 15;
                    d[4 * j + i] = (uint8_t)(lo | hi << 4);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Driver. */

typedef offq_mm_workspace workspace;

/* Unpack and lay out columns [n0, n0 + nc) of w into the workspace (zero codes/scales past N). */
void offq_mm_pack_tile(const offq_mm_plan *pl, const offq_q4_operand *w, int64_t n0, int64_t nc,
                       offq_mm_workspace *ws, const offq_mm_ops *ops)
{
    const int64_t rb = (pl->k + 1) / 2, gw = w->group, ngw = pl->k / gw;
    const int64_t kq = pl->kp / 4;
    for (int64_t p = 0; p < nc / NRP; p++) {
        uint8_t *panel = ws->panels + p * pl->kp * NRP;
        float *wz = ws->par + p * 3 * pl->nb * NRP, *wT = wz + pl->nb * NRP,
              *wsc = wT + pl->nb * NRP;
        int done = 0;
        if (ops->pack_panel != NULL && pl->blk % 32 == 0) {
            ops->pack_panel(pl, w, n0 + p * NRP, panel, ws->psums);
            done = 1;
        }
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
                unpack_blocks(pl, w->codes + n * rb, ws->rows + j * pl->kp, ws->tmp, sums);
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
                dst[t * NRP + j] = offq_load_u32(ws->rows + j * pl->kp + 4 * t);
            }
        }
    }
}

/* The small-M path: activations to the [even | odd] chunk layout of the gemv (chunks of
 * gv->chunk elements: 64 for AVX2, 128 for VNNI; plain order for the decode layout), then
 * gv->range per MS rows, groups of 8 columns split over the team. */
static offq_status small_m(const offq_mm_plan *pl, const offq_q4_operand *a,
                           const offq_q4_operand *w, float *out, const offq_mm_gemv *gv)
{
    const int64_t ch = gv->chunk;
    const int64_t k = pl->k, rb = (k + 1) / 2, nga = k / a->group;
    uint8_t *ap = offq_alloc64((size_t)(MS * k));
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
        const int folded = offq_mm_fold_max(a->zero + m0 * nga, mrows * nga) != 0;
        for (int m = 0; m < mrows; m++) {
            const uint8_t *p = a->codes + (m0 + m) * rb;
            uint8_t *d = ap + m * k;
            for (int64_t b = 0; b < pl->nb; b++) {
                const int64_t gi = b * pl->blk / a->group;
                const float zf = a->zero[(m0 + m) * nga + gi];
                const int z = folded ? (int)zf : 0;
                int32_t acc = 0;
                /* element i goes to position i (decode layout) or to its chunk's even / odd half */
                for (int64_t i = b * pl->blk; i < (b + 1) * pl->blk; i += 2) {
                    const int lo = (p[i / 2] & 15) - z, hi = (p[i / 2] >> 4) - z;
                    const int64_t at = gv->decode_layout ? i : i / ch * ch + i % ch / 2;
                    d[at] = (uint8_t)(int8_t)lo;
                    d[gv->decode_layout ? i + 1 : at + ch / 2] = (uint8_t)(int8_t)hi;
                    acc += lo + hi;
                }
                par[m * pl->nb + b] = (float)acc;
                par[(MS + m) * pl->nb + b] = zf;
                par[(2 * MS + m) * pl->nb + b] = a->scale[(m0 + m) * nga + gi];
            }
        }
        const offq_mm_gemv_args g = {pl,  w, ap, par, par + MS * pl->nb, par + 2 * MS * pl->nb,
                                     out + m0 * pl->n};
        const int64_t groups = (pl->n + 7) / 8;
        const int parallel = groups > 1 && mrows * pl->n * pl->k >= ((int64_t)1 << 21);
        /* contiguous runs of groups, eight per thread, taken as threads come: each run streams
         * its weights front to back (interleaved groups break every thread's stream for the
         * hardware prefetchers), and a thread that wakes late (~100 us on some VMs, a product's
         * whole length at M = 1) finds the runs taken instead of holding the others up with a
         * fixed half of the work */
        const int64_t per_run = groups / (8 * (int64_t)omp_get_max_threads());
        const int64_t run = per_run > 0 ? per_run : 1;
#pragma omp parallel for schedule(dynamic, run) if (parallel)
        for (int64_t i = 0; i < groups; i++) {
            gv->range(&g, mrows, folded, i, i + 1);
        }
    }
    free(ap);
    free(par);
    return OFFQ_OK;
}

int32_t offq_mm_fold_max(const float *zero, int64_t n)
{
    int32_t most = 0;
    for (int64_t i = 0; i < n; i++) {
        const float z = zero[i];
        if (!(z >= -112.0f && z <= 127.0f && z == (float)(int)z)) {
            return 0;
        }
        /* the largest |c - z| over the codes c = 0..15 */
        const int32_t at0 = abs((int32_t)z), at15 = abs(15 - (int32_t)z);
        const int32_t m = at0 > at15 ? at0 : at15;
        most = m > most ? m : most;
    }
    return most;
}

void offq_mm_fold_rows(const offq_mm_plan *pl, uint8_t *codes, int64_t lda, const float *asum,
                       float *zero, int64_t ldp, int64_t rows, int32_t wz)
{
    const int32_t blk = (int32_t)pl->blk;
    for (int64_t r = 0; r < rows; r++) {
        int32_t *init = (int32_t *)(void *)(zero + r * ldp);
        for (int64_t b = 0; b < pl->nb; b++) {
            const int32_t z = (int32_t)zero[r * ldp + b];
            /* a byte difference modulo 256 is the int8 code (|code - z| <= 127) */
            uint8_t *restrict d = codes + r * lda + b * pl->bp;
            const uint8_t zb = (uint8_t)z;
            for (int32_t i = 0; i < blk; i++) {
                d[i] = (uint8_t)(d[i] - zb);
            }
            init[b] = -wz * ((int32_t)asum[r * ldp + b] - blk * z);
        }
    }
}

void offq_mm_strips(const offq_mm_plan *pl, const offq_mm_ops *ops, const uint8_t *acodes,
                    const float *apar, const int32_t *folded, int64_t n0, int64_t nc,
                    int64_t s_begin, int64_t s_end, const offq_mm_workspace *ws, float *out)
{
    const float *asum = apar, *azero = apar + pl->mp * pl->nb, *ascale = apar + 2 * pl->mp * pl->nb;
    float ct[MR * 32] __attribute__((aligned(64)));
    for (int64_t st = s_begin; st < s_end; st++) {
        const int64_t m0 = st * MR;
        offq_mm_tile_args u;
        u.a = acodes + m0 * pl->kp;
        u.lda = pl->kp;
        u.asum = asum + m0 * pl->nb;
        u.azero = azero + m0 * pl->nb;
        u.ascale = ascale + m0 * pl->nb;
        u.ldp = pl->nb;
        u.nb = pl->nb;
        u.bp = pl->bp;
        const int fold = folded != NULL && folded[st] != 0;
        u.ainit = fold ? (const int32_t *)(const void *)u.azero : NULL;
        u.fold_max = fold ? folded[st] : 0;
        void (*const tile)(const offq_mm_tile_args *, int, float *, int64_t) =
            fold ? ops->tile_folded : ops->tile;
        for (int64_t p = 0; p < nc / NRP; p += 2) {
            const int64_t c0 = n0 + p * NRP;
            if (c0 >= pl->n) {
                break;
            }
            for (int h = 0; h < 2; h++) {
                u.wp[h] = ws->panels + (p + h) * pl->kp * NRP;
                u.wz[h] = ws->par + (p + h) * 3 * pl->nb * NRP;
                u.wT[h] = u.wz[h] + pl->nb * NRP;
                u.ws[h] = u.wT[h] + pl->nb * NRP;
            }
            const int second = c0 + NRP < pl->n;
            const int64_t rows = pl->m - m0 < MR ? pl->m - m0 : MR;
            const int64_t cols = pl->n - c0 < 32 ? pl->n - c0 : 32;
            if (rows == MR && cols == 32) { /* a whole tile: straight into out (a scratch tile
                                             * cleared and copied per call was ~4% of SmolLM2's
                                             * prefill in a perf profile, the clear most of it) */
                tile(&u, second, out + m0 * pl->n + c0, pl->n);
                continue;
            }
            tile(&u, second, ct, 32);
            for (int64_t r = 0; r < rows; r++) {
                memcpy(out + (m0 + r) * pl->n + c0, ct + r * 32, sizeof(float) * (size_t)cols);
            }
        }
    }
}

int32_t offq_mm_weight_zero(const float *zero, int64_t n)
{
    const float z0 = n > 0 ? zero[0] : -1.0f;
    if (!(z0 >= 0.0f && z0 <= 15.0f && z0 == (float)(int)z0)) {
        return -1;
    }
    for (int64_t i = 1; i < n; i++) {
        if (zero[i] != z0) {
            return -1;
        }
    }
    return (int32_t)z0;
}

static offq_status matmul_impl(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k,
                               float *out, const offq_mm_ops *ops)
{
    offq_mm_plan pl;
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
    for (int i = 0; i < OFFQ_MM_SMALL_PATHS && ops->small[i].range != NULL; i++) {
        const offq_mm_gemv *gv = &ops->small[i];
        if (pl.m <= gv->max_m && pl.blk % gv->chunk == 0 && (!gv->decode_layout || w->dec)) {
            return small_m(&pl, a, w, out, gv);
        }
    }
    const int64_t rb = (k + 1) / 2;
    const int64_t nga = k / a->group;

    /* 1. activations: unpack once, per-block sums, zero-points and scales per row; then, where
     * the weight has one integer zero-point (symmetric weights: 8) and the variant a folded tile,
     * each strip of rows whose zero-points fold is folded for it (the same bits, a cheaper block
     * epilogue). */
    const int32_t wz =
        ops->tile_folded != NULL ? offq_mm_weight_zero(w->zero, w->rows * (k / w->group)) : -1;
    const int64_t strips = pl.mp / MR;
    uint8_t *acodes = offq_alloc64((size_t)(pl.mp * pl.kp));
    float *apar = malloc(sizeof(float) * (size_t)(3 * pl.mp * pl.nb));
    int32_t *folded = wz >= 0 ? malloc(sizeof(int32_t) * (size_t)strips) : NULL;
    if (acodes == NULL || apar == NULL || (wz >= 0 && folded == NULL)) {
        free(acodes);
        free(apar);
        free(folded);
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
            if (ops->unpack_blocks != NULL && pl.blk % 32 == 0) {
                ops->unpack_blocks(&pl, a->codes + m * rb, acodes + m * pl.kp, s);
            } else {
                unpack_blocks(&pl, a->codes + m * rb, acodes + m * pl.kp, tmp, s);
            }
            for (int64_t b = 0; b < pl.nb; b++) {
                const int64_t g = b * pl.blk / a->group;
                z[b] = a->zero[m * nga + g];
                x[b] = a->scale[m * nga + g];
            }
        }
        free(tmp);
        if (folded != NULL) {
#pragma omp for schedule(static)
            for (int64_t st = 0; st < strips; st++) {
                const int64_t at = st * MR * pl.nb;
                folded[st] = offq_mm_fold_max(azero + at, MR * pl.nb);
                if (folded[st] != 0) {
                    offq_mm_fold_rows(&pl, acodes + st * MR * pl.kp, pl.kp, asum + at, azero + at,
                                      pl.nb, MR, wz);
                }
            }
        }
    }
    if (err != OFFQ_OK) {
        free(folded);
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
        ws.panels = offq_alloc64((size_t)(nc * pl.kp));
        ws.par = malloc(sizeof(float) * (size_t)(3 * pl.nb * nc));
        ws.rows = malloc((size_t)(NRP * pl.kp));
        ws.tmp = malloc((size_t)k);
        ws.psums = malloc(sizeof(float) * (size_t)(NRP * pl.nb));
        int ok = ws.panels && ws.par && ws.rows && ws.tmp && ws.psums;
        if (!ok) {
            err = OFFQ_ERR_NOMEM;
        }
        int64_t packed_tile = -1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < ntasks; task++) {
            if (!ok) {
                continue;
            }
            const int64_t tile = task / mchunks, chunk = task % mchunks;
            const int64_t n0 = tile * nc;
            if (tile != packed_tile) {
                offq_mm_pack_tile(&pl, w, n0, nc, &ws, ops);
                packed_tile = tile;
            }
            const int64_t s_begin = chunk * strips_per_chunk;
            const int64_t s_end = s_begin + strips_per_chunk < strips ? s_begin + strips_per_chunk
                                                                      : strips;
            offq_mm_strips(&pl, ops, acodes, apar, folded, n0, nc, s_begin, s_end, &ws, out);
        }
        free(ws.panels);
        free(ws.par);
        free(ws.rows);
        free(ws.tmp);
        free(ws.psums);
    }
    free(folded);
    free(acodes);
    free(apar);
    return err;
}

offq_status offq_matmul_w4a4(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k,
                             float *out, offq_kernel kernel)
{
    if (kernel == OFFQ_KERNEL_AUTO) {
        kernel = offq_dispatch.matmul_best;
    }
    if ((int)kernel < 0 || kernel >= OFFQ_KERNEL_COUNT || offq_dispatch.matmul[kernel] == NULL) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    return matmul_impl(a, w, k, out, offq_dispatch.matmul[kernel]);
}
