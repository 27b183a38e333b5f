/* quant.h: see offq.h. (placeholder; filled in by the quant kernels) */
#ifndef OFFQ_QUANT_H
#define OFFQ_QUANT_H
#include <stdint.h>
#endif
