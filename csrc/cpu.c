/* cpu.c: CPU features read once, the dispatch table filled once, and the one thread setting shared
 * by OpenMP and OpenBLAS.
 *
 * This is the only place that knows which functions make up each SIMD variant; drivers call
 * through offq_dispatch and never test CPU features themselves.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "kernels.h"

#ifdef OFFQ_X86
#include <immintrin.h>
#endif

static const offq_mm_ops mm_generic = {
    .tile = offq_mm_tile_generic,
    .tile_folded = offq_mm_tile_folded_generic,
};

static const offq_wq_ops wq_generic = {
    .align = 1,
    .rows = offq_wq_rows_generic,
    .dequant = offq_wq_dequant_generic,
};

#ifdef OFFQ_X86
static const offq_wq_ops wq_avx2 = {
    .align = 32, /* whole 32-code chunks per group */
    .prep = offq_wq_prep_avx2,
    .rows = offq_wq_rows_avx2,
    .dequant = offq_wq_dequant_avx2,
};

static const offq_wq_ops wq_avx512 = {
    .align = 64, /* whole 64-code chunks per group */
    .prep = offq_wq_prep_avx512,
    .rows = offq_wq_rows_avx512,
    .dequant = offq_wq_dequant_avx2, /* prep(scaled = 0) keeps the AVX2 panel order */
};

static const offq_wq_ops wq_avx512vbmi = { /* the same variant, its 3-bit lanes by vpermb */
    .align = 64,
    .prep = offq_wq_prep_avx512,
    .rows = offq_wq_rows_avx512vbmi,
    .dequant = offq_wq_dequant_avx2,
};

static const offq_mm_ops mm_avx2 = {
    .tile = offq_mm_tile_avx2,
    .tile_folded = offq_mm_tile_folded_avx2,
    .pack_panel = offq_mm_pack_panel_avx2,
    .unpack_blocks = offq_mm_unpack_blocks_avx2,
    /* above 4 rows the GEMM path wins (16 accumulators would spill); the decode layout first
     * when the weight has it */
    .small = {{offq_mm_gemv_dec_range_avx2, 4, 8, 1}, {offq_mm_gemv_range_avx2, 4, 64, 0}},
};

static const offq_mm_ops mm_avx512vnni = {
    .tile = offq_mm_tile_avx512vnni,
    .tile_folded = offq_mm_tile_folded_avx512vnni,
    .pack_panel = offq_mm_pack_panel_avx2,
    .unpack_blocks = offq_mm_unpack_blocks_avx2,
    /* 32 zmm registers hold 8 rows; blocks of a multiple of 64 take the 256-bit VNNI gemv, the
     * rest of the AVX2 rows the AVX2 gemv */
    .small = {{offq_mm_gemv_dec_range_avx512vnni, 4, 8, 1},
              {offq_mm_gemv_range_avx512vnni, 8, 128, 0},
              {offq_mm_gemv64_range_avx512vnni, 4, 64, 0},
              {offq_mm_gemv_range_avx2, 4, 64, 0}},
};
#endif

offq_dispatch_table offq_dispatch = {
    .quant_group = offq_quant_group_generic,
    .quant_groups = offq_quant_groups_generic,
    .pow2_f32 = offq_pow2_f32_generic,
    .pow2_f64 = offq_pow2_f64_generic,
    .mix_f32 = offq_mix_f32_generic,
    .mix_f64 = offq_mix_f64_generic,
    .attend = offq_attend_generic,
    .attend_i8 = offq_attend_i8_generic,
    .attend_f32 = offq_attend_f32_generic,
    .swiglu = offq_swiglu_generic,
    .residual_norm_row = offq_residual_norm_row_generic,
    .clip_row_error = offq_clip_row_error_generic,
    .i8_rows = offq_i8_rows_generic,
    .matmul = {[OFFQ_KERNEL_GENERIC] = &mm_generic},
    .matmul_best = OFFQ_KERNEL_GENERIC,
    .wq = {[OFFQ_KERNEL_GENERIC] = &wq_generic},
    .wq_best = OFFQ_KERNEL_GENERIC,
};

static int g_avx2 = 0;
static int g_avx512 = 0; /* AVX-512 F: the float kernels' 16-lane variants */
static int g_avx512bw = 0; /* AVX-512 F + BW: the weight-only product's */
static int g_avx512_vbmi = 0; /* + VBMI: matmul_wq's 3-bit lanes in one byte permute */
static int g_avx512_vnni = 0;
static int g_disabled = 0;

/* OFFQ_SIMD_MAX=avx2 stops the dispatch at the AVX2 variants (what an AVX2-only CPU such as Zen3
 * runs: benchmarks and tests emulate one with it); =avx512 at AVX-512 F + BW without VBMI and VNNI
 * (a Skylake-SP); =generic is OFFQ_DISABLE_SIMD=1. */
static int simd_cap_is(const char *isa)
{
    const char *env = getenv("OFFQ_SIMD_MAX");
    return env != NULL && strcmp(env, isa) == 0;
}

#ifdef OFFQ_X86
/* Seconds (best of 5) for 8 chains of 4096 fused multiply-adds x * b + acc, DAZ cleared as the
 * weight-only rows clear it: with b subnormal this is what their subnormal decode costs. */
__attribute__((target("avx2,fma"), noinline)) static double fma_chain_seconds(float x, float b)
{
    volatile float vx = x, vb = b; /* no constant folding */
    const unsigned csr = offq_daz_clear();
    const __m256 a = _mm256_set1_ps(vx), m = _mm256_set1_ps(vb);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) {
            acc[c] = _mm256_setzero_ps();
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < 4096; i++) {
            for (int c = 0; c < 8; c++) {
                acc[c] = _mm256_fmadd_ps(a, m, acc[c]);
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        __m256 s = acc[0];
        for (int c = 1; c < 8; c++) {
            s = _mm256_add_ps(s, acc[c]);
        }
        volatile float sink = _mm256_cvtss_f32(s);
        (void)sink;
        const double t = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        best = t < best ? t : best;
    }
    offq_csr_restore(csr);
    return best;
}

/* Whether the weight-only rows decode codes as subnormal floats (kernels.h): only where a
 * multiply-add with a subnormal operand runs at full speed. A scratch loop on Zen 5 measured no
 * difference; CPUs that take a microcode assist for subnormal operands (vendors document one on
 * some cores) would run the decode many times slower, so a probe decides (2 x 5 x 4096 dependent
 * steps, ~40 us by count; not visible in an ~88 ms import; both decodes give the same bits).
 * OFFQ_WQ_DECODE=convert|subnormal overrides it (tests, benchmarks). */
static int subnormal_decode_fast(void)
{
    const char *env = getenv("OFFQ_WQ_DECODE");
    if (env != NULL && strcmp(env, "convert") == 0) {
        return 0;
    }
    if (env != NULL && strcmp(env, "subnormal") == 0) {
        return 1;
    }
    /* products of the same size, 7 * 2^-49, from a normal and from a subnormal operand */
    const double normal = fma_chain_seconds(0x1p-29f, 7 * 0x1p-20f);
    const double subnormal = fma_chain_seconds(0x1p100f, 7 * 0x1p-149f);
    return subnormal <= 1.5 * normal;
}
#endif

void offq_cpu_init(void)
{
    const char *env = getenv("OFFQ_DISABLE_SIMD");
    g_disabled = (env != NULL && env[0] != '\0' && strcmp(env, "0") != 0) || simd_cap_is("generic");
#ifdef OFFQ_X86
    if (!g_disabled) {
        __builtin_cpu_init();
        g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        g_avx512 = g_avx2 && !simd_cap_is("avx2") && __builtin_cpu_supports("avx512f");
        g_avx512bw = g_avx512 && __builtin_cpu_supports("avx512bw");
        g_avx512_vbmi = g_avx512bw && !simd_cap_is("avx512") &&
                        __builtin_cpu_supports("avx512vbmi");
        g_avx512_vnni = g_avx512bw && !simd_cap_is("avx512") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni");
    }
    if (g_avx2) {
        offq_dispatch.quant_group = offq_quant_group_avx2;
        offq_dispatch.quant_groups = offq_quant_groups_avx2;
        offq_dispatch.pow2_f32 = offq_pow2_f32_avx2;
        offq_dispatch.pow2_f64 = offq_pow2_f64_avx2;
        offq_dispatch.mix_f32 = offq_mix_f32_avx2;
        offq_dispatch.mix_f64 = offq_mix_f64_avx2;
        offq_dispatch.attend = offq_attend_avx2;
        offq_dispatch.attend_i8 = offq_attend_i8_avx2;
        offq_dispatch.attn_i8_pretile = offq_attn_i8_pretile_avx2; /* the layout VNNI reads too */
        offq_dispatch.attend_f32 = offq_attend_f32_avx2;
        offq_dispatch.swiglu = offq_swiglu_avx2;
        offq_dispatch.residual_norm_row = offq_residual_norm_row_avx2;
        offq_dispatch.clip_row_error = offq_clip_row_error_avx2;
        offq_dispatch.i8_rows = offq_i8_rows_avx2;
        offq_dispatch.matmul[OFFQ_KERNEL_AVX2] = &mm_avx2;
        offq_dispatch.matmul_best = OFFQ_KERNEL_AVX2;
        offq_dispatch.wq[OFFQ_KERNEL_AVX2] = &wq_avx2;
        offq_dispatch.wq_best = OFFQ_KERNEL_AVX2;
        offq_dispatch.wq_subnormal = subnormal_decode_fast();
    }
    if (g_avx512) {
        offq_dispatch.swiglu = offq_swiglu_avx512;
        offq_dispatch.residual_norm_row = offq_residual_norm_row_avx512;
        offq_dispatch.quant_group = offq_quant_group_avx512;
        offq_dispatch.quant_groups = offq_quant_groups_avx512;
        offq_dispatch.attend = offq_attend_avx512;
        offq_dispatch.mix_f32 = offq_mix_f32_avx512;
        offq_dispatch.mix_f64 = offq_mix_f64_avx512;
    }
    if (g_avx512bw) {
        offq_dispatch.wq[OFFQ_KERNEL_AVX512] = g_avx512_vbmi ? &wq_avx512vbmi : &wq_avx512;
        offq_dispatch.wq_best = OFFQ_KERNEL_AVX512;
    }
    if (g_avx512_vnni) {
        offq_dispatch.matmul[OFFQ_KERNEL_VNNI] = &mm_avx512vnni;
        offq_dispatch.attend_i8 = offq_attend_i8_avx512vnni;
        offq_dispatch.matmul_best = OFFQ_KERNEL_VNNI;
    }
#endif
}

int offq_cpu_simd_disabled(void) { return g_disabled; }
int offq_cpu_has_avx2(void) { return g_avx2; }
int offq_cpu_has_avx512(void) { return g_avx512; }
int offq_cpu_has_avx512bw(void) { return g_avx512bw; }
int offq_cpu_has_avx512_vbmi(void) { return g_avx512_vbmi; }
int offq_cpu_has_avx512_vnni(void) { return g_avx512_vnni; }
int offq_cpu_wq_subnormal(void) { return offq_dispatch.wq_subnormal; }

void offq_set_num_threads(int n)
{
    if (n < 1) {
        n = 1;
    }
    omp_set_num_threads(n);
    scipy_openblas_set_num_threads(n);
}

int offq_get_num_threads(void) { return omp_get_max_threads(); }
