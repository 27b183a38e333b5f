"""offq: W4A4KV4 quantization of open LLMs (OffQ, GPTQ, OSAQ) with real 4-bit CPU kernels.

Importing offq loads OpenBLAS from the scipy-openblas32 wheel (the C core links against it)
before the extension module ``offq._C``. ``offq.quantize`` is ``offq.pipeline.quantize``
(imported on first use, so ``import offq`` stays light).
"""
import scipy_openblas32 as _openblas  # noqa: F401  (loads libscipy_openblas with RTLD_GLOBAL)

from . import _C  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "quantize"]


def quantize(*args, **kwargs):
    """Quantize a checkpoint: see :func:`offq.pipeline.quantize`."""
    from .pipeline import quantize as _quantize

    return _quantize(*args, **kwargs)
