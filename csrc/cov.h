/* cov.h: streaming second moments (OpenBLAS syrk), top-1 token selection, top eigenpairs.
 *
 * Accumulators are full symmetric d x d matrices (row-major). An update adds x^T x to the upper
 * triangle with syrk and then mirrors the upper triangle into the lower one, so acc must be
 * symmetric on entry (as every accumulator produced here is).
 */
#ifndef OFFQ_COV_H
#define OFFQ_COV_H

#include <stdint.h>

/* acc[d, d] += x^T x for x[n, d]; same precision: ssyrk / dsyrk straight into acc. */
int offq_cov_update_f32(float *acc, const float *x, int64_t n, int64_t d);
int offq_cov_update_f64(double *acc, const double *x, int64_t n, int64_t d);
/* float64 acc, float32 x: x^T x is formed by ssyrk in a float32 scratch (one call's tokens summed
 * in float32, as OpenBLAS does) and added to acc in float64; calls of at most 256 rows widen the
 * rows to float64 and use dsyrk instead. Returns -1 when out of memory. */
int offq_cov_update_f64_x32(double *acc, const float *x, int64_t n, int64_t d);

/* For each of `batch` sequences x[b, :, :] of `tokens` rows of length d, copy the row with the
 * largest L-infinity norm (the first such row; a row containing NaN counts as infinite) into
 * sel[b, :]. */
void offq_top1_rows_f32(const float *x, int64_t batch, int64_t tokens, int64_t d, float *sel);
void offq_top1_rows_f64(const double *x, int64_t batch, int64_t tokens, int64_t d, double *sel);

/* The k algebraically largest eigenpairs of the symmetric a[d, d] (only the upper triangle is
 * read) by Lanczos iteration with full reorthogonalisation, extended until every wanted Ritz pair
 * has residual ||a v - lambda v|| <= tol * ||a||. values[k] descending; vectors[d, k] (column i
 * is the unit eigenvector of values[i], sign chosen so that its largest-magnitude component is
 * positive). Returns 0, -1 when out of memory, -2 when the tridiagonal solver did not converge. */
int offq_top_eigenpairs(const double *a, int64_t d, int64_t k, double tol, uint64_t seed,
                        double *values, double *vectors);

#endif
