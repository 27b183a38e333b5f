/* offq.h: the C API of the offq core.
 *
 * Plain C types only (pointers, int64_t sizes); no Python objects below csrc/python/. Every core
 * function that can fail returns an offq_status. Arguments are validated once, by the caller (the
 * bindings in csrc/python/); the core trusts them. Arrays are contiguous and row-major; kernels
 * run in parallel over rows (OpenMP) and pick their SIMD variant from the dispatch table that
 * offq_cpu_init() fills once (cpu.c).
 */
#ifndef OFFQ_H
#define OFFQ_H

#include <stdint.h>

/* The one status enum of the core. Kernels that reduce statuses over threads keep the largest, so
 * the order is also a priority. */
typedef enum {
    OFFQ_OK = 0,
    OFFQ_ERR_NONFINITE = 1,   /* the input contains NaN or Inf */
    OFFQ_ERR_OVERFLOW = 2,    /* a group's range (max - min) overflows float32 */
    OFFQ_ERR_CODE = 3,        /* a code is >= 2^bits */
    OFFQ_ERR_NOMEM = 4,       /* temporary memory could not be allocated */
    OFFQ_ERR_UNSUPPORTED = 5, /* SIMD variant not usable here, or a length with no construction */
    OFFQ_ERR_NOCONVERGE = 6,  /* an iterative solver did not converge */
    OFFQ_ERR_NOTPD = 7,       /* a matrix is not (numerically) positive definite */
} offq_status;

/* ---- CPU features, dispatch and threads (cpu.c) ------------------------------------------- */

/* Read the CPU features, OFFQ_DISABLE_SIMD=1 and OFFQ_SIMD_MAX (avx2 | generic: the widest variant
 * allowed) once and fill the dispatch table (call once at module import; before it, every kernel
 * runs its generic variant). */
void offq_cpu_init(void);
int offq_cpu_has_avx2(void);        /* AVX2 + FMA usable */
int offq_cpu_has_avx512(void);      /* AVX-512 F usable (and not capped by OFFQ_SIMD_MAX=avx2) */
int offq_cpu_has_avx512bw(void);    /* AVX-512 F + BW usable (the weight-only product's variant) */
int offq_cpu_has_avx512_vbmi(void); /* AVX-512 F/BW + VBMI usable (matmul_wq's 3-bit lanes) */
int offq_cpu_has_avx512_vnni(void); /* AVX-512 F/BW/VL + VNNI usable */
int offq_cpu_wq_subnormal(void);   /* matmul_wq's SIMD rows decode codes as subnormal floats */
int offq_cpu_simd_disabled(void);   /* OFFQ_DISABLE_SIMD=1 was set at init */

/* One setting for offq's OpenMP regions and for OpenBLAS. */
void offq_set_num_threads(int n);
int offq_get_num_threads(void);

/* ---- Walsh-Hadamard transforms (hadamard.c) ---------------------------------------------------
 * y = x H_n (times 1/sqrt(n) when normalised) for each row:
 *   n = 2^k      Sylvester H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] (order of scipy.linalg.hadamard)
 *   n = m * 2^k  H_n = H_m (x) H_{2^k} (element i = a * 2^k + b), H_m from hadamard_tables.h with m
 *                the smallest tabulated order that fits. Row 0 and column 0 are all ones. */

/* m of n = m * 2^k (1 for powers of two), or 0 when no construction is available. */
int64_t offq_hadamard_factor(int64_t n);
/* The largest power of two dividing n (n >= 1). */
int64_t offq_hadamard_pow2_block(int64_t n);
/* The number of tabulated orders, and the i-th (ascending). */
int offq_hadamard_num_orders(void);
int64_t offq_hadamard_order(int i);
/* The tabulated +-1 matrix H_m (row-major m * m); OFFQ_ERR_UNSUPPORTED when m has no table. */
offq_status offq_hadamard_base(int64_t m, double *out);
/* x[r, :] <- x[r, :] H_n in place for r < rows. OFFQ_ERR_UNSUPPORTED for a length without a
 * construction, OFFQ_ERR_NOMEM. */
offq_status offq_fwht_f32(float *x, int64_t rows, int64_t n, int normalize);
offq_status offq_fwht_f64(double *x, int64_t rows, int64_t n, int normalize);

/* ---- Group-wise quantization (quant.c) --------------------------------------------------------
 * The one format of offq: x_hat = scale * (q - zero), q an unsigned code in [0, 2^bits - 1], per
 * group of `group` consecutive elements of a row (group divides k). zero is integer-valued, stored
 * as float32, and may lie outside [0, 2^bits - 1]. float32 arithmetic, round half to even:
 *   asymmetric: d = (0.5 * (1 - clip)) * (max - min); lo = min + d, hi = max - d
 *               (the range shrunk by clip about its midpoint; clip = 1: lo = min, hi = max)
 *               scale = (hi - lo) / (2^bits - 1); if 0: |hi| if hi != 0 else 1
 *               zero = rint(-lo / scale)
 *   symmetric:  scale = clip * max|g| / (2^(bits-1) - 1) (if 0: 1), zero = 2^(bits-1)
 *   both:       q = clamp(rint(x / scale) + zero, 0, 2^bits - 1)
 * Storage: 4 bits -> two codes per byte (element 2i low nibble, 2i + 1 high), ceil(k / 2) bytes a
 * row; 2, 3, 8 bits -> one code per byte. code sums (int32): sum of the codes of each group. */

/* Bytes per row of stored codes. */
int64_t offq_code_row_bytes(int64_t k, int bits);
/* x[rows][k] -> codes, scale, zero, sums [rows][k / group]. bits in {2,3,4,8}, 0 < clip <= 1.
 * OFFQ_ERR_NONFINITE, OFFQ_ERR_OVERFLOW, OFFQ_ERR_NOMEM (outputs then unspecified). */
offq_status offq_quantize_f32(const float *x, int64_t rows, int64_t k, int bits, int64_t group,
                              int symmetric, float clip, uint8_t *codes, float *scale,
                              float *zero, int32_t *sums);
/* out[rows][k] = scale * (q - zero). */
void offq_dequantize_f32(const uint8_t *codes, int64_t rows, int64_t k, int bits, int64_t group,
                         const float *scale, const float *zero, float *out);
/* One-code-per-byte codes[rows][k] -> stored format + group sums; OFFQ_ERR_CODE if a code >= 2^bits. */
offq_status offq_pack_codes(const uint8_t *codes, int64_t rows, int64_t k, int bits,
                            int64_t group, uint8_t *packed, int32_t *sums);
/* Stored format -> one code per byte, out[rows][k]. */
void offq_unpack_codes(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *out);

/* ---- W4A4 matmul (matmul_w4a4.c) --------------------------------------------------------------- */

/* One 4-bit operand: rows x k codes in the stored format, scale and zero [rows][k / group]. */
typedef struct {
    const uint8_t *codes;
    const float *scale;
    const float *zero;
    int64_t rows;
    int64_t group;
    const uint8_t *dec; /* the same codes in the decode layout (below), or NULL */
} offq_q4_operand;

/* The decode layout of a 4-bit weight [n][k] (k % 8 == 0): what the small-M products read when
 * it is given (offq_q4_operand.dec). Rows in groups of 8 (the last padded with zero codes), k in
 * chunks of 8; per (group, chunk) 32 bytes, 4 per row j of the group: byte i of row j holds
 * element 8c + i in its low nibble and element 8c + 4 + i in its high nibble. A 32-byte load then
 * gives, after masking, 4 consecutive k of 8 output columns side by side (the operand layout of
 * vpmaddubsw / vpdpbusd against 4 broadcast activation bytes), so 8 columns are summed at once
 * with no horizontal reduction, and a group's weights are one contiguous stream of 4 k bytes. */
int64_t offq_w4_decode_bytes(int64_t n, int64_t k);
/* codes [n][k/2] (the stored format) -> dst [offq_w4_decode_bytes(n, k)]. */
void offq_w4_decode_pack(const uint8_t *codes, int64_t n, int64_t k, uint8_t *dst);

/* Variants of the matmul (identical results). */
typedef enum {
    OFFQ_KERNEL_AUTO = -1, /* the best usable one */
    OFFQ_KERNEL_GENERIC = 0,
    OFFQ_KERNEL_AVX2 = 1,
    OFFQ_KERNEL_VNNI = 2,   /* AVX-512 VNNI (the W4A4 products) */
    OFFQ_KERNEL_AVX512 = 3, /* AVX-512 F + BW (the weight-only product) */
    OFFQ_KERNEL_COUNT = 4,
} offq_kernel;

/* out[M][N] = dequantize(a) @ dequantize(w)^T (a: M x k, w: N x k; one group size divides the
 * other): exact integer dot products per block of min(group sizes) plus the zero-point correction
 *     sa * sw * (sum qa qw - zw sum qa - za sum qw + block * za * zw),
 * summed over blocks in float32. OFFQ_ERR_UNSUPPORTED when `kernel` is not usable here,
 * OFFQ_ERR_NOMEM. */
offq_status offq_matmul_w4a4(const offq_q4_operand *a, const offq_q4_operand *w, int64_t k,
                             float *out, offq_kernel kernel);

/* A 4-bit weight's one zero-point (zero[0..n), every row and group, all equal to an integer in
 * [0, 15]; symmetric weights: 8), else -1: products fold it into their integer sums. */
int32_t offq_mm_weight_zero(const float *zero, int64_t n);

/* ---- residual add + RMSNorm (norm.c) -------------------------------------------------------------
 * Per row r < rows of h [rows][d]: h_r += y_r (y NULL: unchanged), out_r = h_r / sqrt(mean(h_r^2)
 * + eps) * w (w NULL: ones), the mean of squares in float64: the C decoders' step, in the
 * dispatched width (every width gives the same bits). d >= 1. */
void offq_residual_rms_norm(float *h, const float *y, const float *w, int64_t rows, int64_t d,
                            float eps, float *out);

/* ---- attention over a float32 KV cache (attention_f32.c) ---------------------------------------
 * out[t] = softmax(q_t . K^T) V for nq queries q[nq][hd] (already scaled), rep = nq / kv_heads of
 * them to a KV head (query t uses head t / rep), over n positions of kv[n][2][kv_heads][hd] (K
 * then V per position): the attention of the weight-only decoder step, in the same chunks of
 * positions and merge. `kernel`: OFFQ_KERNEL_GENERIC forces the reference, anything else takes
 * the dispatched variant. n >= 1, nq a multiple of kv_heads. OFFQ_ERR_NOMEM. */
offq_status offq_attention_f32(const float *q, int64_t nq, int64_t kv_heads, int64_t hd,
                               const float *kv, int64_t n, float *out, offq_kernel kernel);

/* ---- attention over a packed 4-bit KV cache (attention.c, attention_i8.c) ----------------------
 * The W4A4KV4 decoder step's attention for one KV head, exposed for tests: out[t] = softmax(q_t .
 * K^T) V for nq queries q[nq][hd] (already scaled), query t over positions 0..n[t]-1 (1 <= n[t]
 * <= npos) of codes [npos][2][hd / 2] (K then V; two codes a byte, the even one low) with scale
 * and zero [npos][2][hd / group]. int8: the 8-bit variant (attention_i8.c; its grids must pass
 * offq_attn_i8_fits) instead of the float one. `kernel`: OFFQ_KERNEL_GENERIC forces the
 * references, anything else takes the dispatched variants. OFFQ_ERR_NOMEM. */
offq_status offq_attention_kv4(const float *q, int64_t nq, int64_t hd, int64_t group,
                               const uint8_t *codes, const float *scale, const float *zero,
                               int64_t npos, const int64_t *n, int int8, float *out,
                               offq_kernel kernel);
/* Whether the 8-bit attention can take the KV grids scale[0..n), zero[0..n): every zero-point an
 * integer in [0, 15] and every scale >= 0 (the weights e_j vs_j are unsigned bytes). offq's KV
 * quantizer gives other zero-points to a group of one sign (a constant positive group: -1; values
 * in [10, 11]: -150), so the decoder step checks a layer's cached grids each step and runs the
 * float attention where they do not fit; offq_attention_kv4's binding refuses such a cache. */
int offq_attn_i8_fits(const float *scale, const float *zero, int64_t n);

/* ---- int8-weight matmul (matmul_i8.c) ---------------------------------------------------------
 * out[m][n] = x_hat[m][k] @ w_hat^T with w_hat[j][i] = scale[j][i / group] * w[j][i] (int8
 * weights, float32 scales per group of `group` inputs; group divides k): the 8-bit LM head.
 * x_hat is x rounded to 16 bits per group of the same inputs: xs = max|x_group| / 32767,
 * x_hat = xs * clamp(rint(x / xs), -32767, 32767) (0 where xs is 0). Few rows read the int8
 * weights directly with integer products (OpenMP over columns; `generic` forces the reference
 * kernel); many rows dequantize blocks of weight rows and use sgemm on x_hat.
 * OFFQ_ERR_NONFINITE (x has NaN or Inf), OFFQ_ERR_NOMEM. */
offq_status offq_matmul_i8(const float *x, int64_t m, int64_t k, const int8_t *w,
                           const float *scale, int64_t n, int64_t group, float *out, int generic);

/* ---- weight-only matmul (matmul_wq.c) ----------------------------------------------------------
 * out[m][n] = x[m][k] @ w_hat^T for float32 activations and 2-, 3-, 4- or 8-bit weights,
 * w_hat[j][i] = scale[j][g] * (q[j][i] - zero[j][g]), g = i / group (group divides k; group = k:
 * one group per row, "per channel"). Storage of q: each row is a little-endian bit stream, code i
 * at bits [bits * i, bits * (i + 1)), ceil(k * bits / 8) bytes a row (unused high bits zero). For
 * 4 bits this is offq's nibble layout (element 2i low nibble, 2i + 1 high); 2 bits: four codes a
 * byte, element 4i + j at bits 2j; 3 bits: eight codes in three bytes; 8 bits: a code a byte. */
typedef struct {
    const uint8_t *packed; /* [n][offq_wq_row_bytes(k, bits)] */
    const float *scale;    /* [n][k / group] */
    const float *zero;     /* [n][k / group] */
    int64_t n, k, group;
    int bits; /* 2, 3, 4 or 8 (offq_wq_bits_supported) */
} offq_wq_operand;

/* Whether the weight-only kernels read codes of this width. */
static inline int offq_wq_bits_supported(long long bits)
{
    return bits == 2 || bits == 3 || bits == 4 || bits == 8;
}

/* Bytes of one packed row. */
int64_t offq_wq_row_bytes(int64_t k, int bits);
/* One-code-per-byte codes[rows][k] -> packed[rows][row bytes]; OFFQ_ERR_CODE if a code >= 2^bits
 * (packed is then unspecified). */
offq_status offq_pack_wq(const uint8_t *codes, int64_t rows, int64_t k, int bits, uint8_t *packed);
/* Inverse of offq_pack_wq. */
void offq_unpack_wq(const uint8_t *packed, int64_t rows, int64_t k, int bits, uint8_t *codes);
/* The product, dequantizing on the fly. Few rows (m <= OFFQ_WQ_SMALL_M, decode): each thread owns
 * blocks of output columns and reads their packed weights once, per group the float32 dot of the
 * inputs and the codes, out = sum_g scale * dot_g - sum_g scale * zero * (sum of the group's
 * inputs). Many rows: panels of weight rows dequantized to float32 (exactly the values of
 * w_hat) and multiplied by sgemm. kernel: OFFQ_KERNEL_AUTO, _GENERIC or _AVX2; OFFQ_ERR_UNSUPPORTED
 * when it is not usable here, OFFQ_ERR_NOMEM; OFFQ_ERR_NONFINITE when a scale or zero point is NaN
 * or Inf (out then unspecified: the few-rows path checks each block's as it reads them, so that
 * a decode product does not read them twice). */
#define OFFQ_WQ_SMALL_M 32
offq_status offq_matmul_wq(const float *x, int64_t m, const offq_wq_operand *w, float *out,
                           offq_kernel kernel);

/* ---- W4A4KV4 decoder step (decoder.c) ---------------------------------------------------------
 * All decoder layers of a Llama-family model for `rows` consecutive tokens of one sequence at
 * positions start..start+rows-1, in one OpenMP team: per layer RMSNorm, 4-bit activation
 * quantization straight into the product's input layout, the fused q/k/v product (+ bias), RoPE,
 * R3 (normalised Hadamard of head_dim on q and k), the key offset, the KV4 append, causal attention over the packed
 * cache (a score row per query, no [rows, positions] matrix), o_proj + residual, RMSNorm, the
 * fused gate/up product, SwiGLU, R4 (Hadamard of the intermediate size), down_proj + residual.
 * The products are the small-M paths of offq_matmul_w4a4 (identical results); the float steps
 * follow offq/model/ops.py in float32. */
typedef struct {
    offq_q4_operand w; /* [n][k] 4-bit weight (w.rows = n) */
    const float *bias; /* [n] or NULL */
    int64_t k;
    int64_t a_group; /* activation group of the input (divides k, and w.group divides it or it w.group) */
    /* the one zero-point of every weight group when they are all the same integer (symmetric
     * weights: 8), else -1: lets the prefill GEMM fold it into its integer sums */
    int w_zero_const;
} offq_dec_linear;

typedef struct {
    const float *input_norm, *post_norm; /* [d] or NULL (ones) */
    offq_dec_linear qkv, o, gate_up, down; /* out: (H + 2 Hkv) hd, d, 2 f, d */
    const float *k_offset; /* [kv_heads][head_dim] subtracted from k after RoPE + R3, or NULL */
} offq_dec_layer;

typedef struct {
    int64_t layers, d, ffn, heads, kv_heads, head_dim;
    float eps;
    int a_symmetric;
    float a_clip;
    int kv_symmetric;
    int64_t kv_group;
    int r3, r4;
    const offq_dec_layer *layer; /* [layers] */
} offq_dec_model;

/* The packed KV cache of all layers: K then V per position, codes 4-bit (head_dim / 2 bytes a head),
 * scale and zero per kv_group: codes [layers][cap][2][kv_heads][head_dim / 2],
 * scale/zero [layers][cap][2][kv_heads][head_dim / kv_group]. Positions < start are filled. */
typedef struct {
    uint8_t *codes;
    float *scale, *zero;
    int64_t cap;
} offq_dec_cache;

/* Bytes of scratch offq_dec_forward needs for `rows` tokens, caches up to `positions` and a team of
 * `threads`. */
int64_t offq_dec_scratch_bytes(const offq_dec_model *m, int64_t rows, int64_t positions,
                               int threads);
/* h[rows][d] (the embeddings in, the residual stream after the last layer out); cos/sin
 * [rows][head_dim / 2] of the positions. The cache gains positions start..start+rows-1
 * (start + rows <= cache->cap). OFFQ_ERR_NONFINITE / OFFQ_ERR_OVERFLOW from a quantizer (h is then
 * unspecified), OFFQ_ERR_UNSUPPORTED (a length without Hadamard, or a forced kernel not usable
 * here), OFFQ_ERR_NOMEM (scratch too small). attention_int8: attention with 8-bit queries and
 * weights and int32 sums (attention_i8.c, an opt-in that changes the numbers) instead of the
 * float kernel (attention.c, the default). */
offq_status offq_dec_forward(const offq_dec_model *m, float *h, int64_t rows, int64_t start,
                             const float *cos, const float *sin, const offq_dec_cache *cache,
                             void *scratch, int64_t scratch_bytes, offq_kernel kernel,
                             int attention_int8);

/* ---- weight-only decoder step (decoder_wq.c) --------------------------------------------------
 * All decoder layers of a Llama-family model whose linears are packed 2-, 3-, 4- or 8-bit weights
 * with float32 activations (offq_wq_operand), for up to OFFQ_WQ_SMALL_M consecutive tokens of one
 * sequence, in one OpenMP team: per layer RMSNorm, the fused q/k/v product (+ bias), RoPE, the
 * float32 K/V append, causal attention (offq_attention_f32's chunks of positions, split over
 * the team), o_proj + residual, RMSNorm, the fused gate/up product, SwiGLU, down_proj +
 * residual. The products are offq_matmul_wq's small-M row kernels; the float steps follow
 * offq/model/ops.py in float32. No online transforms (a weight-only model has none). Results do
 * not depend on the team's size. */
typedef struct {
    offq_wq_operand w; /* [n][k] */
    const float *bias; /* [n] or NULL */
} offq_dwq_linear;

typedef struct {
    const float *input_norm, *post_norm; /* [d] or NULL (ones) */
    offq_dwq_linear qkv, o, gate_up, down; /* out: (H + 2 Hkv) hd, d, 2 f, d */
} offq_dwq_layer;

typedef struct {
    int64_t layers, d, ffn, heads, kv_heads, head_dim;
    float eps;
    const offq_dwq_layer *layer; /* [layers] */
} offq_dwq_model;

/* Bytes of scratch offq_dwq_forward needs for `rows` tokens, caches up to `positions` and a
 * team of `threads` (INT64_MAX when the size does not fit int64). */
int64_t offq_dwq_scratch_bytes(const offq_dwq_model *m, int64_t rows, int64_t positions,
                               int threads);
/* h[rows][d] (the embeddings in, the residual stream after the last layer out), rows <=
 * OFFQ_WQ_SMALL_M; cos/sin [rows][head_dim / 2] of the positions; kv float32
 * [layers][cap][2][kv_heads][head_dim] (K then V per position; positions < start filled), gains
 * positions start..start+rows-1 (start + rows <= cap). OFFQ_ERR_UNSUPPORTED (a forced kernel not
 * usable here, too many rows), OFFQ_ERR_NOMEM (scratch too small). */
offq_status offq_dwq_forward(const offq_dwq_model *m, float *h, int64_t rows, int64_t start,
                             const float *cos, const float *sin, float *kv, int64_t cap,
                             void *scratch, int64_t scratch_bytes, offq_kernel kernel);

/* ---- Second moments and eigenpairs (cov.c) ----------------------------------------------------
 * syrk adds x^T x to the upper triangle of acc[d, d]; with `mirror` the upper triangle is then
 * copied into the lower one (acc must be symmetric on entry and stays so), without it the lower
 * triangle is not touched (a stream of updates mirrors once at its end: offq_cov_mirror_*). */

/* acc[d, d] += x^T x for x[n, d] (ssyrk / dsyrk in place). */
offq_status offq_cov_update_f32(float *acc, const float *x, int64_t n, int64_t d, int mirror);
offq_status offq_cov_update_f64(double *acc, const double *x, int64_t n, int64_t d, int mirror);
/* float64 acc, float32 x: x^T x by ssyrk in a float32 scratch, added in float64 (calls of at most
 * 256 rows widen the rows and use dsyrk). */
offq_status offq_cov_update_f64_x32(double *acc, const float *x, int64_t n, int64_t d, int mirror);
/* Copy the upper triangle of acc[d, d] into the lower one. */
void offq_cov_mirror_f32(float *acc, int64_t d);
void offq_cov_mirror_f64(double *acc, int64_t d);
/* sel[b, :] = the row of x[b, :, :] with the largest L-inf norm (first on ties; NaN counts as
 * infinite). */
void offq_top1_rows_f32(const float *x, int64_t batch, int64_t tokens, int64_t d, float *sel);
void offq_top1_rows_f64(const double *x, int64_t batch, int64_t tokens, int64_t d, double *sel);
/* The k largest eigenpairs of the symmetric a[d, d] (only the upper triangle is read) by Lanczos with full reorthogonalisation until every
 * residual <= tol * ||a||. values[k] descending, vectors[d, k] (largest-magnitude component
 * positive). OFFQ_ERR_NONFINITE (NaN/Inf in the upper triangle), OFFQ_ERR_NOMEM,
 * OFFQ_ERR_NOCONVERGE. */
offq_status offq_top_eigenpairs(const double *a, int64_t d, int64_t k, double tol, uint64_t seed,
                                double *values, double *vectors);

/* ---- Dense factorizations (linalg.c) ---------------------------------------------------------- */

/* u[k, k] (row-major, upper triangular, positive diagonal, strictly lower part zero) with
 * (m + add I)^-1 = u^T u, add >= 0, 1 <= k <= 46000 (LAPACK's 32-bit sizes), for the symmetric
 * m[a][b] = h[perm[a]][perm[b]] with its diagonal m[a][a] = diag[perm[a]]:
 *   perm NULL: the identity, and only h's upper triangle is read;
 *   perm a permutation of 0..k-1 (the caller checks it): h must be symmetric in full (rows of h
 *     are gathered), and no permuted copy of h is made (GPTQ's act-order at K = 8960: 640 MB);
 *   diag NULL: h's own diagonal; else diag[k] replaces it (h's diagonal is then not read).
 * The reversal J (x_i -> x_{k-1-i}): lower Cholesky J (m + add I) J = L L^T (LAPACK potrf), then
 * u = J L^-1 J (trtri); O(k^2) memory besides u. OFFQ_ERR_NONFINITE (a NaN/Inf among the entries
 * of h or diag read), OFFQ_ERR_NOTPD (potrf fails: m + add I is not numerically positive definite;
 * or u has a non-finite entry or a diagonal entry <= 0), OFFQ_ERR_NOMEM. u is unspecified after
 * an error. Threads: OpenBLAS's setting. */
offq_status offq_upper_cholesky_of_inverse(const double *h, int64_t k, double add,
                                           const int64_t *perm, const double *diag, double *u);

/* The UDU^T factorization m + add I = s diag(d) s^T of the same matrix (same arguments, h read the
 * same way): s[k, k] row-major unit upper triangular (diagonal exactly 1, strictly lower part
 * zero), d[k] > 0. potrf of the reversed matrix without trtri: half the flops of
 * offq_upper_cholesky_of_inverse. Same errors (OFFQ_ERR_NOTPD also for a non-finite entry); s and
 * d are unspecified after an error. Threads: OpenBLAS's setting (the scaling: offq's). */
offq_status offq_udu_factor(const double *h, int64_t k, double add, const int64_t *perm,
                            const double *diag, double *s, double *d);

/* The same factorization in float32: m + add I rounded to float32, spotrf (about twice dpotrf's
 * rate), s float32; d float64 (the squares of float32 entries, exact). A matrix float32 cannot
 * factor, or whose entries overflow it, gives OFFQ_ERR_NOTPD. */
offq_status offq_udu_factor_f32(const double *h, int64_t k, double add, const int64_t *perm,
                                const double *diag, float *s, double *d);

/* The MSE clip search of the weight grids (clip_search.c): for each row of x[rows][g], the clip
 * ratio 1 - i / grid, i in 0..top, searched every 5th then the 8 neighbours of the best, whose grid
 * gives the least squared round-trip error; scale[rows], zero[rows] receive that grid (the
 * quantizer's formulas; errors summed in float64). bits 2..8, grid >= 1, 0 <= top < grid.
 * OFFQ_ERR_NONFINITE (NaN/Inf in x), OFFQ_ERR_OVERFLOW (asymmetric: a row's max - min overflows
 * float32); the outputs are then unspecified. Threads: offq's (OpenMP). */
offq_status offq_mse_clip_search(const float *x, int64_t rows, int64_t g, int bits, int symmetric,
                                 int grid, int top, float *scale, float *zero);

/* GPTQ's per-column step (gptq.c) for the columns first..end-1 of a lazy-update sub-block that
 * ends at sub_end, in the block that starts at block_start (block_start <= first <= end <= sub_end
 * <= k). wt[k][n] is the transposed weight in GPTQ's column order as the updates leave it,
 * orig[k][n] the same before any update, s[k][k] the unit upper factor of the damped Hessian
 * (H = s D s^T; only s[i][t], t > i, is read), err[sub_end - block_start][n] the block's rounding
 * errors, codes[k][n] the output codes; column i is on the grid scale/zero[n][groups] at column
 * column_group[i]. For each column i: codes[i] = the grid codes of (float)wt[i],
 * err[i - block_start] = dequantized - orig[i], and wt[t] -= s[i][t] * err[..] for
 * i < t < sub_end. NumPy's arithmetic exactly (float32 grid; the error and updates in float64, or
 * all in float32 for the _f32 variant). The caller checks every index and that scale is finite
 * and > 0 where read. Threads: offq's (OpenMP). */
void offq_gptq_columns(double *wt, const float *orig, int64_t n, double *err, const double *s,
                       int64_t k, uint8_t *codes, const float *scale, const float *zero,
                       int64_t groups, const int64_t *column_group, int64_t block_start,
                       int64_t first, int64_t end, int64_t sub_end, int bits);
void offq_gptq_columns_f32(float *wt, const float *orig, int64_t n, float *err, const float *s,
                           int64_t k, uint8_t *codes, const float *scale, const float *zero,
                           int64_t groups, const int64_t *column_group, int64_t block_start,
                           int64_t first, int64_t end, int64_t sub_end, int bits);

/* GPTQ's lazy update of the rows t0..t1-1 of wt[k][n] from the columns first..last-1 of the block
 * that starts at block_start: wt[t] -= sum_i s[i][t] err[i - block_start] (one BLAS dgemm, or
 * sgemm for the _f32 variant, accumulated in place). The caller checks block_start <= first <=
 * last <= t0 <= t1 <= k, that err holds rows up to last - block_start and k, n fit BLAS's 32-bit
 * sizes. Threads: OpenBLAS's. */
void offq_gptq_block_update(double *wt, int64_t n, const double *err, const double *s, int64_t k,
                            int64_t block_start, int64_t first, int64_t last, int64_t t0,
                            int64_t t1);
void offq_gptq_block_update_f32(float *wt, int64_t n, const float *err, const float *s, int64_t k,
                                int64_t block_start, int64_t first, int64_t last, int64_t t0,
                                int64_t t1);

/* The `count` smallest eigenpairs of the symmetric h[k, k] (only its upper triangle is read),
 * 1 <= count <= k <= 46000: values[count] ascending, vectors[count, k] row-major, one unit
 * eigenvector per row (a tridiagonal reduction, then only the wanted pairs, as LAPACK dsyevr does
 * for a range of indices; OSAQ's Hessian tail needs a few of thousands). OFFQ_ERR_NONFINITE
 * (NaN/Inf in the upper triangle), OFFQ_ERR_NOCONVERGE, OFFQ_ERR_NOMEM. Threads: OpenBLAS's. */
offq_status offq_smallest_eigenpairs(const double *h, int64_t k, int64_t count, double *values,
                                     double *vectors);

/* The longest run of smallest eigenpairs of h (as above) whose |eigenvalues| sum to at most
 * `budget` (OSAQ's Hessian tail): *m of them, in *values [*m] and *vectors [*m, k], allocated here
 * with malloc (NULL when *m = 0; the caller frees them). One reduction: every eigenvalue comes
 * from the tridiagonal matrix before any vector is formed. Errors as above (outputs then NULL). */
offq_status offq_tail_eigenpairs(const double *h, int64_t k, double budget, int64_t *m,
                                 double **values, double **vectors);

/* The same budget, by inverse subspace iteration on a float32 Cholesky factor of h / c + delta I
 * (tail_subspace.c; c = trace / k; no tridiagonal reduction: k^3 / 3 flops plus two triangular
 * solves per step at k = 8960). The block starts at `block` rows and grows with the tail; at
 * most max_iter steps; seed fixes the start block. *vectors are orthonormal rows spanning an
 * approximation of the smallest eigenvectors' span, *values their exact Rayleigh values
 * (V h V^T = diag(values) to rounding), ascending, summing in magnitude to at most budget; *m
 * never exceeds offq_tail_eigenpairs' count. Falls back to offq_tail_eigenpairs when the block
 * would pass k / 2, when h has no positive trace, or when h / c + delta I does not factor with
 * delta up to 1e-2. *steps = iteration steps taken (0 after a fallback). When factor is not NULL
 * it receives the factor (malloc'd, the caller frees it; NULL after a fallback): U [k, k]
 * row-major upper triangle, zeros below, U^T U = h / *factor_scale + *factor_shift I. Errors as
 * offq_tail_eigenpairs. Threads: OpenBLAS's. */
offq_status offq_tail_subspace(const double *h, int64_t k, double budget, int64_t block,
                               int64_t max_iter, uint64_t seed, int64_t *m, double **values,
                               double **vectors, int64_t *steps, float **factor,
                               double *factor_scale, double *factor_shift);

/* out[i] = scale (|U w_i|^2 - shift |w_i|^2) = w_i h w_i^T for the rows of w [n, k], given
 * offq_tail_subspace's factor U (U^T U = h / scale + shift I): a triangular product, half the
 * flops of w h. Threads: OpenBLAS's. */
offq_status offq_factor_energies(const float *u, int64_t k, double scale, double shift,
                                 const float *w, int64_t n, double *out);

/* GGUF block formats offq_gguf_dequantize reads (ggml's type ids). */
enum {
    OFFQ_GGUF_Q4_0 = 2,
    OFFQ_GGUF_Q4_1 = 3,
    OFFQ_GGUF_Q8_0 = 8,
    OFFQ_GGUF_Q4_K = 12,
    OFFQ_GGUF_Q6_K = 14,
};

/* Values and bytes per block of GGUF type qtype: 0, or -1 when it is not one of the above. */
int offq_gguf_block_shape(int qtype, int64_t *values, int64_t *bytes);

/* dst[blocks * values] = the float32 values of `blocks` consecutive blocks of type qtype at src
 * (gguf_dequant.c: the gguf package's arithmetic, bit for bit). Threads: OpenMP. */
void offq_gguf_dequantize(int qtype, const uint8_t *src, int64_t blocks, float *dst);

#endif
