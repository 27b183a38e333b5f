/* kernels.h: internal to the C core (not part of the API in offq.h).
 *
 * Every kernel has a generic C reference (csrc/<concern>.c, suffix _generic) and optional SIMD
 * variants of the same name with an ISA suffix (csrc/x86/<concern>_<isa>.c, target attributes per
 * function, never -march=native). The drivers call them only through offq_dispatch, the table that
 * cpu.c fills once at import from the CPU features and OFFQ_DISABLE_SIMD. Helpers a generic kernel
 * shares with its variants (so that they compute identical results) live here as inline functions.
 */
#ifndef OFFQ_KERNELS_H
#define OFFQ_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "offq.h"

#if defined(__x86_64__) || defined(__i386__)
#define OFFQ_X86 1
#include <xmmintrin.h>

#define OFFQ_MXCSR_DAZ 0x40u /* MXCSR's denormals-are-zero bit (subnormal inputs read as 0) */

/* Code that reads subnormal operands as they are (matmul_wq's subnormal decode, kernels below)
 * clears DAZ for its own thread, since a process may run with it set (code built with
 * -ffast-math sets it when loaded), and puts the returned MXCSR back after. */
static inline unsigned offq_daz_clear(void)
{
    const unsigned csr = _mm_getcsr();
    if (csr & OFFQ_MXCSR_DAZ) {
        _mm_setcsr(csr & ~OFFQ_MXCSR_DAZ);
    }
    return csr;
}

static inline void offq_csr_restore(unsigned csr)
{
    if (csr & OFFQ_MXCSR_DAZ) {
        _mm_setcsr(csr);
    }
}
#else
static inline unsigned offq_daz_clear(void) { return 0; } /* no MXCSR: nothing to clear */
static inline void offq_csr_restore(unsigned csr) { (void)csr; }
#endif

/* A 64-byte aligned buffer of at least `bytes` (at least one line), released with free(). */
static inline void *offq_alloc64(size_t bytes)
{
    const size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

/* A LAPACKE return code as a status (linalg.c): 0 -> OFFQ_OK, a workspace or transpose
 * allocation failure -> OFFQ_ERR_NOMEM, info > 0 (no convergence) -> OFFQ_ERR_NOCONVERGE, info < 0
 * (an argument LAPACKE rejected, which the bindings' checks prevent) -> OFFQ_ERR_UNSUPPORTED. */
offq_status offq_lapack_status(int64_t info);

/* OSAQ's tail count: the longest prefix of values whose magnitudes sum to at most budget. */
static inline int64_t offq_fitting_prefix(const double *values, int64_t n, double budget)
{
    double mass = 0.0;
    int64_t m = 0;
    while (m < n && (mass += fabs(values[m])) <= budget) {
        m++;
    }
    return m;
}

/* splitmix64 in [-1, 1): the deterministic start vectors of the iterative eigensolvers (cov.c's
 * Lanczos, tail_subspace.c's subspace iteration). */
static inline double offq_uniform_pm1(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

/* ---- quant --------------------------------------------------------------------------------- */

/* rintf() in the default rounding mode, written so that it vectorises without SSE4.1: for
 * |v| < 2^23, |v| + 2^23 rounds to an integer (ties to even); larger |v| already are integers. */
static inline float offq_round_half_even(float v)
{
    const float two23 = 8388608.0f;
    const float t = fabsf(v);
    const float r = (t < two23) ? (t + two23) - two23 : t;
    return copysignf(r, v);
}

static inline int offq_is_nonfinite(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x7f800000u) == 0x7f800000u;
}

/* max |g[i]| over g[0..n) into *amax; nonzero when some g[i] is NaN or Inf. */
static inline int offq_abs_max(const float *restrict g, int64_t n, float *amax)
{
    float m = 0.0f;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(g[i]);
        bad |= offq_is_nonfinite(g[i]);
        m = a > m ? a : m;
    }
    *amax = m;
    return bad;
}

/* scale and zero of an asymmetric group from its min and max (formula: offq.h). */
static inline offq_status offq_quant_params_asym(float mn, float mx, int bits, float clip,
                                                 float *scale, float *zero)
{
    const float range = mx - mn;
    if (offq_is_nonfinite(range)) {
        return OFFQ_ERR_OVERFLOW;
    }
    /* shrink about the midpoint: a group of offset + noise keeps its offset */
    const float d = (0.5f * (1.0f - clip)) * range;
    const float lo = mn + d, hi = mx - d;
    float s = (hi - lo) / (float)((1 << bits) - 1);
    if (s == 0.0f) {
        s = hi != 0.0f ? fabsf(hi) : 1.0f; /* constant groups round-trip exactly */
    }
    *scale = s;
    *zero = offq_round_half_even(-lo / s) + 0.0f; /* + 0: no negative zero */
    return OFFQ_OK;
}

/* The code clamp(rint(g / scale) + zero, 0, maxq) of one value. A NaN gives code 0, as NumPy's
 * float -> uint8 conversion does on x86 (C's own would be undefined). */
static inline uint8_t offq_quant_code(float g, float scale, float zero, float maxq)
{
    const float v = offq_round_half_even(g / scale) + zero;
    if (!(v >= 0.0f)) {
        return 0;
    }
    return (uint8_t)(int32_t)(v > maxq ? maxq : v);
}

/* Codes q[i] = offq_quant_code(g[i], ...) for i in [from, n); returns their sum (the scalar
 * reference, and the SIMD kernels' tail). */
static inline int32_t offq_quant_codes(const float *restrict g, int64_t from, int64_t n,
                                       float scale, float zero, float maxq, uint8_t *restrict q)
{
    int32_t s = 0;
    for (int64_t i = from; i < n; i++) {
        const uint8_t c = offq_quant_code(g[i], scale, zero, maxq);
        q[i] = c;
        s += c;
    }
    return s;
}

static inline void offq_quant_params_sym(float amax, int bits, float clip, float *scale,
                                         float *zero)
{
    const float s = (clip * amax) / (float)((1 << (bits - 1)) - 1);
    *scale = s == 0.0f ? 1.0f : s;
    *zero = (float)(1 << (bits - 1));
}

/* k codes (one per byte) <-> nibbles: element 2i low, 2i + 1 high. */
static inline void offq_pack_row4(const uint8_t *restrict c, int64_t k, uint8_t *restrict p)
{
    const int64_t half = k / 2;
    for (int64_t i = 0; i < half; i++) {
        p[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    }
    if (k & 1) {
        p[half] = c[k - 1];
    }
}

static inline void offq_unpack_row4(const uint8_t *restrict p, int64_t k, uint8_t *restrict c)
{
    const int64_t half = k / 2;
    for (int64_t i = 0; i < half; i++) {
        c[2 * i] = p[i] & 15;
        c[2 * i + 1] = p[i] >> 4;
    }
    if (k & 1) {
        c[k - 1] = p[half] & 15;
    }
}

/* Quantize one group g[0..n) to codes q[0..n) (one per byte), its scale, zero and code sum. */
typedef offq_status (*offq_quant_group_fn)(const float *restrict g, int64_t n, int bits,
                                           int symmetric, float clip, uint8_t *restrict q,
                                           float *scale, float *zero, int32_t *sum);
offq_status offq_quant_group_generic(const float *restrict g, int64_t n, int bits, int symmetric,
                                     float clip, uint8_t *restrict q, float *scale, float *zero,
                                     int32_t *sum);
offq_status offq_quant_group_avx2(const float *restrict g, int64_t n, int bits, int symmetric,
                                  float clip, uint8_t *restrict q, float *scale, float *zero,
                                  int32_t *sum);
offq_status offq_quant_group_avx512(const float *restrict g, int64_t n, int bits, int symmetric,
                                    float clip, uint8_t *restrict q, float *scale, float *zero,
                                    int32_t *sum);

/* ng consecutive groups of `group` values x[ng * group] -> codes q[ng * group], scale, zero and
 * code sum [ng] each, in one call (a prefill quantizes ~50 groups per row and layer: a call per
 * group spent more on its arguments than SmolLM2's groups of 64 take). A group that fails
 * (non-finite values) gets zero codes, scale 1, zero 0 and sum 0, the others are still
 * quantized, and the call returns the worst status. */
typedef offq_status (*offq_quant_groups_fn)(const float *restrict x, int64_t ng, int64_t group,
                                            int bits, int symmetric, float clip,
                                            uint8_t *restrict q, float *scale, float *zero,
                                            int32_t *sums);
#define OFFQ_DEFINE_QUANT_GROUPS(NAME, TARGET, GROUP_FN)                                         \
    TARGET offq_status NAME(const float *restrict x, int64_t ng, int64_t group, int bits,        \
                            int symmetric, float clip, uint8_t *restrict q, float *scale,        \
                            float *zero, int32_t *sums)                                           \
    {                                                                                             \
        offq_status err = OFFQ_OK;                                                                \
        for (int64_t gi = 0; gi < ng; gi++) {                                                     \
            const offq_status st = GROUP_FN(x + gi * group, group, bits, symmetric, clip,         \
                                            q + gi * group, scale + gi, zero + gi, sums + gi);    \
            if (st != OFFQ_OK) {                                                                  \
                memset(q + gi * group, 0, (size_t)group);                                         \
                scale[gi] = 1.0f;                                                                 \
                zero[gi] = 0.0f;                                                                  \
                sums[gi] = 0;                                                                     \
                err = st > err ? st : err;                                                        \
            }                                                                                     \
        }                                                                                         \
        return err;                                                                               \
    }
offq_status offq_quant_groups_generic(const float *restrict x, int64_t ng, int64_t group, int bits,
                                      int symmetric, float clip, uint8_t *restrict q,
                                      float *scale, float *zero, int32_t *sums);
offq_status offq_quant_groups_avx2(const float *restrict x, int64_t ng, int64_t group, int bits,
                                   int symmetric, float clip, uint8_t *restrict q, float *scale,
                                   float *zero, int32_t *sums);
offq_status offq_quant_groups_avx512(const float *restrict x, int64_t ng, int64_t group, int bits,
                                     int symmetric, float clip, uint8_t *restrict q,
                                     float *scale, float *zero, int32_t *sums);

/* ---- hadamard -------------------------------------------------------------------------------
 * pow2: the Sylvester transform of x[n] (n = 2^k) in place, times `scale` when normalize.
 * mix:  x = [m, p] rows: x[c, :] <- scale * sum_a ht[c * m + a] x[a, :] (ht: transposed H_m),
 *       tmp holds max(m * p, m * OFFQ_MIX_W) values. */
#define OFFQ_MIX_W 32 /* 2 vectors of the widest mix (AVX-512: 16 floats) */
typedef void (*offq_pow2_f32_fn)(float *restrict x, int64_t n, int normalize, float scale);
typedef void (*offq_pow2_f64_fn)(double *restrict x, int64_t n, int normalize, double scale);
typedef void (*offq_mix_f32_fn)(float *restrict x, int64_t m, int64_t p, const float *restrict ht,
                                float scale, float *restrict tmp);
typedef void (*offq_mix_f64_fn)(double *restrict x, int64_t m, int64_t p,
                                const double *restrict ht, double scale, double *restrict tmp);
void offq_pow2_f32_generic(float *restrict x, int64_t n, int normalize, float scale);
void offq_pow2_f64_generic(double *restrict x, int64_t n, int normalize, double scale);
void offq_mix_f32_generic(float *restrict x, int64_t m, int64_t p, const float *restrict ht,
                          float scale, float *restrict tmp);
void offq_mix_f64_generic(double *restrict x, int64_t m, int64_t p, const double *restrict ht,
                          double scale, double *restrict tmp);
void offq_pow2_f32_avx2(float *restrict x, int64_t n, int normalize, float scale);
void offq_pow2_f64_avx2(double *restrict x, int64_t n, int normalize, double scale);
void offq_mix_f32_avx2(float *restrict x, int64_t m, int64_t p, const float *restrict ht,
                       float scale, float *restrict tmp);
void offq_mix_f64_avx2(double *restrict x, int64_t m, int64_t p, const double *restrict ht,
                       double scale, double *restrict tmp);
void offq_mix_f32_avx512(float *restrict x, int64_t m, int64_t p, const float *restrict ht,
                         float scale, float *restrict tmp);
void offq_mix_f64_avx512(double *restrict x, int64_t m, int64_t p, const double *restrict ht,
                         double scale, double *restrict tmp);

/* One normalised float32 row transform, planned once (table and scale), for callers inside their
 * own thread team; same arithmetic as offq_fwht_f32 on one row. tmp holds tmp_len floats. */
typedef struct {
    int64_t n, m, p, tmp_len;
    const float *ht;
    float scale;
} offq_fwht_row_plan;
offq_status offq_fwht_row_plan_f32(int64_t n, offq_fwht_row_plan *pl);
void offq_fwht_row_f32(float *row, const offq_fwht_row_plan *pl, float *tmp);

/* ---- W4A4 matmul (layout and math: matmul_w4a4.c) -------------------------------------------- */
#define OFFQ_MM_MR 8   /* rows per strip */
#define OFFQ_MM_NRP 16 /* columns per weight panel; a tile is two panels (32 columns) */
#define OFFQ_MM_MS 8   /* rows per small-M (gemv) call */
#define OFFQ_MM_SMALL_PATHS 4 /* small-M paths a variant may list */

typedef struct {
    int64_t m, n, k;
    int64_t blk, bp, nb, kp, mp; /* block, padded block, blocks per row, padded k, padded rows */
} offq_mm_plan;

typedef struct offq_mm_ops offq_mm_ops;

/* One MR x 32 tile: activation bytes a [MR][lda]; per row and block [MR][ldp]: asum, azero,
 * ascale; per panel h: wp[h] [kp/4][16][4] bytes and wz, wT, ws [nb][16] (zw, Sw - blk*zw, sw). */
typedef struct {
    const uint8_t *a;
    int64_t lda;
    const float *asum, *azero, *ascale;
    int64_t ldp;
    const uint8_t *wp[2];
    const float *wz[2], *wT[2], *ws[2];
    int64_t nb, bp;
    /* tile_folded only: [MR][ldp] the start of each block's integer sums, -Z * S' (Z the weight's
     * one zero-point, S' the block's folded code sum); a then holds codes minus zero-point, none
     * of magnitude above fold_max (8..127: what bounds AVX2's 16-bit partial sums) */
    const int32_t *ainit;
    int32_t fold_max;
} offq_mm_tile_args;

/* Small M: activations in chunks of `chunk` as [even | odd] bytes (or in plain order for the
 * decode layout), per row and block params. */
typedef struct {
    const offq_mm_plan *pl;
    const offq_q4_operand *w;
    const uint8_t *ap;                  /* [mrows][k] */
    const float *asum, *azero, *ascale; /* [mrows][nb] */
    float *out;
} offq_mm_gemv_args;

/* Columns [8 * i0, 8 * i1) of the small-M product (groups of 8 output columns), on the calling
 * thread: the small-M driver and the decoder share it (they split the groups over their team). */
typedef void (*offq_mm_gemv_range_fn)(const offq_mm_gemv_args *g, int mrows, int folded,
                                      int64_t i0, int64_t i1);

typedef struct {
    offq_mm_gemv_range_fn range; /* NULL: no small-M path */
    int max_m;                   /* rows eligible */
    int chunk;                   /* block % chunk == 0 */
    /* 1: reads w->dec (the decode layout, offq.h; the path needs it) and activations in plain
     * order, folded like the [even | odd] ones; 0: packed weight rows, [even | odd] chunks */
    int decode_layout;
} offq_mm_gemv;

/* One variant of the matmul: its pieces. NULL pack/unpack: the generic layout code. */
struct offq_mm_ops {
    /* c[r * ldc + j] = the tile (r < MR, j < 32; written, not accumulated); `second`: panel 1
     * holds real columns (else columns 16..31 of c are unspecified: a variant may skip them or
     * write the zero-scaled panel) */
    void (*tile)(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
    /* the same numbers from folded activations (codes - zero-point, int8) against a weight whose
     * zero-points are all one integer Z: E = sum (w - Z)(a - za) is then the integer sum alone,
     * started from u->ainit, with no float correction per block (integer sums and their float
     * corrections are exact, so it equals tile bit for bit); NULL: not offered */
    void (*tile_folded)(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
    /* panel of 16 weight rows from packed nibbles + block sums [16][nb]; needs blk % 32 == 0 */
    void (*pack_panel)(const offq_mm_plan *pl, const offq_q4_operand *w, int64_t n,
                       uint8_t *panel, float *sums);
    /* one packed activation row -> bytes + block sums; needs blk % 32 == 0 */
    void (*unpack_blocks)(const offq_mm_plan *pl, const uint8_t *packed, uint8_t *dst,
                          float *sums);
    offq_mm_gemv small[OFFQ_MM_SMALL_PATHS]; /* small-M paths, tried in order */
};

void offq_mm_tile_generic(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
void offq_mm_tile_folded_generic(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);

/* The GEMM (M > the small-M limit) by pieces, for callers that run their own team (the driver in
 * matmul_w4a4.c and the decoder): a thread packs a tile of nc columns (multiple of 32) into its
 * workspace, then runs 8-row strips of activations against it. Activations: bytes [mp][kp]
 * (rows padded to OFFQ_MM_MR with zero codes), apar = asum, azero, ascale, each [mp][nb].
 * folded (NULL: none): per strip, 0, or its codes are folded (offq_mm_fold_rows), its azero rows
 * hold the int32 ainit of ops->tile_folded instead, and folded[strip] is their offq_mm_fold_max. */
typedef struct {
    uint8_t *panels; /* [nc/16][kp/4][16][4], 32-byte aligned */
    float *par;      /* per panel: wz [nb][16], wT [nb][16], ws [nb][16] */
    uint8_t *rows;   /* [16][kp] unpacked rows of one panel */
    uint8_t *tmp;    /* k bytes */
    float *psums;    /* [16][nb] block sums of the rows of one panel */
} offq_mm_workspace;
void offq_mm_pack_tile(const offq_mm_plan *pl, const offq_q4_operand *w, int64_t n0, int64_t nc,
                       offq_mm_workspace *ws, const offq_mm_ops *ops);
/* Folding activation zero-points into the codes (ops->tile_folded; the small-M paths fold the
 * same way). offq_mm_fold_max: 0 unless every zero[0..n) is an integer in [-112, 127], else the
 * largest |code - zero-point| 4-bit codes can then have (8..127). offq_mm_fold_rows: rows
 * [0, rows) of codes (stride lda, block b's blk codes from b * bp) minus their block's zero-point
 * as int8 bytes, and zero[r * ldp + b] overwritten by the int32 start of the block's sums,
 * -wz * (the folded codes' sum), from asum (the plain codes' sums). */
int32_t offq_mm_fold_max(const float *zero, int64_t n);
void offq_mm_fold_rows(const offq_mm_plan *pl, uint8_t *codes, int64_t lda, const float *asum,
                       float *zero, int64_t ldp, int64_t rows, int32_t wz);
void offq_mm_strips(const offq_mm_plan *pl, const offq_mm_ops *ops, const uint8_t *acodes,
                    const float *apar, const int32_t *folded, int64_t n0, int64_t nc,
                    int64_t s_begin, int64_t s_end, const offq_mm_workspace *ws, float *out);
void offq_mm_tile_avx2(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
void offq_mm_tile_folded_avx2(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
void offq_mm_pack_panel_avx2(const offq_mm_plan *pl, const offq_q4_operand *w, int64_t n,
                             uint8_t *panel, float *sums);
void offq_mm_unpack_blocks_avx2(const offq_mm_plan *pl, const uint8_t *packed, uint8_t *dst,
                                float *sums);
void offq_mm_gemv_range_avx2(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                             int64_t i1);
void offq_mm_gemv_dec_range_avx2(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                 int64_t i1);
void offq_mm_gemv_dec_range_avx512vnni(const offq_mm_gemv_args *g, int mrows, int folded,
                                       int64_t i0, int64_t i1);
void offq_mm_tile_avx512vnni(const offq_mm_tile_args *u, int second, float *c, int64_t ldc);
void offq_mm_tile_folded_avx512vnni(const offq_mm_tile_args *u, int second, float *c,
                                    int64_t ldc);
void offq_mm_gemv_range_avx512vnni(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                   int64_t i1);
void offq_mm_gemv64_range_avx512vnni(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                     int64_t i1);
/* The generic reference of the small-M product on plain activation codes (ap [mrows][k], one
 * code per byte, never folded): the decoder's product when a variant has no small-M path. */
void offq_mm_gemv_range_generic(const offq_mm_gemv_args *g, int mrows, int folded, int64_t i0,
                                int64_t i1);

static inline uint32_t offq_load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---- attention over the packed KV cache (attention.c) ---------------------------------------
 * nq queries q [nq][hd] (scaled by 1/sqrt(hd)) of one KV head; query t sees positions
 * 0..n[t]-1. K / V codes of position j at kc / vc + j * cstride (hd / 2 packed bytes), scales and
 * zero-points at ks, kz / vs, vz + j * pstride (hd / group each). Scratch: scores
 * nq * (max n + 1) floats, row OFFQ_ATTN_ROW_FLOATS(hd) floats. out[t]: query t's hd outputs. */
/* a tile of OFFQ_ATTN_TILE_ROWS decoded rows, their key scales (hd / group <= hd / 16 per row) and
 * then either 8 rows before their transpose or the value phase's 3 x [rows][hd / group]
 * (x86/attention_tiles.h) */
#define OFFQ_ATTN_TILE_ROWS 64
#define OFFQ_ATTN_ROW_FLOATS(hd)                                                                   \
    ((hd) * (OFFQ_ATTN_TILE_ROWS + OFFQ_ATTN_TILE_ROWS / 16 +                                       \
             (3 * OFFQ_ATTN_TILE_ROWS / 16 > 8 ? 3 * OFFQ_ATTN_TILE_ROWS / 16 : 8)))
typedef struct {
    const uint8_t *kc, *vc;
    const float *ks, *kz, *vs, *vz;
    int64_t cstride, pstride, hd, group;
    /* the 8-bit attention's SIMD tiles of these rows already unpacked (offq_attn_i8_pretile_fn,
     * tile t at tiles + t * OFFQ_ATTN_I8_TILE_BYTES), or NULL: each call unpacks its own */
    const uint8_t *tiles;
} offq_attn_args;
/* The most positions any of the nq queries sees (the scores' row length, less one). */
static inline int64_t offq_attn_max_n(const int64_t *n, int64_t nq)
{
    int64_t nmax = 0;
    for (int64_t t = 0; t < nq; t++) {
        nmax = n[t] > nmax ? n[t] : nmax;
    }
    return nmax;
}
typedef void (*offq_attend_fn)(const offq_attn_args *a, int64_t nq, const float *q,
                               const int64_t *n, float *scores, float *const *out, float *row);
void offq_attend_generic(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                         float *scores, float *const *out, float *row);
/* The step every attention variant shares, in one order of operations (identical results): each
 * query's scores s[t * ld + 0..n[t]-1] become exp(score - max) in place, their sum goes to
 * s[t * ld + nmax], and out[t][0..hd) is zeroed for the weighted sum of values. */
static inline void offq_attn_softmax(float *s, int64_t ld, int64_t nq, const int64_t *n,
                                     int64_t nmax, float *const *out, int64_t hd)
{
    for (int64_t t = 0; t < nq; t++) {
        float *st = s + t * ld, mx = -INFINITY, den = 0.0f;
        for (int64_t j = 0; j < n[t]; j++) {
            mx = st[j] > mx ? st[j] : mx;
        }
        for (int64_t j = 0; j < n[t]; j++) {
            st[j] = expf(st[j] - mx);
            den += st[j];
        }
        st[nmax] = den;
        for (int64_t i = 0; i < hd; i++) {
            out[t][i] = 0.0f;
        }
    }
}
void offq_attend_avx2(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                      float *scores, float *const *out, float *row);
void offq_attend_avx512(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                        float *scores, float *const *out, float *row);

/* ---- 8-bit attention over the packed KV cache (attention_i8.c): the opt-in integer variant ----
 * The same arguments and outputs as offq_attend_fn, with integer dot products: each query is
 * quantized to 8 bits per KV group (symmetric, 127 levels), its scores are exact int32 sums of
 * q8 x (key code - zero); the softmax weights times the value scales are quantized to 8 bits per
 * query, group and tile (0..255) and the values summed exactly in int32 per tile of
 * OFFQ_ATTN_TILE_ROWS rows (attention_i8.c states every step). Zero-points must be integers in
 * [0, 15] and scales >= 0 (offq_attn_i8_fits, offq.h; callers check). qwork: OFFQ_ATTN_I8_QBYTES(nq, hd,
 * hd / group, max n) bytes, 4-byte aligned; tile: OFFQ_ATTN_ROW_FLOATS(hd) floats. */
#define OFFQ_ATTN_I8_QBYTES(nq, hd, ng, positions)                                                  \
    (((nq) * (hd) + 63) / 64 * 64 + (nq) * (ng) * 16 + (ng) * (positions) * 4 +                     \
     OFFQ_ATTN_I8_GRID_BYTES(nq, positions))
/* the SIMD kernels' weight grids of every tile, winv and wstep [nq][tiles], after the value scales */
#define OFFQ_ATTN_I8_GRID_BYTES(nq, positions)                                                     \
    (2 * (nq) * (((positions) + OFFQ_ATTN_TILE_ROWS - 1) / OFFQ_ATTN_TILE_ROWS) * 4)
typedef void (*offq_attend_i8_fn)(const offq_attn_args *a, int64_t nq, const float *q,
                                  const int64_t *n, float *scores, float *const *out, float *tile,
                                  void *qwork);
void offq_attend_i8_generic(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                            float *scores, float *const *out, float *tile, void *qwork);
void offq_attend_i8_avx2(const offq_attn_args *a, int64_t nq, const float *q, const int64_t *n,
                         float *scores, float *const *out, float *tile, void *qwork);
void offq_attend_i8_avx512vnni(const offq_attn_args *a, int64_t nq, const float *q,
                               const int64_t *n, float *scores, float *const *out, float *tile,
                               void *qwork);
/* Tiles unpacked once for many calls (a prefill step's query blocks all read the same cached
 * rows): rows [j0, j0 + OFFQ_ATTN_TILE_ROWS) of a's cache, the rows from jn on zero, into dst in
 * the SIMD variants' tile layouts (x86/attention_i8_tiles.h): keys, their scales and zero-points,
 * values, OFFQ_ATTN_I8_TILE_BYTES(hd, hd / group) bytes. Only for the shapes the SIMD variants
 * take (offq_attn_i8_tiled); the dispatch table's pretile is NULL where no SIMD variant runs. */
#define OFFQ_ATTN_I8_TILE_BYTES(hd, ng)                                                            \
    (2 * OFFQ_ATTN_TILE_ROWS * (hd) + 2 * (ng) * OFFQ_ATTN_TILE_ROWS * 4)
#define OFFQ_ATTN_I8_PRETILE_MAX_HD 512 /* the pretile's 4 unpacked rows live on its stack */
static inline int offq_attn_i8_tiled(int64_t hd, int64_t group)
{
    return hd % 16 == 0 && group % 16 == 0 && group <= 4096; /* 4096: exact scores */
}
typedef void (*offq_attn_i8_pretile_fn)(const offq_attn_args *a, int64_t j0, int64_t jn,
                                        uint8_t *dst);
void offq_attn_i8_pretile_avx2(const offq_attn_args *a, int64_t j0, int64_t jn, uint8_t *dst);
/* The query side every variant shares, carved from qwork in this order (offq_attn_i8_layout;
 * offq_attn_i8_quantize also fills the first three): q8 [nq][hd] (rint(q / sq), sq = max |q| of
 * the group / 127; all 0 where sq is 0), sq [nq][ng], qsum [nq][ng] (the sum of the group's q8);
 * winv and wstep [nq][ng], per query and group the current tile's weight grid (wmax = the largest
 * e_j * vs_j of its rows, winv = 255 / wmax or 0 when wmax is 0, wstep = wmax / 255); vs
 * [ng][positions], the value scales of the cached rows, contiguous (offq_attn_i8_value_scales);
 * then, where the SIMD kernels take one value group a row, every tile's grid at once, winv and
 * wstep [nq][tiles] (OFFQ_ATTN_I8_GRID_BYTES). */
typedef struct {
    int8_t *q8;
    float *sq;
    int32_t *qsum;
    float *winv, *wstep, *vs;
} offq_attn_i8_queries;
offq_attn_i8_queries offq_attn_i8_layout(int64_t nq, int64_t hd, int64_t group, void *qwork);
offq_attn_i8_queries offq_attn_i8_quantize(const float *q, int64_t nq, int64_t hd, int64_t group,
                                           void *qwork);
/* Q->vs[gi * nmax + j] = the value scale of row j < nmax, group gi. */
void offq_attn_i8_value_scales(const offq_attn_args *a, const offq_attn_i8_queries *Q,
                               int64_t nmax);
/* A query's weights' grid in one group and tile from wmax, the largest e_j * vs_j of its rows
 * there. */
static inline void offq_attn_i8_set_grid(float *winv, float *wstep, float wmax)
{
    *winv = wmax > 0.0f ? 255.0f / wmax : 0.0f;
    *wstep = wmax / 255.0f;
}
/* A zero-point as the int32 the 8-bit sums use: offq's grids store integers in [0, 15]; anything
 * else (a cache not written by offq) is clamped there, NaN read as 0, so no input is undefined. */
static inline int32_t offq_attn_i8_zero(float z)
{
    return (int32_t)(z >= 0.0f ? (z <= 15.0f ? z : 15.0f) : 0.0f);
}
/* The 8-bit weight of row j for a query (e_j * vs_j * winv, rounded, clamped to 0..255). */
static inline uint8_t offq_attn_i8_weight(float e, float vs, float winv)
{
    const float w = rintf((e * vs) * winv);
    return (uint8_t)(w >= 0.0f ? (w <= 255.0f ? w : 255.0f) : 0.0f); /* NaN (a corrupt cache): 0 */
}

/* ---- attention over a float32 KV cache (attention_f32.c), split over chunks of positions ----
 * nq queries q [nq][hd] (scaled by 1/sqrt(hd)), rep of them a KV head, over the n <=
 * OFFQ_ATTN_F32_CHUNK positions of a chunk: query t's K row j at k + j * stride + (t / rep) * hd,
 * its V row at v + the same (hd floats each). Query t's partial goes to the record
 * rec + t * rstride (hd + 2 floats): [0, hd) the V rows weighted by exp(score - m), [hd] m (the
 * chunk's largest score), [hd + 1] the sum of the weights. scores: nq * n floats of scratch.
 * offq_attn_f32_merge turns the records of `chunks` consecutive chunks (cstride floats apart)
 * into the attention output out[hd]: the partials rescaled to the largest m, summed, divided by
 * the summed weights (with one chunk, acc / sum as one softmax over the positions would give). */
#define OFFQ_ATTN_F32_CHUNK 128
typedef void (*offq_attend_f32_fn)(const float *q, int64_t nq, int64_t rep, int64_t hd,
                                   const float *k, const float *v, int64_t stride, int64_t n,
                                   float *scores, float *rec, int64_t rstride);
void offq_attend_f32_generic(const float *q, int64_t nq, int64_t rep, int64_t hd, const float *k,
                             const float *v, int64_t stride, int64_t n, float *scores,
                             float *rec, int64_t rstride);
void offq_attend_f32_avx2(const float *q, int64_t nq, int64_t rep, int64_t hd, const float *k,
                          const float *v, int64_t stride, int64_t n, float *scores, float *rec,
                          int64_t rstride);
void offq_attn_f32_merge(const float *rec, int64_t chunks, int64_t cstride, int64_t hd,
                         float *out);
/* Chunks of OFFQ_ATTN_F32_CHUNK positions in n positions. */
static inline int64_t offq_attn_f32_chunks(int64_t n)
{
    return (n + OFFQ_ATTN_F32_CHUNK - 1) / OFFQ_ATTN_F32_CHUNK;
}
/* Chunk c of a query row that sees positions 0..n-1 of kv[n][2][kv_heads][hd] (K then V per
 * position): `attend` on its positions, the nq records (hd + 2 floats each) to rec. Nothing
 * when the chunk starts at or past n. The one place that knows the cache layout and the chunk
 * bounds, for the decoder step and offq_attention_f32 alike. */
void offq_attend_f32_chunk(offq_attend_f32_fn attend, const float *q, int64_t nq,
                           int64_t kv_heads, int64_t hd, const float *kv, int64_t c, int64_t n,
                           float *scores, float *rec);

/* ---- MSE clip search (clip_search.c): the squared round-trip error of a row x[0..g) on the grid
 * (s, z), codes clamped to [0, maxq], e = (clamp(rint(x / s) + z) - z) * s - x in float32, the
 * squares summed in float64 in a fixed order: element i into lane i % 4 of four sums (in chunks of
 * ERR_CHUNK = 256; the last chunk's g % 4 leftovers into lane 0), then (l0 + l1) + (l2 + l3). The
 * AVX2 variant keeps that order: the same bits. */
typedef double (*offq_clip_row_error_fn)(const float *x, int64_t g, float s, float z, float maxq);
double offq_clip_row_error_generic(const float *x, int64_t g, float s, float z, float maxq);
double offq_clip_row_error_avx2(const float *x, int64_t g, float s, float z, float maxq);

/* ---- residual add + RMSNorm of one row (norm.c) ---------------------------------------------
 * h[i] += y[i] (y not NULL), then out = h / sqrt(sum(h^2) / d + eps) * w (w NULL: ones). */
typedef void (*offq_residual_norm_row_fn)(float *h, const float *y, const float *w, int64_t d,
                                          float eps, float *out);
void offq_residual_norm_row_generic(float *h, const float *y, const float *w, int64_t d, float eps,
                                    float *out);
void offq_residual_norm_row_avx2(float *h, const float *y, const float *w, int64_t d, float eps,
                                 float *out);
void offq_residual_norm_row_avx512(float *h, const float *y, const float *w, int64_t d, float eps,
                                   float *out);

/* The RMS divisor from the eight float64 sums of squares (sum i % 8 holds element i's square),
 * joined by one fixed tree: sqrt(sum / d + eps) in float32. */
static inline float offq_norm_root(const double part[8], int64_t d, float eps)
{
    const double ss = ((part[0] + part[4]) + (part[2] + part[6])) +
                      ((part[1] + part[5]) + (part[3] + part[7]));
    return sqrtf((float)ss / (float)d + eps);
}

/* ---- SwiGLU (swiglu.c): x[i] = g[i] / (1 + exp(-g[i])) * u[i], i < n ---------------------- */
typedef void (*offq_swiglu_fn)(const float *g, const float *u, float *x, int64_t n);
void offq_swiglu_generic(const float *g, const float *u, float *x, int64_t n);
void offq_swiglu_avx2(const float *g, const float *u, float *x, int64_t n);
void offq_swiglu_avx512(const float *g, const float *u, float *x, int64_t n);

/* ---- int8-weight matmul (matmul_i8.c): x rounded to 16 bits per group (xq int16, xs float32
 * [m][k / group]), then outputs [n0, n1) of out[m][ldo] = x_hat @ w_hat^T for a few rows of x
 * (m <= OFFQ_I8_SMALL_M). Lane sums restart every OFFQ_I8_CHUNK inputs of a group: 2048 / 8
 * products of at most 32767 * 127 each stay below 2^31. */
#define OFFQ_I8_SMALL_M 8
#define OFFQ_I8_CHUNK 2048
offq_status offq_i8_quantize_x(const float *x, int64_t m, int64_t k, int64_t group, int16_t *xq,
                               float *xs);
typedef void (*offq_i8_rows_fn)(const int16_t *xq, const float *xs, int64_t m, int64_t k,
                                const int8_t *w, const float *scale, int64_t group, int64_t n0,
                                int64_t n1, int64_t ldo, float *out);
void offq_i8_rows_generic(const int16_t *xq, const float *xs, int64_t m, int64_t k,
                          const int8_t *w, const float *scale, int64_t group, int64_t n0,
                          int64_t n1, int64_t ldo, float *out);
void offq_i8_rows_avx2(const int16_t *xq, const float *xs, int64_t m, int64_t k, const int8_t *w,
                       const float *scale, int64_t group, int64_t n0, int64_t n1, int64_t ldo,
                       float *out);

/* ---- weight-only matmul (matmul_wq.c; format: offq.h) ---------------------------------------
 * A variant is three pieces. prep: x[m][k] -> xp[m][k], the layout its row kernel (scaled = 1) or
 * its dequantized panels (scaled = 0) expect (NULL: x as is), row r of xp also multiplied by
 * rowmul[r] (a power of two; NULL: 1). rows: outputs [n0, n1) of out[m][ldo] for
 * m <= OFFQ_WQ_SMALL_M rows of xp, xsum [m][k / group] the sums of each group of x. With
 * unscale == NULL they convert each code to float; otherwise (xp prepared with rowmul[r] =
 * 2^(149 - E_r), unscale[r] = 2^E_r; offq_dispatch.wq_subnormal; DAZ cleared by the caller) they
 * use the masked code bits themselves as a float32, the subnormal q * 2^(t - 149), which saves
 * the conversion and gives the same bits (matmul_wq.c says when). dequant: w_hat rows [n0, n1)
 * into buf[n1 - n0][k] (the panel order prep(scaled = 0) matches). A variant runs only when
 * group % align == 0; otherwise auto takes the widest one that can, a variant asked for by name
 * the generic one (offq_matmul_wq). */
typedef struct {
    int align;
    void (*prep)(const float *x, int64_t m, int64_t k, int bits, int scaled, const float *rowmul,
                 float *xp);
    void (*rows)(const offq_wq_operand *w, const float *xp, const float *xsum,
                 const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                 float *out);
    void (*dequant)(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf);
} offq_wq_ops;

/* The variant offq_matmul_wq runs for this group and kernel request (NULL: the kernel is not
 * usable here). */
const offq_wq_ops *offq_wq_select(int64_t group, offq_kernel kernel);
/* Floats of the xsum buffer offq_wq_prepare fills for m rows: the group sums and two row
 * factors a row. */
int64_t offq_wq_input_floats(int64_t m, int64_t k, int64_t group);
/* The input of ops->rows for x[m][k]: the group sums into xsum (offq_wq_input_floats floats), and
 * for a variant with prep the reordered rows into xp[m][k] (64-byte aligned), with the subnormal
 * decode's row factors when it applies. Returns the rows' `unscale` argument (NULL: convert;
 * else the caller clears DAZ around ops->rows). */
const float *offq_wq_prepare(const offq_wq_ops *ops, const float *x, int64_t m, int64_t k,
                             int64_t group, int bits, float *xsum, float *xp);
void offq_wq_rows_generic(const offq_wq_operand *w, const float *xp, const float *xsum,
                          const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                          float *out);
void offq_wq_dequant_generic(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf);
void offq_wq_prep_avx2(const float *x, int64_t m, int64_t k, int bits, int scaled,
                       const float *rowmul, float *xp);
void offq_wq_rows_avx2(const offq_wq_operand *w, const float *xp, const float *xsum,
                       const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                       float *out);
void offq_wq_dequant_avx2(const offq_wq_operand *w, int64_t n0, int64_t n1, float *buf);
void offq_wq_prep_avx512(const float *x, int64_t m, int64_t k, int bits, int scaled,
                         const float *rowmul, float *xp);
void offq_wq_rows_avx512(const offq_wq_operand *w, const float *xp, const float *xsum,
                         const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                         float *out);
void offq_wq_rows_avx512vbmi(const offq_wq_operand *w, const float *xp, const float *xsum,
                             const float *unscale, int64_t m, int64_t n0, int64_t n1, int64_t ldo,
                             float *out);

/* Code i of a packed row of rb bytes (the bit stream of offq.h). */
static inline uint32_t offq_wq_code(const uint8_t *row, int64_t rb, int64_t i, int bits)
{
    const int64_t bit = i * bits, byte = bit >> 3;
    uint32_t v = row[byte];
    if (byte + 1 < rb) {
        v |= (uint32_t)row[byte + 1] << 8;
    }
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

/* ---- the dispatch table (cpu.c) -------------------------------------------------------------- */
typedef struct {
    offq_quant_group_fn quant_group;
    offq_quant_groups_fn quant_groups;
    offq_pow2_f32_fn pow2_f32;
    offq_pow2_f64_fn pow2_f64;
    offq_mix_f32_fn mix_f32;
    offq_mix_f64_fn mix_f64;
    offq_attend_fn attend;
    offq_attend_i8_fn attend_i8;
    offq_attn_i8_pretile_fn attn_i8_pretile; /* NULL: attend_i8 is the generic one */
    offq_attend_f32_fn attend_f32;
    offq_swiglu_fn swiglu;
    offq_residual_norm_row_fn residual_norm_row;
    offq_clip_row_error_fn clip_row_error;
    offq_i8_rows_fn i8_rows;
    const offq_mm_ops *matmul[OFFQ_KERNEL_COUNT]; /* per variant; NULL: not usable here */
    offq_kernel matmul_best;
    const offq_wq_ops *wq[OFFQ_KERNEL_COUNT]; /* per variant (no VNNI one); NULL: not usable */
    offq_kernel wq_best;
    int wq_subnormal; /* the SIMD rows may decode codes as subnormal floats (cpu.c) */
} offq_dispatch_table;

/* Generic entries until offq_cpu_init() runs; written once there, read-only after. */
extern offq_dispatch_table offq_dispatch;

#endif
