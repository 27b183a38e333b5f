/* tail_subspace.c: OSAQ's Hessian tail by inverse subspace iteration (no tridiagonal reduction).
 *
 * offq_tail_eigenpairs (linalg.c) reduces H to tridiagonal form: 4/3 k^3 flops, half of them in
 * memory-bound BLAS-2 (27-31 s at k = 8960 on 2 threads, once per down_proj). The tail only needs
 * the span of the few hundred smallest eigenvectors, and any orthonormal basis V of a subspace
 * with trace(V H V^T) <= budget keeps OSAQ's promise (the change of W X stays within the tail's
 * energy). So:
 *
 *   1. Cholesky H / c + delta I = U^T U in float32 (k^3 / 3 flops, BLAS-3; c = trace / k),
 *      delta = float32's rounding unit of the largest diagonal entry of H / c, so that a positive
 *      semidefinite H with an exact null space factors (grown tenfold while it does not).
 *   2. Subspace iteration with A = (H + delta c I)^-1 on a block Q of b rows (two float32
 *      triangular solves per step): Y = Q A, then Rayleigh-Ritz of H on span(Y) without another
 *      product with H, since Y (H + delta c I) Y^T = Q A Q^T = Y Q^T. With Y^T = Qo R (QR),
 *      Qo^T H Qo = R^-T (Y Q^T) R^-1 - delta c I; its eigenpairs give Ritz values theta
 *      (ascending) and the next block Q (the Ritz vectors).
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

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#define TAIL_DELTA_RETRY 10.0 /* the shift's growth when H / c + delta I does not factor */
#define TAIL_DELTA_MAX 1e-2    /* the largest shift tried (relative to c = trace / k) */
#define TAIL_STABLE_STEPS 2    /* stop once m has been the same for this many steps */
#define TAIL_EXACT_MARGIN 8    /* Ritz vectors beyond m kept for the exact Rayleigh step */

/* u32 <- the upper float32 Cholesky factor of h / c + delta I (h's upper triangle; c = trace / k,
 * so the scaled matrix's mean eigenvalue is 1 whatever h's magnitude); OFFQ_ERR_NOTPD when it
 * does not factor (or h / c overflows float32), OFFQ_ERR_NONFINITE for NaN/Inf in h. */
static offq_status scaled_cholesky32(const double *h, int64_t k, double c, double delta,
                                     float *u32)
{
    const double inv = 1.0 / c;
    int bad = 0, overflow = 0;
    for (int64_t i = 0; i < k; i++) {
        memset(u32 + i * k, 0, sizeof(float) * (size_t)i);
        for (int64_t j = i; j < k; j++) {
            bad |= !isfinite(h[i * k + j]);
            const float f = (float)(inv * h[i * k + j] + (i == j ? delta : 0.0));
            overflow |= !isfinite(f);
            u32[i * k + j] = f;
        }
    }
    if (bad) {
        return OFFQ_ERR_NONFINITE;
    }
    if (overflow) {
        return OFFQ_ERR_NOTPD;
    }
    const lapack_int info = scipy_LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)k, u32,
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
                               double **vectors, int64_t *steps, float **factor,
                               double *factor_scale, double *factor_shift)
{
    *m = 0;
    *steps = 0;
    *values = *vectors = NULL;
    if (factor != NULL) {
        *factor = NULL;
    }
    double trace = 0.0;
    for (int64_t i = 0; i < k; i++) {
        trace += h[i * k + i];
    }
    int64_t b = block < k ? block : k;
    if (!(trace > 0) || 2 * b > k) { /* nothing to shift by, or too small a matrix to pay */
        return offq_tail_eigenpairs(h, k, budget, m, values, vectors);
    }
    /* The factor is float32 (half the time and memory of float64) of H / c + delta I with
     * c = trace / k: the scale keeps 1 / delta within float32's range at any magnitude of H,
     * and the shift starts at float32's rounding unit of the largest diagonal entry, below which
     * the factorization's own rounding, not H, decides whether it factors. The shift (1e-5 of
     * the mean eigenvalue on Qwen2.5-1.5B's down_proj Hessians, whose budget-edge eigenvalues
     * are ~1e-3 of it) only slows the iteration's convergence a little, and the rounding of the
     * factor only perturbs the iteration: the final exact Rayleigh step counts the budget in
     * float64. */
    const double scale = trace / (double)k;
    double max_diag = 0.0;
    for (int64_t i = 0; i < k; i++) {
        max_diag = h[i * k + i] > max_diag ? h[i * k + i] : max_diag;
    }
    float *u32 = malloc(sizeof(float) * (size_t)(k * k));
    subspace s = {.k = k};
    offq_status rc = OFFQ_ERR_NOMEM;
    if (u32 == NULL) {
        goto done;
    }
    double delta_rel = FLT_EPSILON * (max_diag / scale > 1.0 ? max_diag / scale : 1.0);
    rc = scaled_cholesky32(h, k, scale, delta_rel, u32);
    while (rc == OFFQ_ERR_NOTPD && delta_rel * TAIL_DELTA_RETRY <= TAIL_DELTA_MAX) {
        delta_rel *= TAIL_DELTA_RETRY;
        rc = scaled_cholesky32(h, k, scale, delta_rel, u32);
    }
    if (rc == OFFQ_ERR_NOTPD) {
        free(u32);
        return offq_tail_eigenpairs(h, k, budget, m, values, vectors);
    }
    if (rc != OFFQ_OK || (rc = subspace_reserve(&s, b)) != OFFQ_OK) {
        goto done;
    }
    const double delta = delta_rel * scale; /* the shift of H itself */
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
    if (factor != NULL) { /* handed over: the caller's energies w H w^T read it */
        *factor = u32;
        *factor_scale = scale;
        *factor_shift = delta_rel;
    } else {
        free(u32);
    }
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
        if (factor != NULL) {
            free(*factor);
            *factor = NULL;
        }
    }
    free(u32);
    subspace_free(&s);
    return rc;
}

#define ENERGY_ROWS 512 /* rows per triangular product (18 MB of scratch at k = 8960) */

offq_status offq_factor_energies(const float *u, int64_t k, double scale, double shift,
                                 const float *w, int64_t n, double *out)
{
    const int64_t rows = n < ENERGY_ROWS ? n : ENERGY_ROWS;
    float *p = malloc(sizeof(float) * (size_t)((rows > 0 ? rows : 1) * k));
    if (p == NULL) {
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t c = n - r0 < rows ? n - r0 : rows;
        memcpy(p, w + r0 * k, sizeof(float) * (size_t)(c * k));
        /* P = W U^T: row i of P is U w_i, so |P_i|^2 = w_i U^T U w_i^T (half a GEMM's flops) */
        scipy_cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit,
                          (blasint)c, (blasint)k, 1.0f, u, (blasint)k, p, (blasint)k);
        for (int64_t i = 0; i < c; i++) {
            double pp = 0.0, ww = 0.0;
            const float *pi = p + i * k, *wi = w + (r0 + i) * k;
            for (int64_t j = 0; j < k; j++) {
                pp += (double)pi[j] * pi[j];
                ww += (double)wi[j] * wi[j];
            }
            out[r0 + i] = scale * (pp - shift * ww);
        }
    }
    free(p);
    return OFFQ_OK;
}
