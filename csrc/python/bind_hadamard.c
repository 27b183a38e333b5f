/* bind_hadamard.c: Python bindings of the Hadamard kernels (validate, release the GIL, call). */
#include "bind_util.h"

#include <string.h>

/* Set a ValueError for an unsupported transform length n, naming `name`. */
static void unsupported_length(const char *name, int64_t n)
{
    const int64_t b = offq_hadamard_pow2_block(n);
    PyErr_Format(PyExc_ValueError,
                 "%s: no Hadamard construction is available for length %lld (= %lld x %lld); "
                 "supported lengths are 2^k and m * 2^k for the tabulated orders m (see "
                 "offq.kernels.hadamard.SUPPORTED_ORDERS); use block=%lld, the largest power-of-two "
                 "block that divides %lld",
                 name, (long long)n, (long long)(n / b), (long long)b, (long long)b, (long long)n);
}

/* fwht(x, block, normalize, out) -> out. block = None: the whole last axis; out = None: a
 * new array. */
static PyObject *py_fwht(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *block_obj, *norm_obj, *out_obj;
    long long block = 0;
    int normalize;
    int has_block;
    if (!PyArg_ParseTuple(args, "OOOO:fwht", &x_obj, &block_obj, &norm_obj, &out_obj) ||
        offq_py_flag(norm_obj, "normalize", &normalize) < 0) {
        return NULL;
    }
    has_block = block_obj != Py_None;
    if (has_block && offq_py_int(block_obj, "block", &block) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) { /* say that None is allowed too */
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "block: expected an int or None, got %s",
                         Py_TYPE(block_obj)->tp_name);
        }
        return NULL;
    }
    const int typenum = offq_float_typenum(x_obj, "x");
    if (typenum < 0) {
        return NULL;
    }
    PyArrayObject *x = offq_check_array(x_obj, "x", typenum, 1, -1);
    if (x == NULL) {
        return NULL;
    }
    const int nd = PyArray_NDIM(x);
    const int64_t n = (int64_t)PyArray_DIM(x, nd - 1);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "x: the last axis must have length >= 1, got 0");
        return NULL;
    }
    int64_t len = n;
    if (has_block) {
        if (block < 1 || n % block != 0) {
            PyErr_Format(PyExc_ValueError,
                         "block: expected a positive divisor of the last axis length %lld, got %lld",
                         (long long)n, block);
            return NULL;
        }
        len = (int64_t)block;
    }
    if (offq_hadamard_factor(len) == 0) {
        unsupported_length(has_block ? "block" : "x", len);
        return NULL;
    }

    PyArrayObject *out;
    if (out_obj == Py_None) {
        out = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0);
        if (out == NULL) {
            return NULL;
        }
    } else {
        out = offq_check_writeable(out_obj, "out", typenum, nd, nd);
        if (out == NULL) {
            return NULL;
        }
        if (!PyArray_CompareLists(PyArray_DIMS(out), PyArray_DIMS(x), nd)) {
            PyErr_SetString(PyExc_ValueError, "out: expected the shape of x");
            return NULL;
        }
        Py_INCREF(out);
    }
    const size_t nbytes = (size_t)PyArray_NBYTES(x);
    const char *xs = PyArray_BYTES(x);
    char *os = PyArray_BYTES(out);
    if (os != xs && nbytes > 0 && os < xs + nbytes && xs < os + nbytes) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "out: overlaps x partially (pass out=x for in place)");
        return NULL;
    }
    const int64_t rows = (int64_t)(PyArray_SIZE(x) / len);
    offq_status rc = OFFQ_OK;
    Py_BEGIN_ALLOW_THREADS
    if (os != xs) {
        memcpy(os, xs, nbytes);
    }
    if (rows > 0) {
        rc = typenum == NPY_FLOAT32 ? offq_fwht_f32((float *)os, rows, len, normalize)
                                    : offq_fwht_f64((double *)os, rows, len, normalize);
    }
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "x"}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* hadamard_factor(n) -> m (1 for powers of two, 0 when unsupported). */
static PyObject *py_hadamard_factor(PyObject *self, PyObject *arg)
{
    long long n;
    if (offq_py_int(arg, "n", &n) < 0) {
        return NULL;
    }
    return PyLong_FromLongLong((long long)offq_hadamard_factor((int64_t)n));
}

/* hadamard_base(m) -> float64 [m, m], the tabulated +-1 matrix H_m. */
static PyObject *py_hadamard_base(PyObject *self, PyObject *arg)
{
    long long m;
    if (offq_py_int(arg, "m", &m) < 0) {
        return NULL;
    }
    if (m < 2 || m > 4096) {
        PyErr_Format(PyExc_ValueError, "m: expected a tabulated Hadamard order, got %lld", m);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)m, (npy_intp)m};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (out == NULL) {
        return NULL;
    }
    if (offq_hadamard_base((int64_t)m, (double *)PyArray_DATA(out)) != OFFQ_OK) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "m: no Hadamard table of order %lld", m);
        return NULL;
    }
    return (PyObject *)out;
}

/* hadamard_orders() -> tuple of the tabulated orders m. */
static PyObject *py_hadamard_orders(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    const int count = offq_hadamard_num_orders();
    PyObject *t = PyTuple_New(count);
    if (t == NULL) {
        return NULL;
    }
    for (int i = 0; i < count; i++) {
        PyObject *v = PyLong_FromLongLong((long long)offq_hadamard_order(i));
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* hadamard_matrix(n, normalize, dtype) -> [n, n] H with fwht(x) == x @ H: the identity, transformed. */
static PyObject *py_hadamard_matrix(PyObject *self, PyObject *args)
{
    PyObject *n_obj, *norm_obj, *dtype_obj;
    int normalize;
    long long n;
    if (!PyArg_ParseTuple(args, "OOO:hadamard_matrix", &n_obj, &norm_obj, &dtype_obj) ||
        offq_py_int(n_obj, "n", &n) < 0 || offq_py_flag(norm_obj, "normalize", &normalize) < 0) {
        return NULL;
    }
    if (n < 1 || n > 46000) { /* the largest square order the linear algebra takes (bind_util.h) */
        PyErr_Format(PyExc_ValueError, "n: expected a length in [1, 46000], got %lld", n);
        return NULL;
    }
    PyArray_Descr *descr = NULL;
    if (!PyArray_DescrConverter(dtype_obj, &descr)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "dtype: expected float32 or float64, got %R", dtype_obj);
        return NULL;
    }
    const int typenum = descr->type_num;
    const int native = PyArray_ISNBO(descr->byteorder);
    Py_DECREF(descr);
    if ((typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) || !native) {
        PyErr_Format(PyExc_TypeError, "dtype: expected float32 or float64, got %R", dtype_obj);
        return NULL;
    }
    if (offq_hadamard_factor((int64_t)n) == 0) {
        unsupported_length("n", (int64_t)n);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)n, (npy_intp)n};
    PyArrayObject *h = (PyArrayObject *)PyArray_ZEROS(2, dims, typenum, 0);
    if (h == NULL) {
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    if (typenum == NPY_FLOAT32) {
        float *p = (float *)PyArray_DATA(h);
        for (long long i = 0; i < n; i++) {
            p[i * n + i] = 1.0f;
        }
        rc = offq_fwht_f32(p, (int64_t)n, (int64_t)n, normalize);
    } else {
        double *p = (double *)PyArray_DATA(h);
        for (long long i = 0; i < n; i++) {
            p[i * n + i] = 1.0;
        }
        rc = offq_fwht_f64(p, (int64_t)n, (int64_t)n, normalize);
    }
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "n"}) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return (PyObject *)h;
}

PyMethodDef offq_hadamard_methods[] = {
    {"hadamard_matrix", py_hadamard_matrix, METH_VARARGS,
     "hadamard_matrix(n, normalize, dtype) -> [n, n] H with fwht(x) == x @ H."},
    {"fwht", py_fwht, METH_VARARGS,
     "fwht(x, block, normalize, out) -> out: x @ H along the last axis (see offq.kernels.fwht)."},
    {"hadamard_factor", py_hadamard_factor, METH_O,
     "hadamard_factor(n) -> m with n = m * 2^k (1: power of two; 0: unsupported)."},
    {"hadamard_base", py_hadamard_base, METH_O,
     "hadamard_base(m) -> float64 [m, m], the tabulated +-1 Hadamard matrix of order m."},
    {"hadamard_orders", py_hadamard_orders, METH_NOARGS,
     "hadamard_orders() -> tuple of the tabulated orders m."},
    {NULL, NULL, 0, NULL},
};
