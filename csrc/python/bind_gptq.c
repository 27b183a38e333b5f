/* bind_gptq.c: Python bindings of GPTQ's per-column step and lazy block update (validate once,
 * release the GIL, call). */
#include "bind_util.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* A 2-D array argument with the given dtype and (when want_rows / want_cols >= 0) shape; empty
 * only in its rows, and only when rows_may_be_zero. */
static PyArrayObject *matrix_arg(PyObject *obj, const char *name, int typenum, int writeable,
                                 int64_t want_rows, int64_t want_cols, int rows_may_be_zero)
{
    PyArrayObject *a = writeable ? offq_check_writeable(obj, name, typenum, 2, 2)
                                 : offq_check_array(obj, name, typenum, 2, 2);
    if (a == NULL) {
        return NULL;
    }
    const int64_t rows = (int64_t)PyArray_DIM(a, 0), cols = (int64_t)PyArray_DIM(a, 1);
    if ((rows < 1 && !rows_may_be_zero) || cols < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a non-empty matrix, got shape [%lld, %lld]",
                     name, (long long)rows, (long long)cols);
        return NULL;
    }
    if ((want_rows >= 0 && rows != want_rows) || (want_cols >= 0 && cols != want_cols)) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape [%lld, %lld], got [%lld, %lld]", name,
                     (long long)(want_rows >= 0 ? want_rows : rows),
                     (long long)(want_cols >= 0 ? want_cols : cols), (long long)rows,
                     (long long)cols);
        return NULL;
    }
    return a;
}

/* The working type of a GPTQ call: wt's dtype, float64 or float32 (err and s must match it).
 * NPY_FLOAT64 for anything else, so that matrix_arg's message names wt and the expected dtype. */
static int working_type(PyObject *wt)
{
    return PyArray_Check(wt) && PyArray_TYPE((PyArrayObject *)wt) == NPY_FLOAT32 ? NPY_FLOAT32
                                                                                  : NPY_FLOAT64;
}

/* Entry i of a float64 or float32 array, as a double. */
static inline double entry(const void *a, int typenum, int64_t i)
{
    return typenum == NPY_FLOAT32 ? (double)((const float *)a)[i] : ((const double *)a)[i];
}

/* The run's indices idx[0..count) must rise, 0 <= idx[0] <= ... <= idx[count - 1] <= k (names[j]
 * names idx[j]), and err must hold the block's rows up to idx[rows_to] (idx[0] is the block
 * start). 0, or -1 with a ValueError naming the first index out of order, or err. */
static int check_run(const long long *idx, const char *const *names, int count, int rows_to,
                     int64_t k, PyArrayObject *err)
{
    for (int j = 0; j < count; j++) {
        if (idx[j] < (j ? idx[j - 1] : 0) || idx[j] > (long long)k) {
            char order[160] = "0", got[160] = "";
            for (int i = 0; i < count; i++) {
                const size_t o = strlen(order), g = strlen(got);
                snprintf(order + o, sizeof order - o, " <= %s", names[i]);
                snprintf(got + g, sizeof got - g, "%s%lld", i ? ", " : "", idx[i]);
            }
            PyErr_Format(PyExc_ValueError, "%s: expected %s <= %lld, got %s", names[j], order,
                         (long long)k, got);
            return -1;
        }
    }
    if (idx[rows_to] - idx[0] > (long long)PyArray_DIM(err, 0)) {
        PyErr_Format(PyExc_ValueError, "err: expected at least %s - %s = %lld rows, got %lld",
                     names[rows_to], names[0], idx[rows_to] - idx[0],
                     (long long)PyArray_DIM(err, 0));
        return -1;
    }
    return 0;
}

/* gptq_columns(wt, orig, err, s, codes, scale, zero, column_group, block_start, first, end,
 * sub_end, bits): see offq.kernels.gptq_columns. */
static PyObject *py_gptq_columns(PyObject *self, PyObject *args)
{
    PyObject *o[8], *io[5];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOO:gptq_columns", &o[0], &o[7], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &io[0], &io[1], &io[2], &io[3], &io[4])) {
        return NULL;
    }
    static const char *const index_names[4] = {"block_start", "first", "end", "sub_end"};
    long long idx[4];
    int bits;
    for (int j = 0; j < 4; j++) {
        if (offq_py_int(io[j], index_names[j], &idx[j]) < 0) {
            return NULL;
        }
    }
    if (offq_parse_bits(io[4], &bits) < 0) {
        return NULL;
    }
    const int ft = working_type(o[0]);
    PyArrayObject *wt = matrix_arg(o[0], "wt", ft, 1, -1, -1, 0);
    if (wt == NULL) {
        return NULL;
    }
    const int64_t k = (int64_t)PyArray_DIM(wt, 0), n = (int64_t)PyArray_DIM(wt, 1);
    PyArrayObject *orig = matrix_arg(o[7], "orig", NPY_FLOAT32, 0, k, n, 0);
    PyArrayObject *err = orig == NULL ? NULL : matrix_arg(o[1], "err", ft, 1, -1, n, 1);
    PyArrayObject *s = err == NULL ? NULL : matrix_arg(o[2], "s", ft, 0, k, k, 0);
    PyArrayObject *codes = s == NULL ? NULL : matrix_arg(o[3], "codes", NPY_UINT8, 1, k, n, 0);
    PyArrayObject *scale = codes == NULL ? NULL : matrix_arg(o[4], "scale", NPY_FLOAT32, 0, n, -1, 0);
    if (scale == NULL) {
        return NULL;
    }
    const int64_t groups = (int64_t)PyArray_DIM(scale, 1);
    PyArrayObject *zero = matrix_arg(o[5], "zero", NPY_FLOAT32, 0, n, groups, 0);
    PyArrayObject *column_group =
        zero == NULL ? NULL : offq_check_array(o[6], "column_group", NPY_INT64, 1, 1);
    if (column_group == NULL) {
        return NULL;
    }
    if ((int64_t)PyArray_DIM(column_group, 0) != k) {
        PyErr_Format(PyExc_ValueError, "column_group: expected length %lld (wt's rows), got %lld",
                     (long long)k, (long long)PyArray_DIM(column_group, 0));
        return NULL;
    }
    /* 0 <= block_start <= first <= end <= sub_end <= k, and err holds the block's rows */
    if (check_run(idx, index_names, 4, 3, k, err) < 0) {
        return NULL;
    }
    /* what the columns read: their group index, factor row, weights (current and original) and
     * grid */
    const int64_t *cg = (const int64_t *)PyArray_DATA(column_group);
    const void *fd = PyArray_DATA(s), *wd = PyArray_DATA(wt);
    const float *od = (const float *)PyArray_DATA(orig);
    const float *sd = (const float *)PyArray_DATA(scale), *zd = (const float *)PyArray_DATA(zero);
    for (long long i = idx[1]; i < idx[2]; i++) {
        if (cg[i] < 0 || cg[i] >= groups) {
            PyErr_Format(PyExc_ValueError, "column_group: entry %lld is %lld, outside [0, %lld)",
                         i, (long long)cg[i], (long long)groups);
            return NULL;
        }
        for (long long t = i + 1; t < idx[3]; t++) {
            if (!isfinite(entry(fd, ft, i * k + t))) {
                PyErr_Format(PyExc_ValueError, "s: entry [%lld, %lld] is not finite", i, t);
                return NULL;
            }
        }
        for (int64_t r = 0; r < n; r++) {
            if (!isfinite(entry(wd, ft, i * n + r))) {
                PyErr_Format(PyExc_ValueError, "wt: entry [%lld, %lld] is not finite", i,
                             (long long)r);
                return NULL;
            }
            if (!isfinite(od[i * n + r])) {
                PyErr_Format(PyExc_ValueError, "orig: entry [%lld, %lld] is not finite", i,
                             (long long)r);
                return NULL;
            }
        }
        if (i > idx[1] && cg[i] == cg[i - 1]) {
            continue; /* the same grid column as the previous one: checked */
        }
        for (int64_t r = 0; r < n; r++) {
            const float sc = sd[r * groups + cg[i]], z = zd[r * groups + cg[i]];
            if (!(isfinite(sc) && sc > 0.0f)) {
                PyErr_Format(PyExc_ValueError,
                             "scale: entry [%lld, %lld] must be finite and > 0", (long long)r,
                             (long long)cg[i]);
                return NULL;
            }
            if (!isfinite(z)) {
                PyErr_Format(PyExc_ValueError, "zero: entry [%lld, %lld] is not finite",
                             (long long)r, (long long)cg[i]);
                return NULL;
            }
        }
    }
    const offq_named_array inputs[] = {{s, "s"},         {orig, "orig"},
                                       {scale, "scale"}, {zero, "zero"},
                                       {column_group, "column_group"},
                                       {wt, "wt"},       {err, "err"}};
    if (offq_check_disjoint(wt, "wt", inputs, 5) < 0 ||
        offq_check_disjoint(err, "err", inputs, 6) < 0 ||
        offq_check_disjoint(codes, "codes", inputs, 7) < 0) {
        return NULL;
    }
    uint8_t *cd = (uint8_t *)PyArray_DATA(codes);
    Py_BEGIN_ALLOW_THREADS
    if (ft == NPY_FLOAT32) {
        offq_gptq_columns_f32((float *)PyArray_DATA(wt), od, n, (float *)PyArray_DATA(err),
                              (const float *)fd, k, cd, sd, zd, groups, cg, (int64_t)idx[0],
                              (int64_t)idx[1], (int64_t)idx[2], (int64_t)idx[3], bits);
    } else {
        offq_gptq_columns((double *)PyArray_DATA(wt), od, n, (double *)PyArray_DATA(err),
                          (const double *)fd, k, cd, sd, zd, groups, cg, (int64_t)idx[0],
                          (int64_t)idx[1], (int64_t)idx[2], (int64_t)idx[3], bits);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gptq_block_update(wt, err, s, block_start, first, last, t0, t1): see
 * offq.kernels.gptq_block_update. */
static PyObject *py_gptq_block_update(PyObject *self, PyObject *args)
{
    PyObject *o[3], *io[5];
    if (!PyArg_ParseTuple(args, "OOOOOOOO:gptq_block_update", &o[0], &o[1], &o[2], &io[0],
                          &io[1], &io[2], &io[3], &io[4])) {
        return NULL;
    }
    static const char *const index_names[5] = {"block_start", "first", "last", "t0", "t1"};
    long long idx[5];
    for (int j = 0; j < 5; j++) {
        if (offq_py_int(io[j], index_names[j], &idx[j]) < 0) {
            return NULL;
        }
    }
    const int ft = working_type(o[0]);
    PyArrayObject *wt = matrix_arg(o[0], "wt", ft, 1, -1, -1, 0);
    if (wt == NULL) {
        return NULL;
    }
    const int64_t k = (int64_t)PyArray_DIM(wt, 0), n = (int64_t)PyArray_DIM(wt, 1);
    if (k > INT32_MAX || n > INT32_MAX) { /* BLAS's 32-bit sizes */
        PyErr_Format(PyExc_ValueError, "wt: expected at most %d rows and columns, got [%lld, %lld]",
                     INT32_MAX, (long long)k, (long long)n);
        return NULL;
    }
    PyArrayObject *err = matrix_arg(o[1], "err", ft, 0, -1, n, 1);
    PyArrayObject *s = err == NULL ? NULL : matrix_arg(o[2], "s", ft, 0, k, k, 0);
    if (s == NULL) {
        return NULL;
    }
    /* 0 <= block_start <= first <= last <= t0 <= t1 <= k, and err holds the block's rows */
    if (check_run(idx, index_names, 5, 2, k, err) < 0) {
        return NULL;
    }
    /* what the product reads, checked finite: 1/n of the product's work */
    const void *fd = PyArray_DATA(s), *ed = PyArray_DATA(err);
    for (long long i = idx[1]; i < idx[2]; i++) {
        for (long long t = idx[3]; t < idx[4]; t++) {
            if (!isfinite(entry(fd, ft, i * k + t))) {
                PyErr_Format(PyExc_ValueError, "s: entry [%lld, %lld] is not finite", i, t);
                return NULL;
            }
        }
        const int64_t row = (i - idx[0]) * n;
        for (int64_t r = 0; r < n; r++) {
            if (!isfinite(entry(ed, ft, row + r))) {
                PyErr_Format(PyExc_ValueError, "err: entry [%lld, %lld] is not finite",
                             i - idx[0], (long long)r);
                return NULL;
            }
        }
    }
    const offq_named_array inputs[] = {{s, "s"}, {err, "err"}};
    if (offq_check_disjoint(wt, "wt", inputs, 2) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (ft == NPY_FLOAT32) {
        offq_gptq_block_update_f32((float *)PyArray_DATA(wt), n, (const float *)ed,
                                   (const float *)fd, k, (int64_t)idx[0], (int64_t)idx[1],
                                   (int64_t)idx[2], (int64_t)idx[3], (int64_t)idx[4]);
    } else {
        offq_gptq_block_update((double *)PyArray_DATA(wt), n, (const double *)ed,
                               (const double *)fd, k, (int64_t)idx[0], (int64_t)idx[1],
                               (int64_t)idx[2], (int64_t)idx[3], (int64_t)idx[4]);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef offq_gptq_methods[] = {
    {"gptq_columns", (PyCFunction)py_gptq_columns, METH_VARARGS,
     "gptq_columns(wt, orig, err, s, codes, scale, zero, column_group, block_start, first, end, "
     "sub_end, bits): GPTQ's per-column step in place (see offq.kernels.gptq_columns)."},
    {"gptq_block_update", (PyCFunction)py_gptq_block_update, METH_VARARGS,
     "gptq_block_update(wt, err, s, block_start, first, last, t0, t1): GPTQ's lazy update of "
     "rows t0..t1 of wt in place (see offq.kernels.gptq_block_update)."},
    {NULL, NULL, 0, NULL},
};
