/* isa_peak.c: the most multiply-adds per second one core's AVX2 integer pipes can give an exact
 * 4-bit x 4-bit product (compiled and run by bench_isa_peak.py, which sets it beside sgemm).
 *
 * Without VNNI an AVX2 integer dot product needs two instructions per 32 byte pairs: vpmaddubsw
 * (32 u8 x s8 products, summed in pairs into 16-bit lanes) and vpaddw (the 16-bit accumulate).
 * The loop below is only those two, on 6 independent accumulators (no loads, no dependency
 * chain longer than one add per iteration), so its rate bounds every kernel built from them,
 * offq's matmul_w4a4 AVX2 tile included. Prints "<multiply-adds per second>". */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv)
{
    const long iters = argc > 1 ? atol(argv[1]) : 100000000L;
    const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0;
    const double t = now();
    for (long i = 0; i < iters; i++) {
        __m256i p0, p1, p2, p3, p4, p5;
        /* asm keeps the compiler from folding the constant products out of the loop */
        __asm__ volatile("vpmaddubsw %[a], %[b], %[p0]\n\t"
                         "vpmaddubsw %[a], %[b], %[p1]\n\t"
                         "vpmaddubsw %[a], %[b], %[p2]\n\t"
                         "vpmaddubsw %[a], %[b], %[p3]\n\t"
                         "vpmaddubsw %[a], %[b], %[p4]\n\t"
                         "vpmaddubsw %[a], %[b], %[p5]\n\t"
                         "vpaddw %[p0], %[s0], %[s0]\n\t"
                         "vpaddw %[p1], %[s1], %[s1]\n\t"
                         "vpaddw %[p2], %[s2], %[s2]\n\t"
                         "vpaddw %[p3], %[s3], %[s3]\n\t"
                         "vpaddw %[p4], %[s4], %[s4]\n\t"
                         "vpaddw %[p5], %[s5], %[s5]"
                         : [s0] "+x"(s0), [s1] "+x"(s1), [s2] "+x"(s2), [s3] "+x"(s3),
                           [s4] "+x"(s4), [s5] "+x"(s5), [p0] "=&x"(p0), [p1] "=&x"(p1),
                           [p2] "=&x"(p2), [p3] "=&x"(p3), [p4] "=&x"(p4), [p5] "=&x"(p5)
                         : [a] "x"(a), [b] "x"(b));
    }
    const double dt = now() - t;
    /* use the sums, so nothing above is dead */
    const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(s0, s1), s2),
                                       _mm256_add_epi16(_mm256_add_epi16(s3, s4), s5));
    printf("%.6e %d\n", 32.0 * 6.0 * (double)iters / dt, _mm256_extract_epi16(s, 0) & 1);
    return 0;
}
