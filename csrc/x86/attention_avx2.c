/* x86/attention_avx2.c: offq_attend (steps: attention.c) with 8-wide float vectors: the tiled
 * kernel of x86/attention_tiles.h with 8 keys per score vector and 4 x 8 dims per value pair. */
#include "kernels.h"

#ifdef OFFQ_X86
#define ATT_TARGET "avx2,fma"
#include "x86/attention_tiles.h"

DEFINE_ATTEND_WIDTH(offq_attend_avx2, "avx2,fma", __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
                    _mm256_set1_ps, _mm256_fmadd_ps, _mm256_setzero_ps)
#endif
