/* bind_quant.c: Python bindings of the quant kernels (offq.h): parse, validate, release the GIL,
 * call the C core. Every argument error names the argument and what was expected.
 *
 *   quantize(x, bits, group_size, symmetric, clip) -> (codes, scale, zero, code_sums)
 *   dequantize(codes, scale, zero, bits, group_size, k) -> float32 [..., k]
 *   pack_codes(codes, bits, group_size) -> (packed, code_sums)
 *   unpack_codes(packed, bits, k) -> uint8 [..., k]
 *   matmul_w4a4(a_codes, a_scale, a_zero, a_group, w_codes, w_scale, w_zero, w_group, k,
 *               out=None, kernel="auto", w_decode=None) -> float32 [M, N]
 *       kernel: auto|generic|avx2|vnni; w_decode: the weight in the decode layout (below;
 *       its first and last 8 rows are compared with w's, not all of it)
 *   pack_w4_decode(codes, k) -> uint8 [ceil(N / 8), k / 8, 32]: 4-bit codes [N, k / 2] in the
 *       decode layout of offq.h
 */
#include "bind_util.h"

#include <string.h>

/* Resolve a group size (-1 = whole row) against k; must be positive, at most OFFQ_MAX_GROUP and
 * divide k. */
static int check_group(int64_t k, long long group, const char *name, int64_t *out)
{
    if (group == -1) {
        group = k;
    }
    if (group <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a positive group size or -1, got %lld", name,
                     group);
        return -1;
    }
    if (group > OFFQ_MAX_GROUP) { /* a group's code sums and integer dot products are int32 */
        PyErr_Format(PyExc_ValueError, "%s: the group size %lld exceeds %lld (int32 group sums)",
                     name, group, (long long)OFFQ_MAX_GROUP);
        return -1;
    }
    if (k % group != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the group size %lld must divide the last axis length %lld", name, group,
                     (long long)k);
        return -1;
    }
    *out = (int64_t)group;
    return 0;
}

/* The same for a Python object that must be an int. */
static int resolve_group(int64_t k, PyObject *obj, const char *name, int64_t *out)
{
    long long group;
    if (offq_py_int(obj, name, &group) < 0) {
        return -1;
    }
    return check_group(k, group, name, out);
}

/* New uint8/float32/int32 array with shape lead[0..nd-1) + (last,). */
static PyArrayObject *new_array(PyArrayObject *like, int nd, npy_intp last, int typenum)
{
    npy_intp dims[NPY_MAXDIMS];
    for (int i = 0; i < nd - 1; i++) {
        dims[i] = PyArray_DIM(like, i);
    }
    dims[nd - 1] = last;
    return (PyArrayObject *)PyArray_SimpleNew(nd, dims, typenum);
}

/* `arr` must have the leading dims of `ref` and last dim `last`. */
static int check_shape(PyArrayObject *arr, const char *name, PyArrayObject *ref,
                       const char *ref_name, npy_intp last)
{
    int nd = PyArray_NDIM(ref);
    int ok = PyArray_NDIM(arr) == nd;
    for (int i = 0; ok && i < nd - 1; i++) {
        ok = PyArray_DIM(arr, i) == PyArray_DIM(ref, i);
    }
    ok = ok && PyArray_DIM(arr, nd - 1) == last;
    if (!ok) {
        PyObject *got = PyObject_GetAttrString((PyObject *)arr, "shape");
        PyErr_Format(PyExc_ValueError,
                     "%s: expected the leading shape of %s and last axis %lld, got shape %S", name,
                     ref_name, (long long)last, got);
        Py_XDECREF(got);
        return -1;
    }
    return 0;
}

static PyObject *py_quantize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "bits", "group_size", "symmetric", "clip", NULL};
    PyObject *xo, *bits_o = NULL, *group_o = NULL, *sym_o = NULL, *clip_o = NULL;
    int bits = 4, symmetric = 0;
    double clip = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOOO:quantize", kwlist, &xo, &bits_o,
                                     &group_o, &sym_o, &clip_o) ||
        (sym_o != NULL && offq_py_flag(sym_o, "symmetric", &symmetric) < 0)) {
        return NULL;
    }
    PyArrayObject *x = offq_check_array(xo, "x", NPY_FLOAT32, 1, -1);
    if (x == NULL || (bits_o != NULL && offq_parse_bits(bits_o, &bits) < 0) ||
        (clip_o != NULL && offq_py_float(clip_o, "clip", &clip) < 0)) {
        return NULL;
    }
    if (!((float)clip > 0.0f && clip <= 1.0)) { /* the kernel gets it as a float */
        PyObject *got = PyFloat_FromDouble(clip);
        PyErr_Format(PyExc_ValueError, "clip: expected a ratio in (0, 1], got %R", got);
        Py_XDECREF(got);
        return NULL;
    }
    int nd = PyArray_NDIM(x);
    int64_t k = PyArray_DIM(x, nd - 1);
    if (k == 0) {
        PyErr_SetString(PyExc_ValueError, "x: the last axis must not be empty");
        return NULL;
    }
    long long group = 128;
    int64_t g;
    if ((group_o != NULL && offq_py_int(group_o, "group_size", &group) < 0) ||
        check_group(k, group, "group_size", &g) < 0) {
        return NULL;
    }
    int64_t rows = offq_leading_rows(x), ng = k / g;
    PyArrayObject *codes = new_array(x, nd, (npy_intp)offq_code_row_bytes(k, bits), NPY_UINT8);
    PyArrayObject *scale = new_array(x, nd, (npy_intp)ng, NPY_FLOAT32);
    PyArrayObject *zero = new_array(x, nd, (npy_intp)ng, NPY_FLOAT32);
    PyArrayObject *sums = new_array(x, nd, (npy_intp)ng, NPY_INT32);
    if (codes == NULL || scale == NULL || zero == NULL || sums == NULL) {
        goto fail;
    }
    offq_status status;
    Py_BEGIN_ALLOW_THREADS;
    status = offq_quantize_f32((const float *)PyArray_DATA(x), rows, k, bits, g, symmetric,
                               (float)clip, (uint8_t *)PyArray_DATA(codes),
                               (float *)PyArray_DATA(scale), (float *)PyArray_DATA(zero),
                               (int32_t *)PyArray_DATA(sums));
    Py_END_ALLOW_THREADS;
    if (offq_py_status(status, (offq_errctx){.arg = "x"}) < 0) {
        goto fail;
    }
    return Py_BuildValue("(NNNN)", codes, scale, zero, sums);
fail:
    Py_XDECREF(codes);
    Py_XDECREF(scale);
    Py_XDECREF(zero);
    Py_XDECREF(sums);
    return NULL;
}

/* Validate stored codes [..., row_bytes(k)] against k and bits. */
static int check_codes(PyArrayObject *codes, const char *name, int64_t k, int bits)
{
    int nd = PyArray_NDIM(codes);
    int64_t want = offq_code_row_bytes(k, bits);
    if (PyArray_DIM(codes, nd - 1) != want) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected last axis %lld for k=%lld at %d bits (%s), got %lld", name,
                     (long long)want, (long long)k, bits,
                     bits == 4 ? "two codes per byte" : "one code per byte",
                     (long long)PyArray_DIM(codes, nd - 1));
        return -1;
    }
    return 0;
}

/* At 2 and 3 bits a code has a byte of its own, and a byte above 2^bits - 1 is no code (at 4 bits
 * both nibbles of any byte are codes, at 8 any byte is). */
static int check_code_values(PyArrayObject *codes, const char *name, int bits)
{
    if (bits != 2 && bits != 3) {
        return 0;
    }
    const uint8_t *c = (const uint8_t *)PyArray_DATA(codes);
    const npy_intp n = PyArray_SIZE(codes);
    const uint8_t maxq = (uint8_t)((1 << bits) - 1);
    uint8_t over = 0;
    for (npy_intp i = 0; i < n; i++) {
        over |= (uint8_t)(c[i] & ~maxq);
    }
    if (over) {
        PyErr_Format(PyExc_ValueError, "%s: a code exceeds %d, the largest at %d bits", name,
                     (int)maxq, bits);
        return -1;
    }
    return 0;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"codes", "scale", "zero", "bits", "group_size", "k", NULL};
    PyObject *co, *so, *zo, *bits_o, *group_o, *k_o;
    int bits;
    long long kk;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO:dequantize", kwlist, &co, &so, &zo,
                                     &bits_o, &group_o, &k_o)) {
        return NULL;
    }
    PyArrayObject *codes = offq_check_array(co, "codes", NPY_UINT8, 1, -1);
    if (codes == NULL || offq_parse_bits(bits_o, &bits) < 0) {
        return NULL;
    }
    PyArrayObject *scale = offq_check_array(so, "scale", NPY_FLOAT32, 1, -1);
    PyArrayObject *zero = scale ? offq_check_array(zo, "zero", NPY_FLOAT32, 1, -1) : NULL;
    if (zero == NULL || offq_py_int(k_o, "k", &kk) < 0) {
        return NULL;
    }
    if (kk <= 0) {
        PyErr_Format(PyExc_ValueError, "k: expected a positive row length, got %lld", kk);
        return NULL;
    }
    int64_t k = (int64_t)kk, g;
    if (resolve_group(k, group_o, "group_size", &g) < 0 || check_codes(codes, "codes", k, bits) < 0 ||
        check_code_values(codes, "codes", bits) < 0 ||
        check_shape(scale, "scale", codes, "codes", (npy_intp)(k / g)) < 0 ||
        check_shape(zero, "zero", codes, "codes", (npy_intp)(k / g)) < 0 ||
        offq_all_finite(scale, "scale") < 0 || offq_all_finite(zero, "zero") < 0) {
        return NULL;
    }
    PyArrayObject *out = new_array(codes, PyArray_NDIM(codes), (npy_intp)k, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    offq_dequantize_f32((const uint8_t *)PyArray_DATA(codes), offq_leading_rows(codes), k, bits,
                        g, (const float *)PyArray_DATA(scale), (const float *)PyArray_DATA(zero),
                        (float *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS;
    return (PyObject *)out;
}

static PyObject *py_pack_codes(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"codes", "bits", "group_size", NULL};
    PyObject *co, *bits_o, *group_o;
    int bits;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:pack_codes", kwlist, &co, &bits_o,
                                     &group_o)) {
        return NULL;
    }
    PyArrayObject *codes = offq_check_array(co, "codes", NPY_UINT8, 1, -1);
    if (codes == NULL || offq_parse_bits(bits_o, &bits) < 0) {
        return NULL;
    }
    int nd = PyArray_NDIM(codes);
    int64_t k = PyArray_DIM(codes, nd - 1), g;
    if (k == 0) {
        PyErr_SetString(PyExc_ValueError, "codes: the last axis must not be empty");
        return NULL;
    }
    if (resolve_group(k, group_o, "group_size", &g) < 0) {
        return NULL;
    }
    PyArrayObject *packed = new_array(codes, nd, (npy_intp)offq_code_row_bytes(k, bits), NPY_UINT8);
    PyArrayObject *sums = new_array(codes, nd, (npy_intp)(k / g), NPY_INT32);
    if (packed == NULL || sums == NULL) {
        Py_XDECREF(packed);
        Py_XDECREF(sums);
        return NULL;
    }
    offq_status status;
    Py_BEGIN_ALLOW_THREADS;
    status = offq_pack_codes((const uint8_t *)PyArray_DATA(codes), offq_leading_rows(codes), k,
                             bits, g, (uint8_t *)PyArray_DATA(packed),
                             (int32_t *)PyArray_DATA(sums));
    Py_END_ALLOW_THREADS;
    if (offq_py_status(status, (offq_errctx){.arg = "codes", .bits = bits}) < 0) {
        Py_DECREF(packed);
        Py_DECREF(sums);
        return NULL;
    }
    return Py_BuildValue("(NN)", packed, sums);
}

static PyObject *py_unpack_codes(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"packed", "bits", "k", NULL};
    PyObject *po, *bits_o, *k_o;
    int bits;
    long long kk;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:unpack_codes", kwlist, &po, &bits_o, &k_o)) {
        return NULL;
    }
    PyArrayObject *packed = offq_check_array(po, "packed", NPY_UINT8, 1, -1);
    if (packed == NULL || offq_parse_bits(bits_o, &bits) < 0 || offq_py_int(k_o, "k", &kk) < 0) {
        return NULL;
    }
    if (kk <= 0) {
        PyErr_Format(PyExc_ValueError, "k: expected a positive row length, got %lld", kk);
        return NULL;
    }
    if (check_codes(packed, "packed", (int64_t)kk, bits) < 0 ||
        check_code_values(packed, "packed", bits) < 0) {
        return NULL;
    }
    PyArrayObject *out = new_array(packed, PyArray_NDIM(packed), (npy_intp)kk, NPY_UINT8);
    if (out == NULL) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    offq_unpack_codes((const uint8_t *)PyArray_DATA(packed), offq_leading_rows(packed),
                      (int64_t)kk, bits, (uint8_t *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS;
    return (PyObject *)out;
}

/* Validate one 2-D operand of matmul_w4a4; prefix is "a" or "w". */
static int check_operand(PyObject *co, PyObject *so, PyObject *zo, PyObject *group, int64_t k,
                         const char *prefix, offq_q4_operand *op)
{
    char n_codes[32], n_scale[32], n_zero[32], n_group[32];
    snprintf(n_codes, sizeof n_codes, "%s_codes", prefix);
    snprintf(n_scale, sizeof n_scale, "%s_scale", prefix);
    snprintf(n_zero, sizeof n_zero, "%s_zero", prefix);
    snprintf(n_group, sizeof n_group, "%s_group", prefix);
    PyArrayObject *codes = offq_check_array(co, n_codes, NPY_UINT8, 2, 2);
    if (codes == NULL) {
        return -1;
    }
    PyArrayObject *scale = offq_check_array(so, n_scale, NPY_FLOAT32, 2, 2);
    PyArrayObject *zero = scale ? offq_check_array(zo, n_zero, NPY_FLOAT32, 2, 2) : NULL;
    if (zero == NULL) {
        return -1;
    }
    int64_t g;
    if (resolve_group(k, group, n_group, &g) < 0 || check_codes(codes, n_codes, k, 4) < 0 ||
        check_shape(scale, n_scale, codes, n_codes, (npy_intp)(k / g)) < 0 ||
        check_shape(zero, n_zero, codes, n_codes, (npy_intp)(k / g)) < 0 ||
        offq_all_finite(scale, n_scale) < 0 || offq_all_finite(zero, n_zero) < 0) {
        return -1;
    }
    op->codes = (const uint8_t *)PyArray_DATA(codes);
    op->scale = (const float *)PyArray_DATA(scale);
    op->zero = (const float *)PyArray_DATA(zero);
    op->rows = PyArray_DIM(codes, 0);
    op->group = g;
    op->dec = NULL;
    return 0;
}

/* Shape of the decode layout of an [n, k] 4-bit weight: (ceil(n / 8), k / 8, 32). */
static void decode_shape(int64_t n, int64_t k, npy_intp *shape)
{
    shape[0] = (npy_intp)((n + 7) / 8);
    shape[1] = (npy_intp)(k / 8);
    shape[2] = 32;
}

static PyObject *py_pack_w4_decode(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"codes", "k", NULL};
    PyObject *co, *k_o;
    long long kk;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:pack_w4_decode", kwlist, &co, &k_o) ||
        offq_py_int(k_o, "k", &kk) < 0) {
        return NULL;
    }
    if (kk <= 0 || kk % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "k: the decode layout needs a positive multiple of 8, got %lld",
                     kk);
        return NULL;
    }
    PyArrayObject *codes = offq_check_array(co, "codes", NPY_UINT8, 2, 2);
    if (codes == NULL || check_codes(codes, "codes", (int64_t)kk, 4) < 0) {
        return NULL;
    }
    const int64_t n = PyArray_DIM(codes, 0), k = (int64_t)kk;
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "codes: expected at least one row");
        return NULL;
    }
    npy_intp shape[3];
    decode_shape(n, k, shape);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(3, shape, NPY_UINT8);
    if (out == NULL) {
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)PyArray_DATA(codes);
    uint8_t *dst = (uint8_t *)PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS;
    offq_w4_decode_pack(src, n, k, dst);
    Py_END_ALLOW_THREADS;
    return (PyObject *)out;
}

/* Any bytes are valid codes, so a decode layout packed from another weight of the same shape
 * would silently give another product: the first and last 8-k chunks of its first and last
 * groups of 8 rows are repacked from w (the packer on a 4-byte slice of each row) and compared,
 * O(1) beside the product (repacking whole groups cost ~6% of a 1 x 4096 x 4096 decode). */
static int decode_mismatch(const offq_q4_operand *w, int64_t k)
{
    const int64_t rb = k / 2, chunks = k / 8, last_group = (w->rows - 1) / 8;
    const int64_t groups[2] = {0, last_group}, cs[2] = {0, chunks - 1};
    for (int gi = 0; gi < 2; gi++) {
        const int64_t g = groups[gi], rows = w->rows - 8 * g < 8 ? w->rows - 8 * g : 8;
        for (int ci = 0; ci < 2; ci++) {
            uint8_t slice[8 * 4], packed[32];
            for (int64_t j = 0; j < rows; j++) { /* bytes 4c..4c+3: elements 8c..8c+7 */
                memcpy(slice + 4 * j, w->codes + (8 * g + j) * rb + 4 * cs[ci], 4);
            }
            offq_w4_decode_pack(slice, rows, 8, packed);
            if (memcmp(packed, w->dec + (g * chunks + cs[ci]) * 32, 32) != 0) {
                return 1;
            }
        }
    }
    return 0;
}

static PyObject *py_matmul_w4a4(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"a_codes", "a_scale", "a_zero", "a_group", "w_codes", "w_scale",
                             "w_zero", "w_group", "k", "out", "kernel", "w_decode", NULL};
    PyObject *aco, *aso, *azo, *ag, *wco, *wso, *wzo, *wg, *k_o, *outo = Py_None,
                                                                 *deco = Py_None;
    long long kk;
    PyObject *kobj = NULL;
    const char *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOO|OOO:matmul_w4a4", kwlist, &aco, &aso,
                                     &azo, &ag, &wco, &wso, &wzo, &wg, &k_o, &outo, &kobj,
                                     &deco)) {
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    offq_kernel kernel;
    if (offq_parse_kernel(kname, "matmul_w4a4", OFFQ_VARIANTS_W4A4, &kernel) < 0) {
        return NULL;
    }
    if (offq_py_int(k_o, "k", &kk) < 0) {
        return NULL;
    }
    if (kk <= 0) {
        PyErr_Format(PyExc_ValueError, "k: expected a positive reduction length, got %lld", kk);
        return NULL;
    }
    int64_t k = (int64_t)kk;
    offq_q4_operand a, w;
    if (check_operand(aco, aso, azo, ag, k, "a", &a) < 0 ||
        check_operand(wco, wso, wzo, wg, k, "w", &w) < 0) {
        return NULL;
    }
    if (a.group % w.group != 0 && w.group % a.group != 0) {
        PyErr_Format(PyExc_ValueError,
                     "w_group: the group sizes of a (%lld) and w (%lld) must divide one another",
                     (long long)a.group, (long long)w.group);
        return NULL;
    }
    PyArrayObject *dec = NULL;
    if (deco != Py_None) {
        if (k % 8 != 0) {
            PyErr_Format(PyExc_ValueError, "w_decode: the decode layout needs k %% 8 == 0, got k=%lld",
                         (long long)k);
            return NULL;
        }
        dec = offq_check_array(deco, "w_decode", NPY_UINT8, 3, 3);
        if (dec == NULL) {
            return NULL;
        }
        npy_intp want[3];
        decode_shape(w.rows, k, want);
        if (PyArray_DIM(dec, 0) != want[0] || PyArray_DIM(dec, 1) != want[1] ||
            PyArray_DIM(dec, 2) != want[2]) {
            PyErr_Format(PyExc_ValueError,
                         "w_decode: expected shape (%lld, %lld, 32) for a [%lld, %lld] weight, got "
                         "(%lld, %lld, %lld)",
                         (long long)want[0], (long long)want[1], (long long)w.rows, (long long)k,
                         (long long)PyArray_DIM(dec, 0), (long long)PyArray_DIM(dec, 1),
                         (long long)PyArray_DIM(dec, 2));
            return NULL;
        }
        w.dec = (const uint8_t *)PyArray_DATA(dec);
        /* a weight of no rows has an empty layout: nothing to compare (or to read) */
        if (w.rows > 0 && decode_mismatch(&w, k)) {
            PyErr_SetString(PyExc_ValueError,
                            "w_decode: not pack_w4_decode(w) (its first or last 8 rows differ "
                            "from w's; only those are compared)");
            return NULL;
        }
    }
    PyArrayObject *out;
    if (outo == Py_None) {
        npy_intp dims[2] = {(npy_intp)a.rows, (npy_intp)w.rows};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (out == NULL) {
            return NULL;
        }
    } else {
        out = offq_check_writeable(outo, "out", NPY_FLOAT32, 2, 2);
        if (out == NULL) {
            return NULL;
        }
        if (PyArray_DIM(out, 0) != a.rows || PyArray_DIM(out, 1) != w.rows) {
            PyErr_Format(PyExc_ValueError, "out: expected shape (%lld, %lld), got (%lld, %lld)",
                         (long long)a.rows, (long long)w.rows, (long long)PyArray_DIM(out, 0),
                         (long long)PyArray_DIM(out, 1));
            return NULL;
        }
        /* check_operand validated every input as a C-contiguous array */
        const offq_named_array inputs[] = {
            {(PyArrayObject *)aco, "a_codes"}, {(PyArrayObject *)aso, "a_scale"},
            {(PyArrayObject *)azo, "a_zero"},  {(PyArrayObject *)wco, "w_codes"},
            {(PyArrayObject *)wso, "w_scale"}, {(PyArrayObject *)wzo, "w_zero"},
            {dec, "w_decode"}};
        if (offq_check_disjoint(out, "out", inputs, 7) < 0) {
            return NULL;
        }
        Py_INCREF(out);
    }
    offq_status status;
    float *po = (float *)PyArray_DATA(out);
    Py_BEGIN_ALLOW_THREADS;
    status = offq_matmul_w4a4(&a, &w, k, po, kernel);
    Py_END_ALLOW_THREADS;
    if (offq_py_status(status, (offq_errctx){.arg = "a", .kernel = kname}) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* mse_clip_search(x, bits, symmetric, grid, top) -> (scale, zero) float32 of shape x.shape[:-1]:
 * see offq.kernels.mse_clip_search. */
static PyObject *py_mse_clip_search(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *bits_obj, *sym_obj, *grid_obj, *top_obj;
    int bits;
    long long grid, top;
    if (!PyArg_ParseTuple(args, "OOOOO:mse_clip_search", &x_obj, &bits_obj, &sym_obj, &grid_obj,
                          &top_obj) ||
        offq_parse_bits(bits_obj, &bits) < 0 || offq_py_int(grid_obj, "grid", &grid) < 0 ||
        offq_py_int(top_obj, "top", &top) < 0) {
        return NULL;
    }
    int symmetric;
    if (offq_py_flag(sym_obj, "symmetric", &symmetric) < 0) {
        return NULL;
    }
    /* the cost is ~(top / 5 + 8) round trips per row: a cap keeps a call interruptible in time */
    if (grid < 1 || grid > 1000) {
        PyErr_Format(PyExc_ValueError, "grid: expected 1 to 1000, got %lld", grid);
        return NULL;
    }
    if (top < 0 || top >= grid) {
        PyErr_Format(PyExc_ValueError, "top: expected 0 <= top < grid = %lld, got %lld", grid, top);
        return NULL;
    }
    PyArrayObject *x = offq_check_array(x_obj, "x", NPY_FLOAT32, 1, -1);
    if (x == NULL) {
        return NULL;
    }
    const int nd = PyArray_NDIM(x);
    const int64_t g = (int64_t)PyArray_DIM(x, nd - 1), rows = offq_leading_rows(x);
    if (g < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected a last axis of length >= 1, got 0");
        return NULL;
    }
    PyArrayObject *scale = (PyArrayObject *)PyArray_SimpleNew(nd - 1, PyArray_DIMS(x), NPY_FLOAT32);
    PyArrayObject *zero = (PyArrayObject *)PyArray_SimpleNew(nd - 1, PyArray_DIMS(x), NPY_FLOAT32);
    if (scale == NULL || zero == NULL) {
        Py_XDECREF(scale);
        Py_XDECREF(zero);
        return NULL;
    }
    offq_status rc;
    Py_BEGIN_ALLOW_THREADS
    rc = offq_mse_clip_search((const float *)PyArray_DATA(x), rows, g, bits, symmetric,
                              (int)grid, (int)top, (float *)PyArray_DATA(scale),
                              (float *)PyArray_DATA(zero));
    Py_END_ALLOW_THREADS
    if (offq_py_status(rc, (offq_errctx){.arg = "x"}) < 0) {
        Py_DECREF(scale);
        Py_DECREF(zero);
        return NULL;
    }
    return Py_BuildValue("(NN)", scale, zero);
}

PyMethodDef offq_quant_methods[] = {
    {"mse_clip_search", (PyCFunction)py_mse_clip_search, METH_VARARGS,
     "mse_clip_search(x, bits, symmetric, grid, top) -> (scale, zero): the MSE clip search of "
     "the weight grids (see offq.kernels.mse_clip_search)."},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_VARARGS | METH_KEYWORDS,
     "quantize(x, bits=4, group_size=128, symmetric=False, clip=1.0) -> (codes, scale, zero, "
     "code_sums)\n\nGroup-wise quantization of float32 x [..., K] in offq's format (offq.h)."},
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_VARARGS | METH_KEYWORDS,
     "dequantize(codes, scale, zero, bits, group_size, k) -> float32 [..., k]"},
    {"pack_codes", (PyCFunction)(void (*)(void))py_pack_codes, METH_VARARGS | METH_KEYWORDS,
     "pack_codes(codes, bits, group_size) -> (packed, code_sums); codes one per byte."},
    {"unpack_codes", (PyCFunction)(void (*)(void))py_unpack_codes, METH_VARARGS | METH_KEYWORDS,
     "unpack_codes(packed, bits, k) -> uint8 [..., k], one code per byte."},
    {"matmul_w4a4", (PyCFunction)(void (*)(void))py_matmul_w4a4, METH_VARARGS | METH_KEYWORDS,
     "matmul_w4a4(a_codes, a_scale, a_zero, a_group, w_codes, w_scale, w_zero, w_group, k, "
     "out=None, kernel='auto', w_decode=None) -> float32 [M, N] = dequantize(a) @ dequantize(w).T "
     "(4-bit a, w)."},
    {"pack_w4_decode", (PyCFunction)(void (*)(void))py_pack_w4_decode, METH_VARARGS | METH_KEYWORDS,
     "pack_w4_decode(codes, k) -> uint8 [ceil(N / 8), k / 8, 32]: the decode layout of 4-bit "
     "codes [N, k / 2] (offq.h)."},
    {NULL, NULL, 0, NULL},
};
