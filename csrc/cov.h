/* cov.h: see offq.h. (placeholder; filled in by the cov kernels) */
#ifndef OFFQ_COV_H
#define OFFQ_COV_H
#include <stdint.h>
#endif
