/* bind_attention_f32.c: Python binding of the attention over a float32 KV cache (offq.h,
 * attention_f32.c): the weight-only decoder step's attention, exposed so that tests can hold it
 * against a NumPy reference on inputs a model would rarely produce.
 *
 *   attention_f32(q, kv, kernel="auto") -> float32 [nq, hd]
 *       q float32 [nq, hd] (scaled queries; nq a multiple of Hkv), kv float32 [n, 2, Hkv, hd]
 *       (K then V per position, n >= 1), both finite; kernel: auto|generic|avx2
 */
#include "bind_plan.h"
#include "bind_util.h"

#include <string.h>

static PyObject *py_attention_f32(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"q", "kv", "kernel", NULL};
    PyObject *qo, *kvo;
    PyObject *kobj = NULL;
    const char *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:attention_f32", kwlist, &qo, &kvo,
                                     &kobj)) {
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    offq_kernel kernel;
    if (offq_parse_kernel(kname, "attention_f32",
                          OFFQ_VARIANT(OFFQ_KERNEL_GENERIC) | OFFQ_VARIANT(OFFQ_KERNEL_AVX2),
                          &kernel) < 0) {
        return NULL;
    }
    if (kernel == OFFQ_KERNEL_AVX2 && !offq_cpu_has_avx2()) {
        PyErr_SetString(PyExc_ValueError, "kernel: 'avx2' is not usable on this CPU");
        return NULL;
    }
    PyArrayObject *q = offq_check_array(qo, "q", NPY_FLOAT32, 2, 2);
    PyArrayObject *kv = q ? offq_check_array(kvo, "kv", NPY_FLOAT32, 4, 4) : NULL;
    if (kv == NULL) {
        return NULL;
    }
    const int64_t nq = PyArray_DIM(q, 0), hd = PyArray_DIM(q, 1), n = PyArray_DIM(kv, 0);
    const int64_t hkv = PyArray_DIM(kv, 2);
    if (PyArray_DIM(kv, 1) != 2 || PyArray_DIM(kv, 3) != hd || hkv < 1) {
        PyErr_Format(PyExc_ValueError,
                     "kv: expected shape (n, 2, kv_heads, %lld) with kv_heads >= 1, got (%lld, "
                     "%lld, %lld, %lld)",
                     (long long)hd, (long long)n, (long long)PyArray_DIM(kv, 1), (long long)hkv,
                     (long long)PyArray_DIM(kv, 3));
        return NULL;
    }
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "kv: expected at least one position");
        return NULL;
    }
    if (hd < 1 || nq < 1 || nq % hkv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "q: expected shape (a positive multiple of kv_heads = %lld, head_dim >= 1), "
                     "got (%lld, %lld)",
                     (long long)hkv, (long long)nq, (long long)hd);
        return NULL;
    }
    if (offq_all_finite(q, "q") < 0 || offq_all_finite(kv, "kv") < 0) {
        return NULL;
    }
    PyArrayObject *out = offq_output_f32_2d(Py_None, (npy_intp)nq, (npy_intp)hd, NULL, 0);
    if (out == NULL) {
        return NULL;
    }
    offq_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = offq_attention_f32((const float *)PyArray_DATA(q), nq, hkv, hd,
                            (const float *)PyArray_DATA(kv), n, (float *)PyArray_DATA(out),
                            kernel);
    Py_END_ALLOW_THREADS;
    return offq_py_result(st, out, (offq_errctx){.arg = "kv"});
}

PyMethodDef offq_attention_f32_methods[] = {
    {"attention_f32", (PyCFunction)(void (*)(void))py_attention_f32, METH_VARARGS | METH_KEYWORDS,
     "attention_f32(q, kv, kernel='auto') -> float32 [nq, hd]: softmax(q K^T) V per query over "
     "kv [n, 2, kv_heads, hd], query t on KV head t // (nq // kv_heads); the weight-only decoder "
     "step's attention."},
    {NULL, NULL, 0, NULL},
};
