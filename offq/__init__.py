"""offq: W4A4KV4 quantization of open LLMs (OffQ, GPTQ, OSAQ) with real 4-bit CPU kernels.

The method as one recipe (``offq.quantize``, docs/METHODS.md)::

    import offq
    with offq.open_checkpoint("smollm2-135m") as ckpt:       # HF dir, .gguf file or a name
        calib = offq.data.sample_calibration(ckpt.tokenizer, "wiki-vital", n=16, seqlen=512)
        result = offq.quantize(ckpt, offq.QuantConfig(method="offq"), calib, out_dir="runs/q")
    model, tokenizer, config = offq.load_quantized("runs/q")  # packed 4-bit kernels

Where things live (one concern per module):

- ``offq.kernels``: the C core's kernels on NumPy arrays (Hadamard, covariance, quantize,
  W4A4 matmul, threads);
- ``offq.model``: architectures as data (``arch``), the float32 decoder (``ops``, ``decoder``);
- ``offq.quant``: the grid, ``QuantizedWeight``, the activation quantizer, the KV codec, fake and
  real linears, model assembly;
- ``offq.quantizers``: RTN, GPTQ and OSAQ behind one interface and a registry;
- ``offq.recipe``: the pipeline, the statistics pass, the rotations, the checkpoint store;
- ``offq.formats``: safetensors, GGUF, tokenizers, the offq checkpoint format;
- ``offq.data`` / ``offq.eval`` / ``offq.generate`` / ``offq.cli``.

Importing offq loads OpenBLAS from the scipy-openblas32 wheel (the C core links against it)
before the extension module ``offq._C``. OpenMP threads that finish a kernel sleep instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the environment already sets it): offq calls many
short kernels from Python, and spinning waiters steal the cores the next call needs; on a busy
2-core machine the default made W4A4 prefill about 3x slower.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import scipy_openblas32 as _openblas  # noqa: E402,F401  (loads libscipy_openblas with RTLD_GLOBAL)

from . import _C  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = ["__version__", "QuantConfig", "quantize", "load_quantized", "open_checkpoint"]


def __getattr__(name: str):
    """The public names, imported on first use so that ``import offq`` stays light."""
    if name == "QuantConfig":
        from .config import QuantConfig
        return QuantConfig
    if name == "quantize":
        from .recipe.pipeline import quantize
        return quantize
    if name == "load_quantized":
        from .quant.assemble import load_quantized
        return load_quantized
    if name == "open_checkpoint":
        from .formats import open_checkpoint
        return open_checkpoint
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'offq' has no attribute {name!r}")


_SUBMODULES = ("data", "eval", "generate", "kernels", "model", "quant", "quantizers", "recipe",
               "formats", "config", "cli")
