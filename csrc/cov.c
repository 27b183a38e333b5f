/* cov.c: second-moment accumulation through OpenBLAS syrk, top-1 token selection, and the
 * leading eigenpairs of a symmetric matrix by Lanczos iteration.
 *
 * Lanczos (full reorthogonalisation): from a unit start vector v_0, w = A v_j - alpha_j v_j -
 * beta_{j-1} v_{j-1}, orthogonalised twice against all previous v (classical Gram-Schmidt through
 * gemv), beta_j = ||w||, v_{j+1} = w / beta_j. V_m^T A V_m = T_m is tridiagonal; its eigenpairs
 * (theta, s) give Ritz pairs (theta, V_m s) with residual |beta_{m-1} s[m-1]|. On breakdown
 * (beta ~ 0: an invariant subspace was found) a fresh random vector orthogonal to V continues the
 * basis with a zero coupling, so repeated eigenvalues are found too. The basis is extended until
 * the k largest Ritz pairs have converged (at most d steps: then T is exact).
 */
#include "kernels.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

/* OpenBLAS (scipy-openblas32) takes 32-bit sizes: longer inputs are processed in chunks. */
#define BLAS_MAX_ROWS ((int64_t)1 << 30)
/* Updates of at most this many float32 rows into a float64 accumulator go through dsyrk on the
 * widened rows (no d x d scratch: its page faults and extra pass cost more than the flops saved). */
#define SMALL_UPDATE_ROWS 256
/* Tile of the upper -> lower mirror. */
#define MIRROR_TILE 64

/* Copy the upper triangle of a[d, d] into the lower one (tiled transpose, rows in parallel). */
#define DEFINE_MIRROR(T, NAME)                                                                    \
    static void NAME(T *a, int64_t d)                                                             \
    {                                                                                             \
        _Pragma("omp parallel for schedule(dynamic, 1) if (d >= 256)")                            \
        for (int64_t ib = 0; ib < d; ib += MIRROR_TILE) {                                          \
            const int64_t ie = ib + MIRROR_TILE < d ? ib + MIRROR_TILE : d;                        \
            for (int64_t jb = 0; jb <= ib; jb += MIRROR_TILE) {                                    \
                const int64_t je = jb + MIRROR_TILE < d ? jb + MIRROR_TILE : d;                    \
                for (int64_t i = ib; i < ie; i++) {                                               \
                    for (int64_t j = jb; j < je && j < i; j++) {                                  \
                        a[i * d + j] = a[j * d + i];                                              \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_MIRROR(float, mirror_f32)
DEFINE_MIRROR(double, mirror_f64)

/* acc += x^T x by BLAS syrk on the upper triangle, in row blocks BLAS can index, then (with
 * `mirror`) copied into the lower one; without it the lower triangle is left as it was. */
#define DEFINE_COV_UPDATE(T, NAME, SYRK, ONE, MIRROR)                                               \
    offq_status NAME(T *acc, const T *x, int64_t n, int64_t d, int mirror)                        \
    {                                                                                              \
        for (int64_t r = 0; r < n; r += BLAS_MAX_ROWS) {                                           \
            const int64_t k = n - r < BLAS_MAX_ROWS ? n - r : BLAS_MAX_ROWS;                       \
            SYRK(CblasRowMajor, CblasUpper, CblasTrans, (blasint)d, (blasint)k, ONE, x + r * d,    \
                 (blasint)d, ONE, acc, (blasint)d);                                                \
        }                                                                                          \
        if (mirror) {                                                                              \
            MIRROR(acc, d);                                                                        \
        }                                                                                          \
        return OFFQ_OK;                                                                            \
    }

DEFINE_COV_UPDATE(float, offq_cov_update_f32, scipy_cblas_ssyrk, 1.0f, mirror_f32)
DEFINE_COV_UPDATE(double, offq_cov_update_f64, scipy_cblas_dsyrk, 1.0, mirror_f64)

void offq_cov_mirror_f32(float *acc, int64_t d)
{
    mirror_f32(acc, d);
}

void offq_cov_mirror_f64(double *acc, int64_t d)
{
    mirror_f64(acc, d);
}

/* One d x d float32 scratch is kept between calls (up to SCRATCH_KEEP_BYTES), because a fresh
 * 64 MB block costs ~16k page faults per call. Lock-free: a call takes it by atomic exchange (a
 * concurrent call allocates its own) and gives it back, freeing whichever block it displaces.
 * The block starts with a 64-byte header holding its capacity. Its data is not cleared: the first
 * syrk into it runs with beta = 0, which writes the upper triangle without reading it, and only
 * that triangle is read back. */
#define SCRATCH_KEEP_BYTES ((int64_t)256 << 20)
#define SCRATCH_HEADER 64
static _Atomic(char *) g_scratch;

static float *scratch_take(int64_t elems)
{
    const int64_t bytes = elems * (int64_t)sizeof(float);
    char *blk = atomic_exchange(&g_scratch, NULL);
    if (blk != NULL && *(int64_t *)blk < bytes) {
        free(blk);
        blk = NULL;
    }
    if (blk == NULL) {
        blk = malloc((size_t)(SCRATCH_HEADER + bytes));
        if (blk == NULL) {
            return NULL;
        }
        *(int64_t *)blk = bytes;
    }
    return (float *)(void *)(blk + SCRATCH_HEADER);
}

static void scratch_give(float *s)
{
    char *blk = (char *)(void *)s - SCRATCH_HEADER;
    if (*(int64_t *)blk > SCRATCH_KEEP_BYTES) {
        free(blk);
        return;
    }
    free(atomic_exchange(&g_scratch, blk));
}

offq_status offq_cov_update_f64_x32(double *acc, const float *x, int64_t n, int64_t d, int mirror)
{
    if (n <= SMALL_UPDATE_ROWS) { /* few rows (e.g. top-1 tokens): widen them, dsyrk into acc */
        double *x64 = malloc((size_t)(n * d) * sizeof(double));
        if (x64 == NULL) {
            return OFFQ_ERR_NOMEM;
        }
        for (int64_t i = 0; i < n * d; i++) {
            x64[i] = (double)x[i];
        }
        offq_cov_update_f64(acc, x64, n, d, mirror);
        free(x64);
        return OFFQ_OK;
    }
    float *s = scratch_take(d * d);
    if (s == NULL) {
        return OFFQ_ERR_NOMEM;
    }
    for (int64_t r = 0; r < n; r += BLAS_MAX_ROWS) {
        const int64_t k = n - r < BLAS_MAX_ROWS ? n - r : BLAS_MAX_ROWS;
        scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, (blasint)d, (blasint)k, 1.0f,
                          x + r * d, (blasint)d, r == 0 ? 0.0f : 1.0f, s, (blasint)d);
    }
    if (!mirror) {
        /* acc += s on the upper triangle only, row by row (contiguous, vectorizable); rows
         * shorten towards the bottom, hence the dynamic schedule */
#pragma omp parallel for schedule(dynamic, 16) if (d >= 256)
        for (int64_t i = 0; i < d; i++) {
            double *a = acc + i * d;
            const float *b = s + i * d;
            for (int64_t j = i; j < d; j++) {
                a[j] += (double)b[j];
            }
        }
        scratch_give(s);
        return OFFQ_OK;
    }
    /* acc += s on the upper triangle and its mirror, one tile pair at a time (a single pass) */
#pragma omp parallel for schedule(dynamic, 1) if (d >= 256)
    for (int64_t ib = 0; ib < d; ib += MIRROR_TILE) {
        const int64_t ie = ib + MIRROR_TILE < d ? ib + MIRROR_TILE : d;
        for (int64_t jb = ib; jb < d; jb += MIRROR_TILE) {
            const int64_t je = jb + MIRROR_TILE < d ? jb + MIRROR_TILE : d;
            for (int64_t i = ib; i < ie; i++) {
                for (int64_t j = (jb > i ? jb : i); j < je; j++) {
                    acc[i * d + j] += (double)s[i * d + j];
                }
            }
            for (int64_t j = jb; j < je; j++) {
                for (int64_t i = ib; i < ie && i < j; i++) {
                    acc[j * d + i] = acc[i * d + j];
                }
            }
        }
    }
    scratch_give(s);
    return OFFQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Top-1 token per sequence.
 * ------------------------------------------------------------------------------------------- */
#define DEFINE_TOP1(T, NAME)                                                                      \
    void NAME(const T *x, int64_t batch, int64_t tokens, int64_t d, T *sel)                       \
    {                                                                                             \
        _Pragma("omp parallel for schedule(static) if (batch * tokens * d >= (1 << 16))")          \
        for (int64_t b = 0; b < batch; b++) {                                                     \
            const T *seq = x + b * tokens * d;                                                    \
            int64_t best = 0;                                                                     \
            double best_norm = -1.0;                                                              \
            for (int64_t t = 0; t < tokens; t++) {                                                \
                const T *row = seq + t * d;                                                       \
                double norm = 0.0;                                                                \
                for (int64_t j = 0; j < d; j++) {                                                 \
                    const double v = fabs((double)row[j]);                                        \
                    if (!(v <= norm)) { /* also true for NaN: it wins */                          \
                        norm = isnan(v) ? INFINITY : v;                                           \
                    }                                                                             \
                }                                                                                 \
                if (norm > best_norm) {                                                           \
                    best_norm = norm;                                                             \
                    best = t;                                                                     \
                }                                                                                 \
            }                                                                                     \
            memcpy(sel + b * d, seq + best * d, (size_t)d * sizeof(T));                           \
        }                                                                                         \
    }

DEFINE_TOP1(float, offq_top1_rows_f32)
DEFINE_TOP1(double, offq_top1_rows_f64)

/* ---------------------------------------------------------------------------------------------
 * Eigenpairs.
 * ------------------------------------------------------------------------------------------- */

/* Eigen-decomposition of the symmetric tridiagonal matrix with diagonal dg[0..n-1] and
 * off-diagonal e[0..n-2] (e[i] couples i and i+1; e has room for n entries), by implicit QL
 * sweeps with Wilkinson shifts. On return dg holds the eigenvalues (unsorted) and column c of
 * z[n, n] (initialised here) the eigenvector of dg[c]. Returns 0, or -1 without convergence. */
static int tridiag_eigen(double *dg, double *e, int64_t n, double *z)
{
    memset(z, 0, (size_t)(n * n) * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        z[i * n + i] = 1.0;
    }
    if (n > 0) {
        e[n - 1] = 0.0;
    }
    for (int64_t l = 0; l < n; l++) {
        int iter = 0;
        for (;;) {
            int64_t m = l; /* first negligible coupling at or after l */
            while (m < n - 1 && fabs(e[m]) > DBL_EPSILON * (fabs(dg[m]) + fabs(dg[m + 1]))) {
                m++;
            }
            if (m == l) {
                break;
            }
            if (++iter > 100) {
                return -1;
            }
            /* Wilkinson shift from the leading 2 x 2 block, chased up from m to l */
            double g = (dg[l + 1] - dg[l]) / (2.0 * e[l]);
            double r = hypot(g, 1.0);
            g = dg[m] - dg[l] + e[l] / (g + copysign(r, g));
            double s = 1.0, c = 1.0, p = 0.0;
            int64_t i;
            int deflated = 0;
            for (i = m - 1; i >= l; i--) {
                const double f = s * e[i];
                const double b = c * e[i];
                r = hypot(f, g);
                e[i + 1] = r;
                if (r == 0.0) { /* underflow: split the problem here and restart */
                    dg[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = 1;
                    break;
                }
                s = f / r;
                c = g / r;
                g = dg[i + 1] - p;
                r = (dg[i] - g) * s + 2.0 * c * b;
                p = s * r;
                dg[i + 1] = g + p;
                g = c * r - b;
                for (int64_t row = 0; row < n; row++) { /* accumulate the plane rotation */
                    double *zr = z + row * n;
                    const double t = zr[i + 1];
                    zr[i + 1] = s * zr[i] + c * t;
                    zr[i] = c * zr[i] - s * t;
                }
            }
            if (deflated) {
                continue;
            }
            dg[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    return 0;
}

/* w <- w - V[0:j]^T (V[0:j] w), twice (classical Gram-Schmidt with reorthogonalisation).
 * V holds j orthonormal rows of length d; c is scratch of length j. */
static void orthogonalize(const double *V, int64_t j, int64_t d, double *w, double *c)
{
    if (j == 0) {
        return;
    }
    for (int pass = 0; pass < 2; pass++) {
        scipy_cblas_dgemv(CblasRowMajor, CblasNoTrans, (blasint)j, (blasint)d, 1.0, V, (blasint)d,
                          w, 1, 0.0, c, 1);
        scipy_cblas_dgemv(CblasRowMajor, CblasTrans, (blasint)j, (blasint)d, -1.0, V, (blasint)d,
                          c, 1, 1.0, w, 1);
    }
}

/* A unit vector orthogonal to V[0:j] (random start; retried if it falls into span V). */
static int fresh_vector(const double *V, int64_t j, int64_t d, uint64_t *state, double *w, double *c)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        for (int64_t i = 0; i < d; i++) {
            w[i] = offq_uniform_pm1(state);
        }
        orthogonalize(V, j, d, w, c);
        const double nrm = scipy_cblas_dnrm2((blasint)d, w, 1);
        if (nrm > 1e-8 * sqrt((double)d)) {
            scipy_cblas_dscal((blasint)d, 1.0 / nrm, w, 1);
            return 0;
        }
    }
    return -1;
}

offq_status offq_top_eigenpairs(const double *a, int64_t d, int64_t k, double tol,
                                uint64_t seed, double *values, double *vectors)
{
    if (k <= 0 || d <= 0) {
        return OFFQ_OK;
    }
    for (int64_t i = 0; i < d; i++) { /* only the upper triangle is read */
        for (int64_t j = i; j < d; j++) {
            if (!isfinite(a[i * d + j])) {
                return OFFQ_ERR_NONFINITE;
            }
        }
    }
    const int64_t mmax = d;
    double *V = malloc((size_t)(mmax * d) * sizeof(double));    /* Lanczos basis, rows */
    double *alpha = malloc((size_t)mmax * sizeof(double));
    double *beta = malloc((size_t)mmax * sizeof(double));       /* beta[j] couples j and j+1 */
    double *w = malloc((size_t)d * sizeof(double));
    double *c = malloc((size_t)mmax * sizeof(double));
    double *dg = malloc((size_t)mmax * sizeof(double));
    double *e = malloc((size_t)mmax * sizeof(double));
    double *z = NULL;
    int64_t *order = malloc((size_t)mmax * sizeof(int64_t));
    offq_status rc = OFFQ_ERR_NOMEM;
    if (!V || !alpha || !beta || !w || !c || !dg || !e || !order) {
        goto done;
    }
    rc = OFFQ_ERR_NOCONVERGE; /* until the Ritz pairs converge */
    uint64_t state = seed;
    if (fresh_vector(NULL, 0, d, &state, w, c) != 0) {
        goto done;
    }
    memcpy(V, w, (size_t)d * sizeof(double));
    int64_t next_check = k + 16 < mmax ? k + 16 : mmax;
    double anorm = 0.0; /* running estimate of ||A|| (largest |Ritz value| or |alpha|+|beta|) */
    for (int64_t j = 0; j < mmax; j++) {
        const double *vj = V + j * d;
        scipy_cblas_dsymv(CblasRowMajor, CblasUpper, (blasint)d, 1.0, a, (blasint)d, vj, 1, 0.0, w, 1);
        alpha[j] = scipy_cblas_ddot((blasint)d, w, 1, vj, 1);
        orthogonalize(V, j + 1, d, w, c);
        beta[j] = scipy_cblas_dnrm2((blasint)d, w, 1);
        const double local = fabs(alpha[j]) + beta[j] + (j > 0 ? beta[j - 1] : 0.0);
        anorm = local > anorm ? local : anorm;
        const int64_t m = j + 1; /* steps done: T_m is m x m */
        if (m < mmax) {
            if (beta[j] <= 1e-12 * (anorm > 0 ? anorm : 1.0)) {
                beta[j] = 0.0; /* invariant subspace: continue from a fresh orthogonal vector */
                if (fresh_vector(V, m, d, &state, w, c) != 0) {
                    goto done;
                }
                memcpy(V + m * d, w, (size_t)d * sizeof(double));
            } else {
                memcpy(V + m * d, w, (size_t)d * sizeof(double));
                scipy_cblas_dscal((blasint)d, 1.0 / beta[j], V + m * d, 1);
            }
        }
        if (m < next_check && m < mmax) {
            continue;
        }
        /* Ritz pairs of T_m */
        free(z);
        z = malloc((size_t)(m * m) * sizeof(double));
        if (z == NULL) {
            rc = OFFQ_ERR_NOMEM;
            goto done;
        }
        memcpy(dg, alpha, (size_t)m * sizeof(double));
        memcpy(e, beta, (size_t)m * sizeof(double));
        if (tridiag_eigen(dg, e, m, z) != 0) {
            rc = OFFQ_ERR_NOCONVERGE;
            goto done;
        }
        for (int64_t i = 0; i < m; i++) {
            order[i] = i;
        }
        for (int64_t i = 1; i < m; i++) { /* insertion sort, descending */
            const int64_t oi = order[i];
            int64_t q = i;
            while (q > 0 && dg[order[q - 1]] < dg[oi]) {
                order[q] = order[q - 1];
                q--;
            }
            order[q] = oi;
        }
        const int64_t kk = k < m ? k : m;
        double scale = 0.0;
        for (int64_t i = 0; i < m; i++) {
            scale = fabs(dg[i]) > scale ? fabs(dg[i]) : scale;
        }
        scale = scale > 0 ? scale : 1.0;
        const double bm = (m < mmax) ? beta[j] : 0.0;
        int converged = (kk == k);
        for (int64_t i = 0; i < kk && converged; i++) {
            const double res = fabs(bm * z[(m - 1) * m + order[i]]);
            converged = res <= tol * scale;
        }
        if (converged || m == mmax) {
            for (int64_t i = 0; i < k; i++) {
                const int64_t col = order[i];
                values[i] = dg[col];
                /* y = V_m^T s */
                for (int64_t q = 0; q < m; q++) {
                    c[q] = z[q * m + col];
                }
                scipy_cblas_dgemv(CblasRowMajor, CblasTrans, (blasint)m, (blasint)d, 1.0, V,
                                  (blasint)d, c, 1, 0.0, w, 1);
                const double nrm = scipy_cblas_dnrm2((blasint)d, w, 1);
                int64_t imax = 0;
                for (int64_t q = 1; q < d; q++) {
                    imax = fabs(w[q]) > fabs(w[imax]) ? q : imax;
                }
                const double sgn = (w[imax] < 0 ? -1.0 : 1.0) / (nrm > 0 ? nrm : 1.0);
                for (int64_t q = 0; q < d; q++) {
                    vectors[q * k + i] = sgn * w[q];
                }
            }
            rc = OFFQ_OK;
            goto done;
        }
        next_check = m + (m / 4 > 8 ? m / 4 : 8);
        next_check = next_check < mmax ? next_check : mmax;
    }
done:
    free(V);
    free(alpha);
    free(beta);
    free(w);
    free(c);
    free(dg);
    free(e);
    free(z);
    free(order);
    return rc;
}
