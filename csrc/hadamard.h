/* hadamard.h: see offq.h. (placeholder; filled in by the hadamard kernels) */
#ifndef OFFQ_HADAMARD_H
#define OFFQ_HADAMARD_H
#include <stdint.h>
#endif
