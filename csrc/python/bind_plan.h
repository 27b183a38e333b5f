/* bind_plan.h: what the bindings of the two decoder steps (bind_decoder.c for W4A4KV4 models,
 * bind_decoder_wq.c for weight-only ones) share: parsing the per-layer tuples of a plan, the byte
 * ranges of the plan's arrays (so that each step checks its output buffers against them in
 * O(log n)), and the exact-shape checks of the step's buffers. */
#ifndef OFFQ_BIND_PLAN_H
#define OFFQ_BIND_PLAN_H

#include "bind_util.h"

/* The bytes [start, end) of one of the plan's arrays, and the largest end of any range sorted
 * at or before it (so that one binary search answers "does [a, b) touch a weight?"). */
typedef struct {
    uintptr_t start, end, max_end;
} offq_byte_range;

/* The byte ranges of every array a plan keeps alive, sorted by start. */
typedef struct {
    offq_byte_range *r;
    Py_ssize_t n;
} offq_weight_ranges;

/* w <- the sorted byte ranges of every non-empty array inside obj (nested tuples of arrays and
 * None). 0, or -1 with MemoryError (w->r is then freed by the caller as usual). */
int offq_collect_weight_ranges(offq_weight_ranges *w, PyObject *obj);
/* -1 with ValueError when `out` shares a byte with any range of w, else 0. */
int offq_disjoint_from_weights(const offq_weight_ranges *w, PyArrayObject *out, const char *name);

/* The model sizes of a decoder plan: hidden_size, intermediate_size, num_heads, num_kv_heads,
 * head_dim (ints in 1..2^20, so products of them fit int64; heads a multiple of kv heads, head_dim
 * even) and eps (finite, >= 0). 0, or -1 with TypeError / ValueError naming the argument. */
int offq_parse_model_dims(PyObject *const dims_o[5], PyObject *eps_o, int64_t dims[5],
                          double *eps);

/* A float32 [n] array of finite values (or None -> NULL when allow_none) -> *out. */
int offq_parse_vector(PyObject *obj, const char *name, int64_t n, int allow_none,
                      const float **out);
/* ValueError unless 0 < v <= 2^40. */
int offq_positive(long long v, const char *name);
/* A C-contiguous array of dtype `typenum` and this shape (axes of length -1: any); writeable
 * when asked. */
PyArrayObject *offq_check_exact(PyObject *obj, const char *name, int typenum, int nd,
                                const npy_intp *shape, int writeable);

#endif
