/* x86/attention_avx512.c: offq_attend with 16-wide float vectors where the work is: the tiled
 * kernel of x86/attention_tiles.h with 16 keys per score vector and 4 x 16 dims per value pair.
 * Each lane runs the same fma chain as in x86/attention_avx2.c, so both variants give the same
 * numbers bit for bit; on CPUs with full-width 512-bit FMA pipes (Zen5, most Xeons) the scores
 * and values run at twice the AVX2 rate. */
#include "kernels.h"

#ifdef OFFQ_X86
#define ATT_TARGET "avx512f,avx2,fma"
#define ATT_AVX512 /* 16-wide row decoding and softmax exp too */
#include "x86/attention_tiles.h"

DEFINE_ATTEND_WIDTH(offq_attend_avx512, "avx512f,avx2,fma", __m512, 16, _mm512_loadu_ps,
                    _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_setzero_ps)
#endif
