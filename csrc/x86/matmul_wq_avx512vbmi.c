/* x86/matmul_wq_avx512vbmi.c: the AVX-512 decode rows of the weight-only matmul
 * (x86/wq_avx512_rows.h, described in x86/matmul_wq_avx512.c) on CPUs with AVX-512 VBMI (Ice
 * Lake, Zen 4 and later): a 3-bit chunk's lanes come from one byte permute (vpermb) instead of a
 * dword permute and a byte shuffle, which brings W3 from 27% to a few % behind W4 at one row (with
 * 32-byte loads instead of masked 24-byte ones away from the array's end; scratch A/B on Zen 5).
 * The variant is still "avx512"; prep and the panels are the F + BW unit's.
 */
#include "kernels.h"

#ifdef OFFQ_X86
#define WQ512_TARGET "avx512f,avx512bw,avx512vbmi,avx2,fma"
#define WQ512_ROWS offq_wq_rows_avx512vbmi
#include "x86/wq_avx512_rows.h"

INLINE __m512i lanes3(const uint8_t *p, int edge)
{
    /* lane L <- bytes floor(3L/2), floor(3L/2) + 1; its upper two bytes are don't-cares */
#define L3(l) (3 * (l)) / 2, (3 * (l)) / 2 + 1, 0, 0
    static const int8_t idx[64] = {L3(0),  L3(1),  L3(2),  L3(3),  L3(4),  L3(5),
                                   L3(6),  L3(7),  L3(8),  L3(9),  L3(10), L3(11),
                                   L3(12), L3(13), L3(14), L3(15)};
#undef L3
    return _mm512_permutexvar_epi8(_mm512_loadu_si512(idx), load24(p, edge));
}
#endif
