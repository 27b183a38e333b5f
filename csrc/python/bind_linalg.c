/* bind_linalg.c: Python bindings of the dense factorizations (validate, release the GIL, call). */
#include "bind_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An optional vector argument: *out = NULL for None, else the C-contiguous [k] array of dtype
 * `typenum`; -1 with an exception naming `name` when it is neither. */
static int optional_vector(PyObject *obj, const char *name, int typenum, int64_t k,
                           PyArrayObject **out)
{
    *out = NULL;
    if (obj == Py_None) {
        return 0;
    }
    PyArrayObject *v = offq_check_array(obj, name, typenum, 1, 1);
    if (v == NULL) {
        return -1;
    }
    if (PyArray_DIM(v, 0) != k) {
        PyErr_Format(PyExc_ValueError, "%s: expected length %lld (h's order), got %lld", name,
                     (long long)k, (long long)PyArray_DIM(v, 0));
        return -1;
    }
    *out = v;
    return 0;
}

/* The optional perm argument: None (NULL), or an int64 [k] permutation of 0..k-1; -1 with a
 * ValueError/TypeError naming "perm" otherwise. */
static int check_permutation(PyObject *obj, int64_t k, const int64_t **perm)
{
    PyArrayObject *p;
    *perm = NULL;
    if (optional_vector(obj, "perm", NPY_INT64, k, &p) < 0) {
        return -1;
    }
    if (p == NULL) { /* None */
        return 0;
    }
    const int64_t *v = (const int64_t *)PyArray_DATA(p);
    unsigned char *seen = calloc((size_t)k, 1);
    if (seen == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t i = 0; i < k; i++) {
        if (v[i] < 0 || v[i] >= k || seen[v[i]]) {
            PyErr_Format(PyExc_ValueError,
                         "perm: expected a permutation of 0..%lld, entry %lld is %lld (%s)",
                         (long long)(k - 1), (long long)i, (long long)v[i],
                         v[i] < 0 || v[i] >= k ? "out of range" : "repeated");
            free(seen);
            return -1;
        }
        seen[v[i]] = 1;
    }
    free(seen);
    *perm = v;
    return 0;
}

/* The optional diag argument: None (NULL), or a finite float64 [k]. */
static int check_diagonal(PyObject *obj, int64_t k, const double **diag)
{
    PyArrayObject *d;
    *diag = NULL;
    if (optional_vector(obj, "diag", NPY_FLOAT64, k, &d) < 0) {
        return -1;
    }
    if (d == NULL) { /* None */
        return 0;
    }
    const double *v = (const double *)PyArray_DATA(d);
    for (int64_t i = 0; i < k; i++) {
        if (!isfinite(v[i])) {
            PyErr_Format(PyExc_ValueError, "diag: contains NaN or Inf (entry %lld)", (long long)i);
            return -1;
        }
    }
    *diag = v;
    return 0;
}

/* The h argument every entry point takes: a float64 C-contiguous square array of order 1..46000.
 * Returns its order, or -1 with the exception set (naming "h"). */
static int64_t check_h(PyObject *obj, PyArrayObject **h)
{
    *h = offq_check_array(obj, "h", NPY_FLOAT64, 2, 2);
    return *h == NULL ? -1 : offq_square_order(*h, "h");
}

/* A finite number >= 0 named `name` (add, budget); 0, or -1 with the exception set. */
static int nonnegative_number(PyObject *obj, const char *name, double *out)
{
    if (offq_py_float(obj, name, out) < 0) {
        return -1;
    }
    if (!isfinite(*out) || *out < 0.0) {
        char what[64];
        snprintf(what, sizeof what, "%s: expected a finite number >= 0", name);
        offq_value_error_got(what, *out);
        return -1;
    }
    return 0;
}

/* The arguments both factorizations take, (h, add, perm=None, diag=None), checked once: the
 * order k of h, or -1 with the exception set (naming the argument). */
typedef struct {
    const double *h;
    double add;
    const int64_t *perm;
    const double *diag;
} factor_args;

static int64_t parse_factor_args(PyObject *args, PyObject *kwargs, const char *format,
                                 factor_args *out, int *single)
{
    /* `single` (udu_factor only): a fifth, optional argument */
    static char *kwlist[] = {"h", "add", "perm", "diag", NULL};
    static char *kwlist_single[] = {"h", "add", "perm", "diag", "single", NULL};
    PyObject *h_obj, *add_obj, *perm_obj = Py_None, *diag_obj = Py_None, *single_obj = Py_False;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, single ? kwlist_single : kwlist,
                                     &h_obj, &add_obj, &perm_obj, &diag_obj, &single_obj) ||
        nonnegative_number(add_obj, "add", &out->add) < 0 ||
        (single != NULL && offq_py_flag(single_obj, "single", single) < 0)) {
        return -1;
    }
    PyArrayObject *h;
    const int64_t k = check_h(h_obj, &h);
    if (k < 0 || check_permutation(perm_obj, k, &out->perm) < 0 ||
        check_diagonal(diag_obj, k, &out->diag) < 0) {
        return -1;
    }
    out->h = (const double *)PyArray_DATA(h);
    return k;
}

/* upper_cholesky_of_inverse(h, add, perm=None, diag=None) -> u float64 [k, k] with
 * (P h P^T + add I)^-1 = u^T u (P h P^T's diagonal replaced by diag[perm] when diag is given), or
 * None when that matrix is not numerically positive definite (the caller may retry with more
 * damping). */
static PyObject *py_upper_cholesky_of_inverse(PyObject *self, PyObject *args, PyObject *kwargs)
{
    factor_args a;
    const int64_t k =
        parse_factor_args(args, kwargs, "OO|OO:upper_cholesky_of_inverse", &a, NULL);
    if (k < 0) {
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)k, (npy_intp)k};
    PyArrayObject *u = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (u == NULL) {
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_upper_cholesky_of_inverse(a.h, k, a.add, a.perm, a.diag, (double *)PyArray_DATA(u));
    Py_END_ALLOW_THREADS
    if (rc == OFFQ_ERR_NOTPD) {
        Py_DECREF(u);
        Py_RETURN_NONE;
    }
    if (offq_py_status(rc, (offq_errctx){.arg = "h"}) < 0) {
        Py_DECREF(u);
        return NULL;
    }
    return (PyObject *)u;
}

/* udu_factor(h, add, perm=None, diag=None, single=False) -> (s [k, k] unit upper, d float64 [k])
 * with P h P^T + add I = s diag(d) s^T, or None when not numerically positive definite; s is
 * float64, or float32 with single (the whole factorization in float32). */
static PyObject *py_udu_factor(PyObject *self, PyObject *args, PyObject *kwargs)
{
    factor_args a;
    int single = 0;
    const int64_t k = parse_factor_args(args, kwargs, "OO|OOO:udu_factor", &a, &single);
    if (k < 0) {
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)k, (npy_intp)k};
    PyArrayObject *s =
        (PyArrayObject *)PyArray_SimpleNew(2, dims, single ? NPY_FLOAT32 : NPY_FLOAT64);
    PyArrayObject *d = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT64);
    if (s == NULL || d == NULL) {
        Py_XDECREF(s);
        Py_XDECREF(d);
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = single ? offq_udu_factor_f32(a.h, k, a.add, a.perm, a.diag, (float *)PyArray_DATA(s),
                                      (double *)PyArray_DATA(d))
                : offq_udu_factor(a.h, k, a.add, a.perm, a.diag, (double *)PyArray_DATA(s),
                                  (double *)PyArray_DATA(d));
    Py_END_ALLOW_THREADS
    if (rc != OFFQ_OK) {
        Py_DECREF(s);
        Py_DECREF(d);
        if (rc == OFFQ_ERR_NOTPD) {
            Py_RETURN_NONE;
        }
        offq_py_status(rc, (offq_errctx){.arg = "h"});
        return NULL;
    }
    return Py_BuildValue("(NN)", s, d);
}

/* A positive int argument no larger than `most` -> *out; -1 with an exception naming `name`. */
static int bounded_count(PyObject *obj, const char *name, long long most, long long *out)
{
    if (offq_py_int(obj, name, out) < 0) {
        return -1;
    }
    if (*out < 1 || *out > most) {
        PyErr_Format(PyExc_ValueError, "%s: expected 1 <= %s <= %lld, got %lld", name, name, most,
                     *out);
        return -1;
    }
    return 0;
}

/* smallest_eigenpairs(h, count) -> (values [count] ascending, vectors [count, k]): the count
 * smallest eigenpairs of the symmetric h (upper triangle read). */
static PyObject *py_smallest_eigenpairs(PyObject *self, PyObject *args)
{
    PyObject *h_obj, *count_obj;
    long long count;
    if (!PyArg_ParseTuple(args, "OO:smallest_eigenpairs", &h_obj, &count_obj) ||
        offq_py_int(count_obj, "count", &count) < 0) {
        return NULL;
    }
    PyArrayObject *h;
    const int64_t k = check_h(h_obj, &h);
    if (k < 0 || offq_check_magnitude(h, "h") < 0 ||
        bounded_count(count_obj, "count", (long long)k, &count) < 0) {
        return NULL;
    }
    npy_intp vdims[1] = {(npy_intp)count}, edims[2] = {(npy_intp)count, (npy_intp)k};
    PyArrayObject *values = (PyArrayObject *)PyArray_SimpleNew(1, vdims, NPY_FLOAT64);
    PyArrayObject *vectors = (PyArrayObject *)PyArray_SimpleNew(2, edims, NPY_FLOAT64);
    if (values == NULL || vectors == NULL) {
        Py_XDECREF(values);
        Py_XDECREF(vectors);
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_smallest_eigenpairs((const double *)PyArray_DATA(h), k, (int64_t)count,
                                  (double *)PyArray_DATA(values), (double *)PyArray_DATA(vectors));
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "h"}) < 0) {
        Py_DECREF(values);
        Py_DECREF(vectors);
        return NULL;
    }
    return Py_BuildValue("NN", values, vectors);
}

/* (values [m], vectors [m, k]) as new arrays from malloc'd buffers, which are freed here. */
static PyObject *pairs_result(int64_t m, int64_t k, double *vals, double *vecs)
{
    npy_intp vdims[1] = {(npy_intp)m}, edims[2] = {(npy_intp)m, (npy_intp)k};
    PyArrayObject *values = (PyArrayObject *)PyArray_SimpleNew(1, vdims, NPY_FLOAT64);
    PyArrayObject *vectors = (PyArrayObject *)PyArray_SimpleNew(2, edims, NPY_FLOAT64);
    if (values != NULL && vectors != NULL && m > 0) {
        memcpy(PyArray_DATA(values), vals, sizeof(double) * (size_t)m);
        memcpy(PyArray_DATA(vectors), vecs, sizeof(double) * (size_t)(m * k));
    }
    free(vals);
    free(vecs);
    if (values == NULL || vectors == NULL) {
        Py_XDECREF(values);
        Py_XDECREF(vectors);
        return NULL;
    }
    return Py_BuildValue("NN", values, vectors);
}

/* tail_eigenpairs(h, budget) -> (values [m] ascending, vectors [m, k]): the longest run of the
 * smallest eigenpairs of the symmetric h (upper triangle read) whose |eigenvalues| sum to at most
 * budget (m may be 0). */
static PyObject *py_tail_eigenpairs(PyObject *self, PyObject *args)
{
    PyObject *h_obj, *budget_obj;
    double budget;
    if (!PyArg_ParseTuple(args, "OO:tail_eigenpairs", &h_obj, &budget_obj) ||
        nonnegative_number(budget_obj, "budget", &budget) < 0) {
        return NULL;
    }
    PyArrayObject *h;
    const int64_t k = check_h(h_obj, &h);
    if (k < 0 || offq_check_magnitude(h, "h") < 0) {
        return NULL;
    }
    int64_t m = 0;
    double *vals = NULL, *vecs = NULL;
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_tail_eigenpairs((const double *)PyArray_DATA(h), k, budget, &m, &vals, &vecs);
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "h"}) < 0) {
        return NULL;
    }
    return pairs_result(m, k, vals, vecs);
}

static void free_capsule(PyObject *capsule)
{
    free(PyCapsule_GetPointer(capsule, NULL));
}

/* A float32 [k, k] array that owns the malloc'd `data` (freed with the array; no copy of a
 * 320 MB factor), or NULL with an exception (data freed). */
static PyObject *owning_f32_square(float *data, int64_t k)
{
    npy_intp dims[2] = {(npy_intp)k, (npy_intp)k};
    PyObject *arr = PyArray_SimpleNewFromData(2, dims, NPY_FLOAT32, data);
    PyObject *capsule = arr == NULL ? NULL : PyCapsule_New(data, NULL, free_capsule);
    if (capsule == NULL) {
        Py_XDECREF(arr);
        free(data);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, capsule) < 0) { /* steals capsule */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* tail_subspace(h, budget, block, max_iter, seed, keep_factor) -> (values [m], vectors [m, k],
 * steps), and with keep_factor also (factor [k, k] float32 or None, scale, shift): the tail's span
 * by inverse subspace iteration (see offq.kernels.tail_subspace). */
static PyObject *py_tail_subspace(PyObject *self, PyObject *args)
{
    PyObject *h_obj, *budget_obj, *block_obj, *iter_obj, *seed_obj, *keep_obj;
    int keep_factor;
    double budget;
    long long block, max_iter, seed;
    if (!PyArg_ParseTuple(args, "OOOOOO:tail_subspace", &h_obj, &budget_obj, &block_obj,
                          &iter_obj, &seed_obj, &keep_obj) ||
        offq_py_flag(keep_obj, "keep_factor", &keep_factor) < 0 ||
        nonnegative_number(budget_obj, "budget", &budget) < 0 ||
        bounded_count(iter_obj, "max_iter", 100000, &max_iter) < 0 ||
        offq_py_int(seed_obj, "seed", &seed) < 0) {
        return NULL;
    }
    if (seed < 0) {
        PyErr_Format(PyExc_ValueError, "seed: expected a non-negative integer, got %lld", seed);
        return NULL;
    }
    PyArrayObject *h;
    const int64_t k = check_h(h_obj, &h);
    if (k < 0 || offq_check_magnitude(h, "h") < 0 || offq_py_int(block_obj, "block", &block) < 0) {
        return NULL;
    }
    if (block < 1) { /* a block over k is the core's fallback to the exact tail (documented) */
        PyErr_Format(PyExc_ValueError, "block: expected an integer >= 1, got %lld", block);
        return NULL;
    }
    int64_t m = 0, steps = 0;
    double *vals = NULL, *vecs = NULL, scale = 0.0, shift = 0.0;
    float *factor = NULL;
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_tail_subspace((const double *)PyArray_DATA(h), k, budget, (int64_t)block,
                            (int64_t)max_iter, (uint64_t)seed, &m, &vals, &vecs, &steps,
                            keep_factor ? &factor : NULL, &scale, &shift);
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "h"}) < 0) {
        return NULL;
    }
    PyObject *pairs = pairs_result(m, k, vals, vecs);
    if (pairs == NULL) {
        free(factor);
        return NULL;
    }
    PyObject *out;
    if (!keep_factor) {
        out = Py_BuildValue("OOL", PyTuple_GET_ITEM(pairs, 0), PyTuple_GET_ITEM(pairs, 1),
                            (long long)steps);
    } else {
        PyObject *u = factor != NULL ? owning_f32_square(factor, k) : Py_NewRef(Py_None);
        out = u == NULL ? NULL
                        : Py_BuildValue("OOLNdd", PyTuple_GET_ITEM(pairs, 0),
                                        PyTuple_GET_ITEM(pairs, 1), (long long)steps, u, scale,
                                        shift);
    }
    Py_DECREF(pairs);
    return out;
}

/* factor_energies(u, scale, shift, w) -> float64 [n]: w_i h w_i^T from tail_subspace's factor
 * (see offq.kernels.TailFactor.energies). */
static PyObject *py_factor_energies(PyObject *self, PyObject *args)
{
    PyObject *u_obj, *scale_obj, *shift_obj, *w_obj;
    double scale, shift;
    if (!PyArg_ParseTuple(args, "OOOO:factor_energies", &u_obj, &scale_obj, &shift_obj, &w_obj) ||
        offq_py_float(scale_obj, "scale", &scale) < 0 ||
        nonnegative_number(shift_obj, "shift", &shift) < 0) {
        return NULL;
    }
    if (!(scale > 0) || !isfinite(scale)) {
        offq_value_error_got("scale: expected a finite number > 0", scale);
        return NULL;
    }
    PyArrayObject *u = offq_check_array(u_obj, "u", NPY_FLOAT32, 2, 2);
    const int64_t k = u == NULL ? -1 : offq_square_order(u, "u");
    if (k < 0) {
        return NULL;
    }
    PyArrayObject *w = offq_check_array(w_obj, "w", NPY_FLOAT32, 2, 2);
    if (w == NULL || offq_all_finite(u, "u") < 0 || offq_all_finite(w, "w") < 0) {
        return NULL;
    }
    if (PyArray_DIM(w, 1) != k) {
        PyErr_Format(PyExc_ValueError,
                     "w: expected rows of length %lld (u's order), got [%lld, %lld]", (long long)k,
                     (long long)PyArray_DIM(w, 0), (long long)PyArray_DIM(w, 1));
        return NULL;
    }
    const int64_t n = (int64_t)PyArray_DIM(w, 0);
    npy_intp dims[1] = {(npy_intp)n};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT64);
    if (out == NULL) {
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_factor_energies((const float *)PyArray_DATA(u), k, scale, shift,
                              (const float *)PyArray_DATA(w), n, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "w"}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

PyMethodDef offq_linalg_methods[] = {
    {"smallest_eigenpairs", (PyCFunction)py_smallest_eigenpairs, METH_VARARGS,
     "smallest_eigenpairs(h, count) -> (values [count] ascending, vectors [count, k] float64): "
     "the count smallest eigenpairs of the symmetric h (see offq.kernels.smallest_eigenpairs)."},
    {"tail_eigenpairs", (PyCFunction)py_tail_eigenpairs, METH_VARARGS,
     "tail_eigenpairs(h, budget) -> (values [m] ascending, vectors [m, k] float64): the longest "
     "run of smallest eigenpairs of the symmetric h whose |eigenvalues| sum to at most budget "
     "(see offq.kernels.tail_eigenpairs)."},
    {"tail_subspace", (PyCFunction)py_tail_subspace, METH_VARARGS,
     "tail_subspace(h, budget, block, max_iter, seed, keep_factor) -> (values [m], vectors [m, k] "
     "float64, steps[, factor, scale, shift]): the same budget by inverse subspace iteration "
     "(see offq.kernels.tail_subspace)."},
    {"factor_energies", (PyCFunction)py_factor_energies, METH_VARARGS,
     "factor_energies(u, scale, shift, w) -> float64 [n]: w_i h w_i^T for the rows of w from "
     "tail_subspace's factor (see offq.kernels.TailFactor.energies)."},
    {"upper_cholesky_of_inverse", (PyCFunction)(void (*)(void))py_upper_cholesky_of_inverse,
     METH_VARARGS | METH_KEYWORDS,
     "upper_cholesky_of_inverse(h, add, perm=None, diag=None) -> u [k, k] float64 upper with "
     "(h[perm][:, perm] + add I)^-1 = u.T @ u, or None when not positive definite (see "
     "offq.kernels.upper_cholesky_of_inverse)."},
    {"udu_factor", (PyCFunction)(void (*)(void))py_udu_factor, METH_VARARGS | METH_KEYWORDS,
     "udu_factor(h, add, perm=None, diag=None, single=False) -> (s [k, k] (float32 with single, "
     "else float64), d [k] float64), s unit upper with h[perm][:, perm] + add I = "
     "s @ diag(d) @ s.T, or None when not positive definite (see "
     "offq.kernels.udu_factor)."},
    {NULL, NULL, 0, NULL},
};
