/* hadamard.h: fast Walsh-Hadamard transforms (powers of two and m * 2^k lengths).
 *
 * The transform of a row vector x of length n is y = x H_n (times 1/sqrt(n) when normalised):
 *   n = 2^k       H_n is the Sylvester matrix, H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]
 *                 (symmetric; the order of scipy.linalg.hadamard).
 *   n = m * 2^k   H_n = H_m (x) H_{2^k} (Kronecker product: element index i = a * 2^k + b, a < m,
 *                 b < 2^k), with H_m from the Paley tables of hadamard_tables.h, where m is the
 *                 smallest supported factor. Row 0 and column 0 of every H_n are all ones.
 * Rows are transformed in place, in parallel over rows (OpenMP); a generic C kernel is the reference
 * and an AVX2+FMA variant of the same computation is chosen at run time (offq_cpu_has_avx2()).
 */
#ifndef OFFQ_HADAMARD_H
#define OFFQ_HADAMARD_H

#include <stdint.h>

/* The factor m of a supported length n = m * 2^k (m = 1 for powers of two; otherwise the smallest
 * tabulated order with n / m a power of two), or 0 when no construction is available. */
int64_t offq_hadamard_factor(int64_t n);

/* The largest power of two dividing n (n >= 1). */
int64_t offq_hadamard_pow2_block(int64_t n);

/* The number of tabulated orders, and the i-th (ascending). */
#define OFFQ_HAD_NUM_TABLES_PUBLIC offq_hadamard_num_orders()
int offq_hadamard_num_orders(void);
int64_t offq_hadamard_order(int i);

/* Write the tabulated +-1 matrix H_m (row-major, m * m) into out. Returns 0, or -1 when m has no
 * table. */
int offq_hadamard_base(int64_t m, double *out);

/* x[r, :] <- x[r, :] H_n (times 1/sqrt(n) if normalize) for every row r < rows, in place, on the
 * contiguous array x[rows * n]. n must be supported (offq_hadamard_factor(n) != 0).
 * Returns 0, or -1 when n is unsupported or temporary memory could not be allocated. */
int offq_fwht_f32(float *x, int64_t rows, int64_t n, int normalize);
int offq_fwht_f64(double *x, int64_t rows, int64_t n, int normalize);

#endif
