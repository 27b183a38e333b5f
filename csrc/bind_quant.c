/* bind_quant.c: Python bindings of the quant kernels (placeholder). */
#include "bind_util.h"
#include "offq.h"

PyMethodDef offq_quant_methods[] = {
    {NULL, NULL, 0, NULL},
};
