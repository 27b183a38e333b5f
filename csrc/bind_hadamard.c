/* bind_hadamard.c: Python bindings of the hadamard kernels (placeholder). */
#include "bind_util.h"
#include "offq.h"

PyMethodDef offq_hadamard_methods[] = {
    {NULL, NULL, 0, NULL},
};
