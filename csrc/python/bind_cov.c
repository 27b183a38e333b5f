/* bind_cov.c: Python bindings of the covariance kernels (validate, release the GIL, call). */
#include "bind_util.h"

#include <stdlib.h>
#include <string.h>

/* `acc` as both functions take it: a writeable, C-contiguous, square [d, d] float32 or float64
 * array with d >= 1 (its dtype in *type); NULL with the exception set (naming "acc"). */
static PyArrayObject *check_accumulator(PyObject *obj, int *type)
{
    *type = offq_float_typenum(obj, "acc");
    if (*type < 0) {
        return NULL;
    }
    PyArrayObject *acc = offq_check_writeable(obj, "acc", *type, 2, 2);
    if (acc == NULL) {
        return NULL;
    }
    if (PyArray_DIM(acc, 1) != PyArray_DIM(acc, 0) || PyArray_DIM(acc, 0) < 1) {
        PyErr_Format(PyExc_ValueError, "acc: expected a square [d, d] array with d >= 1, got [%lld, %lld]",
                     (long long)PyArray_DIM(acc, 0), (long long)PyArray_DIM(acc, 1));
        return NULL;
    }
    return acc;
}

/* cov_update(acc, x, top1, mirror) -> acc, in place: acc += x^T x (rows of x; with top1, one row
 * per sequence of x[batch, tokens, d]: the token of largest L-infinity norm); without mirror only
 * the upper triangle of acc changes. */
static PyObject *py_cov_update(PyObject *self, PyObject *args)
{
    PyObject *acc_obj, *x_obj, *top1_obj, *mirror_obj;
    int top1, mirror;
    if (!PyArg_ParseTuple(args, "OOOO:cov_update", &acc_obj, &x_obj, &top1_obj, &mirror_obj) ||
        offq_py_flag(top1_obj, "top1", &top1) < 0 || offq_py_flag(mirror_obj, "mirror", &mirror) < 0) {
        return NULL;
    }
    int acc_type;
    PyArrayObject *acc = check_accumulator(acc_obj, &acc_type);
    if (acc == NULL) {
        return NULL;
    }
    const int64_t d = (int64_t)PyArray_DIM(acc, 0);
    if (d > 2000000000LL) {
        PyErr_SetString(PyExc_ValueError, "acc: d too large for OpenBLAS (32-bit sizes)");
        return NULL;
    }
    const int x_type = offq_float_typenum(x_obj, "x");
    if (x_type < 0) {
        return NULL;
    }
    if (x_type == NPY_FLOAT64 && acc_type == NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "x: expected dtype float32 (acc is float32), got %S",
                     (PyObject *)PyArray_DESCR((PyArrayObject *)x_obj));
        return NULL;
    }
    PyArrayObject *x = offq_check_array(x_obj, "x", x_type, top1 ? 3 : 1, top1 ? 3 : -1);
    if (x == NULL) {
        if (top1 && PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "x: top1=True expects [batch, tokens, d], got %d dimensions",
                         PyArray_NDIM((PyArrayObject *)x_obj));
        }
        return NULL;
    }
    const int nd = PyArray_NDIM(x);
    if ((int64_t)PyArray_DIM(x, nd - 1) != d) {
        PyErr_Format(PyExc_ValueError, "x: expected a last axis of length d=%lld (acc is [d, d]), got %lld",
                     (long long)d, (long long)PyArray_DIM(x, nd - 1));
        return NULL;
    }
    if (PyArray_BYTES(x) < PyArray_BYTES(acc) + PyArray_NBYTES(acc) &&
        PyArray_BYTES(acc) < PyArray_BYTES(x) + PyArray_NBYTES(x)) {
        PyErr_SetString(PyExc_ValueError, "x: must not share memory with acc");
        return NULL;
    }
    int64_t rows = (int64_t)(PyArray_SIZE(x) / d);
    int64_t batch = 0, tokens = 0;
    if (top1) {
        batch = (int64_t)PyArray_DIM(x, 0);
        tokens = (int64_t)PyArray_DIM(x, 1);
        if (batch > 0 && tokens < 1) {
            PyErr_SetString(PyExc_ValueError, "x: top1=True needs at least one token per sequence");
            return NULL;
        }
        rows = batch;
    }
    if (rows == 0) {
        Py_INCREF(acc);
        return (PyObject *)acc;
    }
    const size_t esize = x_type == NPY_FLOAT32 ? sizeof(float) : sizeof(double);
    void *sel = NULL;
    const void *src = PyArray_DATA(x);
    if (top1) {
        sel = malloc((size_t)(batch * d) * esize);
        if (sel == NULL) {
            return PyErr_NoMemory();
        }
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    if (top1) {
        if (x_type == NPY_FLOAT32) {
            offq_top1_rows_f32((const float *)src, batch, tokens, d, (float *)sel);
        } else {
            offq_top1_rows_f64((const double *)src, batch, tokens, d, (double *)sel);
        }
        src = sel;
    }
    if (acc_type == NPY_FLOAT32) {
        rc = offq_cov_update_f32((float *)PyArray_DATA(acc), (const float *)src, rows, d, mirror);
    } else if (x_type == NPY_FLOAT64) {
        rc = offq_cov_update_f64((double *)PyArray_DATA(acc), (const double *)src, rows, d, mirror);
    } else {
        rc = offq_cov_update_f64_x32((double *)PyArray_DATA(acc), (const float *)src, rows, d,
                                     mirror);
    }
    Py_END_ALLOW_THREADS
    free(sel);
    if (offq_py_status(rc, (offq_errctx){.arg = "acc"}) < 0) {
        return NULL;
    }
    Py_INCREF(acc);
    return (PyObject *)acc;
}

/* cov_mirror(acc) -> acc, in place: the upper triangle copied into the lower one. */
static PyObject *py_cov_mirror(PyObject *self, PyObject *args)
{
    PyObject *acc_obj;
    if (!PyArg_ParseTuple(args, "O:cov_mirror", &acc_obj)) {
        return NULL;
    }
    int acc_type;
    PyArrayObject *acc = check_accumulator(acc_obj, &acc_type);
    if (acc == NULL) {
        return NULL;
    }
    const int64_t d = (int64_t)PyArray_DIM(acc, 0);
    Py_BEGIN_ALLOW_THREADS
    if (acc_type == NPY_FLOAT32) {
        offq_cov_mirror_f32((float *)PyArray_DATA(acc), d);
    } else {
        offq_cov_mirror_f64((double *)PyArray_DATA(acc), d);
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(acc);
    return (PyObject *)acc;
}

/* top_eigenpairs(cov, k, tol, seed) -> (values float64 [k], vectors float64 [d, k]). */
static PyObject *py_top_eigenpairs(PyObject *self, PyObject *args)
{
    PyObject *cov_obj, *k_obj, *tol_obj, *seed_obj;
    long long k;
    double tol;
    if (!PyArg_ParseTuple(args, "OOOO:top_eigenpairs", &cov_obj, &k_obj, &tol_obj, &seed_obj) ||
        offq_py_int(k_obj, "k", &k) < 0 || offq_py_float(tol_obj, "tol", &tol) < 0) {
        return NULL;
    }
    /* seed: any non-negative int, used modulo 2^64 */
    PyObject *seed_int = PyBool_Check(seed_obj) || !PyIndex_Check(seed_obj)
                             ? NULL
                             : PyNumber_Index(seed_obj);
    int overflow = 0;
    const long long seed_ll = seed_int ? PyLong_AsLongLongAndOverflow(seed_int, &overflow) : -1;
    if (seed_int == NULL || overflow < 0 || (overflow == 0 && seed_ll < 0)) {
        Py_XDECREF(seed_int);
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_TypeError)) {
            return NULL; /* e.g. MemoryError: not the argument's fault */
        }
        PyErr_Clear(); /* __index__'s own TypeError for an array: name the argument instead */
        PyErr_Format(PyExc_TypeError, "seed: expected a non-negative int, got %R", seed_obj);
        return NULL;
    }
    const unsigned long long seed = PyLong_AsUnsignedLongLongMask(seed_int);
    Py_DECREF(seed_int);
    const int typenum = offq_float_typenum(cov_obj, "cov");
    if (typenum < 0) {
        return NULL;
    }
    PyArrayObject *cov = offq_check_array(cov_obj, "cov", typenum, 2, 2);
    if (cov == NULL) {
        return NULL;
    }
    const int64_t d = offq_square_order(cov, "cov");
    if (d < 0 || offq_check_magnitude(cov, "cov") < 0) {
        return NULL;
    }
    if (k < 1 || k > d) {
        PyErr_Format(PyExc_ValueError, "k: expected 1 <= k <= d=%lld, got %lld", (long long)d, k);
        return NULL;
    }
    if (!(tol > 0.0) || !(tol < 1.0)) {
        offq_value_error_got("tol: expected 0 < tol < 1", tol);
        return NULL;
    }
    npy_intp vdims[1] = {(npy_intp)k};
    npy_intp wdims[2] = {(npy_intp)d, (npy_intp)k};
    PyArrayObject *values = (PyArrayObject *)PyArray_SimpleNew(1, vdims, NPY_FLOAT64);
    PyArrayObject *vectors = (PyArrayObject *)PyArray_SimpleNew(2, wdims, NPY_FLOAT64);
    double *a = malloc((size_t)(d * d) * sizeof(double));
    if (values == NULL || vectors == NULL || a == NULL) {
        Py_XDECREF(values);
        Py_XDECREF(vectors);
        free(a);
        return PyErr_NoMemory();
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    const int64_t total = d * d;
    if (typenum == NPY_FLOAT32) {
        const float *src = (const float *)PyArray_DATA(cov);
        for (int64_t i = 0; i < total; i++) {
            a[i] = (double)src[i];
        }
    } else {
        memcpy(a, PyArray_DATA(cov), (size_t)total * sizeof(double));
    }
    rc = offq_top_eigenpairs(a, d, (int64_t)k, tol, (uint64_t)seed,
                             (double *)PyArray_DATA(values), (double *)PyArray_DATA(vectors));
    Py_END_ALLOW_THREADS
    free(a);
    if (offq_py_status(rc, (offq_errctx){.arg = "cov"}) < 0) {
        Py_DECREF(values);
        Py_DECREF(vectors);
        return NULL;
    }
    return Py_BuildValue("(NN)", (PyObject *)values, (PyObject *)vectors);
}

PyMethodDef offq_cov_methods[] = {
    {"cov_update", py_cov_update, METH_VARARGS,
     "cov_update(acc, x, top1, mirror) -> acc: acc += x^T x in place (see offq.kernels.cov_update)."},
    {"cov_mirror", py_cov_mirror, METH_VARARGS,
     "cov_mirror(acc) -> acc: the upper triangle copied into the lower one (see offq.kernels.cov_mirror)."},
    {"top_eigenpairs", py_top_eigenpairs, METH_VARARGS,
     "top_eigenpairs(cov, k, tol, seed) -> (values [k] desc, vectors [d, k]), float64."},
    {NULL, NULL, 0, NULL},
};
