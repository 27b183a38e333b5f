/* bind_gguf.c: Python binding of the GGUF block dequantizers (validate once, release the GIL). */
#include "bind_util.h"

/* gguf_dequantize(data, qtype) -> float32 [rows, row_bytes / block_bytes * block_values]: the
 * values of a quantized GGUF tensor's rows (uint8 [rows, row_bytes], whole blocks per row). */
static PyObject *py_gguf_dequantize(PyObject *self, PyObject *args)
{
    PyObject *data_obj, *qtype_obj;
    long long qtype;
    if (!PyArg_ParseTuple(args, "OO:gguf_dequantize", &data_obj, &qtype_obj) ||
        offq_py_int(qtype_obj, "qtype", &qtype) < 0) {
        return NULL;
    }
    int64_t values = 0, bytes = 0;
    if (qtype < 0 || qtype > 1000 || offq_gguf_block_shape((int)qtype, &values, &bytes) < 0) {
        PyErr_Format(PyExc_ValueError,
                     "qtype: GGUF type %lld is not one this kernel reads (Q4_0 2, Q4_1 3, Q8_0 8, "
                     "Q4_K 12, Q6_K 14)", qtype);
        return NULL;
    }
    PyArrayObject *data = offq_check_array(data_obj, "data", NPY_UINT8, 2, 2);
    if (data == NULL) {
        return NULL;
    }
    const int64_t rows = (int64_t)PyArray_DIM(data, 0), row_bytes = (int64_t)PyArray_DIM(data, 1);
    if (row_bytes % bytes != 0) {
        PyErr_Format(PyExc_ValueError,
                     "data: rows of %lld bytes are not whole blocks of GGUF type %lld (%lld bytes "
                     "each)", (long long)row_bytes, qtype, (long long)bytes);
        return NULL;
    }
    const int64_t blocks_per_row = row_bytes / bytes;
    npy_intp dims[2] = {(npy_intp)rows, (npy_intp)(blocks_per_row * values)};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)PyArray_DATA(data);
    float *dst = (float *)PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS
    offq_gguf_dequantize((int)qtype, src, rows * blocks_per_row, dst);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

PyMethodDef offq_gguf_methods[] = {
    {"gguf_dequantize", py_gguf_dequantize, METH_VARARGS,
     "gguf_dequantize(data, qtype) -> float32 [rows, values]: the values of GGUF blocks of type "
     "Q4_0, Q4_1, Q8_0, Q4_K or Q6_K (see offq.kernels.gguf.gguf_dequantize)."},
    {NULL, NULL, 0, NULL},
};
