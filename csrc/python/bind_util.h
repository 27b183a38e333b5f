/* bind_util.h: shared argument validation for the binding layer (csrc/python/).
 *
 * The bindings are the one place where arguments are validated: every entry point checks types,
 * dtype, ndim, shape, contiguity, byte order and ranges and raises TypeError/ValueError naming the
 * argument; the C core below trusts what it gets. Core statuses become Python exceptions in one
 * place, offq_py_status (module.c).
 */
#ifndef OFFQ_BIND_UTIL_H
#define OFFQ_BIND_UTIL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL offq_ARRAY_API
#ifndef OFFQ_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "offq.h"

/* What an error message may need besides the status. */
typedef struct {
    const char *arg;    /* the argument the error is about */
    int bits;           /* OFFQ_ERR_CODE: the code width */
    const char *kernel; /* OFFQ_ERR_UNSUPPORTED from the matmul: the variant asked for */
} offq_errctx;

/* 0 for OFFQ_OK; otherwise set the Python exception for `status` and return -1. */
int offq_py_status(offq_status status, offq_errctx ctx);
/* A binding's result: `out` when status is OFFQ_OK, else NULL with the status's exception set and
 * `out` released. */
static inline PyObject *offq_py_result(offq_status status, PyArrayObject *out, offq_errctx ctx)
{
    if (offq_py_status(status, ctx) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* A Python int (or an object with __index__, not a bool) -> *out; else TypeError naming `name`. */
int offq_py_int(PyObject *obj, const char *name, long long *out);
/* The truth value of a flag argument -> *out (0 or 1); a TypeError or ValueError its __bool__
 * raises (a NumPy array of several elements) becomes a TypeError naming `name`. */
int offq_py_flag(PyObject *obj, const char *name, int *out);
/* A real number -> *out; else TypeError naming `name`. */
int offq_py_float(PyObject *obj, const char *name, double *out);

/* The `bits` argument of the grid kernels: an int in {2, 3, 4, 8} -> *bits; else TypeError /
 * ValueError naming it. */
static inline int offq_parse_bits(PyObject *obj, int *bits)
{
    long long b;
    if (offq_py_int(obj, "bits", &b) < 0) {
        return -1;
    }
    if (b != 2 && b != 3 && b != 4 && b != 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected one of 2, 3, 4, 8, got %lld", b);
        return -1;
    }
    *bits = (int)b;
    return 0;
}

/* ValueError "`msg`, got `v`" (`v` as Python's repr of a float). PyErr_Format has no %g: Python
 * 3.11 printed "%g" itself and 3.12 raises SystemError on it. */
static inline void offq_value_error_got(const char *msg, double v)
{
    char *text = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    PyErr_Format(PyExc_ValueError, "%s, got %s", msg, text != NULL ? text : "?");
    PyMem_Free(text);
}

/* Bits of the `variants` argument of offq_parse_kernel: the variants a function has. */
/* The largest quantization group the products accept: a group's integer sums are int32, and the
 * largest term is 15 * 127 = 1905 (a 4-bit code times an 8-bit code with the activation's integer
 * zero-point folded in, the small-M path of matmul_w4a4); 1905 * 2^20 < 2^31. */
#define OFFQ_MAX_GROUP (INT64_C(1) << 20)

#define OFFQ_VARIANT(v) (1u << (v))
#define OFFQ_VARIANTS_W4A4                                                                      \
    (OFFQ_VARIANT(OFFQ_KERNEL_GENERIC) | OFFQ_VARIANT(OFFQ_KERNEL_AVX2) |                        \
     OFFQ_VARIANT(OFFQ_KERNEL_VNNI))
#define OFFQ_VARIANTS_WQ                                                                        \
    (OFFQ_VARIANT(OFFQ_KERNEL_GENERIC) | OFFQ_VARIANT(OFFQ_KERNEL_AVX2) |                        \
     OFFQ_VARIANT(OFFQ_KERNEL_AVX512))

/* ValueError naming `name` when the float32 array holds NaN or Inf (checked before a kernel
 * writes anything, so that a bad table or scale is not reported later as a bad output). Blocks of
 * branch-free isfinite() tests, which the compiler vectorises (an early-exit loop over a 4096 x
 * 4096 W4 g128 weight's scales and zero points, 2 x 128K floats, took 15% of matmul_wq's decode
 * product, which now checks them in its kernel). */
static inline int offq_all_finite(PyArrayObject *a, const char *name)
{
    const float *v = (const float *)PyArray_DATA(a);
    const npy_intp n = PyArray_SIZE(a);
    for (npy_intp i0 = 0; i0 < n; i0 += 4096) {
        const npy_intp i1 = n - i0 < 4096 ? n : i0 + 4096;
        int bad = 0;
        for (npy_intp i = i0; i < i1; i++) {
            bad |= !isfinite(v[i]);
        }
        if (bad) {
            PyErr_Format(PyExc_ValueError, "%s: contains NaN or Inf (needs finite values)", name);
            return -1;
        }
    }
    return 0;
}

/* ValueError naming `name` when positions [0, n) of a C-contiguous float32 KV cache
 * [layers, capacity, ...] (axis 1 the positions) hold NaN or Inf; 0 otherwise. The decoder steps
 * call it only after a step failed or gave a non-finite output (a scan per step would cost as
 * much as the attention that reads the cache), to blame the cache rather than h. */
static inline int offq_cache_prefix_finite(PyArrayObject *a, const char *name, int64_t n)
{
    const float *v = (const float *)PyArray_DATA(a);
    const int64_t layers = PyArray_DIM(a, 0), cap = PyArray_DIM(a, 1);
    const int64_t inner = cap > 0 ? (int64_t)PyArray_SIZE(a) / (layers * cap) : 0;
    for (int64_t l = 0; l < layers; l++) {
        const float *row = v + l * cap * inner;
        for (int64_t i = 0; i < n * inner; i++) {
            if (!isfinite(row[i])) {
                PyErr_Format(PyExc_ValueError,
                             "%s: layer %lld, position %lld holds NaN or Inf (a cache this "
                             "model's steps did not write?)",
                             name, (long long)l, (long long)(i / inner));
                return -1;
            }
        }
    }
    return 0;
}

/* The error of a decoder step that failed with `status` after its input h was put back: a
 * non-finite value inside the layers (h itself was checked) is reported as an overflow there. */
static inline void offq_step_error(offq_status status, const char *kernel)
{
    if (status == OFFQ_ERR_NONFINITE || status == OFFQ_ERR_OVERFLOW) {
        PyErr_SetString(PyExc_ValueError,
                        "h: the step's activations overflowed float32 inside the layers (h is "
                        "as it was given)");
        return;
    }
    offq_py_status(status, (offq_errctx){.arg = "h", .kernel = kernel});
}

/* A copy of the float32 array h (a step's input, overwritten in place) to put back when the step
 * fails: NULL with MemoryError set. */
static inline float *offq_save_rows(PyArrayObject *h)
{
    const size_t bytes = (size_t)PyArray_NBYTES(h);
    float *copy = (float *)PyMem_Malloc(bytes > 0 ? bytes : 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(copy, PyArray_DATA(h), bytes);
    return copy;
}

/* The largest |value| a rotary table (cos or sin) may hold: 1, times the attention factor that
 * some rope scalings (YaRN, LongRoPE) fold into the tables, which stays below 2 for any context
 * they are used at; 8 leaves room and still refuses tables that would overflow the rotation. */
#define OFFQ_ROTARY_MAX 8.0f

/* ValueError naming `name` unless every value of the float32 rotary table is finite and at most
 * OFFQ_ROTARY_MAX in magnitude. */
static inline int offq_rotary_table(PyArrayObject *a, const char *name)
{
    const float *v = (const float *)PyArray_DATA(a);
    const npy_intp n = PyArray_SIZE(a);
    for (npy_intp i = 0; i < n; i++) {
        if (!(fabsf(v[i]) <= OFFQ_ROTARY_MAX)) { /* (PyErr_Format has no %g) */
            char *text = PyOS_double_to_string((double)v[i], 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
            PyErr_Format(PyExc_ValueError,
                         "%s: a rotary table needs finite values of magnitude at most %d, got %s "
                         "at flat index %lld", name, (int)OFFQ_ROTARY_MAX,
                         text != NULL ? text : "?", (long long)i);
            PyMem_Free(text);
            return -1;
        }
    }
    return 0;
}

/* A str argument `arg` as a C string: `dflt` when it was not given (obj NULL), else a str that
 * encodes to UTF-8 without null characters; TypeError / ValueError naming `arg` otherwise. The
 * pointer lives as long as obj (the call's arguments). */
static inline int offq_str_arg(PyObject *obj, const char *arg, const char *dflt, const char **name)
{
    if (obj == NULL) {
        *name = dflt;
        return 0;
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a str such as '%s', got %s", arg, dflt,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &len);
    if (s == NULL) { /* a lone surrogate: name the argument, not the codec */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected a name such as '%s', got %R", arg, dflt, obj);
        return -1;
    }
    if ((size_t)len != strlen(s)) {
        PyErr_Format(PyExc_ValueError, "%s: contains a null character", arg);
        return -1;
    }
    *name = s;
    return 0;
}

/* The `kernel=` argument as a C string ("auto" when not given; offq_str_arg). */
static inline int offq_kernel_name(PyObject *obj, const char **name)
{
    return offq_str_arg(obj, "kernel", "auto", name);
}

/* The `kernel=` argument of `fn` ("auto" or a variant name in `variants`) -> *out; else
 * ValueError naming the argument and the names `fn` accepts, and -1. */
static inline int offq_parse_kernel(const char *name, const char *fn, unsigned variants,
                                    offq_kernel *out)
{
    static const char *names[OFFQ_KERNEL_COUNT] = {
        [OFFQ_KERNEL_GENERIC] = "generic", [OFFQ_KERNEL_AVX2] = "avx2",
        [OFFQ_KERNEL_VNNI] = "vnni", [OFFQ_KERNEL_AVX512] = "avx512"};
    char accepted[96] = "'auto'";
    int known = -1;
    for (int i = 0; i < OFFQ_KERNEL_COUNT; i++) {
        if (variants & (1u << i)) {
            strncat(accepted, ", '", sizeof accepted - strlen(accepted) - 1);
            strncat(accepted, names[i], sizeof accepted - strlen(accepted) - 1);
            strncat(accepted, "'", sizeof accepted - strlen(accepted) - 1);
        }
        if (strcmp(name, names[i]) == 0) {
            known = i;
        }
    }
    if (strcmp(name, "auto") == 0) {
        *out = OFFQ_KERNEL_AUTO;
        return 0;
    }
    if (known >= 0 && (variants & (1u << known))) {
        *out = (offq_kernel)known;
        return 0;
    }
    if (known >= 0) {
        PyErr_Format(PyExc_ValueError, "kernel: %s has no '%s' variant (expected one of %s)", fn,
                     name, accepted);
    } else {
        PyErr_Format(PyExc_ValueError, "kernel: expected one of %s, got '%s'", accepted, name);
    }
    return -1;
}

/* The dtype (NPY_FLOAT32 or NPY_FLOAT64) of an ndarray argument that may be either, or -1 with a
 * TypeError naming `name` (the array's layout is checked after, by offq_check_array). */
static inline int offq_float_typenum(PyObject *obj, const char *name)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const int typenum = PyArray_TYPE((PyArrayObject *)obj);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype float32 or float64, got %S", name,
                     (PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        return -1;
    }
    return typenum;
}

/* Return `obj` as a borrowed PyArrayObject* if it is a C-contiguous ndarray of dtype `typenum`
 * with min_ndim <= ndim <= max_ndim (max_ndim < 0: no upper bound); else set TypeError/ValueError
 * naming `name` and return NULL. No copies are ever made silently. */
static inline PyArrayObject *offq_check_array(PyObject *obj, const char *name, int typenum,
                                              int min_ndim, int max_ndim)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(arr));
        Py_XDECREF(want);
        return NULL;
    }
    if (PyArray_ISBYTESWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected native byte order, got %S (use x.astype(x.dtype.newbyteorder('='))",
                     name, (PyObject *)PyArray_DESCR(arr));
        return NULL;
    }
    int nd = PyArray_NDIM(arr);
    if (nd < min_ndim || (max_ndim >= 0 && nd > max_ndim)) {
        if (max_ndim < 0) {
            PyErr_Format(PyExc_ValueError, "%s: expected at least %d dimensions, got %d", name,
                         min_ndim, nd);
        } else if (min_ndim == max_ndim) {
            PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", name, min_ndim, nd);
        } else {
            PyErr_Format(PyExc_ValueError, "%s: expected %d to %d dimensions, got %d", name,
                         min_ndim, max_ndim, nd);
        }
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous array (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    if (!PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: expected an aligned array", name);
        return NULL;
    }
    return arr;
}

/* Same as offq_check_array, and the array must be writeable. */
static inline PyArrayObject *offq_check_writeable(PyObject *obj, const char *name, int typenum,
                                                  int min_ndim, int max_ndim)
{
    PyArrayObject *arr = offq_check_array(obj, name, typenum, min_ndim, max_ndim);
    if (arr != NULL && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a writeable array", name);
        return NULL;
    }
    return arr;
}

/* The order of a square 2-D array, 1 <= order <= 46000 (OpenBLAS/LAPACK take 32-bit sizes), or -1
 * with a ValueError naming `name`. */
static inline int64_t offq_square_order(PyArrayObject *arr, const char *name)
{
    const int64_t k = (int64_t)PyArray_DIM(arr, 0);
    if (PyArray_DIM(arr, 1) != k || k < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a square array of order >= 1, got [%lld, %lld]",
                     name, (long long)PyArray_DIM(arr, 0), (long long)PyArray_DIM(arr, 1));
        return -1;
    }
    if (k > 46000) {
        PyErr_Format(PyExc_ValueError, "%s: order %lld too large for OpenBLAS (32-bit sizes)", name,
                     (long long)k);
        return -1;
    }
    return k;
}

/* The upper triangle (what the solvers read) of a square float32/float64 C-contiguous matrix
 * that an eigen-solver takes: finite, with the largest |entry| zero or within [1e-150, 1e150], so
 * that squares and sums over 46000 terms stay normal float64 numbers (beyond, LAPACK refuses the
 * input or Lanczos returns Inf/NaN). 0, or -1 with a ValueError naming `name`. */
static inline int offq_check_magnitude(PyArrayObject *arr, const char *name)
{
    const npy_intp k = PyArray_DIM(arr, 0);
    const int f32 = PyArray_TYPE(arr) == NPY_FLOAT32;
    const float *v32 = (const float *)PyArray_DATA(arr);
    const double *v64 = (const double *)PyArray_DATA(arr);
    double big = 0.0;
    for (npy_intp i = 0; i < k; i++) {
        for (npy_intp j = i; j < k; j++) {
            const double a = fabs(f32 ? (double)v32[i * k + j] : v64[i * k + j]);
            if (!(a <= DBL_MAX)) {
                PyErr_Format(PyExc_ValueError, "%s: contains NaN or Inf (needs finite values)",
                             name);
                return -1;
            }
            big = a > big ? a : big;
        }
    }
    if (big > 1e150 || (big > 0.0 && big < 1e-150)) {
        char text[32];
        snprintf(text, sizeof text, "%.3g", big);
        PyErr_Format(PyExc_ValueError,
                     "%s: its largest |entry| is %s, outside [1e-150, 1e150]; rescale it (the "
                     "eigenvectors do not change)", name, text);
        return -1;
    }
    return 0;
}

/* An input array and the argument name it came from, for the overlap checks below. */
typedef struct {
    PyArrayObject *arr; /* NULL entries are skipped */
    const char *name;
} offq_named_array;

/* 1 when the bytes of two C-contiguous arrays intersect (empty arrays intersect nothing). */
static inline int offq_bytes_overlap(PyArrayObject *a, PyArrayObject *b)
{
    const char *a0 = PyArray_BYTES(a), *b0 = PyArray_BYTES(b);
    const npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    return na > 0 && nb > 0 && a0 < b0 + nb && b0 < a0 + na;
}

/* 0 when `out` shares no byte with any of the `count` inputs, else -1 with ValueError
 * "<out_name>: must not share memory with <input name>" (a kernel that writes while it still
 * reads would silently compute garbage). Every array must be C-contiguous. */
static inline int offq_check_disjoint(PyArrayObject *out, const char *out_name,
                                      const offq_named_array *inputs, int count)
{
    for (int i = 0; i < count; i++) {
        if (inputs[i].arr != NULL && offq_bytes_overlap(out, inputs[i].arr)) {
            PyErr_Format(PyExc_ValueError, "%s: must not share memory with %s", out_name,
                         inputs[i].name);
            return -1;
        }
    }
    return 0;
}

/* 0 if the 2-D array `arr` has shape (m, n), else -1 with a ValueError naming `name`. */
static inline int offq_expect_shape_2d(PyArrayObject *arr, const char *name, npy_intp m, npy_intp n)
{
    if (PyArray_DIM(arr, 0) != m || PyArray_DIM(arr, 1) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld), got (%lld, %lld)", name,
                     (long long)m, (long long)n, (long long)PyArray_DIM(arr, 0),
                     (long long)PyArray_DIM(arr, 1));
        return -1;
    }
    return 0;
}

/* The float32 [m, n] output of a product: a new array when `obj` is None, else `obj` checked
 * (float32, 2-D, C-contiguous, writeable, shape (m, n), sharing no memory with any of the `count`
 * inputs). Returns a new reference, or NULL with the exception set (naming "out"). */
static inline PyArrayObject *offq_output_f32_2d(PyObject *obj, npy_intp m, npy_intp n,
                                                const offq_named_array *inputs, int count)
{
    if (obj == Py_None) {
        npy_intp dims[2] = {m, n};
        return (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    }
    PyArrayObject *out = offq_check_writeable(obj, "out", NPY_FLOAT32, 2, 2);
    if (out == NULL) {
        return NULL;
    }
    if (offq_expect_shape_2d(out, "out", m, n) < 0 ||
        offq_check_disjoint(out, "out", inputs, count) < 0) {
        return NULL;
    }
    Py_INCREF(out);
    return out;
}

/* Product of all dimensions but the last (the number of rows of a [..., n] array). */
static inline int64_t offq_leading_rows(PyArrayObject *arr)
{
    int64_t rows = 1;
    int nd = PyArray_NDIM(arr);
    for (int i = 0; i < nd - 1; i++) {
        rows *= (int64_t)PyArray_DIM(arr, i);
    }
    return rows;
}

#endif
