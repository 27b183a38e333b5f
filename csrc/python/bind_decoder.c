/* bind_decoder.c: Python bindings of the W4A4KV4 decoder step (offq.h, decoder.c).
 *
 *   decoder_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, eps,
 *                a_symmetric, a_clip, kv_symmetric, kv_group, r3, r4) -> plan (a capsule)
 *       layers: a tuple of per-layer tuples (input_norm, post_norm, qkv, o, gate_up, down,
 *       k_offset); a norm is a float32 [d] array or None, k_offset a float32 [num_kv_heads *
 *       head_dim] array or None; a linear is a tuple (codes uint8 [n, k/2], scale float32
 *       [n, k/wg], zero float32 [n, k/wg], w_group, bias float32 [n] or None, a_group).
 *       Everything is validated here, once; the plan keeps the tuple (so the arrays) alive and,
 *       where the CPU's small-M kernels read it, a copy of the weights in the decode layout.
 *   decoder_scratch_bytes(plan, rows, positions) -> int (for the current thread setting)
 *   decoder_forward(plan, h, start, cos, sin, kv_codes, kv_scale, kv_zero, scratch,
 *                   kernel="auto", attention="float") -> None; h [rows, d] updated in place,
 *                   the cache gains rows; attention="int8": the 8-bit attention (attention_i8.c)
 */
#include "bind_plan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PLAN_NAME "offq.decoder_plan"

typedef struct {
    offq_dec_model model;
    offq_dec_layer *layers;
    PyObject *keep;      /* the validated layers tuple */
    uint8_t *dec;        /* every linear's weight in the decode layout (offq.h), or NULL */
    offq_weight_ranges weights; /* the bytes of every array in keep, sorted by start */
} dec_plan;

static void plan_free(PyObject *capsule)
{
    dec_plan *p = PyCapsule_GetPointer(capsule, PLAN_NAME);
    if (p != NULL) {
        free(p->layers);
        free(p->dec);
        free(p->weights.r);
        Py_XDECREF(p->keep);
        free(p);
    }
}

/* The four linears of a layer, in the order of its tuple. */
static void layer_linears(offq_dec_layer *l, offq_dec_linear *lins[4])
{
    lins[0] = &l->qkv;
    lins[1] = &l->o;
    lins[2] = &l->gate_up;
    lins[3] = &l->down;
}

/* On CPUs whose small-M kernels read the decode layout (AVX2 and up): a copy of every weight in
 * it, owned by the plan (+ 4 bits per weight; decode steps read only this copy). Returns 0, or -1
 * with MemoryError set. Weights whose k is not a multiple of 8 keep the row-major path. */
static int build_decode_layouts(dec_plan *p)
{
    if (!offq_cpu_has_avx2()) {
        return 0;
    }
    int64_t total = 0;
    for (int64_t i = 0; i < p->model.layers; i++) {
        offq_dec_linear *lins[4];
        layer_linears(&p->layers[i], lins);
        for (int j = 0; j < 4; j++) {
            total += lins[j]->k % 8 == 0 ? offq_w4_decode_bytes(lins[j]->w.rows, lins[j]->k) : 0;
        }
    }
    if (total == 0 || (p->dec = aligned_alloc(64, (size_t)(total + 63) / 64 * 64)) == NULL) {
        if (total > 0) {
            PyErr_NoMemory();
            return -1;
        }
        return 0;
    }
    uint8_t *at = p->dec;
    for (int64_t i = 0; i < p->model.layers; i++) {
        offq_dec_linear *lins[4];
        layer_linears(&p->layers[i], lins);
        for (int j = 0; j < 4; j++) {
            if (lins[j]->k % 8 != 0) {
                continue;
            }
            Py_BEGIN_ALLOW_THREADS;
            offq_w4_decode_pack(lins[j]->w.codes, lins[j]->w.rows, lins[j]->k, at);
            Py_END_ALLOW_THREADS;
            lins[j]->w.dec = at;
            at += offq_w4_decode_bytes(lins[j]->w.rows, lins[j]->k);
        }
    }
    return 0;
}

/* A positive group size that divides k, at most OFFQ_MAX_GROUP (int32 group sums). */
static int parse_group(PyObject *obj, const char *name, int64_t k, int64_t *out)
{
    long long g;
    if (offq_py_int(obj, name, &g) < 0) {
        return -1;
    }
    if (g <= 0 || k % g != 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a positive group size dividing %lld, got %lld",
                     name, (long long)k, g);
        return -1;
    }
    if (g > OFFQ_MAX_GROUP) {
        PyErr_Format(PyExc_ValueError, "%s: the group size %lld exceeds %lld (int32 group sums)",
                     name, g, (long long)OFFQ_MAX_GROUP);
        return -1;
    }
    *out = (int64_t)g;
    return 0;
}

/* One linear tuple (codes, scale, zero, w_group, bias, a_group) of shape [n, k]. */
static int parse_linear(PyObject *obj, const char *name, int64_t n, int64_t k,
                        offq_dec_linear *lin)
{
    char arg[96];
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 6) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a tuple (codes, scale, zero, w_group, bias, a_group), got %s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (k % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: the input size %lld must be even", name, (long long)k);
        return -1;
    }
    int64_t wg, ag;
    snprintf(arg, sizeof arg, "%s.w_group", name);
    if (parse_group(PyTuple_GET_ITEM(obj, 3), arg, k, &wg) < 0) {
        return -1;
    }
    snprintf(arg, sizeof arg, "%s.a_group", name);
    if (parse_group(PyTuple_GET_ITEM(obj, 5), arg, k, &ag) < 0) {
        return -1;
    }
    if (wg % ag != 0 && ag % wg != 0) {
        PyErr_Format(PyExc_ValueError, "%s: one of w_group %lld and a_group %lld must divide the other",
                     name, (long long)wg, (long long)ag);
        return -1;
    }
    const npy_intp want[3][2] = {{n, k / 2}, {n, k / wg}, {n, k / wg}};
    const char *parts[3] = {"codes", "scale", "zero"};
    const int types[3] = {NPY_UINT8, NPY_FLOAT32, NPY_FLOAT32};
    void *data[3];
    for (int i = 0; i < 3; i++) {
        snprintf(arg, sizeof arg, "%s.%s", name, parts[i]);
        PyArrayObject *a = offq_check_array(PyTuple_GET_ITEM(obj, i), arg, types[i], 2, 2);
        if (a == NULL) {
            return -1;
        }
        if (PyArray_DIM(a, 0) != want[i][0] || PyArray_DIM(a, 1) != want[i][1]) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld), got (%lld, %lld)", arg,
                         (long long)want[i][0], (long long)want[i][1],
                         (long long)PyArray_DIM(a, 0), (long long)PyArray_DIM(a, 1));
            return -1;
        }
        if (i > 0 && offq_all_finite(a, arg) < 0) {
            return -1;
        }
        data[i] = PyArray_DATA(a);
    }
    snprintf(arg, sizeof arg, "%s.bias", name);
    if (offq_parse_vector(PyTuple_GET_ITEM(obj, 4), arg, n, 1, &lin->bias) < 0) {
        return -1;
    }
    lin->w.codes = data[0];
    lin->w.scale = data[1];
    lin->w.zero = data[2];
    lin->w.rows = n;
    lin->w.group = wg;
    lin->k = k;
    lin->a_group = ag;
    lin->w_zero_const = offq_mm_weight_zero(data[2], n * (k / wg));
    return 0;
}

static PyObject *py_decoder_plan(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"layers", "hidden_size", "intermediate_size", "num_heads",
                             "num_kv_heads", "head_dim", "eps", "a_symmetric", "a_clip",
                             "kv_symmetric", "kv_group", "r3", "r4", NULL};
    PyObject *layers_o, *dims_o[5], *eps_o, *clip_o, *kvg_o, *flag_o[4];
    int a_sym, kv_sym, r3, r4;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOOOO:decoder_plan", kwlist,
                                     &layers_o, &dims_o[0], &dims_o[1], &dims_o[2], &dims_o[3],
                                     &dims_o[4], &eps_o, &flag_o[0], &clip_o, &flag_o[1], &kvg_o,
                                     &flag_o[2], &flag_o[3]) ||
        offq_py_flag(flag_o[0], "a_symmetric", &a_sym) < 0 ||
        offq_py_flag(flag_o[1], "kv_symmetric", &kv_sym) < 0 ||
        offq_py_flag(flag_o[2], "r3", &r3) < 0 || offq_py_flag(flag_o[3], "r4", &r4) < 0) {
        return NULL;
    }
    int64_t dims[5];
    double eps, clip;
    long long kvg;
    if (offq_parse_model_dims(dims_o, eps_o, dims, &eps) < 0 ||
        offq_py_float(clip_o, "a_clip", &clip) < 0 || offq_py_int(kvg_o, "kv_group", &kvg) < 0) {
        return NULL;
    }
    if (!((float)clip > 0.0f && clip <= 1.0)) {
        offq_value_error_got("a_clip: expected a ratio in (0, 1]", clip);
        return NULL;
    }
    const int64_t d = dims[0], f = dims[1], H = dims[2], Hkv = dims[3], hd = dims[4];
    if (kvg <= 0 || kvg % 2 != 0 || hd % kvg != 0) {
        PyErr_Format(PyExc_ValueError,
                     "kv_group: expected an even group size dividing head_dim %lld, got %lld",
                     (long long)hd, kvg);
        return NULL;
    }
    if ((r3 && offq_hadamard_factor(hd) == 0) || (r4 && offq_hadamard_factor(f) == 0)) {
        PyErr_Format(PyExc_ValueError, "%s: no Hadamard matrix of order %lld is available",
                     (r3 && offq_hadamard_factor(hd) == 0) ? "r3" : "r4",
                     (long long)((r3 && offq_hadamard_factor(hd) == 0) ? hd : f));
        return NULL;
    }
    if (!PyTuple_Check(layers_o) || PyTuple_GET_SIZE(layers_o) == 0) {
        PyErr_SetString(PyExc_TypeError, "layers: expected a non-empty tuple of layer tuples");
        return NULL;
    }
    const Py_ssize_t nl = PyTuple_GET_SIZE(layers_o);
    dec_plan *p = calloc(1, sizeof *p);
    if (p == NULL || (p->layers = calloc((size_t)nl, sizeof *p->layers)) == NULL) {
        free(p);
        return PyErr_NoMemory();
    }
    const int64_t shapes[4][2] = {{(H + 2 * Hkv) * hd, d}, {d, H * hd}, {2 * f, d}, {d, f}};
    const char *lin_names[4] = {"qkv", "o", "gate_up", "down"};
    for (Py_ssize_t i = 0; i < nl; i++) {
        PyObject *L = PyTuple_GET_ITEM(layers_o, i);
        char arg[64];
        if (!PyTuple_Check(L) || PyTuple_GET_SIZE(L) != 7) {
            PyErr_Format(PyExc_TypeError,
                         "layers[%zd]: expected a tuple (input_norm, post_norm, qkv, o, gate_up, "
                         "down, k_offset)", i);
            goto fail;
        }
        offq_dec_layer *dl = &p->layers[i];
        snprintf(arg, sizeof arg, "layers[%zd].input_norm", i);
        if (offq_parse_vector(PyTuple_GET_ITEM(L, 0), arg, d, 1, &dl->input_norm) < 0) {
            goto fail;
        }
        snprintf(arg, sizeof arg, "layers[%zd].post_norm", i);
        if (offq_parse_vector(PyTuple_GET_ITEM(L, 1), arg, d, 1, &dl->post_norm) < 0) {
            goto fail;
        }
        offq_dec_linear *lins[4];
        layer_linears(dl, lins);
        for (int j = 0; j < 4; j++) {
            snprintf(arg, sizeof arg, "layers[%zd].%s", i, lin_names[j]);
            if (parse_linear(PyTuple_GET_ITEM(L, 2 + j), arg, shapes[j][0], shapes[j][1],
                             lins[j]) < 0) {
                goto fail;
            }
        }
        snprintf(arg, sizeof arg, "layers[%zd].k_offset", i);
        if (offq_parse_vector(PyTuple_GET_ITEM(L, 6), arg, Hkv * hd, 1, &dl->k_offset) < 0) {
            goto fail;
        }
    }
    p->model = (offq_dec_model){.layers = nl,
                                .d = d,
                                .ffn = f,
                                .heads = H,
                                .kv_heads = Hkv,
                                .head_dim = hd,
                                .eps = (float)eps,
                                .a_symmetric = a_sym,
                                .a_clip = (float)clip,
                                .kv_symmetric = kv_sym,
                                .kv_group = kvg,
                                .r3 = r3,
                                .r4 = r4,
                                .layer = p->layers};
    if (build_decode_layouts(p) < 0 || offq_collect_weight_ranges(&p->weights, layers_o) < 0) {
        goto fail;
    }
    Py_INCREF(layers_o);
    p->keep = layers_o;
    PyObject *cap = PyCapsule_New(p, PLAN_NAME, plan_free);
    if (cap == NULL) {
        Py_DECREF(layers_o);
        goto fail;
    }
    return cap;
fail:
    free(p->layers);
    free(p->dec);
    free(p->weights.r);
    free(p);
    return NULL;
}

static dec_plan *get_plan(PyObject *obj)
{
    if (!PyCapsule_IsValid(obj, PLAN_NAME)) {
        PyErr_Format(PyExc_TypeError, "plan: expected a decoder_plan capsule, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyCapsule_GetPointer(obj, PLAN_NAME);
}

static PyObject *py_decoder_scratch_bytes(PyObject *self, PyObject *args)
{
    PyObject *plan_o, *rows_o, *pos_o;
    if (!PyArg_ParseTuple(args, "OOO:decoder_scratch_bytes", &plan_o, &rows_o, &pos_o)) {
        return NULL;
    }
    dec_plan *p = get_plan(plan_o);
    long long rows, pos;
    if (p == NULL || offq_py_int(rows_o, "rows", &rows) < 0 || offq_positive(rows, "rows") < 0 ||
        offq_py_int(pos_o, "positions", &pos) < 0 || offq_positive(pos, "positions") < 0) {
        return NULL;
    }
    const int64_t need = offq_dec_scratch_bytes(&p->model, rows, pos, offq_get_num_threads());
    if (need == INT64_MAX) { /* the size saturated: no buffer can hold it */
        PyErr_Format(PyExc_ValueError,
                     "positions: the scratch for %lld rows and %lld positions exceeds 2^63 bytes",
                     rows, pos);
        return NULL;
    }
    return PyLong_FromLongLong((long long)need);
}

static PyObject *py_decoder_forward(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"plan", "h", "start", "cos", "sin", "kv_codes", "kv_scale",
                             "kv_zero", "scratch", "kernel", "attention", NULL};
    PyObject *plan_o, *h_o, *start_o, *cos_o, *sin_o, *kc_o, *ks_o, *kz_o, *scr_o;
    PyObject *kobj = NULL, *attention_o = NULL;
    const char *kname, *attention;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOO|OO:decoder_forward", kwlist, &plan_o,
                                     &h_o, &start_o, &cos_o, &sin_o, &kc_o, &ks_o, &kz_o, &scr_o,
                                     &kobj, &attention_o) ||
        offq_str_arg(attention_o, "attention", "float", &attention) < 0) {
        return NULL;
    }
    const int attention_int8 = strcmp(attention, "int8") == 0;
    if (!attention_int8 && strcmp(attention, "float") != 0) {
        PyErr_Format(PyExc_ValueError, "attention: expected 'float' or 'int8', got '%s'",
                     attention);
        return NULL;
    }
    if (offq_kernel_name(kobj, &kname) < 0) {
        return NULL;
    }
    offq_kernel kernel;
    if (offq_parse_kernel(kname, "decoder_forward", OFFQ_VARIANTS_W4A4, &kernel) < 0) {
        return NULL;
    }
    dec_plan *p = get_plan(plan_o);
    if (p == NULL) {
        return NULL;
    }
    const offq_dec_model *m = &p->model;
    const npy_intp h_shape[2] = {-1, m->d};
    PyArrayObject *h = offq_check_exact(h_o, "h", NPY_FLOAT32, 2, h_shape, 1);
    long long start;
    if (h == NULL || offq_py_int(start_o, "start", &start) < 0) {
        return NULL;
    }
    const int64_t rows = PyArray_DIM(h, 0);
    if (rows == 0) {
        PyErr_SetString(PyExc_ValueError, "h: expected at least one row");
        return NULL;
    }
    const npy_intp rope_shape[2] = {rows, m->head_dim / 2};
    const npy_intp kc_shape[5] = {m->layers, -1, 2, m->kv_heads, m->head_dim / 2};
    const npy_intp kp_shape[5] = {m->layers, -1, 2, m->kv_heads, m->head_dim / m->kv_group};
    PyArrayObject *cs = offq_check_exact(cos_o, "cos", NPY_FLOAT32, 2, rope_shape, 0);
    PyArrayObject *sn = cs ? offq_check_exact(sin_o, "sin", NPY_FLOAT32, 2, rope_shape, 0) : NULL;
    PyArrayObject *kc = sn ? offq_check_exact(kc_o, "kv_codes", NPY_UINT8, 5, kc_shape, 1) : NULL;
    if (kc == NULL || offq_rotary_table(cs, "cos") < 0 || offq_rotary_table(sn, "sin") < 0) {
        return NULL;
    }
    const int64_t cap = PyArray_DIM(kc, 1);
    const npy_intp kp_cap[5] = {kp_shape[0], cap, kp_shape[2], kp_shape[3], kp_shape[4]};
    PyArrayObject *ks = offq_check_exact(ks_o, "kv_scale", NPY_FLOAT32, 5, kp_cap, 1);
    PyArrayObject *kz = ks ? offq_check_exact(kz_o, "kv_zero", NPY_FLOAT32, 5, kp_cap, 1) : NULL;
    PyArrayObject *scr = kz ? offq_check_writeable(scr_o, "scratch", NPY_UINT8, 1, 1) : NULL;
    if (scr == NULL) {
        return NULL;
    }
    if (start < 0 || rows > cap || start > cap - rows) { /* no start + rows: it could overflow */
        PyErr_Format(PyExc_ValueError,
                     "start: positions %lld..%lld do not fit the cache capacity %lld", start,
                     start + (long long)rows - 1, (long long)cap);
        return NULL;
    }
    /* every buffer the step writes must share no byte with another argument or a weight */
    const offq_named_array args_[] = {{h, "h"},           {kc, "kv_codes"}, {ks, "kv_scale"},
                                      {kz, "kv_zero"},    {scr, "scratch"}, {cs, "cos"},
                                      {sn, "sin"}};
    for (int i = 0; i < 5; i++) {
        if (offq_check_disjoint(args_[i].arr, args_[i].name, args_ + i + 1, 6 - i) < 0 ||
            offq_disjoint_from_weights(&p->weights, args_[i].arr, args_[i].name) < 0) {
            return NULL;
        }
    }
    const int64_t need = offq_dec_scratch_bytes(m, rows, start + rows, offq_get_num_threads());
    if (need == INT64_MAX) { /* the size saturated: no buffer can hold it */
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
    const offq_dec_cache cache = {(uint8_t *)PyArray_DATA(kc), (float *)PyArray_DATA(ks),
                                  (float *)PyArray_DATA(kz), cap};
    float *h_in = offq_save_rows(h); /* put back if the step fails */
    if (h_in == NULL) {
        return NULL;
    }
    offq_status status;
    Py_BEGIN_ALLOW_THREADS;
    status = offq_dec_forward(m, (float *)PyArray_DATA(h), rows, (int64_t)start,
                              (const float *)PyArray_DATA(cs), (const float *)PyArray_DATA(sn),
                              &cache, PyArray_DATA(scr), (int64_t)PyArray_DIM(scr, 0), kernel,
                              attention_int8);
    Py_END_ALLOW_THREADS;
    if (status != OFFQ_OK) {
        /* h as it came (the cache rows from start on are the step's own, past the valid ones);
         * a non-finite cached row is the likelier cause than h, which was checked */
        memcpy(PyArray_DATA(h), h_in, (size_t)PyArray_NBYTES(h));
        PyMem_Free(h_in);
        if (offq_cache_prefix_finite(ks, "kv_scale", start) < 0 ||
            offq_cache_prefix_finite(kz, "kv_zero", start) < 0) {
            return NULL;
        }
        offq_step_error(status, kname);
        return NULL;
    }
    PyMem_Free(h_in);
    Py_RETURN_NONE;
}

PyMethodDef offq_decoder_methods[] = {
    {"decoder_plan", (PyCFunction)(void (*)(void))py_decoder_plan, METH_VARARGS | METH_KEYWORDS,
     "decoder_plan(layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, "
     "eps, a_symmetric, a_clip, kv_symmetric, kv_group, r3, r4) -> a validated W4A4KV4 decoder "
     "plan."},
    {"decoder_scratch_bytes", py_decoder_scratch_bytes, METH_VARARGS,
     "decoder_scratch_bytes(plan, rows, positions) -> bytes of scratch decoder_forward needs."},
    {"decoder_forward", (PyCFunction)(void (*)(void))py_decoder_forward,
     METH_VARARGS | METH_KEYWORDS,
     "decoder_forward(plan, h, start, cos, sin, kv_codes, kv_scale, kv_zero, scratch, "
     "kernel='auto', attention='float'): every decoder layer on h [rows, d] in place; the cache "
     "gains the rows. attention='int8': 8-bit queries and softmax weights, int32 sums."},
    {NULL, NULL, 0, NULL},
};
