/* tail_subspace.c: OSAQ's Hessian tail by inverse subspace iteration (no tridiagonal reduction).
 *
 * offq_tail_eigenpairs (linalg.c) reduces H to tridiagonal form: 4/3 k^3 flops, half of them in
 * memory-bound BLAS-2 (27-31 s at k = 8960 on 2 threads, once per down_proj). The tail only needs
 * the span of the few hundred smallest eigenvectors, and any orthonormal basis V of a subspace
 * with trace(V H V^T) <= budget keeps OSAQ's promise (the change of W X stays within the tail's
 * energy). So:
 *
 *   1. Cholesky H + delta I = U^T U (k^3 / 3 flops, BLAS-3), delta = 1e-10 trace / k so that a
 *      positive semidefinite H with an exact null space factors.
 *   2. Subspace iteration with A = (H + delta I)^-1 on a block Q of b rows (two triangular solves
 *      per step, in float32 on the factor scaled by 1 / sqrt(trace / k)): Y = Q A, then
 *      Rayleigh-Ritz of H on span(Y) without another product with H,
 *      since Y (H + delta I) Y^T = Q A Q^T = Y Q^T. With Y^T = Qo R (QR),
 *      Qo^T H Qo = R^-T (Y Q^T) R^-1 - delta I; its eigenpairs give Ritz values theta (ascending)
 *      and the next block Q (the Ritz vectors).
 *   3. m = the longest prefix of theta whose |values| fit the budget. The block grows when m
 *      comes within a quarter of it; the iteration stops when two steps in a row give the same
 *      m (the Ritz values still creep down, by well under 1% of the budget) or after max_iter
 *      steps.
 *   4. The first few Ritz vectors' exact Rayleigh matrix V H V^T (one product with H) is
 *      diagonalised, and the final m is counted on those exact values: the returned pairs' values
 *      are V H V^T's eigenvalues, so the budget holds for the returned basis whatever the
 *      convergence.
 *
 * The Ritz values bound the true eigenvalues from above (theta_i >= lambda_i), so m never exceeds
 * the exact count. A tail too long for the method to pay (b past k / 2), or an H that does not
 * factor even with a larger delta, falls back to the exact reduction.
 *
 * Storage: Q, Y [b, k] row-major (one vector per row). A row-major [b, k] array is LAPACK's
 * column-major k x b, so the QR of Y^T runs in place on Y; the row-major upper triangle of h is the
 * column-major lower one, so potrf 'L' on a copy yields U in the row-major upper triangle.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#define TAIL_DELTA 1e-10       /* Cholesky shift, relative to trace / k */
#define TAIL_DELTA_RETRY 1e4   /* the shift's growth when H + delta I does not factor */
#define TAIL_STABLE_STEPS 2    /* stop once m has been the same for this many steps */
#define TAIL_EXACT_MARGIN 8    /* Ritz vectors beyond m kept for the exact Rayleigh step */

/* u <- the upper Cholesky factor of h + delta I (h's upper triangle); OFFQ_ERR_NOTPD when it does
 * not factor, OFFQ_ERR_NONFINITE for NaN/Inf in h's upper triangle. */
static offq_status shifted_cholesky(const double *h, int64_t k, double delta, double *u)
{
    int bad = 0;
    for (int64_t i = 0; i < k; i++) {
        memset(u + i * k, 0, sizeof(double) * (size_t)i);
        for (int64_t j = i; j < k; j++) {
            bad |= !isfinite(h[i * k + j]);
            u[i * k + j] = h[i * k + j];
        }
        u[i * k + i] += delta;
    }
    if (bad) {
        return OFFQ_ERR_NONFINITE;
    }
    const lapack_int info = scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)k, u,
                                                 (lapack_int)k);
    return info > 0 ? OFFQ_ERR_NOTPD : offq_lapack_status(info);
}

typedef struct {
    int64_t k, cap;   /* order of H; rows allocated in q, y, y32 */
    double *q, *y;    /* [cap, k] */
    float *y32;       /* [cap, k]: the block for the float32 triangular solves */
    double *g, *t;    /* [cap, cap] */
    double *theta;    /* [cap] */
    double *tau;      /* [cap] */
} subspace;

static void subspace_free(subspace *s)
{
    free(s->q);
    free(s->y);
    free(s->y32);
    free(s->g);
    free(s->t);
    free(s->theta);
    free(s->tau);
}

static offq_status subspace_reserve(subspace *s, int64_t cap)
{
    const size_t vec = sizeof(double) * (size_t)(cap * s->k);
    const size_t sq = sizeof(double) * (size_t)(cap * cap);
    double *q = realloc(s->q, vec);
    if (q != NULL) {
        s->q = q;
    }
    free(s->y);
    free(s->y32);
    free(s->g);
    free(s->t);
    free(s->theta);
    free(s->tau);
    s->y = malloc(vec);
    s->y32 = malloc(sizeof(float) * (size_t)(cap * s->k));
    s->g = malloc(sq);
    s->t = malloc(sq);
    s->theta = malloc(sizeof(double) * (size_t)cap);
    s->tau = malloc(sizeof(double) * (size_t)cap);
    if (q == NULL || !s->y || !s->y32 || !s->g || !s->t || !s->theta || !s->tau) {
        return OFFQ_ERR_NOMEM;
    }
    s->cap = cap;
    return OFFQ_OK;
}

/* One step on the b rows of s->q: Y = Q A, Rayleigh-Ritz of H on span(Y); afterwards s->q holds
 * the Ritz vectors (rows, ascending) and s->theta their Ritz values. u32 is the Cholesky factor
 * scaled by 1 / sqrt(scale), so the float32 solves give scale * Y. */
static offq_status subspace_step(subspace *s, const float *u32, double scale, int64_t b,
                                 double delta)
{
    const int64_t k = s->k;
    const blasint K = (blasint)k, B = (blasint)b;
    for (int64_t i = 0; i < b * k; i++) {
        s->y32[i] = (float)s->q[i];
    }
    /* Y (U^T U) = Q: Z U = Q, then Y U^T = Z */
    scipy_cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, B, K,
                      1.0f, u32, K, s->y32, K);
    scipy_cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit, B, K,
                      1.0f, u32, K, s->y32, K);
    const double unscale = 1.0 / scale;
    for (int64_t i = 0; i < b * k; i++) {
        s->y[i] = unscale * (double)s->y32[i];
    }
    /* G = Y Q^T = Q A Q^T (symmetric), before Q is overwritten */
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, B, K, 1.0, s->y, K, s->q, K,
                      0.0, s->g, B);
    offq_status rc = offq_lapack_status(scipy_LAPACKE_dgeqrf(LAPACK_COL_MAJOR, (lapack_int)k,
                                                    (lapack_int)b, s->y, (lapack_int)k, s->tau));
    if (rc != OFFQ_OK) {
        return rc;
    }
    /* T = R^-T G R^-1 - delta I, with R the column-major upper b x b at the top of Y^T */
    for (int64_t i = 0; i < b; i++) {
        for (int64_t j = 0; j < b; j++) {
            s->t[i * b + j] = 0.5 * (s->g[i * b + j] + s->g[j * b + i]);
        }
    }
    scipy_cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, B, B,
                      1.0, s->y, K, s->t, B);
    scipy_cblas_dtrsm(CblasColMajor, CblasLeft, CblasUpper, CblasTrans, CblasNonUnit, B, B, 1.0,
                      s->y, K, s->t, B);
    for (int64_t i = 0; i < b; i++) {
        for (int64_t j = 0; j < i; j++) {
            const double avg = 0.5 * (s->t[i * b + j] + s->t[j * b + i]);
            s->t[i * b + j] = s->t[j * b + i] = avg;
        }
        s->t[i * b + i] -= delta;
    }
    rc = offq_lapack_status(scipy_LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)b, s->t,
                                        (lapack_int)b, s->theta));
    if (rc == OFFQ_OK) {
        rc = offq_lapack_status(scipy_LAPACKE_dorgqr(LAPACK_COL_MAJOR, (lapack_int)k, (lapack_int)b,
                                            (lapack_int)b, s->y, (lapack_int)k, s->tau));
    }
    if (rc != OFFQ_OK) {
        return rc;
    }
    /* Ritz vectors: row i = sum_j C[j, i] Qo_j; column-major C read row-major is C^T */
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, K, B, 1.0, s->t, B, s->y, K,
                      0.0, s->q, K);
    return OFFQ_OK;
}

/* The final pairs from the first c Ritz vectors (rows of q): diagonalise their exact Rayleigh
 * matrix V H V^T (h's upper triangle), keep the prefix whose values fit the budget. */
static offq_status exact_rayleigh(const double *h, int64_t k, const double *q, int64_t c,
                                  double budget, int64_t *m, double **values, double **vectors)
{
    const blasint K = (blasint)k, C = (blasint)c;
    double *p = malloc(sizeof(double) * (size_t)(c * k));
    double *w = malloc(sizeof(double) * (size_t)(c * c));
    double *vals = malloc(sizeof(double) * (size_t)c);
    offq_status rc = OFFQ_ERR_NOMEM;
    if (p == NULL || w == NULL || vals == NULL) {
        goto done;
    }
    scipy_cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, C, K, 1.0, h, K, q, K, 0.0, p, K);
    scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, C, C, K, 1.0, p, K, q, K, 0.0, w,
                      C);
    for (int64_t i = 0; i < c; i++) {
        for (int64_t j = 0; j < i; j++) {
            const double avg = 0.5 * (w[i * c + j] + w[j * c + i]);
            w[i * c + j] = w[j * c + i] = avg;
        }
    }
    rc = offq_lapack_status(scipy_LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'U', C, w, C, vals));
    if (rc != OFFQ_OK) {
        goto done;
    }
    *m = offq_fitting_prefix(vals, c, budget);
    if (*m > 0) {
        *values = malloc(sizeof(double) * (size_t)*m);
        *vectors = malloc(sizeof(double) * (size_t)(*m * k));
        if (*values == NULL || *vectors == NULL) {
            rc = OFFQ_ERR_NOMEM;
            goto done;
        }
        memcpy(*values, vals, sizeof(double) * (size_t)*m);
        /* rows of E^T V, E's columns the eigenvectors (column-major read row-major is E^T) */
        scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)*m, K, C, 1.0, w, C,
                          q, K, 0.0, *vectors, K);
    }
done:
    free(p);
    free(w);
    free(vals);
    return rc;
}

offq_status offq_tail_subspace(const double *h, int64_t k, double budget, int64_t block,
                               int64_t max_iter, uint64_t seed, int64_t *m, double **values,
                               double **vectors, int64_t *steps)
{
    *m = 0;
    *steps = 0;
    *values = *vectors = NULL;
    double trace = 0.0;
    for (int64_t i = 0; i < k; i++) {
        trace += h[i * k + i];
    }
    int64_t b = block < k ? block : k;
    if (!(trace > 0) || 2 * b > k) { /* nothing to shift by, or too small a matrix to pay */
        return offq_tail_eigenpairs(h, k, budget, m, values, vectors);
    }
    double *u = malloc(sizeof(double) * (size_t)(k * k));
    float *u32 = NULL;
    subspace s = {.k = k};
    offq_status rc = OFFQ_ERR_NOMEM;
    if (u == NULL) {
        goto done;
    }
    double delta = TAIL_DELTA * trace / (double)k;
    rc = shifted_cholesky(h, k, delta, u);
    for (int retry = 0; rc == OFFQ_ERR_NOTPD && retry < 2; retry++) {
        delta *= TAIL_DELTA_RETRY;
        rc = shifted_cholesky(h, k, delta, u);
    }
    if (rc == OFFQ_ERR_NOTPD) {
        free(u);
        return offq_tail_eigenpairs(h, k, budget, m, values, vectors);
    }
    if (rc != OFFQ_OK || (rc = subspace_reserve(&s, b)) != OFFQ_OK) {
        goto done;
    }
    /* The iteration's solves run in float32 on U / sqrt(trace / k) (half the time of float64;
     * the scale keeps 1 / delta within float32's range). Their rounding only perturbs the
     * iteration: the final exact Rayleigh step counts the budget in float64. */
    const double scale = trace / (double)k;
    const double inv_root = 1.0 / sqrt(scale);
    /* converted in place, so the two copies never coexist (640 + 320 MB at k = 8960): float i
     * lands in bytes [4i, 4i + 4), below double i's bytes [8i, 8i + 8), which are read first;
     * memcpy keeps the stores ordered after the loads whatever the aliasing rules */
    for (int64_t i = 0; i < k * k; i++) {
        const float f = (float)(inv_root * u[i]);
        memcpy((char *)u + sizeof(float) * (size_t)i, &f, sizeof f);
    }
    u32 = realloc(u, sizeof(float) * (size_t)(k * k)); /* shrinking: NULL only leaves u as it was */
    if (u32 == NULL) {
        u32 = (float *)u;
    }
    u = NULL;
    uint64_t state = seed;
    for (int64_t i = 0; i < b * k; i++) {
        s.q[i] = offq_uniform_pm1(&state);
    }
    int64_t count = 0, stable = 0, last = -1, ritz = 0; /* ritz: rows of q that are Ritz vectors */
    for (int64_t it = 0; it < max_iter; it++) {
        if ((rc = subspace_step(&s, u32, scale, b, delta)) != OFFQ_OK) {
            goto done;
        }
        *steps = it + 1;
        ritz = b;
        count = offq_fitting_prefix(s.theta, b, budget);
        if (4 * count > 3 * b) { /* the tail may not fit: grow the block by fresh rows */
            int64_t grown = count + count / 2 + 32;
            grown = grown > b + 64 ? grown : b + 64;
            if (2 * grown > k) {
                free(u32);
                u32 = NULL;
                subspace_free(&s);
                return offq_tail_eigenpairs(h, k, budget, m, values, vectors);
            }
            if ((rc = subspace_reserve(&s, grown)) != OFFQ_OK) {
                goto done;
            }
            for (int64_t i = b * k; i < grown * k; i++) {
                s.q[i] = offq_uniform_pm1(&state);
            }
            b = grown;
            stable = 0;
            last = -1;
            continue;
        }
        stable = count == last ? stable + 1 : 1;
        last = count;
        if (stable >= TAIL_STABLE_STEPS) {
            break;
        }
    }
    free(u32);
    u32 = NULL;
    /* (after a last-step growth the rows past `ritz` are still random) */
    const int64_t c = count + TAIL_EXACT_MARGIN < ritz ? count + TAIL_EXACT_MARGIN : ritz;
    rc = exact_rayleigh(h, k, s.q, c, budget, m, values, vectors);
done:
    if (rc != OFFQ_OK) {
        free(*values);
        free(*vectors);
        *values = *vectors = NULL;
        *m = 0;
    }
    free(u);
    free(u32);
    subspace_free(&s);
    return rc;
}
