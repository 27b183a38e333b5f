/* bind_decoder_wq.c: Python bindings of the weight-only decoder step (offq.h, decoder_wq.c).
 *
 *   decoder_wq_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim,
 *                   eps) -> plan (a capsule)
 *       layers: a tuple of per-layer tuples (input_norm, post_norm, qkv, o, gate_up, down); a
 *       norm is a float32 [d] array or None; a linear is a tuple (packed uint8 [n, row bytes],
 *       scale float32 [n, k/group], zero float32 [n, k/group], bits 2|3|4|8, group, bias float32
 *       [n] or None), the operands of matmul_wq. Everything is validated here, once; the plan
 *       keeps the tuple (so the arrays) alive.
 *   decoder_wq_scratch_bytes(plan, rows, positions) -> int (for the current thread setting)
 *   decoder_wq_forward(plan, h, start, cos, sin, kv, scratch, kernel="auto") -> None;
 *       h [rows, d] (rows <= 32) updated in place, kv float32 [layers, cap, 2, num_kv_heads,
 *       head_dim] gains the rows.
 */
#include "bind_plan.h"

#include <math.h>
#include <stdlib.h>

#define WQ_PLAN_NAME "offq.decoder_wq_plan"

typedef struct {
    offq_dwq_model model;
    offq_dwq_layer *layers;
    PyObject *keep;             /* the validated layers tuple */
    offq_weight_ranges weights; /* the bytes of every array in keep, sorted by start */
} wq_plan;

static void wq_plan_free(PyObject *capsule)
{
    wq_plan *p = PyCapsule_GetPointer(capsule, WQ_PLAN_NAME);
    if (p != NULL) {
        free(p->layers);
        free(p->weights.r);
        Py_XDECREF(p->keep);
        free(p);
    }
}

/* One linear tuple (packed, scale, zero, bits, group, bias) of shape [n, k]. */
static int parse_wq_linear(PyObject *obj, const char *name, int64_t n, int64_t k,
                           offq_dwq_linear *lin)
{
    char arg[96];
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 6) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a tuple (packed, scale, zero, bits, group, bias), got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long bits, group;
    snprintf(arg, sizeof arg, "%s.bits", name);
    if (offq_py_int(PyTuple_GET_ITEM(obj, 3), arg, &bits) < 0) {
        return -1;
    }
    if (!offq_wq_bits_supported(bits)) {
        PyErr_Format(PyExc_ValueError, "%s: expected 2, 3, 4 or 8, got %lld", arg, bits);
        return -1;
    }
    snprintf(arg, sizeof arg, "%s.group", name);
    if (offq_py_int(PyTuple_GET_ITEM(obj, 4), arg, &group) < 0) {
        return -1;
    }
    if (group <= 0 || k % group != 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a positive group size dividing %lld, got %lld",
                     arg, (long long)k, group);
        return -1;
    }
    const npy_intp want[3][2] = {{n, offq_wq_row_bytes(k, (int)bits)}, {n, k / group},
                                 {n, k / group}};
    const char *parts[3] = {"packed", "scale", "zero"};
    const int types[3] = {NPY_UINT8, NPY_FLOAT32, NPY_FLOAT32};
    void *data[3];
    for (int i = 0; i < 3; i++) {
        snprintf(arg, sizeof arg, "%s.%s", name, parts[i]);
        PyArrayObject *a = offq_check_exact(PyTuple_GET_ITEM(obj, i), arg, types[i], 2, want[i], 0);
        if (a == NULL || (i > 0 && offq_all_finite(a, arg) < 0)) {
            return -1;
        }
        data[i] = PyArray_DATA(a);
    }
    snprintf(arg, sizeof arg, "%s.bias", name);
    if (offq_parse_vector(PyTuple_GET_ITEM(obj, 5), arg, n, 1, &lin->bias) < 0) {
        return -1;
    }
    lin->w = (offq_wq_operand){.packed = data[0],
                               .scale = data[1],
                               .zero = data[2],
                               .n = n,
                               .k = k,
                               .group = (int64_t)group,
                               .bits = (int)bits};
    return 0;
}

static PyObject *py_decoder_wq_plan(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"layers",       "hidden_size", "intermediate_size", "num_heads",
                             "num_kv_heads", "head_dim",    "eps",               NULL};
    PyObject *layers_o, *dims_o[5], *eps_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO:decoder_wq_plan", kwlist, &layers_o,
                                     &dims_o[0], &dims_o[1], &dims_o[2], &dims_o[3], &dims_o[4],
                                     &eps_o)) {
        return NULL;
    }
    int64_t dims[5];
    double eps;
    if (offq_parse_model_dims(dims_o, eps_o, dims, &eps) < 0) {
        return NULL;
    }
    const int64_t d = dims[0], f = dims[1], H = dims[2], Hkv = dims[3], hd = dims[4];
    if (!PyTuple_Check(layers_o) || PyTuple_GET_SIZE(layers_o) == 0) {
        PyErr_SetString(PyExc_TypeError, "layers: expected a non-empty tuple of layer tuples");
        return NULL;
    }
    const Py_ssize_t nl = PyTuple_GET_SIZE(layers_o);
    wq_plan *p = calloc(1, sizeof *p);
    if (p == NULL || (p->layers = calloc((size_t)nl, sizeof *p->layers)) == NULL) {
        free(p);
        return PyErr_NoMemory();
    }
    const int64_t shapes[4][2] = {{(H + 2 * Hkv) * hd, d}, {d, H * hd}, {2 * f, d}, {d, f}};
    const char *lin_names[4] = {"qkv", "o", "gate_up", "down"};
    for (Py_ssize_t i = 0; i < nl; i++) {
        PyObject *L = PyTuple_GET_ITEM(layers_o, i);
        char arg[64];
        if (!PyTuple_Check(L) || PyTuple_GET_SIZE(L) != 6) {
            PyErr_Format(PyExc_TypeError,
                         "layers[%zd]: expected a tuple (input_norm, post_norm, qkv, o, gate_up, "
                         "down)", i);
            goto fail;
        }
        offq_dwq_layer *dl = &p->layers[i];
        snprintf(arg, sizeof arg, "layers[%zd].input_norm", i);
        if (offq_parse_vector(PyTuple_GET_ITEM(L, 0), arg, d, 1, &dl->input_norm) < 0) {
            goto fail;
        }
        snprintf(arg, sizeof arg, "layers[%zd].post_norm", i);
        if (offq_parse_vector(PyTuple_GET_ITEM(L, 1), arg, d, 1, &dl->post_norm) < 0) {
            goto fail;
        }
        offq_dwq_linear *lins[4] = {&dl->qkv, &dl->o, &dl->gate_up, &dl->down};
        for (int j = 0; j < 4; j++) {
            snprintf(arg, sizeof arg, "layers[%zd].%s", i, lin_names[j]);
            if (parse_wq_linear(PyTuple_GET_ITEM(L, 2 + j), arg, shapes[j][0], shapes[j][1],
                                lins[j]) < 0) {
                goto fail;
            }
        }
    }
    p->model = (offq_dwq_model){.layers = nl,
                                .d = d,
                                .ffn = f,
                                .heads = H,
                                .kv_heads = Hkv,
                                .head_dim = hd,
                                .eps = (float)eps,
                                .layer = p->layers};
    if (offq_collect_weight_ranges(&p->weights, layers_o) < 0) {
        goto fail;
    }
    Py_INCREF(layers_o);
    p->keep = layers_o;
    PyObject *cap = PyCapsule_New(p, WQ_PLAN_NAME, wq_plan_free);
    if (cap == NULL) {
        Py_DECREF(layers_o);
        goto fail;
    }
    return cap;
fail:
    free(p->layers);
    free(p->weights.r);
    free(p);
    return NULL;
}

static wq_plan *get_wq_plan(PyObject *obj)
{
    if (!PyCapsule_IsValid(obj, WQ_PLAN_NAME)) {
        PyErr_Format(PyExc_TypeError, "plan: expected a decoder_wq_plan capsule, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyCapsule_GetPointer(obj, WQ_PLAN_NAME);
}

/* rows in 1..OFFQ_WQ_SMALL_M (what one step takes). */
static int step_rows(long long rows, const char *name)
{
    if (rows < 1 || rows > OFFQ_WQ_SMALL_M) {
        PyErr_Format(PyExc_ValueError, "%s: the weight-only step takes 1 to %d rows, got %lld",
                     name, OFFQ_WQ_SMALL_M, rows);
        return -1;
    }
    return 0;
}

static PyObject *py_decoder_wq_scratch_bytes(PyObject *self, PyObject *args)
{
    PyObject *plan_o, *rows_o, *pos_o;
    if (!PyArg_ParseTuple(args, "OOO:decoder_wq_scratch_bytes", &plan_o, &rows_o, &pos_o)) {
        return NULL;
    }
    wq_plan *p = get_wq_plan(plan_o);
    long long rows, pos;
    if (p == NULL || offq_py_int(rows_o, "rows", &rows) < 0 || step_rows(rows, "rows") < 0 ||
        offq_py_int(pos_o, "positions", &pos) < 0 || offq_positive(pos, "positions") < 0) {
        return NULL;
    }
    const int64_t need = offq_dwq_scratch_bytes(&p->model, rows, pos, offq_get_num_threads());
    if (need == INT64_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "positions: the scratch for %lld rows and %lld positions exceeds 2^63 bytes",
                     rows, pos);
        return NULL;
    }
    return PyLong_FromLongLong((long long)need);
}

static PyObject *py_decoder_wq_forward(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"plan", "h", "start", "cos", "sin", "kv", "scratch", "kernel", NULL};
    PyObject *plan_o, *h_o, *start_o, *cos_o, *sin_o, *kv_o, *scr_o;
    PyObject *kobj = NULL;
    const char *kname;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO|O:decoder_wq_forward", kwlist, &plan_o,
                                     &h_o, &start_o, &cos_o, &sin_o, &kv_o, &scr_o, &kobj)) {
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    offq_kernel kernel;
    if (offq_parse_kernel(kname, "decoder_wq_forward", OFFQ_VARIANTS_WQ, &kernel) < 0) {
        return NULL;
    }
    wq_plan *p = get_wq_plan(plan_o);
    if (p == NULL) {
        return NULL;
    }
    const offq_dwq_model *m = &p->model;
    const npy_intp h_shape[2] = {-1, m->d};
    PyArrayObject *h = offq_check_exact(h_o, "h", NPY_FLOAT32, 2, h_shape, 1);
    long long start;
    if (h == NULL || offq_py_int(start_o, "start", &start) < 0 ||
        step_rows(PyArray_DIM(h, 0), "h") < 0) {
        return NULL;
    }
    const int64_t rows = PyArray_DIM(h, 0);
    const npy_intp rope_shape[2] = {rows, m->head_dim / 2};
    const npy_intp kv_shape[5] = {m->layers, -1, 2, m->kv_heads, m->head_dim};
    PyArrayObject *cs = offq_check_exact(cos_o, "cos", NPY_FLOAT32, 2, rope_shape, 0);
    PyArrayObject *sn = cs ? offq_check_exact(sin_o, "sin", NPY_FLOAT32, 2, rope_shape, 0) : NULL;
    PyArrayObject *kv = sn ? offq_check_exact(kv_o, "kv", NPY_FLOAT32, 5, kv_shape, 1) : NULL;
    PyArrayObject *scr = kv ? offq_check_writeable(scr_o, "scratch", NPY_UINT8, 1, 1) : NULL;
    if (scr == NULL || offq_rotary_table(cs, "cos") < 0 || offq_rotary_table(sn, "sin") < 0) {
        return NULL;
    }
    const int64_t cap = PyArray_DIM(kv, 1);
    if (start < 0 || rows > cap || start > cap - rows) { /* no start + rows: it could overflow */
        PyErr_Format(PyExc_ValueError,
                     "start: positions %lld..%lld do not fit the cache capacity %lld", start,
                     start + (long long)rows - 1, (long long)cap);
        return NULL;
    }
    /* every buffer the step writes must share no byte with another argument or a weight */
    const offq_named_array args_[] = {
        {h, "h"}, {kv, "kv"}, {scr, "scratch"}, {cs, "cos"}, {sn, "sin"}};
    for (int i = 0; i < 3; i++) {
        if (offq_check_disjoint(args_[i].arr, args_[i].name, args_ + i + 1, 4 - i) < 0 ||
            offq_disjoint_from_weights(&p->weights, args_[i].arr, args_[i].name) < 0) {
            return NULL;
        }
    }
    const int64_t need = offq_dwq_scratch_bytes(m, rows, start + rows, offq_get_num_threads());
    if (need == INT64_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "start: the scratch for positions up to %lld exceeds 2^63 bytes",
                     start + (long long)rows);
        return NULL;
    }
    if (PyArray_DIM(scr, 0) < need) {
        PyErr_Format(PyExc_ValueError, "scratch: expected at least %lld bytes, got %lld",
                     (long long)need, (long long)PyArray_DIM(scr, 0));
        return NULL;
    }
    if (offq_all_finite(h, "h") < 0) { /* last: before it, h may be memory another check refuses */
        return NULL;
    }
    float *h_in = offq_save_rows(h); /* put back if the step fails */
    if (h_in == NULL) {
        return NULL;
    }
    offq_status status;
    Py_BEGIN_ALLOW_THREADS;
    status = offq_dwq_forward(m, (float *)PyArray_DATA(h), rows, (int64_t)start,
                              (const float *)PyArray_DATA(cs), (const float *)PyArray_DATA(sn),
                              (float *)PyArray_DATA(kv), cap, PyArray_DATA(scr),
                              (int64_t)PyArray_DIM(scr, 0), kernel);
    Py_END_ALLOW_THREADS;
    /* float activations carry a NaN through silently: a non-finite output fails the step too,
     * blaming a non-finite cached row if there is one (h was checked) */
    if (status == OFFQ_OK && offq_all_finite(h, "h") < 0) {
        PyErr_Clear();
        status = OFFQ_ERR_OVERFLOW;
    }
    if (status != OFFQ_OK) {
        memcpy(PyArray_DATA(h), h_in, (size_t)PyArray_NBYTES(h));
        PyMem_Free(h_in);
        if (offq_cache_prefix_finite(kv, "kv", start) < 0) {
            return NULL;
        }
        offq_step_error(status, kname);
        return NULL;
    }
    PyMem_Free(h_in);
    Py_RETURN_NONE;
}

PyMethodDef offq_decoder_wq_methods[] = {
    {"decoder_wq_plan", (PyCFunction)(void (*)(void))py_decoder_wq_plan,
     METH_VARARGS | METH_KEYWORDS,
     "decoder_wq_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, "
     "eps) -> a validated weight-only decoder plan."},
    {"decoder_wq_scratch_bytes", py_decoder_wq_scratch_bytes, METH_VARARGS,
     "decoder_wq_scratch_bytes(plan, rows, positions) -> bytes of scratch decoder_wq_forward "
     "needs."},
    {"decoder_wq_forward", (PyCFunction)(void (*)(void))py_decoder_wq_forward,
     METH_VARARGS | METH_KEYWORDS,
     "decoder_wq_forward(plan, h, start, cos, sin, kv, scratch, kernel='auto'): every decoder "
     "layer of a weight-only model on h [rows, d] (rows <= 32) in place; kv gains the rows."},
    {NULL, NULL, 0, NULL},
};
