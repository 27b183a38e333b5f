/* cpu.h: run-time CPU feature dispatch and thread control.
 *
 * Every kernel has a generic C implementation (the reference) and optional SIMD variants of the
 * same name compiled with target attributes. offq_cpu_* report what may be used: the hardware
 * feature AND not disabled by the environment variable OFFQ_DISABLE_SIMD=1 (read once, at module
 * import), which forces the generic path so tests can cover both.
 */
#ifndef OFFQ_CPU_H
#define OFFQ_CPU_H

#include <stdint.h>

void offq_cpu_init(void);      /* call once at module init */
int offq_cpu_has_avx2(void);   /* AVX2 + FMA usable */
int offq_cpu_has_avx512_vnni(void); /* AVX-512 F/BW/VL + VNNI usable */
int offq_cpu_simd_disabled(void);

/* Threads: one setting for offq's OpenMP regions and for OpenBLAS. */
void offq_set_num_threads(int n);
int offq_get_num_threads(void);

#endif
