/* bind_matmul_wq.c: Python bindings of the weight-only matmul and its packing (offq.h,
 * matmul_wq.c).
 *
 *   pack_wq(codes, bits) -> uint8 [N, ceil(K * bits / 8)]     codes uint8 [N, K], bits 2|3|4|8
 *   unpack_wq(packed, bits, k) -> uint8 [N, k]
 *   matmul_wq(x, packed, scale, zero, bits, group, out=None, kernel="auto") -> float32 [M, N]
 *       x float32 [M, K], packed uint8 [N, row bytes], scale/zero float32 [N, K / group];
 *       kernel: auto|generic|avx2|avx512
 */
#include "bind_util.h"

static int parse_bits(PyObject *obj, int *bits)
{
    long long b;
    if (offq_py_int(obj, "bits", &b) < 0) {
        return -1;
    }
    if (!offq_wq_bits_supported(b)) {
        PyErr_Format(PyExc_ValueError, "bits: expected 2, 3, 4 or 8, got %lld", b);
        return -1;
    }
    *bits = (int)b;
    return 0;
}

/* A new C-contiguous uint8 array [rows][cols] whose data starts on a cache line (the row
 * kernels' 32- and 64-byte chunk loads then never straddle two; NumPy's own buffers of this size
 * start at 16 mod 64): a view into a slightly larger 1-D array, which it keeps alive. */
static PyArrayObject *new_cache_line_array(npy_intp rows, npy_intp cols)
{
    enum { LINE = 64 };
    npy_intp total = rows * cols + LINE;
    PyArrayObject *base = (PyArrayObject *)PyArray_SimpleNew(1, &total, NPY_UINT8);
    if (base == NULL) {
        return NULL;
    }
    char *data = PyArray_BYTES(base);
    data += (LINE - (uintptr_t)data % LINE) % LINE;
    npy_intp dims[2] = {rows, cols};
    PyArrayObject *view = (PyArrayObject *)PyArray_NewFromDescr(
        &PyArray_Type, PyArray_DescrFromType(NPY_UINT8), 2, dims, NULL, data, NPY_ARRAY_CARRAY,
        NULL);
    if (view == NULL || PyArray_SetBaseObject(view, (PyObject *)base) < 0) {
        Py_XDECREF(view);
        if (view == NULL) {
            Py_DECREF(base);
        }
        return NULL;
    }
    return view;
}

static PyObject *py_pack_wq(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"codes", "bits", NULL};
    PyObject *co, *bo;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:pack_wq", kwlist, &co, &bo)) {
        return NULL;
    }
    PyArrayObject *c = offq_check_array(co, "codes", NPY_UINT8, 2, 2);
    int bits;
    if (c == NULL || parse_bits(bo, &bits) < 0) {
        return NULL;
    }
    const int64_t n = PyArray_DIM(c, 0), k = PyArray_DIM(c, 1);
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "codes: expected at least one column");
        return NULL;
    }
    PyArrayObject *out = new_cache_line_array(n, offq_wq_row_bytes(k, bits));
    if (out == NULL) {
        return NULL;
    }
    offq_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = offq_pack_wq((const uint8_t *)PyArray_DATA(c), n, k, bits, (uint8_t *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS;
    if (offq_py_status(st, (offq_errctx){.arg = "codes", .bits = bits}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *py_unpack_wq(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"packed", "bits", "k", NULL};
    PyObject *po, *bo, *ko;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:unpack_wq", kwlist, &po, &bo, &ko)) {
        return NULL;
    }
    PyArrayObject *p = offq_check_array(po, "packed", NPY_UINT8, 2, 2);
    int bits;
    long long k;
    if (p == NULL || parse_bits(bo, &bits) < 0 || offq_py_int(ko, "k", &k) < 0) {
        return NULL;
    }
    if (k < 1 || k > ((long long)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "k: expected a positive column count, got %lld", k);
        return NULL;
    }
    if (PyArray_DIM(p, 1) != offq_wq_row_bytes(k, bits)) {
        PyErr_Format(PyExc_ValueError, "packed: expected %lld bytes a row for k=%lld at %d bits, "
                     "got %lld", (long long)offq_wq_row_bytes(k, bits), k, bits,
                     (long long)PyArray_DIM(p, 1));
        return NULL;
    }
    const int64_t n = PyArray_DIM(p, 0);
    npy_intp dims[2] = {n, k};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_UINT8);
    if (out == NULL) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    offq_unpack_wq((const uint8_t *)PyArray_DATA(p), n, k, bits, (uint8_t *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS;
    return (PyObject *)out;
}

static PyObject *py_matmul_wq(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "packed", "scale", "zero", "bits", "group", "out", "kernel",
                             NULL};
    PyObject *xo, *po, *so, *zo, *bo, *go, *oo = Py_None;
    PyObject *kobj = NULL;
    const char *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|OO:matmul_wq", kwlist, &xo, &po, &so,
                                     &zo, &bo, &go, &oo, &kobj)) {
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    offq_kernel kernel;
    if (offq_parse_kernel(kname, "matmul_wq", OFFQ_VARIANTS_WQ, &kernel) < 0) {
        return NULL;
    }
    PyArrayObject *x = offq_check_array(xo, "x", NPY_FLOAT32, 2, 2);
    PyArrayObject *p = x ? offq_check_array(po, "packed", NPY_UINT8, 2, 2) : NULL;
    PyArrayObject *sc = p ? offq_check_array(so, "scale", NPY_FLOAT32, 2, 2) : NULL;
    PyArrayObject *zr = sc ? offq_check_array(zo, "zero", NPY_FLOAT32, 2, 2) : NULL;
    int bits;
    long long group;
    if (zr == NULL || parse_bits(bo, &bits) < 0 || offq_py_int(go, "group", &group) < 0) {
        return NULL;
    }
    const int64_t m = PyArray_DIM(x, 0), k = PyArray_DIM(x, 1), n = PyArray_DIM(p, 0);
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected at least one column (K >= 1)");
        return NULL;
    }
    if (k > INT32_MAX || n > INT32_MAX || m > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "x: dimensions above 2^31 - 1 are not supported");
        return NULL;
    }
    if (PyArray_DIM(p, 1) != offq_wq_row_bytes(k, bits)) {
        PyErr_Format(PyExc_ValueError, "packed: expected %lld bytes a row (K=%lld at %d bits), "
                     "got %lld", (long long)offq_wq_row_bytes(k, bits), (long long)k, bits,
                     (long long)PyArray_DIM(p, 1));
        return NULL;
    }
    if (group <= 0 || k % group != 0) {
        PyErr_Format(PyExc_ValueError,
                     "group: expected a positive group size dividing K=%lld, got %lld",
                     (long long)k, group);
        return NULL;
    }
    const int64_t ng = k / group;
    PyArrayObject *pz[2] = {sc, zr};
    const char *pn[2] = {"scale", "zero"};
    for (int i = 0; i < 2; i++) {
        if (PyArray_DIM(pz[i], 0) != n || PyArray_DIM(pz[i], 1) != ng) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld), got (%lld, %lld)",
                         pn[i], (long long)n, (long long)ng, (long long)PyArray_DIM(pz[i], 0),
                         (long long)PyArray_DIM(pz[i], 1));
            return NULL;
        }
    }
    const offq_named_array inputs[] = {{x, "x"}, {p, "packed"}, {sc, "scale"}, {zr, "zero"}};
    PyArrayObject *out = offq_output_f32_2d(oo, m, n, inputs, 4);
    if (out == NULL) {
        return NULL;
    }
    const offq_wq_operand w = {
        .packed = (const uint8_t *)PyArray_DATA(p),
        .scale = (const float *)PyArray_DATA(sc),
        .zero = (const float *)PyArray_DATA(zr),
        .n = n,
        .k = k,
        .group = (int64_t)group,
        .bits = bits,
    };
    offq_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = offq_matmul_wq((const float *)PyArray_DATA(x), m, &w, (float *)PyArray_DATA(out), kernel);
    Py_END_ALLOW_THREADS;
    if (st == OFFQ_ERR_NONFINITE) {
        /* a NaN or Inf scale or zero point (x may carry them: they propagate, as in sgemm); the
         * kernel checks them as it reads them, and only this slow path finds which */
        Py_DECREF(out);
        for (int i = 0; i < 2; i++) {
            if (offq_all_finite(pz[i], pn[i]) < 0) {
                return NULL;
            }
        }
        PyErr_SetString(PyExc_RuntimeError, "matmul_wq: the kernel reported a non-finite scale or "
                        "zero point that a second reading did not find");
        return NULL;
    }
    if (offq_py_status(st, (offq_errctx){.arg = "x", .kernel = kname}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

PyMethodDef offq_matmul_wq_methods[] = {
    {"pack_wq", (PyCFunction)(void (*)(void))py_pack_wq, METH_VARARGS | METH_KEYWORDS,
     "pack_wq(codes, bits) -> uint8 [N, ceil(K * bits / 8)]: one-code-per-byte codes [N, K] as "
     "the bit stream matmul_wq reads (code i at bits [bits*i, bits*(i+1)) of its row), its data "
     "starting on a 64-byte boundary."},
    {"unpack_wq", (PyCFunction)(void (*)(void))py_unpack_wq, METH_VARARGS | METH_KEYWORDS,
     "unpack_wq(packed, bits, k) -> uint8 [N, k]: inverse of pack_wq."},
    {"matmul_wq", (PyCFunction)(void (*)(void))py_matmul_wq, METH_VARARGS | METH_KEYWORDS,
     "matmul_wq(x, packed, scale, zero, bits, group, out=None, kernel='auto') -> float32 [M, N] "
     "= x @ w_hat.T, w_hat = scale * (codes - zero) per group of inputs, codes packed by "
     "pack_wq at 2, 3, 4 or 8 bits."},
    {NULL, NULL, 0, NULL},
};
