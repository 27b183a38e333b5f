/* bind_plan.c: helpers the decoder-step bindings share (bind_plan.h). */
#include "bind_plan.h"

#include <math.h>
#include <stdlib.h>

/* A float32 [n] array or None (-> NULL). */
int offq_parse_vector(PyObject *obj, const char *name, int64_t n, int allow_none,
                      const float **out)
{
    if (obj == Py_None && allow_none) {
        *out = NULL;
        return 0;
    }
    PyArrayObject *a = offq_check_array(obj, name, NPY_FLOAT32, 1, 1);
    if (a == NULL) {
        return -1;
    }
    if (PyArray_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld,), got (%lld,)", name,
                     (long long)n, (long long)PyArray_DIM(a, 0));
        return -1;
    }
    if (offq_all_finite(a, name) < 0) { /* a NaN norm or bias would surface as a bad h */
        return -1;
    }
    *out = (const float *)PyArray_DATA(a);
    return 0;
}

/* Append the byte range of every non-empty array inside obj (nested tuples of arrays and None)
 * to w (capacity *cap, grown as needed). 0, or -1 with MemoryError. */
static int append_ranges(offq_weight_ranges *w, PyObject *obj, Py_ssize_t *cap)
{
    if (PyArray_Check(obj)) {
        PyArrayObject *a = (PyArrayObject *)obj;
        if (PyArray_NBYTES(a) == 0) {
            return 0;
        }
        if (w->n == *cap) {
            *cap = *cap ? 2 * *cap : 64;
            offq_byte_range *grown = realloc(w->r, sizeof *grown * (size_t)*cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            w->r = grown;
        }
        const uintptr_t start = (uintptr_t)PyArray_BYTES(a);
        w->r[w->n++] = (offq_byte_range){start, start + (uintptr_t)PyArray_NBYTES(a), 0};
        return 0;
    }
    if (PyTuple_Check(obj)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
            if (append_ranges(w, PyTuple_GET_ITEM(obj, i), cap) < 0) {
                return -1;
            }
        }
    }
    return 0;
}

static int by_start(const void *x, const void *y)
{
    const uintptr_t a = ((const offq_byte_range *)x)->start, b = ((const offq_byte_range *)y)->start;
    return (a > b) - (a < b);
}

/* w->r <- the sorted byte ranges of the plan's arrays (450 for SmolLM2-135M), once, so
 * that each decoder_forward call checks its buffers against them by binary search instead of
 * walking every array on every decode step. */
int offq_collect_weight_ranges(offq_weight_ranges *w, PyObject *obj)
{
    Py_ssize_t cap = 0;
    if (append_ranges(w, obj, &cap) < 0) {
        return -1;
    }
    qsort(w->r, (size_t)w->n, sizeof *w->r, by_start);
    uintptr_t running = 0;
    for (Py_ssize_t i = 0; i < w->n; i++) {
        running = w->r[i].end > running ? w->r[i].end : running;
        w->r[i].max_end = running;
    }
    return 0;
}

/* -1 with ValueError when `out` shares a byte with any of the plan's arrays, else 0. */
int offq_disjoint_from_weights(const offq_weight_ranges *w, PyArrayObject *out, const char *name)
{
    const uintptr_t a = (uintptr_t)PyArray_BYTES(out), b = a + (uintptr_t)PyArray_NBYTES(out);
    Py_ssize_t lo = 0, hi = w->n; /* count the ranges that start before b */
    while (lo < hi) {
        const Py_ssize_t mid = lo + (hi - lo) / 2;
        if (w->r[mid].start < b) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (a < b && lo > 0 && w->r[lo - 1].max_end > a) {
        PyErr_Format(PyExc_ValueError, "%s: must not share memory with the plan's weights", name);
        return -1;
    }
    return 0;
}

int offq_positive(long long v, const char *name)
{
    if (v <= 0 || v > ((long long)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a positive size, got %lld", name, v);
        return -1;
    }
    return 0;
}

/* A C-contiguous array of dtype `typenum` and exactly this shape (writeable when asked). */
PyArrayObject *offq_check_exact(PyObject *obj, const char *name, int typenum, int nd,
                                const npy_intp *shape, int writeable)
{
    PyArrayObject *a = writeable ? offq_check_writeable(obj, name, typenum, nd, nd)
                                 : offq_check_array(obj, name, typenum, nd, nd);
    if (a == NULL) {
        return NULL;
    }
    for (int i = 0; i < nd; i++) {
        if (shape[i] >= 0 && PyArray_DIM(a, i) != shape[i]) {
            PyObject *got = PyObject_GetAttrString(obj, "shape");
            PyErr_Format(PyExc_ValueError, "%s: axis %d must have length %lld, got shape %S", name,
                         i, (long long)shape[i], got);
            Py_XDECREF(got);
            return NULL;
        }
    }
    return a;
}

int offq_parse_model_dims(PyObject *const dims_o[5], PyObject *eps_o, int64_t dims[5],
                          double *eps)
{
    static const char *names[5] = {"hidden_size", "intermediate_size", "num_heads",
                                   "num_kv_heads", "head_dim"};
    for (int i = 0; i < 5; i++) {
        long long v;
        if (offq_py_int(dims_o[i], names[i], &v) < 0 || offq_positive(v, names[i]) < 0) {
            return -1;
        }
        if (v > (1LL << 20)) { /* products of dims fit int64; with positions, the scratch sizes
                                 * saturate (decoder_team.h) */
            PyErr_Format(PyExc_ValueError, "%s: %lld exceeds the limit 2^20", names[i], v);
            return -1;
        }
        dims[i] = (int64_t)v;
    }
    if (offq_py_float(eps_o, "eps", eps) < 0) {
        return -1;
    }
    if (!((float)*eps > 0.0f && isfinite((float)*eps))) { /* a zero row divides by eps */
        offq_value_error_got("eps: expected a finite value > 0", *eps);
        return -1;
    }
    if (dims[2] % dims[3] != 0) {
        PyErr_Format(PyExc_ValueError, "num_heads: %lld is not a multiple of num_kv_heads %lld",
                     (long long)dims[2], (long long)dims[3]);
        return -1;
    }
    if (dims[4] % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "head_dim: expected an even size, got %lld",
                     (long long)dims[4]);
        return -1;
    }
    return 0;
}
