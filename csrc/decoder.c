/* decoder.c: every decoder layer of a W4A4KV4 model for a few tokens of one sequence, in ONE
 * OpenMP team (contract and cache layout: offq.h, "W4A4KV4 decoder step").
 *
 * Why one team: a decode step is ~30 layers x 4 products of ~0.05 ms each. Starting a team (or
 * crossing into Python) per kernel costs as much as the kernel on a busy machine, so the team is
 * started once per step and its threads claim the items of one phase after another from shared
 * counters (see "the team's work"); between phases a thread spins briefly, then yields its core.
 *
 * Phases of a layer (each waits for the items of the one before):
 *   1. residual + RMSNorm + activation quantization of the q/k/v input, by chunks of rows
 *   2. fused q/k/v product (+ bias): groups of 8 output columns split over the team
 *   3. per head vector: RoPE + R3 on q and k, the key offset off k, KV4 quantization of k and v
 *      into the cache
 *   4. attention: scores over the packed cache, softmax, V sum (attention.c); one item per block
 *      of a KV head's query heads when decoding, per KV head and ATT_ROWS positions in prefill (a
 *      score row per query, never a [rows, positions] matrix)
 *   5. quantization of the attention output            6. o_proj product (+ bias)
 *   7. residual + RMSNorm + quantization                8. fused gate/up product (+ bias)
 *   9. SwiGLU + R4 + quantization                      10. down_proj product (+ bias)
 * and the next layer's phase 1 adds the down_proj output to the residual.
 *
 * Equality with the NumPy path (offq/model/decoder.py on W4A4Linear): quantizers, products, bias
 * and residual adds, RoPE, the Hadamard transforms and the KV codes are the same float32
 * operations in the same order, so they are bit-identical for the same inputs. Three steps sum in
 * a different order or call a different exp: the RMSNorm sum of squares (float64 here, BLAS sdot or
 * einsum there), the attention dot products and sums (BLAS there) and exp (libm in the generic
 * kernels, the 8-lane polynomial of x86/exp_simd.h in the AVX2 attention and SwiGLU; NumPy's SIMD
 * exp there); these differ by float32 rounding and can flip an activation code now and then.
 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "decoder_team.h"
#include "kernels.h"

#define MS OFFQ_MM_MS
#define PRODUCT_GROUP_BLOCK 32 /* groups of 8 columns whose weights stay cached across row chunks */

/* ---- products ------------------------------------------------------------------------------- */

/* One linear as the step runs it: its small-M kernel and the activation layout it reads. */
typedef struct {
    const offq_dec_linear *lin;
    const offq_mm_ops *ops;
    offq_mm_plan pl;
    offq_mm_gemv_range_fn range;
    int gemm;               /* more rows than the small-M path takes: the tile GEMM */
    int64_t rows_per_chunk; /* rows per kernel call (gemv) or per quantization item (GEMM) */
    int64_t chunk;          /* 0: plain codes (GEMM, generic gemv); else [even | odd] chunks */
    int decode_layout;      /* the gemv reads w.dec: plain order, folded like the chunks */
    int fold_gemm;          /* GEMM strips may fold (ops->tile_folded, one weight zero-point) */
    float *asum, *azero, *ascale; /* [mp][nb] each, in the shared apar buffer */
} product;

/* The kernel choice of offq_matmul_w4a4 for this many rows: its small-M path when the rows fit,
 * else the tile GEMM (blocks of a multiple of 4, so the plain codes need no block padding);
 * the generic gemv otherwise. Every choice computes the same numbers. */
static void plan_product(const offq_dec_linear *lin, const offq_mm_ops *ops, int64_t rows,
                         float *apar, product *p)
{
    p->lin = lin;
    p->ops = ops;
    p->pl.m = rows;
    p->pl.n = lin->w.rows;
    p->pl.k = lin->k;
    p->pl.blk = lin->a_group < lin->w.group ? lin->a_group : lin->w.group;
    p->pl.bp = p->pl.blk;
    p->pl.nb = lin->k / p->pl.blk;
    p->pl.kp = lin->k;
    p->pl.mp = (rows + OFFQ_MM_MR - 1) / OFFQ_MM_MR * OFFQ_MM_MR;
    p->range = offq_mm_gemv_range_generic;
    p->gemm = 0;
    p->rows_per_chunk = MS;
    p->chunk = 0;
    p->decode_layout = 0;
    int small = 0;
    for (int i = 0; i < OFFQ_MM_SMALL_PATHS && ops->small[i].range != NULL; i++) {
        const offq_mm_gemv *gv = &ops->small[i];
        if (rows <= gv->max_m && p->pl.blk % gv->chunk == 0 &&
            (!gv->decode_layout || lin->w.dec != NULL)) {
            p->range = gv->range;
            p->rows_per_chunk = gv->max_m;
            p->chunk = gv->chunk;
            p->decode_layout = gv->decode_layout;
            small = 1;
            break;
        }
    }
    p->fold_gemm = 0;
    if (!small && rows > MS && p->pl.blk % 4 == 0) {
        p->gemm = 1;
        p->rows_per_chunk = OFFQ_MM_MR;
        p->fold_gemm = ops->tile_folded != NULL && lin->w_zero_const >= 0;
    }
    p->asum = apar;
    p->azero = apar + p->pl.mp * p->pl.nb;
    p->ascale = apar + 2 * p->pl.mp * p->pl.nb;
}

/* Shared buffers of the step (carved from the caller's scratch). */
typedef struct {
    float *x;        /* [rows][max_k] float input of the next product */
    float *y;        /* [rows][max_n] output of the last product */
    uint8_t *ap;     /* [mp][max_k] activation codes in the product's layout */
    float *apar;     /* 3 x [mp][max_nb]: per row and block code sums, zero-points, scales */
    int32_t *folded; /* [mp] per chunk of rows: zero-points folded into the codes */
    uint8_t *kv_tiles; /* [Hkv][tiles of positions] a layer's K/V tiles, unpacked once (8-bit
                        * attention in prefill; head_tile_bytes each) */
} shared_bufs;

/* Per-thread buffers. */
typedef struct {
    uint8_t *codes; /* [MS][max_k] one code per byte */
    float *scores;  /* [ATT_ROWS * rep][positions + 1] */
    float *tmp;     /* fwht scratch */
    float *q;       /* [ATT_ROWS * rep][head_dim] scaled queries */
    float *row;     /* [OFFQ_ATTN_ROW_FLOATS(head_dim)] decoded cache rows */
    void *qwork;    /* OFFQ_ATTN_I8_QBYTES: the 8-bit attention's queries and value scales */
    int64_t *n;     /* [ATT_ROWS * rep] positions each query sees */
    float **out;    /* [ATT_ROWS * rep] where each query's output goes */
    offq_mm_workspace ws; /* a packed weight tile (GEMM) */
} thread_bufs;

#define QUANT_GROUPS_PER_CALL 64 /* activation groups per offq_dispatch.quant_groups call */

/* Quantize rows [r0, r1) of x (stride ld; one chunk of p's rows, at most MS) into p's input
 * layout; codes: MS * k bytes of the thread's scratch. */
static offq_status quantize_chunk(const offq_dec_model *md, const product *p, const float *x,
                                  int64_t ld, int64_t r0, int64_t r1, int64_t chunk_index,
                                  const shared_bufs *sb, uint8_t *codes)
{
    const offq_mm_plan *pl = &p->pl;
    const int64_t k = pl->k, nb = pl->nb, ag = p->lin->a_group, ng = k / ag;
    offq_status err = OFFQ_OK;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * ld;
        float *za = p->azero + r * nb, *sa = p->ascale + r * nb;
        uint8_t *dst = sb->ap + r * k;
        uint8_t *c = p->chunk == 0 ? dst : codes + (r - r0) * k; /* a chunk's rows side by side */
        for (int64_t g0 = 0; g0 < ng; g0 += QUANT_GROUPS_PER_CALL) {
            const int64_t gn = ng - g0 < QUANT_GROUPS_PER_CALL ? ng - g0 : QUANT_GROUPS_PER_CALL;
            float scale[QUANT_GROUPS_PER_CALL], zero[QUANT_GROUPS_PER_CALL];
            int32_t sum[QUANT_GROUPS_PER_CALL];
            const offq_status st =
                offq_dispatch.quant_groups(xr + g0 * ag, gn, ag, 4, md->a_symmetric, md->a_clip,
                                           c + g0 * ag, scale, zero, sum);
            err = st > err ? st : err;
            for (int64_t j = 0; j < gn; j++) {
                const int64_t gi = g0 + j;
                for (int64_t b = gi * ag / pl->blk; b < (gi + 1) * ag / pl->blk; b++) {
                    za[b] = zero[j];
                    sa[b] = scale[j];
                }
                if (p->chunk == 0 && ag == pl->blk) { /* a block is a group: its code sum */
                    p->asum[r * nb + gi] = (float)sum[j];
                }
            }
        }
        if (p->chunk == 0 && ag != pl->blk) {
            for (int64_t b = 0; b < nb; b++) {
                int32_t acc = 0;
                for (int64_t i = b * pl->blk; i < (b + 1) * pl->blk; i++) {
                    acc += dst[i];
                }
                p->asum[r * nb + b] = (float)acc;
            }
        }
    }
    /* zero-points folded into the codes (matmul_w4a4.c's small_m tests the same condition) */
    const int32_t fold_max =
        p->chunk != 0 || p->fold_gemm ? offq_mm_fold_max(p->azero + r0 * nb, (r1 - r0) * nb) : 0;
    const int folded = fold_max != 0;
    if (p->fold_gemm && folded) { /* GEMM strip (ops->tile_folded) */
        offq_mm_fold_rows(pl, sb->ap + r0 * k, k, p->asum + r0 * nb, p->azero + r0 * nb, nb,
                          r1 - r0, p->lin->w_zero_const);
    }
    sb->folded[chunk_index] = fold_max;
    if (p->gemm && r1 == pl->m) { /* the GEMM reads whole strips: zero codes and parameters */
        memset(sb->ap + pl->m * k, 0, (size_t)((pl->mp - pl->m) * k));
        for (int64_t i = pl->m * nb; i < pl->mp * nb; i++) {
            p->asum[i] = p->azero[i] = p->ascale[i] = 0.0f;
        }
    }
    if (p->chunk == 0) {
        return err;
    }
    /* [even | odd] bytes per chunk of `ch` elements (plain order for the decode layout), minus
     * the zero-point when folded (the layout and sums small_m builds from packed codes) */
    const int64_t ch = p->chunk;
    for (int64_t r = r0; r < r1; r++) {
        const float *za = p->azero + r * nb;
        const uint8_t *cr = codes + (r - r0) * k;
        uint8_t *dst = sb->ap + r * k;
        for (int64_t b = 0; b < nb; b++) {
            const int z = folded ? (int)za[b] : 0;
            int32_t acc = 0;
            /* element i to position i (decode layout) or to its chunk's even / odd half */
            for (int64_t i = b * pl->blk; i < (b + 1) * pl->blk; i++) {
                const int v = cr[i] - z;
                const int64_t at =
                    p->decode_layout ? i : i / ch * ch + i % ch / 2 + i % 2 * (ch / 2);
                dst[at] = (uint8_t)(int8_t)v;
                acc += v;
            }
            p->asum[r * nb + b] = (float)acc;
        }
    }
    return err;
}

#define GEMM_COLUMNS 64 /* output columns per GEMM item (a multiple of 32) */

/* Items of p's product: GEMM tiles of GEMM_COLUMNS columns, or blocks of `product_step` groups of
 * 8 output columns for the gemv. A decode-size product (one chunk of rows) is cut into one
 * contiguous block per thread: each thread then streams its weights front to back, which the
 * hardware prefetchers follow; small interleaved blocks break every thread's stream at each block
 * and cost more than the product (SmolLM2 decode at 2 threads: 224 -> 418 tokens/s). */
static int64_t product_step(const product *p, int64_t rows)
{
    if (rows > p->rows_per_chunk) {
        return PRODUCT_GROUP_BLOCK;
    }
    const int64_t groups = (p->pl.n + 7) / 8, team = omp_get_num_threads();
    return (groups + team - 1) / team;
}

static int64_t product_items(const product *p, int64_t rows)
{
    if (p->gemm) {
        return (p->pl.n + GEMM_COLUMNS - 1) / GEMM_COLUMNS;
    }
    const int64_t groups = (p->pl.n + 7) / 8, step = product_step(p, rows);
    return (groups + step - 1) / step;
}

static void add_bias(const product *p, int64_t rows, int64_t n0, int64_t n1, float *y)
{
    const float *bias = p->lin->bias;
    if (bias == NULL) {
        return;
    }
    n1 = n1 < p->pl.n ? n1 : p->pl.n;
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * p->pl.n;
        for (int64_t n = n0; n < n1; n++) {
            yr[n] = yr[n] + bias[n];
        }
    }
}

/* y[rows][n] = product of the quantized input (+ bias), by claimed items: a GEMM tile packed once
 * and run over every strip of rows, or a block of gemv columns whose weights stay cached across
 * the chunks of rows. */
static void run_product(const product *p, int64_t rows, team_work *w, int64_t base,
                        const shared_bufs *sb, offq_mm_workspace *ws)
{
    const offq_mm_plan *pl = &p->pl;
    const int64_t groups = (pl->n + 7) / 8, R = p->rows_per_chunk, chunks = (rows + R - 1) / R;
    const int64_t step = product_step(p, rows), items = product_items(p, rows);
    int64_t i0, i1;
    while (claim(w, base, items, 1, &i0, &i1)) {
        if (p->gemm) {
            const int64_t n0 = i0 * GEMM_COLUMNS;
            offq_mm_pack_tile(pl, &p->lin->w, n0, GEMM_COLUMNS, ws, p->ops);
            offq_mm_strips(pl, p->ops, sb->ap, p->asum, p->fold_gemm ? sb->folded : NULL, n0,
                           GEMM_COLUMNS, 0, pl->mp / OFFQ_MM_MR, ws, sb->y);
            add_bias(p, rows, n0, n0 + GEMM_COLUMNS, sb->y);
            finish(w, 1);
            continue;
        }
        const int64_t gb = i0 * step, ge = gb + step < groups ? gb + step : groups;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t r0 = c * R, mrows = rows - r0 < R ? rows - r0 : R;
            const offq_mm_gemv_args g = {pl,
                                         &p->lin->w,
                                         sb->ap + r0 * pl->k,
                                         p->asum + r0 * pl->nb,
                                         p->azero + r0 * pl->nb,
                                         p->ascale + r0 * pl->nb,
                                         sb->y + r0 * pl->n};
            p->range(&g, (int)mrows, sb->folded[c] != 0, gb, ge);
        }
        add_bias(p, rows, 8 * gb, 8 * ge, sb->y);
        finish(w, 1);
    }
}

/* Quantize one head vector (kv group) and store it packed at cache position `pos`. */
static offq_status kv_store(const offq_dec_model *md, const offq_dec_cache *cache, int64_t layer,
                            int64_t pos, int kind, int64_t head, const float *x, uint8_t *codes)
{
    const int64_t hd = md->head_dim, Hkv = md->kv_heads, ng = hd / md->kv_group;
    const int64_t slot = ((layer * cache->cap + pos) * 2 + kind) * Hkv + head;
    offq_status err = OFFQ_OK;
    for (int64_t gi = 0; gi < ng; gi++) {
        float scale = 1.0f, zero = 0.0f;
        int32_t sum;
        const offq_status st =
            offq_dispatch.quant_group(x + gi * md->kv_group, md->kv_group, 4, md->kv_symmetric,
                                      1.0f, codes + gi * md->kv_group, &scale, &zero, &sum);
        if (st != OFFQ_OK) {
            err = st;
            memset(codes + gi * md->kv_group, 0, (size_t)md->kv_group);
            scale = 1.0f;
            zero = 0.0f;
        }
        cache->scale[slot * ng + gi] = scale;
        cache->zero[slot * ng + gi] = zero;
    }
    offq_pack_row4(codes, hd, cache->codes + slot * (hd / 2));
    return err;
}

#define ATT_ROWS 32 /* query positions per attention item in prefill (SmolLM2 on Zen 4 against 32: 16
                     * 1.5-3% slower at 512 and 2048 tokens, 64 no faster; 8 was 1-7% behind 16) */

/* KV head g of a layer's cache as the attention kernels' arguments. */
static offq_attn_args cache_args(const offq_dec_model *md, const offq_dec_cache *cache,
                                 int64_t layer, int64_t g)
{
    const int64_t hd = md->head_dim, Hkv = md->kv_heads, ng = hd / md->kv_group;
    const int64_t k0 = (layer * cache->cap * 2) * Hkv + g, v0 = k0 + Hkv;
    const offq_attn_args a = {.kc = cache->codes + k0 * (hd / 2),
                              .vc = cache->codes + v0 * (hd / 2),
                              .ks = cache->scale + k0 * ng,
                              .kz = cache->zero + k0 * ng,
                              .vs = cache->scale + v0 * ng,
                              .vz = cache->zero + v0 * ng,
                              .cstride = 2 * Hkv * (hd / 2),
                              .pstride = 2 * Hkv * ng,
                              .hd = hd,
                              .group = md->kv_group,
                              .tiles = NULL};
    return a;
}

/* Bytes of one KV head's unpacked 8-bit attention tiles over `positions` rows. */
static int64_t head_tile_bytes(const offq_dec_model *m, int64_t positions)
{
    const int64_t tiles = (positions + OFFQ_ATTN_TILE_ROWS - 1) / OFFQ_ATTN_TILE_ROWS;
    return sz_mul(tiles, OFFQ_ATTN_I8_TILE_BYTES(m->head_dim, m->head_dim / m->kv_group));
}

/* Whether a step of `rows` unpacks its layers' K/V tiles once for all its query blocks: a
 * prefill with more than one block of ATT_ROWS rows, on shapes the SIMD 8-bit kernels take. The
 * buffer is planned whatever the attention (its size does not depend on it). */
static int pretiles(const offq_dec_model *m, int64_t rows)
{
    return rows > ATT_ROWS && offq_attn_i8_tiled(m->head_dim, m->kv_group) &&
           m->head_dim <= OFFQ_ATTN_I8_PRETILE_MAX_HD;
}

/* Causal attention of query heads [h0, h1) (all of KV head h0 / rep) at rows [r0, r1) (positions
 * start + r) over the packed cache: the dispatched kernel (attention.c) on the queries scaled by
 * 1/sqrt(hd); outputs into x [rows][H * hd]. kv_tiles: this KV head's unpacked 8-bit tiles, or
 * NULL. */
static void attend(const offq_dec_model *md, const offq_dec_cache *cache, int64_t layer,
                   int64_t start, int64_t r0, int64_t r1, int64_t h0, int64_t h1,
                   const float *qkv, int64_t qkv_n, float *x, const thread_bufs *tb,
                   offq_attend_fn kernel, offq_attend_i8_fn kernel_i8, const uint8_t *kv_tiles)
{
    const int64_t hd = md->head_dim, H = md->heads, Hkv = md->kv_heads;
    const int64_t g = h0 / (H / Hkv);
    const float scale = (float)(1.0 / sqrt((double)hd));
    int64_t nq = 0;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t h = h0; h < h1; h++, nq++) {
            const float *q = qkv + r * qkv_n + h * hd;
            float *qs = tb->q + nq * hd;
            for (int64_t i = 0; i < hd; i++) {
                qs[i] = q[i] * scale;
            }
            tb->n[nq] = start + r + 1;
            tb->out[nq] = x + r * H * hd + h * hd;
        }
    }
    offq_attn_args a = cache_args(md, cache, layer, g);
    a.tiles = kv_tiles; /* this KV head's, or NULL */
    if (kernel_i8 != NULL) {
        kernel_i8(&a, nq, tb->q, tb->n, tb->scores, tb->out, tb->row, tb->qwork);
    } else {
        kernel(&a, nq, tb->q, tb->n, tb->scores, tb->out, tb->row);
    }
}

/* ---- scratch -------------------------------------------------------------------------------- */

typedef struct {
    int64_t max_k, max_n, max_nb, tmp_len;
} step_dims;

static int64_t lin_nb(const offq_dec_linear *l)
{
    const int64_t blk = l->a_group < l->w.group ? l->a_group : l->w.group;
    return l->k / blk;
}

static step_dims dims_of(const offq_dec_model *m)
{
    step_dims s;
    layer_widths(m->d, m->ffn, m->heads, m->kv_heads, m->head_dim, &s.max_k, &s.max_n);
    s.max_nb = 1;
    for (int64_t i = 0; i < m->layers; i++) {
        const offq_dec_layer *L = &m->layer[i];
        const offq_dec_linear *ls[4] = {&L->qkv, &L->o, &L->gate_up, &L->down};
        for (int j = 0; j < 4; j++) {
            const int64_t nb = lin_nb(ls[j]);
            s.max_nb = nb > s.max_nb ? nb : s.max_nb;
        }
    }
    /* fwht scratch: the mix of n = m * 2^k needs max(n, m * OFFQ_MIX_W) floats (m < 256) */
    s.tmp_len = m->ffn > m->head_dim ? m->ffn : m->head_dim;
    s.tmp_len = s.tmp_len > 256 * OFFQ_MIX_W ? s.tmp_len : 256 * OFFQ_MIX_W;
    return s;
}

static int64_t padded_rows(int64_t rows) { return (rows + OFFQ_MM_MR - 1) / OFFQ_MM_MR * OFFQ_MM_MR; }

static int64_t shared_bytes(const step_dims *s, int64_t rows)
{
    const int64_t mp = padded_rows(rows);
    int64_t b = align64(sz_mul(sz_mul(rows, s->max_k), 4));
    b = sz_add(b, align64(sz_mul(sz_mul(mp, s->max_n), 4)));
    b = sz_add(b, align64(sz_mul(mp, s->max_k)));
    b = sz_add(b, align64(sz_mul(sz_mul(12, mp), s->max_nb)));
    return sz_add(b, align64(sz_mul(mp, 4)));
}

/* The GEMM workspace of one thread: a tile of GEMM_COLUMNS columns of the largest k. */
static int64_t workspace_bytes(const step_dims *s)
{
    return align64(GEMM_COLUMNS * s->max_k) + align64(3 * s->max_nb * GEMM_COLUMNS * 4) +
           align64(16 * s->max_k) + align64(s->max_k) + align64(16 * s->max_nb * 4);
}

/* The 8-bit attention's query work (OFFQ_ATTN_I8_QBYTES), its value scales sized with sz_mul. */
static int64_t qwork_bytes(const offq_dec_model *m, int64_t nq, int64_t positions)
{
    const int64_t ng = m->head_dim / m->kv_group;
    const int64_t tiles = positions / OFFQ_ATTN_TILE_ROWS + 1; /* OFFQ_ATTN_I8_GRID_BYTES */
    return sz_add(sz_add(align64(OFFQ_ATTN_I8_QBYTES(nq, m->head_dim, ng, 0)),
                         align64(sz_mul(ng * 4, positions))),
                  align64(sz_mul(nq * 8, tiles)));
}

static int64_t thread_bytes(const offq_dec_model *m, const step_dims *s, int64_t positions)
{
    const int64_t nq = ATT_ROWS * (m->heads / m->kv_heads);
    int64_t b = sz_add(align64(MS * s->max_k), align64(sz_mul(sz_mul(nq, 4), sz_add(positions, 1))));
    b = sz_add(b, qwork_bytes(m, nq, positions));
    return sz_add(b, align64(s->tmp_len * 4) + align64(nq * m->head_dim * 4) +
                         align64(OFFQ_ATTN_ROW_FLOATS(m->head_dim) * 4) + align64(nq * 8) +
                         align64(nq * (int64_t)sizeof(float *)) + workspace_bytes(s));
}

int64_t offq_dec_scratch_bytes(const offq_dec_model *m, int64_t rows, int64_t positions,
                               int threads)
{
    const step_dims s = dims_of(m);
    const int64_t tiles =
        pretiles(m, rows) ? align64(sz_mul(m->kv_heads, head_tile_bytes(m, positions))) : 0;
    return sz_add(sz_add(64 + shared_bytes(&s, rows), tiles),
                  sz_mul(threads, thread_bytes(m, &s, positions)));
}

/* ---- the step ------------------------------------------------------------------------------- */

offq_status offq_dec_forward(const offq_dec_model *md, float *h, int64_t rows, int64_t start,
                             const float *cos, const float *sin, const offq_dec_cache *cache,
                             void *scratch, int64_t scratch_bytes, offq_kernel kernel,
                             int attention_int8)
{
    if (kernel == OFFQ_KERNEL_AUTO) {
        kernel = offq_dispatch.matmul_best;
    }
    if ((int)kernel < 0 || kernel >= OFFQ_KERNEL_COUNT || offq_dispatch.matmul[kernel] == NULL) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    if (rows <= 0 || md->layers == 0) {
        return OFFQ_OK;
    }
    const offq_mm_ops *ops = offq_dispatch.matmul[kernel];
    /* a forced generic variant runs the generic attention too (the reference end to end) */
    const offq_attend_fn attend_fn =
        kernel == OFFQ_KERNEL_GENERIC ? offq_attend_generic : offq_dispatch.attend;
    const offq_attend_i8_fn attend_i8_fn =
        !attention_int8 ? NULL
                        : (kernel == OFFQ_KERNEL_GENERIC ? offq_attend_i8_generic
                                                         : offq_dispatch.attend_i8);
    const offq_swiglu_fn swiglu_fn =
        kernel == OFFQ_KERNEL_GENERIC ? offq_swiglu_generic : offq_dispatch.swiglu;
    offq_fwht_row_plan r3, r4;
    memset(&r3, 0, sizeof r3);
    memset(&r4, 0, sizeof r4);
    offq_status st;
    if (md->r3 && (st = offq_fwht_row_plan_f32(md->head_dim, &r3)) != OFFQ_OK) {
        return st;
    }
    if (md->r4 && (st = offq_fwht_row_plan_f32(md->ffn, &r4)) != OFFQ_OK) {
        return st;
    }
    const step_dims sd = dims_of(md);
    if ((r3.tmp_len > sd.tmp_len && md->r3) || (r4.tmp_len > sd.tmp_len && md->r4)) {
        return OFFQ_ERR_NOMEM;
    }
    const int max_threads = omp_get_max_threads();
    const int64_t positions = start + rows;
    if (offq_dec_scratch_bytes(md, rows, positions, max_threads) > scratch_bytes) {
        return OFFQ_ERR_NOMEM;
    }
    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    shared_bufs sb;
    sb.x = (float *)base;
    base += align64(rows * sd.max_k * 4);
    const int64_t mp = padded_rows(rows);
    sb.y = (float *)base;
    base += align64(mp * sd.max_n * 4);
    sb.ap = base;
    base += align64(mp * sd.max_k);
    sb.apar = (float *)base;
    base += align64(3 * mp * sd.max_nb * 4);
    sb.folded = (int32_t *)base;
    base += align64(mp * 4);
    sb.kv_tiles = NULL;
    if (pretiles(md, rows)) {
        sb.kv_tiles = base;
        base += align64(sz_mul(md->kv_heads, head_tile_bytes(md, positions)));
    }
    uint8_t *thread_base = base;
    const int64_t per_thread = thread_bytes(md, &sd, positions);

    const int64_t d = md->d, hd = md->head_dim, H = md->heads, Hkv = md->kv_heads, f = md->ffn;
    const int64_t half = hd / 2, qkv_n = (H + 2 * Hkv) * hd, rep = H / Hkv;
    /* the 8-bit SIMD attention reads this step's K/V tiles from one shared unpacking */
    uint8_t *const kv_tiles = attend_i8_fn != NULL && attend_i8_fn == offq_dispatch.attend_i8 &&
                                      offq_dispatch.attn_i8_pretile != NULL
                                  ? sb.kv_tiles
                                  : NULL;
    const int64_t KT = OFFQ_ATTN_TILE_ROWS, tiles_per_head = (positions + KT - 1) / KT;
    const int64_t tile_bytes = OFFQ_ATTN_I8_TILE_BYTES(md->head_dim, md->head_dim / md->kv_group);
    team_work work;
    atomic_init(&work.claimed, 0);
    atomic_init(&work.done, 0);
    int err = OFFQ_OK;

#pragma omp parallel num_threads(max_threads) reduction(max : err)
    {
        const int tid = omp_get_thread_num();
        const int64_t team = omp_get_num_threads();
        thread_bufs tb;
        uint8_t *mine = thread_base + tid * per_thread;
        tb.codes = mine;
        mine += align64(MS * sd.max_k);
        tb.scores = (float *)mine;
        mine += align64(ATT_ROWS * rep * (positions + 1) * 4);
        tb.tmp = (float *)mine;
        mine += align64(sd.tmp_len * 4);
        tb.q = (float *)mine;
        mine += align64(ATT_ROWS * rep * hd * 4);
        tb.row = (float *)mine;
        mine += align64(OFFQ_ATTN_ROW_FLOATS(hd) * 4);
        tb.qwork = mine;
        mine += qwork_bytes(md, ATT_ROWS * rep, positions);
        tb.n = (int64_t *)mine;
        mine += align64(ATT_ROWS * rep * 8);
        tb.out = (float **)mine;
        mine += align64(ATT_ROWS * rep * (int64_t)sizeof(float *));
        tb.ws.panels = mine;
        mine += align64(GEMM_COLUMNS * sd.max_k);
        tb.ws.par = (float *)mine;
        mine += align64(3 * sd.max_nb * GEMM_COLUMNS * 4);
        tb.ws.rows = mine;
        mine += align64(16 * sd.max_k);
        tb.ws.tmp = mine;
        mine += align64(sd.max_k);
        tb.ws.psums = (float *)mine;
        offq_status e = OFFQ_OK, s1;
        int64_t base = 0, n, lo, hi;
#define KEEP(expr) ((s1 = (expr)) > e ? (e = s1) : e)

        for (int64_t li = 0; li < md->layers; li++) {
            const offq_dec_layer *L = &md->layer[li];
            product pq, po, pg, pd;
            plan_product(&L->qkv, ops, rows, sb.apar, &pq);
            plan_product(&L->o, ops, rows, sb.apar, &po);
            plan_product(&L->gate_up, ops, rows, sb.apar, &pg);
            plan_product(&L->down, ops, rows, sb.apar, &pd);

            /* 1. residual (+ the previous layer's down_proj), RMSNorm, quantize: chunks of pq */
            n = (rows + pq.rows_per_chunk - 1) / pq.rows_per_chunk;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r0 = lo * pq.rows_per_chunk;
                const int64_t r1 = r0 + pq.rows_per_chunk < rows ? r0 + pq.rows_per_chunk : rows;
                residual_norm_rows(h, sb.y, li > 0, L->input_norm, d, md->eps, r0, r1, sb.x);
                KEEP(quantize_chunk(md, &pq, sb.x, d, r0, r1, lo, &sb, tb.codes));
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 2. q/k/v */
            run_product(&pq, rows, &work, base, &sb, &tb.ws);
            phase_end(&work, &base, product_items(&pq, rows));
            /* 3. head vectors: RoPE + R3 on q and k; k and v into the cache. A prompt claims a
             * token's vectors at a time: one claim per small vector made the two threads fight
             * over the shared counter's cache line (perf: ~2% of a 2-thread prefill on it) */
            n = rows * (H + 2 * Hkv);
            const int64_t per_claim = rows >= ATT_ROWS ? H + 2 * Hkv : 1;
            while (claim(&work, base, n, per_claim, &lo, &hi)) {
                for (int64_t item = lo; item < hi; item++) {
                    const int64_t r = item / (H + 2 * Hkv), v = item % (H + 2 * Hkv);
                    float *x = sb.y + r * qkv_n + v * hd;
                    if (v < H + Hkv) {
                        rope_row(x, hd, cos + r * half, sin + r * half);
                        if (md->r3) {
                            offq_fwht_row_f32(x, &r3, tb.tmp);
                        }
                        if (v >= H && L->k_offset != NULL) { /* softmax ignores a common shift */
                            const float *mu = L->k_offset + (v - H) * hd;
                            for (int64_t j = 0; j < hd; j++) {
                                x[j] -= mu[j];
                            }
                        }
                    }
                    if (v >= H) {
                        const int kind = v >= H + Hkv;
                        KEEP(kv_store(md, cache, li, start + r, kind, v - H - kind * Hkv, x,
                                      tb.codes));
                    }
                }
                finish(&work, hi - lo);
            }
            phase_end(&work, &base, n);
            /* the 8-bit attention for this layer where every grid it reads fits it (a key or value
             * group of one sign can have a zero-point outside the codes: offq_attn_i8_fits), the
             * float one otherwise; each thread finds the same answer */
            const int64_t kv_ng = hd / md->kv_group, at = li * cache->cap * 2 * Hkv * kv_ng;
            const offq_attend_i8_fn layer_i8 =
                attend_i8_fn != NULL && offq_attn_i8_fits(cache->scale + at, cache->zero + at,
                                                          positions * 2 * Hkv * kv_ng)
                    ? attend_i8_fn
                    : NULL;
            /* 3b. the 8-bit attention's K/V tiles of this layer, unpacked once for all blocks of
             * ATT_ROWS rows (each block unpacked every tile it reads: ~3% of SmolLM2's 2048-token
             * prefill, benchmarks/results_speed.md) */
            if (kv_tiles != NULL && layer_i8 != NULL) {
                n = Hkv * tiles_per_head;
                while (claim(&work, base, n, 1, &lo, &hi)) {
                    for (int64_t item = lo; item < hi; item++) {
                        /* item = g * tiles_per_head + tile: also its place in kv_tiles */
                        const int64_t g = item / tiles_per_head, j0 = item % tiles_per_head * KT;
                        const int64_t jn = positions - j0 < KT ? positions - j0 : KT;
                        const offq_attn_args a = cache_args(md, cache, li, g);
                        offq_dispatch.attn_i8_pretile(&a, j0, jn, kv_tiles + item * tile_bytes);
                    }
                    finish(&work, hi - lo);
                }
                phase_end(&work, &base, n);
            }
            /* 4. attention -> x [rows][H * hd]: when decoding, per row and block of a KV head's
             * query heads, as few blocks as give every thread an item (each block decodes the
             * cached rows once: one block per KV head halved SmolLM2's attention at 2000
             * positions on 2 threads; one query head per block decoded each row 3 times); per KV
             * head and ATT_ROWS positions in prefill */
            const int per_row = rows <= OFFQ_MM_MR / 2;
            const int64_t blocks = (team + Hkv - 1) / Hkv < rep ? (team + Hkv - 1) / Hkv : rep;
            const int64_t per_block = (rep + blocks - 1) / blocks;
            n = per_row ? rows * Hkv * blocks : (rows + ATT_ROWS - 1) / ATT_ROWS * Hkv;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                if (per_row) {
                    const int64_t r = lo / (Hkv * blocks), g = lo / blocks % Hkv;
                    const int64_t h0 = g * rep + lo % blocks * per_block, hg = (g + 1) * rep;
                    const int64_t h1 = h0 + per_block < hg ? h0 + per_block : hg;
                    if (h0 < h1) { /* the last block may be empty (rep 5 in blocks of 2) */
                        attend(md, cache, li, start, r, r + 1, h0, h1, sb.y, qkv_n, sb.x, &tb,
                               attend_fn, layer_i8, NULL);
                    }
                } else {
                    const int64_t r0 = lo / Hkv * ATT_ROWS, g = lo % Hkv;
                    const uint8_t *head = kv_tiles != NULL && layer_i8 != NULL
                                              ? kv_tiles + g * tiles_per_head * tile_bytes
                                              : NULL;
                    attend(md, cache, li, start, r0, r0 + ATT_ROWS < rows ? r0 + ATT_ROWS : rows,
                           g * rep, (g + 1) * rep, sb.y, qkv_n, sb.x, &tb, attend_fn, layer_i8,
                           head);
                }
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 5. quantize the attention output */
            n = (rows + po.rows_per_chunk - 1) / po.rows_per_chunk;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r0 = lo * po.rows_per_chunk;
                const int64_t r1 = r0 + po.rows_per_chunk < rows ? r0 + po.rows_per_chunk : rows;
                KEEP(quantize_chunk(md, &po, sb.x, H * hd, r0, r1, lo, &sb, tb.codes));
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 6. o_proj */
            run_product(&po, rows, &work, base, &sb, &tb.ws);
            phase_end(&work, &base, product_items(&po, rows));
            /* 7. residual, RMSNorm, quantize: chunks of pg */
            n = (rows + pg.rows_per_chunk - 1) / pg.rows_per_chunk;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r0 = lo * pg.rows_per_chunk;
                const int64_t r1 = r0 + pg.rows_per_chunk < rows ? r0 + pg.rows_per_chunk : rows;
                residual_norm_rows(h, sb.y, 1, L->post_norm, d, md->eps, r0, r1, sb.x);
                KEEP(quantize_chunk(md, &pg, sb.x, d, r0, r1, lo, &sb, tb.codes));
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 8. gate/up */
            run_product(&pg, rows, &work, base, &sb, &tb.ws);
            phase_end(&work, &base, product_items(&pg, rows));
            /* 9. SwiGLU, R4, quantize: chunks of pd */
            n = (rows + pd.rows_per_chunk - 1) / pd.rows_per_chunk;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r0 = lo * pd.rows_per_chunk;
                const int64_t r1 = r0 + pd.rows_per_chunk < rows ? r0 + pd.rows_per_chunk : rows;
                for (int64_t r = r0; r < r1; r++) {
                    const float *gr = sb.y + r * 2 * f, *ur = gr + f;
                    float *xr = sb.x + r * f;
                    swiglu_fn(gr, ur, xr, f);
                    if (md->r4) {
                        offq_fwht_row_f32(xr, &r4, tb.tmp);
                    }
                }
                KEEP(quantize_chunk(md, &pd, sb.x, f, r0, r1, lo, &sb, tb.codes));
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 10. down_proj */
            run_product(&pd, rows, &work, base, &sb, &tb.ws);
            phase_end(&work, &base, product_items(&pd, rows));
        }
        /* the last residual */
        while (claim(&work, base, rows, 1, &lo, &hi)) {
            for (int64_t i = 0; i < d; i++) {
                h[lo * d + i] = h[lo * d + i] + sb.y[lo * d + i];
            }
            finish(&work, 1);
        }
        phase_end(&work, &base, rows);
#undef KEEP
        err = (int)e;
    }
    return (offq_status)err;
}
