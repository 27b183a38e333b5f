/* bind_linalg.c: Python bindings of the dense factorizations (validate, release the GIL, call). */
#include "bind_util.h"

#include <math.h>

/* upper_cholesky_of_inverse(h, add) -> u float64 [k, k] with (h + add I)^-1 = u^T u, or None when
 * h + add I is not numerically positive definite (the caller may retry with more damping). */
static PyObject *py_upper_cholesky_of_inverse(PyObject *self, PyObject *args)
{
    PyObject *h_obj, *add_obj;
    double add;
    if (!PyArg_ParseTuple(args, "OO:upper_cholesky_of_inverse", &h_obj, &add_obj) ||
        offq_py_float(add_obj, "add", &add) < 0) {
        return NULL;
    }
    if (!isfinite(add) || add < 0.0) {
        PyErr_Format(PyExc_ValueError, "add: expected a finite number >= 0, got %g", add);
        return NULL;
    }
    PyArrayObject *h = offq_check_array(h_obj, "h", NPY_FLOAT64, 2, 2);
    if (h == NULL) {
        return NULL;
    }
    const int64_t k = offq_square_order(h, "h");
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
    rc = offq_upper_cholesky_of_inverse((const double *)PyArray_DATA(h), k, add,
                                        (double *)PyArray_DATA(u));
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

PyMethodDef offq_linalg_methods[] = {
    {"upper_cholesky_of_inverse", py_upper_cholesky_of_inverse, METH_VARARGS,
     "upper_cholesky_of_inverse(h, add) -> u [k, k] float64 upper with (h + add I)^-1 = u.T @ u, "
     "or None when not positive definite (see offq.kernels.upper_cholesky_of_inverse)."},
    {NULL, NULL, 0, NULL},
};
