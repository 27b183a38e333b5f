/* bind_matmul_i8.c: Python binding of the int8-weight matmul (offq.h, matmul_i8.c).
 *
 *   matmul_i8(x, w, scale, group, out=None, kernel="auto") -> float32 [M, N]
 *       x float32 [M, K], w int8 [N, K], scale float32 [N, K / group]; kernel: auto|generic
 */
#include "bind_util.h"

#include <string.h>

static PyObject *py_matmul_i8(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "w", "scale", "group", "out", "kernel", NULL};
    PyObject *xo, *wo, *so, *go, *oo = Py_None;
    PyObject *kobj = NULL;
    const char *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|OO:matmul_i8", kwlist, &xo, &wo, &so, &go,
                                     &oo, &kobj)) {
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    int generic;
    if (strcmp(kname, "auto") == 0) {
        generic = 0;
    } else if (strcmp(kname, "generic") == 0) {
        generic = 1;
    } else {
        PyErr_Format(PyExc_ValueError, "kernel: expected 'auto' or 'generic', got '%s'", kname);
        return NULL;
    }
    PyArrayObject *x = offq_check_array(xo, "x", NPY_FLOAT32, 2, 2);
    PyArrayObject *w = x ? offq_check_array(wo, "w", NPY_INT8, 2, 2) : NULL;
    PyArrayObject *sc = w ? offq_check_array(so, "scale", NPY_FLOAT32, 2, 2) : NULL;
    long long group;
    if (sc == NULL || offq_py_int(go, "group", &group) < 0) {
        return NULL;
    }
    const int64_t m = PyArray_DIM(x, 0), k = PyArray_DIM(x, 1), n = PyArray_DIM(w, 0);
    if (PyArray_DIM(w, 1) != k) {
        PyErr_Format(PyExc_ValueError, "w: expected %lld columns (x's K), got %lld", (long long)k,
                     (long long)PyArray_DIM(w, 1));
        return NULL;
    }
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) { /* the sgemm path takes int sizes */
        PyErr_Format(PyExc_ValueError, "%s: dimensions above 2^31 - 1 are not supported",
                     n > INT32_MAX ? "w" : "x");
        return NULL;
    }
    if (k == 0 || group <= 0 || k % group != 0) {
        PyErr_Format(PyExc_ValueError, "group: expected a positive group size dividing K=%lld, got %lld",
                     (long long)k, group);
        return NULL;
    }
    if (PyArray_DIM(sc, 0) != n || PyArray_DIM(sc, 1) != k / group) {
        PyErr_Format(PyExc_ValueError, "scale: expected shape (%lld, %lld), got (%lld, %lld)",
                     (long long)n, (long long)(k / group), (long long)PyArray_DIM(sc, 0),
                     (long long)PyArray_DIM(sc, 1));
        return NULL;
    }
    if (offq_all_finite(sc, "scale") < 0) { /* as every other product's scales */
        return NULL;
    }
    const offq_named_array inputs[] = {{x, "x"}, {w, "w"}, {sc, "scale"}};
    PyArrayObject *out = offq_output_f32_2d(oo, m, n, inputs, 3);
    if (out == NULL) {
        return NULL;
    }
    offq_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = offq_matmul_i8((const float *)PyArray_DATA(x), m, k, (const int8_t *)PyArray_DATA(w),
                        (const float *)PyArray_DATA(sc), n, (int64_t)group,
                        (float *)PyArray_DATA(out), generic);
    Py_END_ALLOW_THREADS;
    if (offq_py_status(st, (offq_errctx){.arg = "x"}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

PyMethodDef offq_matmul_i8_methods[] = {
    {"matmul_i8", (PyCFunction)(void (*)(void))py_matmul_i8, METH_VARARGS | METH_KEYWORDS,
     "matmul_i8(x, w, scale, group, out=None, kernel='auto') -> float32 [M, N] = x @ "
     "(scale * w).T with int8 w [N, K] and one scale per group of inputs."},
    {NULL, NULL, 0, NULL},
};
