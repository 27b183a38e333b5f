/* linalg.c: dense factorizations through OpenBLAS's LAPACKE (scipy-openblas32, prefixed names).
 *
 * Upper Cholesky factor of an inverse (what GPTQ needs): U upper with (H + add I)^-1 = U^T U.
 * With J the reversal permutation (J = J^T = J^-1) and M = J (H + add I) J = L L^T (lower
 * Cholesky), R = J L J is upper and H + add I = R R^T, so (H + add I)^-1 = R^-T R^-1 and
 * U = R^-1 = J L^-1 J. Cost: potrf + trtri (K^3 / 3 each) instead of an inverse (~2 K^3) followed
 * by a Cholesky of it. The UDU^T factor (GPTQ's, below) stops before trtri: with R = J L J,
 * m + add I = R R^T, and R's columns over their diagonal entries give S (unit upper) and D.
 *
 * Storage: for a row-major K x K array, J A J is the same K * K numbers in reverse order, so the
 * reversals are flat reversals. A row-major lower triangle is a column-major upper one, so LAPACK
 * runs column-major with uplo 'U' on the buffer in place (LAPACKE's row-major layout would
 * transpose into and out of a K x K copy): column-major potrf 'U' gives M = Uc^T Uc, i.e. L = Uc^T
 * in the row-major view, and trtri 'U' turns Uc into Uc^-1, i.e. L^-1 in the row-major view.
 *
 * Smallest eigenpairs (OSAQ's Hessian tail): a tridiagonal reduction, then only the wanted pairs
 * (below). A row-major symmetric matrix is its own column-major view, so the row-major upper
 * triangle is handed to LAPACK as the column-major lower one; eigenvectors come back as columns
 * of a column-major k x count array, i.e. rows of a row-major count x k one.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lapacke.h>

/* out = the flat reversal of m (out = J m J), plus `add` on the diagonal, where m is h with rows
 * and columns permuted by perm and its diagonal replaced by diag (either NULL: identity / h's
 * own). Only m's upper triangle is used (it lands in the row-major lower triangle of out, the
 * part LAPACK reads; the other triangle of out is zeroed): without perm that is h's upper
 * triangle, with it each output row gathers from one row of h. Returns OFFQ_ERR_NONFINITE if an
 * entry read is NaN or Inf. */
#define DEFINE_REVERSE_DAMPED(T, NAME)                                                            \
    static offq_status NAME(const double *h, int64_t k, double add, const int64_t *perm,          \
                            const double *diag, T *out)                                           \
    {                                                                                             \
        int bad = 0;                                                                              \
        _Pragma("omp parallel for schedule(static) reduction(| : bad) if (k >= 512)")             \
        for (int64_t i = 0; i < k; i++) {                                                         \
            const int64_t a = k - 1 - i;           /* row a of m, read right to left */           \
            const int64_t ha = perm ? perm[a] : a; /* ... is row ha of h */                       \
            const double *src = h + ha * k;                                                       \
            T *dst = out + i * k;                                                                 \
            for (int64_t j = 0; j < i; j++) { /* dst[j] = m[a][k-1-j], k-1-j > a */              \
                const int64_t b = k - 1 - j;                                                      \
                const double v = src[perm ? perm[b] : b];                                         \
                bad |= !isfinite(v);                                                              \
                dst[j] = (T)v;                                                                    \
            }                                                                                     \
            const double d = diag ? diag[ha] : src[ha];                                           \
            bad |= !isfinite(d);                                                                  \
            dst[i] = (T)(d + add);                                                                \
            for (int64_t j = i + 1; j < k; j++) { /* LAPACK leaves this triangle alone: 0 */      \
                dst[j] = 0;                                                                       \
            }                                                                                     \
        }                                                                                         \
        return bad ? OFFQ_ERR_NONFINITE : OFFQ_OK;                                                \
    }

DEFINE_REVERSE_DAMPED(double, reverse_damped)
DEFINE_REVERSE_DAMPED(float, reverse_damped_f32)

/* u <- J u J (flat reversal in place), keeping only what was the lower triangle (now the upper
 * one) and zeroing the rest; OFFQ_ERR_NOTPD unless every kept entry is finite and the diagonal
 * positive. */
#define DEFINE_REVERSE_LOWER_TO_UPPER(T, NAME)                                                    \
    static offq_status NAME(T *u, int64_t k)                                                      \
    {                                                                                             \
        int bad = 0;                                                                              \
        /* row i of the result is row k-1-i of the input reversed: rows i and k-1-i swap */      \
        _Pragma("omp parallel for schedule(static) reduction(| : bad) if (k >= 512)")             \
        for (int64_t i = 0; i < (k + 1) / 2; i++) {                                               \
            T *a = u + i * k;           /* input row i: lower part a[0..i] */                     \
            T *b = u + (k - 1 - i) * k; /* input row k-1-i: lower part b[0..k-1-i] */             \
            if (a == b) {               /* the middle row of an odd k */                          \
                for (int64_t j = 0; j < k - 1 - j; j++) {                                         \
                    const T t = a[j];                                                             \
                    a[j] = a[k - 1 - j];                                                          \
                    a[k - 1 - j] = t;                                                             \
                }                                                                                 \
            } else {                                                                              \
                for (int64_t j = 0; j < k; j++) {                                                 \
                    const T t = a[j];                                                             \
                    a[j] = b[k - 1 - j];                                                          \
                    b[k - 1 - j] = t;                                                             \
                }                                                                                 \
            }                                                                                     \
            /* now rows i and k-1-i hold the result: upper parts from column i (k-1-i) */        \
            for (int64_t j = 0; j < i; j++) {                                                     \
                a[j] = 0;                                                                         \
            }                                                                                     \
            for (int64_t j = 0; j < k - 1 - i; j++) {                                             \
                b[j] = 0;                                                                         \
            }                                                                                     \
            for (int64_t j = i; j < k; j++) {                                                     \
                bad |= !isfinite(a[j]);                                                           \
            }                                                                                     \
            for (int64_t j = k - 1 - i; j < k; j++) {                                             \
                bad |= !isfinite(b[j]);                                                           \
            }                                                                                     \
            bad |= !(a[i] > 0) || !(b[k - 1 - i] > 0);                                            \
        }                                                                                         \
        return bad ? OFFQ_ERR_NOTPD : OFFQ_OK;                                                    \
    }

DEFINE_REVERSE_LOWER_TO_UPPER(double, reverse_lower_to_upper)
DEFINE_REVERSE_LOWER_TO_UPPER(float, reverse_lower_to_upper_f32)

/* LAPACK's status after potrf or trtri -> offq's (info > 0: not positive definite, or an exactly
 * zero diagonal entry for trtri). */
static offq_status lapack_status(lapack_int info)
{
    if (info > 0) {
        return OFFQ_ERR_NOTPD;
    }
    if (info == LAPACK_WORK_MEMORY_ERROR || info == LAPACK_TRANSPOSE_MEMORY_ERROR) {
        return OFFQ_ERR_NOMEM;
    }
    if (info < 0) { /* an argument LAPACKE rejected: the binding's checks make it unreachable */
        return OFFQ_ERR_UNSUPPORTED;
    }
    return OFFQ_OK;
}

/* u <- L with J (m + add I) J = L L^T, in the row-major lower triangle (reverse_damped, then
 * column-major potrf 'U' in place). */
static offq_status reversed_potrf(const double *h, int64_t k, double add, const int64_t *perm,
                                  const double *diag, double *u)
{
    offq_status rc = reverse_damped(h, k, add, perm, diag, u);
    if (rc != OFFQ_OK) {
        return rc;
    }
    return lapack_status(
        scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)k, u, (lapack_int)k));
}

offq_status offq_upper_cholesky_of_inverse(const double *h, int64_t k, double add,
                                           const int64_t *perm, const double *diag, double *u)
{
    offq_status rc = reversed_potrf(h, k, add, perm, diag, u);
    if (rc == OFFQ_OK) {
        rc = lapack_status(scipy_LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', (lapack_int)k, u,
                                                (lapack_int)k));
    }
    return rc == OFFQ_OK ? reverse_lower_to_upper(u, k) : rc;
}

/* u <- L as reversed_potrf, in float32 (spotrf: twice the rate of dpotrf). */
static offq_status reversed_potrf_f32(const double *h, int64_t k, double add, const int64_t *perm,
                                      const double *diag, float *u)
{
    offq_status rc = reverse_damped_f32(h, k, add, perm, diag, u);
    if (rc != OFFQ_OK) {
        return rc;
    }
    return lapack_status(
        scipy_LAPACKE_spotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)k, u, (lapack_int)k));
}

/* UDU^T: R = J L J is upper with m + add I = R R^T; S = R D^-1/2 (each column over its diagonal
 * entry, so S's diagonal is exactly 1) and d = diag(R)^2 give m + add I = S diag(d) S^T. No
 * triangular inverse: half the flops of offq_upper_cholesky_of_inverse. The float32 variant
 * runs every step in float32 (the diagonal's square in float64). */
#define DEFINE_UDU_FACTOR(T, NAME, POTRF, REVERSE)                                                \
    offq_status NAME(const double *h, int64_t k, double add, const int64_t *perm,                 \
                     const double *diag, T *s, double *d)                                         \
    {                                                                                             \
        offq_status rc = POTRF(h, k, add, perm, diag, s);                                         \
        if (rc == OFFQ_OK) {                                                                      \
            rc = REVERSE(s, k);                                                                   \
        }                                                                                         \
        if (rc != OFFQ_OK) {                                                                      \
            return rc;                                                                            \
        }                                                                                         \
        _Pragma("omp parallel for schedule(dynamic, 16) if (k >= 512)")                           \
        for (int64_t i = 0; i < k; i++) {                                                         \
            T *row = s + i * k;                                                                   \
            for (int64_t j = i + 1; j < k; j++) {                                                 \
                row[j] = row[j] / s[j * k + j];                                                   \
            }                                                                                     \
        }                                                                                         \
        /* the diagonal last: every row above read it */                                          \
        for (int64_t j = 0; j < k; j++) {                                                         \
            const double r = (double)s[j * k + j];                                                \
            d[j] = r * r;                                                                         \
            s[j * k + j] = 1;                                                                     \
        }                                                                                         \
        return OFFQ_OK;                                                                           \
    }

DEFINE_UDU_FACTOR(double, offq_udu_factor, reversed_potrf, reverse_lower_to_upper)
DEFINE_UDU_FACTOR(float, offq_udu_factor_f32, reversed_potrf_f32, reverse_lower_to_upper_f32)

/* ---- Smallest eigenpairs ------------------------------------------------------------------------
 * One tridiagonal reduction A = Q T Q^T (dsytrd) serves every step after it: T's eigenvalues
 * (bisection, dstebz), their vectors (inverse iteration, dstein) and the back-transformation
 * Q z (dormtr) on the wanted pairs only, which is what dsyevr does for a range of indices. Doing
 * the steps here lets OSAQ's tail take all eigenvalues from T (dsterf, O(k^2)) to find how many
 * pairs fit its budget before any vector is formed: one reduction instead of two calls. */

typedef struct {
    int64_t k;
    double *a;   /* the reduction's Householder vectors (column-major lower) */
    double *d;   /* T's diagonal [k] */
    double *e;   /* T's off-diagonal [k - 1] (+1 so that k = 1 allocates) */
    double *tau; /* [k - 1] (+1) */
} tridiagonal;

static void tridiagonal_free(tridiagonal *t)
{
    free(t->a);
    free(t->d);
    free(t->e);
    free(t->tau);
}

offq_status offq_lapack_status(int64_t info)
{
    if (info == LAPACK_WORK_MEMORY_ERROR || info == LAPACK_TRANSPOSE_MEMORY_ERROR) {
        return OFFQ_ERR_NOMEM;
    }
    if (info > 0) { /* an internal failure (no convergence) */
        return OFFQ_ERR_NOCONVERGE;
    }
    if (info < 0) { /* an argument LAPACKE rejected: the bindings' checks prevent it */
        return OFFQ_ERR_UNSUPPORTED;
    }
    return OFFQ_OK;
}

/* t <- the reduction of h's upper triangle (a row-major upper triangle is LAPACK's column-major
 * lower one). OFFQ_ERR_NONFINITE for NaN/Inf there. */
static offq_status tridiagonal_reduce(const double *h, int64_t k, tridiagonal *t)
{
    t->k = k;
    t->a = malloc(sizeof(double) * (size_t)(k * k));
    t->d = malloc(sizeof(double) * (size_t)k);
    t->e = malloc(sizeof(double) * (size_t)k);
    t->tau = malloc(sizeof(double) * (size_t)k);
    if (t->a == NULL || t->d == NULL || t->e == NULL || t->tau == NULL) {
        return OFFQ_ERR_NOMEM;
    }
    int bad = 0;
    for (int64_t i = 0; i < k; i++) {
        for (int64_t j = i; j < k; j++) {
            bad |= !isfinite(h[i * k + j]);
            t->a[i * k + j] = h[i * k + j];
        }
    }
    if (bad) {
        return OFFQ_ERR_NONFINITE;
    }
    return offq_lapack_status(scipy_LAPACKE_dsytrd(LAPACK_COL_MAJOR, 'L', (lapack_int)k, t->a,
                                              (lapack_int)k, t->d, t->e, t->tau));
}

/* The count smallest eigenpairs of the reduced matrix: values[count] ascending, vectors[count, k]
 * row-major (= column-major k x count, what dstein and dormtr write). */
static offq_status tridiagonal_pairs(const tridiagonal *t, int64_t count, double *values,
                                     double *vectors)
{
    const int64_t k = t->k;
    /* zeroed: LAPACKE's dstein checks all k entries of w for NaN, dstebz sets only count */
    double *w = calloc((size_t)k, sizeof(double));
    lapack_int *iblock = malloc(sizeof(lapack_int) * (size_t)k);
    lapack_int *isplit = malloc(sizeof(lapack_int) * (size_t)k);
    lapack_int *ifail = malloc(sizeof(lapack_int) * (size_t)count);
    offq_status rc = OFFQ_ERR_NOMEM;
    if (w == NULL || iblock == NULL || isplit == NULL || ifail == NULL) {
        goto done;
    }
    lapack_int found = 0, nsplit = 0;
    /* abstol 0: LAPACK's default (unit roundoff times |T|), as dsyevr passes it */
    rc = offq_lapack_status(scipy_LAPACKE_dstebz('I', 'B', (lapack_int)k, 0.0, 0.0, 1,
                                            (lapack_int)count, 0.0, t->d, t->e, &found, &nsplit,
                                            w, iblock, isplit));
    if (rc == OFFQ_OK && found != count) {
        rc = OFFQ_ERR_NOCONVERGE;
    }
    if (rc == OFFQ_OK) {
        rc = offq_lapack_status(scipy_LAPACKE_dstein(LAPACK_COL_MAJOR, (lapack_int)k, t->d, t->e,
                                                found, w, iblock, isplit, vectors, (lapack_int)k,
                                                ifail));
    }
    if (rc != OFFQ_OK) {
        goto done;
    }
    /* order 'B' lists the values block by block of a split T: sort them ascending, vectors along */
    for (int64_t i = 0; i < count; i++) {
        int64_t lo = i;
        for (int64_t j = i + 1; j < count; j++) {
            lo = w[j] < w[lo] ? j : lo;
        }
        if (lo != i) {
            const double tw = w[i];
            w[i] = w[lo];
            w[lo] = tw;
            double *x = vectors + i * k, *y = vectors + lo * k;
            for (int64_t r = 0; r < k; r++) {
                const double tx = x[r];
                x[r] = y[r];
                y[r] = tx;
            }
        }
    }
    rc = offq_lapack_status(scipy_LAPACKE_dormtr(LAPACK_COL_MAJOR, 'L', 'L', 'N', (lapack_int)k,
                                            (lapack_int)count, t->a, (lapack_int)k, t->tau,
                                            vectors, (lapack_int)k));
    if (rc == OFFQ_OK) {
        memcpy(values, w, sizeof(double) * (size_t)count);
    }
done:
    free(w);
    free(iblock);
    free(isplit);
    free(ifail);
    return rc;
}

offq_status offq_smallest_eigenpairs(const double *h, int64_t k, int64_t count, double *values,
                                     double *vectors)
{
    tridiagonal t = {0};
    offq_status rc = tridiagonal_reduce(h, k, &t);
    if (rc == OFFQ_OK) {
        rc = tridiagonal_pairs(&t, count, values, vectors);
    }
    tridiagonal_free(&t);
    return rc;
}

offq_status offq_tail_eigenpairs(const double *h, int64_t k, double budget, int64_t *m,
                                 double **values, double **vectors)
{
    *m = 0;
    *values = *vectors = NULL;
    tridiagonal t = {0};
    double *all = NULL, *off = NULL;
    offq_status rc = tridiagonal_reduce(h, k, &t);
    if (rc != OFFQ_OK) {
        goto done;
    }
    all = malloc(sizeof(double) * (size_t)k);
    off = malloc(sizeof(double) * (size_t)k);
    if (all == NULL || off == NULL) {
        rc = OFFQ_ERR_NOMEM;
        goto done;
    }
    memcpy(all, t.d, sizeof(double) * (size_t)k);
    memcpy(off, t.e, sizeof(double) * (size_t)(k - 1));
    rc = offq_lapack_status(scipy_LAPACKE_dsterf((lapack_int)k, all, off)); /* all values, ascending */
    if (rc != OFFQ_OK) {
        goto done;
    }
    const int64_t count = offq_fitting_prefix(all, k, budget);
    if (count > 0) {
        *values = malloc(sizeof(double) * (size_t)count);
        *vectors = malloc(sizeof(double) * (size_t)(count * k));
        if (*values == NULL || *vectors == NULL) {
            rc = OFFQ_ERR_NOMEM;
            goto done;
        }
        rc = tridiagonal_pairs(&t, count, *values, *vectors);
        /* dstebz's values may differ from dsterf's by rounding (about ulp * |T|): keep only the
         * prefix whose own magnitudes fit, so the returned pairs always sum to at most budget */
        *m = rc == OFFQ_OK ? offq_fitting_prefix(*values, count, budget) : 0;
    }
done:
    if (rc != OFFQ_OK) {
        free(*values);
        free(*vectors);
        *values = *vectors = NULL;
        *m = 0;
    }
    free(all);
    free(off);
    tridiagonal_free(&t);
    return rc;
}
