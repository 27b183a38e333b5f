/* cpu.c: feature detection (once) and the single thread setting shared by OpenMP and OpenBLAS. */
#include "cpu.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

static int g_avx2 = 0;
static int g_avx512_vnni = 0;
static int g_disabled = 0;

void offq_cpu_init(void)
{
    const char *env = getenv("OFFQ_DISABLE_SIMD");
    g_disabled = (env != NULL && env[0] != '\0' && strcmp(env, "0") != 0);
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    g_avx512_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
}

int offq_cpu_simd_disabled(void) { return g_disabled; }
int offq_cpu_has_avx2(void) { return g_avx2 && !g_disabled; }
int offq_cpu_has_avx512_vnni(void) { return g_avx512_vnni && !g_disabled; }

void offq_set_num_threads(int n)
{
    if (n < 1) {
        n = 1;
    }
    omp_set_num_threads(n);
    scipy_openblas_set_num_threads(n);
}

int offq_get_num_threads(void) { return omp_get_max_threads(); }
