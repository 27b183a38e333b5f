/* decoder_wq.c: every decoder layer of a weight-only model (packed 2-, 3-, 4- or 8-bit weights,
 * float32 activations and KV cache) for a few tokens of one sequence, in ONE OpenMP team
 * (contract: offq.h, "weight-only decoder step"; the team's work counters: decoder_team.h).
 *
 * Why: the NumPy-sequenced decode of a weight-only model crosses into Python about ten times a
 * layer, and matmul_wq runs a product of under ~2M multiply-adds on one thread (waking a team
 * per call costs more than it saves), so on SmolLM2-135M every product of a decode step ran on
 * one core and Python took about a third of the step. Here the team starts once per step and
 * every product is split over it, one contiguous block of output columns per thread (each thread
 * then streams its weights front to back, as the hardware prefetchers like).
 *
 * Phases of a layer (each waits for the one before):
 *   1. residual (+ the previous layer's down_proj output), RMSNorm, the q/k/v product's input
 *      (group sums and the row kernel's layout: offq_wq_prepare)
 *   2. q/k/v product (+ bias)
 *   3. per head vector: RoPE on q and k; k and v into the cache
 *   4. attention per row and chunk of positions (attention_f32.c), then each row and head's
 *      chunks merged
 *   5. the o_proj input                6. o_proj product (+ bias)
 *   7. residual, RMSNorm, gate/up input 8. fused gate/up product (+ bias)
 *   9. SwiGLU, the down_proj input     10. down_proj product (+ bias)
 * and the next layer's phase 1 adds the down_proj output to the residual.
 *
 * Against the NumPy path (offq/model/decoder.py on PackedWeightLinear): the products are
 * matmul_wq's own row kernels on the same prepared input, the bias and residual adds, RoPE and
 * SwiGLU the same float32 operations; the RMSNorm sum of squares (float64 here), the attention's
 * dot products and sums (BLAS there; here split over chunks of positions) and exp (libm in the
 * generic kernels, a polynomial in the SIMD ones) round differently, so hidden states agree to
 * float32 rounding.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "decoder_team.h"
#include "kernels.h"

/* Buffers the team shares (carved from the caller's scratch). */
typedef struct {
    float *x;             /* [rows][k] float input of the next product, k that product's */
    float *xp;            /* [rows][k] the same in the row kernel's layout (64-byte aligned) */
    float *xsum;          /* the group sums and row factors of offq_wq_prepare */
    float *y;             /* [rows][n] output of the last product */
    const float *unscale; /* the row kernels' argument, set with the input */
} shared_bufs;

/* The input of p's product from the rows of sb->x: one item, done by whichever thread claims it
 * (a decode step has one row; the prepared input is a few microseconds). */
static void prepare_input(const offq_dwq_linear *lin, const offq_wq_ops *ops, int64_t rows,
                          shared_bufs *sb)
{
    const offq_wq_operand *w = &lin->w;
    sb->unscale = offq_wq_prepare(ops, sb->x, rows, w->k, w->group, w->bits, sb->xsum, sb->xp);
}

/* y[rows][n] = the product (+ bias), in `items` contiguous blocks of output columns. */
static void run_product(const offq_dwq_linear *lin, const offq_wq_ops *ops, int64_t rows,
                        team_work *w, int64_t base, int64_t items, const shared_bufs *sb)
{
    const offq_wq_operand *op = &lin->w;
    const int64_t n = op->n, step = ((n + items - 1) / items + 7) / 8 * 8;
    const float *xin = ops->prep != NULL ? sb->xp : sb->x;
    int64_t i0, i1;
    while (claim(w, base, items, 1, &i0, &i1)) {
        const int64_t n0 = i0 * step, n1 = n0 + step < n ? n0 + step : n;
        if (n0 < n1) {
            const unsigned csr = sb->unscale != NULL ? offq_daz_clear() : 0;
            ops->rows(op, xin, sb->xsum, sb->unscale, rows, n0, n1, n, sb->y);
            offq_csr_restore(csr);
            if (lin->bias != NULL) {
                for (int64_t r = 0; r < rows; r++) {
                    float *yr = sb->y + r * n;
                    for (int64_t j = n0; j < n1; j++) {
                        yr[j] = yr[j] + lin->bias[j];
                    }
                }
            }
        }
        finish(w, 1);
    }
}

/* Attention of row r's query heads over chunk c of the float32 cache of `layer`
 * (offq_attend_f32_chunk; nothing past the row's last position): the queries scaled as
 * offq/model/ops.py scales them (q * float32(1 / sqrt(hd))) into qs, each head's partial into its
 * record of `part` ([rows][chunks][heads] records of hd + 2 floats). */
static void attend_chunk(const offq_dwq_model *md, offq_attend_f32_fn attend, const float *kv,
                         int64_t cap, int64_t layer, int64_t start, int64_t r, int64_t c,
                         int64_t chunks, const float *q, float *part, float *scores, float *qs)
{
    const int64_t hd = md->head_dim, H = md->heads, Hkv = md->kv_heads;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int64_t i = 0; i < H * hd; i++) {
        qs[i] = q[i] * scale;
    }
    offq_attend_f32_chunk(attend, qs, H, Hkv, hd, kv + layer * cap * 2 * Hkv * hd, c,
                          start + r + 1, scores, part + (r * chunks + c) * H * (hd + 2));
}

/* ---- scratch -------------------------------------------------------------------------------- */

typedef struct {
    int64_t max_k, max_n, max_sums; /* widest input, widest output, most offq_wq_prepare floats */
} step_dims;

static step_dims dims_of(const offq_dwq_model *m, int64_t rows)
{
    step_dims s;
    layer_widths(m->d, m->ffn, m->heads, m->kv_heads, m->head_dim, &s.max_k, &s.max_n);
    s.max_sums = 0;
    for (int64_t i = 0; i < m->layers; i++) {
        const offq_dwq_layer *L = &m->layer[i];
        const offq_dwq_linear *ls[4] = {&L->qkv, &L->o, &L->gate_up, &L->down};
        for (int j = 0; j < 4; j++) {
            const int64_t f = offq_wq_input_floats(rows, ls[j]->w.k, ls[j]->w.group);
            s.max_sums = f > s.max_sums ? f : s.max_sums;
        }
    }
    return s;
}

/* The attention's partial records: [rows][chunks of the longest row][heads] of hd + 2 floats. */
static int64_t part_bytes(const offq_dwq_model *m, int64_t rows, int64_t positions)
{
    const int64_t chunks = offq_attn_f32_chunks(positions);
    return align64(sz_mul(sz_mul(sz_mul(rows, chunks), m->heads), sz_mul(m->head_dim + 2, 4)));
}

static int64_t shared_bytes(const offq_dwq_model *m, const step_dims *s, int64_t rows,
                            int64_t positions)
{
    const int64_t xk = align64(sz_mul(sz_mul(rows, s->max_k), 4));
    return sz_add(sz_add(sz_add(sz_mul(2, xk), align64(sz_mul(s->max_sums, 4))),
                         align64(sz_mul(sz_mul(rows, s->max_n), 4))),
                  part_bytes(m, rows, positions));
}

/* A thread's attention scratch: one chunk's scores and the scaled queries of a row. */
static int64_t thread_bytes(const offq_dwq_model *m)
{
    return align64(sz_mul(sz_mul(m->heads, OFFQ_ATTN_F32_CHUNK + m->head_dim), 4));
}

int64_t offq_dwq_scratch_bytes(const offq_dwq_model *m, int64_t rows, int64_t positions,
                               int threads)
{
    const step_dims s = dims_of(m, rows);
    return sz_add(64 + shared_bytes(m, &s, rows, positions), sz_mul(threads, thread_bytes(m)));
}

/* ---- the step ------------------------------------------------------------------------------- */

/* Claim the one item of a single-item phase: 1 for the thread that gets it. */
static inline int claim_single(team_work *w, int64_t base)
{
    int64_t lo, hi;
    return claim(w, base, 1, 1, &lo, &hi);
}

offq_status offq_dwq_forward(const offq_dwq_model *md, float *h, int64_t rows, int64_t start,
                             const float *cos, const float *sin, float *kv, int64_t cap,
                             void *scratch, int64_t scratch_bytes, offq_kernel kernel)
{
    if (rows > OFFQ_WQ_SMALL_M) {
        return OFFQ_ERR_UNSUPPORTED;
    }
    for (int64_t i = 0; i < md->layers; i++) { /* every product has a usable variant */
        const offq_dwq_layer *L = &md->layer[i];
        const offq_dwq_linear *ls[4] = {&L->qkv, &L->o, &L->gate_up, &L->down};
        for (int j = 0; j < 4; j++) {
            if (offq_wq_select(ls[j]->w.group, kernel) == NULL) {
                return OFFQ_ERR_UNSUPPORTED;
            }
        }
    }
    if (rows <= 0 || md->layers == 0) {
        return OFFQ_OK;
    }
    /* a forced generic variant runs the generic SwiGLU too (the reference end to end) */
    const offq_swiglu_fn swiglu_fn =
        kernel == OFFQ_KERNEL_GENERIC ? offq_swiglu_generic : offq_dispatch.swiglu;
    const int max_threads = omp_get_max_threads();
    const int64_t positions = start + rows;
    if (offq_dwq_scratch_bytes(md, rows, positions, max_threads) > scratch_bytes) {
        return OFFQ_ERR_NOMEM;
    }
    const step_dims sd = dims_of(md, rows);
    uint8_t *at = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    shared_bufs sb;
    sb.x = (float *)at;
    at += align64(rows * sd.max_k * 4);
    sb.xp = (float *)at;
    at += align64(rows * sd.max_k * 4);
    sb.xsum = (float *)at;
    at += align64(sd.max_sums * 4);
    sb.y = (float *)at;
    at += align64(rows * sd.max_n * 4);
    sb.unscale = NULL;
    float *part = (float *)at;
    at += part_bytes(md, rows, positions);
    uint8_t *thread_base = at;
    const int64_t per_thread = thread_bytes(md);
    const int64_t chunks = offq_attn_f32_chunks(positions); /* of the longest row */
    const offq_attend_f32_fn attend =
        kernel == OFFQ_KERNEL_GENERIC ? offq_attend_f32_generic : offq_dispatch.attend_f32;

    const int64_t d = md->d, hd = md->head_dim, H = md->heads, Hkv = md->kv_heads, f = md->ffn;
    const int64_t half = hd / 2, qkv_n = (H + 2 * Hkv) * hd;
    team_work work;
    atomic_init(&work.claimed, 0);
    atomic_init(&work.done, 0);

#pragma omp parallel num_threads(max_threads)
    {
        uint8_t *mine = thread_base + omp_get_thread_num() * per_thread;
        float *scores = (float *)mine, *qs = scores + H * OFFQ_ATTN_F32_CHUNK;
        const int64_t team = omp_get_num_threads();
        int64_t base = 0, n, lo, hi;
        for (int64_t li = 0; li < md->layers; li++) {
            const offq_dwq_layer *L = &md->layer[li];
            const offq_wq_ops *oq = offq_wq_select(L->qkv.w.group, kernel);
            const offq_wq_ops *oo = offq_wq_select(L->o.w.group, kernel);
            const offq_wq_ops *og = offq_wq_select(L->gate_up.w.group, kernel);
            const offq_wq_ops *od = offq_wq_select(L->down.w.group, kernel);

            /* 1. residual (+ down_proj), RMSNorm, the q/k/v input */
            if (claim_single(&work, base)) {
                residual_norm_rows(h, sb.y, li > 0, L->input_norm, d, md->eps, 0, rows, sb.x);
                prepare_input(&L->qkv, oq, rows, &sb);
                finish(&work, 1);
            }
            phase_end(&work, &base, 1);
            /* 2. q/k/v */
            run_product(&L->qkv, oq, rows, &work, base, team, &sb);
            phase_end(&work, &base, team);
            /* 3. head vectors: RoPE on q and k; k and v into the cache */
            n = rows * (H + 2 * Hkv);
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r = lo / (H + 2 * Hkv), v = lo % (H + 2 * Hkv);
                float *x = sb.y + r * qkv_n + v * hd;
                if (v < H + Hkv) {
                    rope_row(x, hd, cos + r * half, sin + r * half);
                }
                if (v >= H) {
                    const int64_t kind = v >= H + Hkv, head = v - H - kind * Hkv;
                    const int64_t slot = ((li * cap + start + r) * 2 + kind) * Hkv + head;
                    memcpy(kv + slot * hd, x, sizeof(float) * (size_t)hd);
                }
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 4. attention: each chunk of positions of each row, then the chunks' partials
             * merged per row and head -> x [rows][H * hd] */
            n = rows * chunks;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r = lo / chunks, c = lo % chunks;
                attend_chunk(md, attend, kv, cap, li, start, r, c, chunks, sb.y + r * qkv_n, part,
                             scores, qs);
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            n = rows * H;
            while (claim(&work, base, n, 1, &lo, &hi)) {
                const int64_t r = lo / H, head = lo % H;
                offq_attn_f32_merge(part + (r * chunks * H + head) * (hd + 2),
                                    offq_attn_f32_chunks(start + r + 1), H * (hd + 2), hd,
                                    sb.x + r * H * hd + head * hd);
                finish(&work, 1);
            }
            phase_end(&work, &base, n);
            /* 5-6. o_proj */
            if (claim_single(&work, base)) {
                prepare_input(&L->o, oo, rows, &sb);
                finish(&work, 1);
            }
            phase_end(&work, &base, 1);
            run_product(&L->o, oo, rows, &work, base, team, &sb);
            phase_end(&work, &base, team);
            /* 7-8. residual, RMSNorm, gate/up */
            if (claim_single(&work, base)) {
                residual_norm_rows(h, sb.y, 1, L->post_norm, d, md->eps, 0, rows, sb.x);
                prepare_input(&L->gate_up, og, rows, &sb);
                finish(&work, 1);
            }
            phase_end(&work, &base, 1);
            run_product(&L->gate_up, og, rows, &work, base, team, &sb);
            phase_end(&work, &base, team);
            /* 9-10. SwiGLU, down_proj */
            if (claim_single(&work, base)) {
                for (int64_t r = 0; r < rows; r++) {
                    swiglu_fn(sb.y + r * 2 * f, sb.y + r * 2 * f + f, sb.x + r * f, f);
                }
                prepare_input(&L->down, od, rows, &sb);
                finish(&work, 1);
            }
            phase_end(&work, &base, 1);
            run_product(&L->down, od, rows, &work, base, team, &sb);
            phase_end(&work, &base, team);
        }
        /* the last residual */
        if (claim_single(&work, base)) {
            for (int64_t i = 0; i < rows * d; i++) {
                h[i] = h[i] + sb.y[i];
            }
            finish(&work, 1);
        }
        phase_end(&work, &base, 1);
    }
    return OFFQ_OK;
}
