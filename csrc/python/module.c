/* module.c: the extension module offq._C.
 *
 * Module init and the thread / dispatch controls. The kernels' bindings live beside their
 * concern (bind_hadamard.c, bind_quant.c, bind_cov.c), each exporting a method table that is
 * added here. Every binding parses, validates, releases the GIL and calls the C core.
 */
#define OFFQ_MODULE_MAIN
#include "bind_util.h"
#include "offq.h"

extern PyMethodDef offq_hadamard_methods[];
extern PyMethodDef offq_quant_methods[];
extern PyMethodDef offq_cov_methods[];

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "n: expected a thread count in [1, 4096], got %ld", n);
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
    return Py_BuildValue("{s:O,s:O,s:O}", "avx2", offq_cpu_has_avx2() ? Py_True : Py_False,
                         "avx512_vnni", offq_cpu_has_avx512_vnni() ? Py_True : Py_False,
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
        PyModule_AddFunctions(m, offq_cov_methods) < 0) {
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
    .m_doc = "offq C core: Hadamard transforms, group-wise quantization, W4A4 matmul, covariance.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
