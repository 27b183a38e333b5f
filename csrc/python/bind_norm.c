/* bind_norm.c: Python binding of the decoders' residual add + RMSNorm (norm.c, x86/norm_avx2.c),
 * exposed so that tests can hold each SIMD width against a NumPy reference.
 *
 *   residual_rms_norm(h, y, weight, eps) -> (h + y, rmsnorm(h + y) * weight), float32 [rows, d]
 *       h float32 [rows, d]; y None or like h; weight None or float32 [d]; 0 < eps <= 1 (eps = 0
 *       would divide a zero row by zero).
 *       Neither input is modified; the widest dispatch of this process runs (OFFQ_SIMD_MAX).
 */
#include "bind_util.h"

#include <string.h>

static PyObject *py_residual_rms_norm(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"h", "y", "weight", "eps", NULL};
    PyObject *ho, *yo, *wo, *eo;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO:residual_rms_norm", kwlist, &ho, &yo, &wo,
                                     &eo)) {
        return NULL;
    }
    PyArrayObject *h = offq_check_array(ho, "h", NPY_FLOAT32, 2, 2);
    if (h == NULL) {
        return NULL;
    }
    const int64_t rows = PyArray_DIM(h, 0), d = PyArray_DIM(h, 1);
    if (d < 1) {
        PyErr_SetString(PyExc_ValueError, "h: expected at least one column");
        return NULL;
    }
    PyArrayObject *y = NULL, *w = NULL;
    if (yo != Py_None) {
        y = offq_check_array(yo, "y", NPY_FLOAT32, 2, 2);
        if (y == NULL || offq_expect_shape_2d(y, "y", (npy_intp)rows, (npy_intp)d) < 0) {
            return NULL;
        }
    }
    if (wo != Py_None) {
        w = offq_check_array(wo, "weight", NPY_FLOAT32, 1, 1);
        if (w == NULL) {
            return NULL;
        }
        if (PyArray_DIM(w, 0) != d) {
            PyErr_Format(PyExc_ValueError, "weight: expected shape (%lld,), got (%lld,)",
                         (long long)d, (long long)PyArray_DIM(w, 0));
            return NULL;
        }
    }
    double eps;
    if (offq_py_float(eo, "eps", &eps) < 0) {
        return NULL;
    }
    if (!((float)eps > 0.0f && eps <= 1.0)) { /* eps divides: a zero row (0 in float32 too) */
        offq_value_error_got("eps: expected a finite value in (0, 1]", eps);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)rows, (npy_intp)d};
    PyArrayObject *sum = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    PyArrayObject *out = sum ? (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32) : NULL;
    if (out == NULL) {
        Py_XDECREF(sum);
        return NULL;
    }
    float *hs = (float *)PyArray_DATA(sum), *o = (float *)PyArray_DATA(out);
    const float *yd = y ? (const float *)PyArray_DATA(y) : NULL;
    const float *wd = w ? (const float *)PyArray_DATA(w) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (rows > 0) {
        memcpy(hs, PyArray_DATA(h), (size_t)(rows * d) * sizeof(float));
    }
    offq_residual_rms_norm(hs, yd, wd, rows, d, (float)eps, o);
    Py_END_ALLOW_THREADS;
    return Py_BuildValue("(NN)", (PyObject *)sum, (PyObject *)out);
}

PyMethodDef offq_norm_methods[] = {
    {"residual_rms_norm", (PyCFunction)(void (*)(void))py_residual_rms_norm,
     METH_VARARGS | METH_KEYWORDS,
     "residual_rms_norm(h, y, weight, eps) -> (s, out): s = h + y (y None: h), out = s / "
     "sqrt(mean(s^2) + eps) * weight per row, float32 [rows, d]; the C decoders' residual add "
     "and RMSNorm (the mean of squares in float64)."},
    {NULL, NULL, 0, NULL},
};
