/* module.c: the extension module offq._C.
 *
 * Module init (fills the dispatch table once), the thread / dispatch controls, and the shared
 * argument converters and status -> exception mapping of bind_util.h. The kernels' bindings live in
 * bind_hadamard.c, bind_quant.c, bind_cov.c, bind_linalg.c, bind_gptq.c, bind_decoder.c,
 * bind_decoder_wq.c, bind_matmul_i8.c, bind_matmul_wq.c, each exporting a method table added here. Every binding
 * parses, validates, releases the GIL and calls the C core.
 */
#define OFFQ_MODULE_MAIN
#include <omp.h>

#include "bind_util.h"

int offq_py_status(offq_status status, offq_errctx ctx)
{
    const char *arg = ctx.arg != NULL ? ctx.arg : "argument";
    switch (status) {
    case OFFQ_OK:
        return 0;
    case OFFQ_ERR_NONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: contains NaN or Inf (needs finite values)", arg);
        break;
    case OFFQ_ERR_OVERFLOW:
        PyErr_Format(PyExc_ValueError,
                     "%s: a group's range max - min overflows float32 (|values| near 3.4e38)", arg);
        break;
    case OFFQ_ERR_CODE:
        PyErr_Format(PyExc_ValueError, "%s: expected values in [0, %d] for %d bits", arg,
                     (1 << ctx.bits) - 1, ctx.bits);
        break;
    case OFFQ_ERR_UNSUPPORTED:
        if (ctx.kernel != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "kernel: '%s' is not available on this CPU (or OFFQ_DISABLE_SIMD is set)",
                         ctx.kernel);
        } else {
            PyErr_Format(PyExc_ValueError, "%s: not supported", arg);
        }
        break;
    case OFFQ_ERR_NOCONVERGE:
        PyErr_Format(PyExc_RuntimeError, "%s: the iterative solver did not converge", arg);
        break;
    case OFFQ_ERR_NOTPD:
        PyErr_Format(PyExc_ValueError, "%s: not positive definite (numerically)", arg);
        break;
    case OFFQ_ERR_NOMEM:
    default:
        PyErr_NoMemory();
        break;
    }
    return -1;
}

int offq_py_int(PyObject *obj, const char *name, long long *out)
{
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) { /* e.g. a 1-element array, whose __index__ refuses: name the argument */
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", name,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (overflow != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %S is out of range", name, obj);
        return -1;
    }
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

int offq_py_flag(PyObject *obj, const char *name, int *out)
{
    /* a bool, a NumPy bool, or the integers 0 / 1; anything else (a string such as "false",
     * an array, None) is refused rather than read by its truth value */
    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool)) {
        *out = PyObject_IsTrue(obj);
        return 0;
    }
    if (PyLong_Check(obj) || PyArray_IsScalar(obj, Integer)) {
        const long long v = PyLong_AsLongLong(obj);
        if (!(v == -1 && PyErr_Occurred()) && (v == 0 || v == 1)) {
            *out = (int)v;
            return 0;
        }
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected a bool (or 0 / 1), got %R", name, obj);
        return -1;
    }
    PyErr_Format(PyExc_TypeError, "%s: expected a bool, got %s", name, Py_TYPE(obj)->tp_name);
    return -1;
}

int offq_py_float(PyObject *obj, const char *name, double *out)
{
    if (!PyFloat_Check(obj) && !PyIndex_Check(obj) && !PyNumber_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = PyFloat_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

extern PyMethodDef offq_hadamard_methods[];
extern PyMethodDef offq_quant_methods[];
extern PyMethodDef offq_cov_methods[];
extern PyMethodDef offq_decoder_methods[];
extern PyMethodDef offq_decoder_wq_methods[];
extern PyMethodDef offq_matmul_i8_methods[];
extern PyMethodDef offq_linalg_methods[];
extern PyMethodDef offq_gptq_methods[];
extern PyMethodDef offq_matmul_wq_methods[];
extern PyMethodDef offq_gguf_methods[];
extern PyMethodDef offq_attention_f32_methods[];
extern PyMethodDef offq_attention_kv4_methods[];
extern PyMethodDef offq_norm_methods[];

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    long long n;
    if (offq_py_int(arg, "n", &n) < 0) {
        return NULL;
    }
    /* OpenMP ends the process when it cannot create a team's threads, so counts far above the
     * cores (each thread reserves a stack) are refused here instead */
    const long long most = 8LL * omp_get_num_procs() > 64 ? 8LL * omp_get_num_procs() : 64;
    if (n < 1 || n > most) {
        PyErr_Format(PyExc_ValueError,
                     "n: expected a thread count in [1, %lld] (8 per core, at least 64), got %lld",
                     most, n);
        return NULL;
    }
    offq_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(offq_get_num_threads());
}

static PyObject *py_simd_info(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O}", "avx2",
                         offq_cpu_has_avx2() ? Py_True : Py_False,
                         "avx512", offq_cpu_has_avx512() ? Py_True : Py_False,
                         "avx512_bw", offq_cpu_has_avx512bw() ? Py_True : Py_False,
                         "avx512_vbmi", offq_cpu_has_avx512_vbmi() ? Py_True : Py_False,
                         "avx512_vnni", offq_cpu_has_avx512_vnni() ? Py_True : Py_False,
                         "wq_subnormal_decode", offq_cpu_wq_subnormal() ? Py_True : Py_False,
                         "disabled_by_env", offq_cpu_simd_disabled() ? Py_True : Py_False);
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n): threads for offq's OpenMP kernels and for OpenBLAS."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"simd_info", py_simd_info, METH_NOARGS,
     "simd_info() -> dict of the SIMD paths the dispatcher may use."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m)
{
    if (PyArray_ImportNumPyAPI() < 0) {
        return -1;
    }
    offq_cpu_init();
    if (PyModule_AddFunctions(m, offq_hadamard_methods) < 0 ||
        PyModule_AddFunctions(m, offq_quant_methods) < 0 ||
        PyModule_AddFunctions(m, offq_cov_methods) < 0 ||
        PyModule_AddFunctions(m, offq_decoder_methods) < 0 ||
        PyModule_AddFunctions(m, offq_decoder_wq_methods) < 0 ||
        PyModule_AddFunctions(m, offq_matmul_i8_methods) < 0 ||
        PyModule_AddFunctions(m, offq_linalg_methods) < 0 ||
        PyModule_AddFunctions(m, offq_gptq_methods) < 0 ||
        PyModule_AddFunctions(m, offq_matmul_wq_methods) < 0 ||
        PyModule_AddFunctions(m, offq_gguf_methods) < 0 ||
        PyModule_AddFunctions(m, offq_attention_f32_methods) < 0 ||
        PyModule_AddFunctions(m, offq_attention_kv4_methods) < 0 ||
        PyModule_AddFunctions(m, offq_norm_methods) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "offq._C",
    .m_doc = "offq C core: Hadamard transforms, group-wise quantization, W4A4 matmul, weight-only W2/W3/W4/W8 x float32 matmul, covariance, the W4A4KV4 and weight-only decoder steps.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
