"""offq: W4A4KV4 quantization of open LLMs (OffQ, GPTQ, OSAQ) with real 4-bit CPU kernels.

Importing offq loads OpenBLAS from the scipy-openblas32 wheel (the C core links against it)
before the extension module ``offq._C``. ``offq.quantize`` is ``offq.pipeline.quantize``
(imported on first use, so ``import offq`` stays light).

OpenMP threads that finish a kernel sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless
the environment already sets it): offq calls many short kernels from Python, and spinning waiters
steal the cores the next call (or OpenBLAS, or another process) needs; on a busy 2-core machine the
default made W4A4 prefill about 3x slower. It takes effect only if the OpenMP runtime was not
already started by another library.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import scipy_openblas32 as _openblas  # noqa: F401  (loads libscipy_openblas with RTLD_GLOBAL)

from . import _C  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "quantize"]


def quantize(*args, **kwargs):
    """Quantize a checkpoint: see :func:`offq.pipeline.quantize`."""
    from .pipeline import quantize as _quantize

    return _quantize(*args, **kwargs)
