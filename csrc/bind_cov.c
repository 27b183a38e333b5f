/* bind_cov.c: Python bindings of the cov kernels (placeholder). */
#include "bind_util.h"
#include "offq.h"

PyMethodDef offq_cov_methods[] = {
    {NULL, NULL, 0, NULL},
};
