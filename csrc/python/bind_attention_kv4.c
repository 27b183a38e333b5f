/* bind_attention_kv4.c: Python binding of the attention over a packed 4-bit KV cache (offq.h,
 * attention.c, attention_i8.c): the W4A4KV4 decoder step's attention for one KV head, float or
 * 8-bit, exposed so that tests can hold both against NumPy references.
 *
 *   attention_kv4(q, codes, scale, zero, n, mode="float", kernel="auto") -> float32 [nq, hd]
 *       q float32 [nq, hd] (scaled queries), codes uint8 [npos, 2, hd / 2] (K then V), scale and
 *       zero float32 [npos, 2, hd / group] (group even), n int64 [nq] (1 <= n[t] <= npos);
 *       mode: float|int8 (int8: zero-points integers in [0, 15], scales >= 0); kernel:
 *       auto|generic
 */
#include "bind_plan.h"
#include "bind_util.h"

#include <math.h>
#include <string.h>

/* The 8-bit variant's grids (offq_attn_i8_fits, the test the decoder makes): zero-points integers
 * in [0, 15] (it sums them as int32) and scales >= 0 (its weights e_j * scale_j are unsigned
 * bytes); ValueError naming the first that is not. */
static int grids_fit_int8(PyArrayObject *scale, PyArrayObject *zero)
{
    const float *s = (const float *)PyArray_DATA(scale);
    const float *z = (const float *)PyArray_DATA(zero);
    const npy_intp size = PyArray_SIZE(zero);
    if (offq_attn_i8_fits(s, z, size)) {
        return 0;
    }
    npy_intp i = 0;
    while (i < size && offq_attn_i8_fits(s + i, z + i, 1)) {
        i++;
    }
    const float one = 1.0f;
    const int bad_zero = !offq_attn_i8_fits(&one, z + i, 1);
    PyObject *value = PyFloat_FromDouble((double)(bad_zero ? z[i] : s[i]));
    if (value != NULL) {
        PyErr_Format(PyExc_ValueError, "%s, got %R at flat index %zd",
                     bad_zero ? "zero: mode 'int8' needs integer zero-points in [0, 15] (offq's "
                                "4-bit grids)"
                              : "scale: mode 'int8' needs scales >= 0",
                     value, (Py_ssize_t)i);
        Py_DECREF(value);
    }
    return -1;
}

static PyObject *py_attention_kv4(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"q", "codes", "scale", "zero", "n", "mode", "kernel", NULL};
    PyObject *qo, *co, *so, *zo, *no, *mode_o = NULL, *kobj = NULL;
    const char *mode, *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|OO:attention_kv4", kwlist, &qo, &co, &so,
                                     &zo, &no, &mode_o, &kobj) ||
        offq_str_arg(mode_o, "mode", "float", &mode) < 0) {
        return NULL;
    }
    const int int8 = strcmp(mode, "int8") == 0;
    if (!int8 && strcmp(mode, "float") != 0) {
        PyErr_Format(PyExc_ValueError, "mode: expected 'float' or 'int8', got '%s'", mode);
        return NULL;
    }
    offq_kernel kernel;
    if (offq_kernel_name(kobj, &kname) < 0 ||
        offq_parse_kernel(kname, "attention_kv4", OFFQ_VARIANT(OFFQ_KERNEL_GENERIC), &kernel) < 0) {
        return NULL;
    }
    PyArrayObject *q = offq_check_array(qo, "q", NPY_FLOAT32, 2, 2);
    PyArrayObject *codes = q ? offq_check_array(co, "codes", NPY_UINT8, 3, 3) : NULL;
    PyArrayObject *scale = codes ? offq_check_array(so, "scale", NPY_FLOAT32, 3, 3) : NULL;
    PyArrayObject *zero = scale ? offq_check_array(zo, "zero", NPY_FLOAT32, 3, 3) : NULL;
    PyArrayObject *n = zero ? offq_check_array(no, "n", NPY_INT64, 1, 1) : NULL;
    if (n == NULL) {
        return NULL;
    }
    const int64_t nq = PyArray_DIM(q, 0), hd = PyArray_DIM(q, 1), npos = PyArray_DIM(codes, 0);
    if (nq < 1 || hd < 2 || hd % 2 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "q: expected shape (nq >= 1, an even head_dim >= 2), got (%lld, %lld)",
                     (long long)nq, (long long)hd);
        return NULL;
    }
    if (hd > ((int64_t)1 << 20)) { /* the decoders' limit; past ~1.1e6 the int8 sums wrap */
        PyErr_Format(PyExc_ValueError, "q: head_dim %lld exceeds the limit 2^20", (long long)hd);
        return NULL;
    }
    if (npos < 1 || PyArray_DIM(codes, 1) != 2 || PyArray_DIM(codes, 2) != hd / 2) {
        PyErr_Format(PyExc_ValueError, "codes: expected shape (npos >= 1, 2, %lld), got (%lld, "
                     "%lld, %lld)", (long long)(hd / 2), (long long)npos,
                     (long long)PyArray_DIM(codes, 1), (long long)PyArray_DIM(codes, 2));
        return NULL;
    }
    const int64_t ng = PyArray_DIM(scale, 2);
    if (PyArray_DIM(scale, 0) != npos || PyArray_DIM(scale, 1) != 2 || ng < 1 || hd % ng != 0 ||
        (hd / ng) % 2 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "scale: expected shape (%lld, 2, groups) with head_dim / groups an even "
                     "integer, got (%lld, %lld, %lld)", (long long)npos,
                     (long long)PyArray_DIM(scale, 0), (long long)PyArray_DIM(scale, 1),
                     (long long)ng);
        return NULL;
    }
    if (PyArray_DIM(zero, 0) != npos || PyArray_DIM(zero, 1) != 2 || PyArray_DIM(zero, 2) != ng) {
        PyErr_Format(PyExc_ValueError, "zero: expected shape (%lld, 2, %lld), like scale",
                     (long long)npos, (long long)ng);
        return NULL;
    }
    if (PyArray_DIM(n, 0) != nq) {
        PyErr_Format(PyExc_ValueError, "n: expected %lld entries (one per query), got %lld",
                     (long long)nq, (long long)PyArray_DIM(n, 0));
        return NULL;
    }
    const int64_t *nv = (const int64_t *)PyArray_DATA(n);
    for (int64_t t = 0; t < nq; t++) {
        if (nv[t] < 1 || nv[t] > npos) {
            PyErr_Format(PyExc_ValueError, "n: entry %lld is %lld, expected 1 to npos = %lld",
                         (long long)t, (long long)nv[t], (long long)npos);
            return NULL;
        }
    }
    if (offq_all_finite(q, "q") < 0 || offq_all_finite(scale, "scale") < 0 ||
        offq_all_finite(zero, "zero") < 0 || (int8 && grids_fit_int8(scale, zero) < 0)) {
        return NULL;
    }
    PyArrayObject *out = offq_output_f32_2d(Py_None, (npy_intp)nq, (npy_intp)hd, NULL, 0);
    if (out == NULL) {
        return NULL;
    }
    offq_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = offq_attention_kv4((const float *)PyArray_DATA(q), nq, hd, hd / ng,
                            (const uint8_t *)PyArray_DATA(codes), (const float *)PyArray_DATA(scale),
                            (const float *)PyArray_DATA(zero), npos, nv, int8,
                            (float *)PyArray_DATA(out), kernel);
    Py_END_ALLOW_THREADS;
    return offq_py_result(st, out, (offq_errctx){.arg = "codes"});
}

PyMethodDef offq_attention_kv4_methods[] = {
    {"attention_kv4", (PyCFunction)(void (*)(void))py_attention_kv4, METH_VARARGS | METH_KEYWORDS,
     "attention_kv4(q, codes, scale, zero, n, mode='float', kernel='auto') -> float32 [nq, hd]: "
     "softmax(q K^T) V per query t over positions 0..n[t]-1 of a packed 4-bit K/V cache of one "
     "KV head; mode 'int8' runs the 8-bit variant (8-bit queries and weights, int32 sums)."},
    {NULL, NULL, 0, NULL},
};
