"""offq: W4A4KV4 quantization of open LLMs (OffQ, GPTQ, OSAQ) with real 4-bit CPU kernels.

OffQ rotates the residual stream with a top-1 PCA basis and a block Hadamard so that the massive
activation outliers of LLMs become a per-group constant that the asymmetric zero-point absorbs;
weights, activations and the KV cache then fit 4-bit uniform grids. offq quantizes models read
from disk or handed over in memory (Llama family, SmolLM2, Mistral, Qwen2/2.5) and runs them on
CPUs with integer 4-bit kernels (``offq._C``: C, OpenMP, OpenBLAS).

The API (docs/METHODS.md has every choice and default)::

    import offq
    ckpt = offq.load("smollm2-135m")                       # name, HF directory or .gguf
    # or, from a transformers script: offq.load(model.config.to_dict(), model.state_dict(),
    #                                           tokenizer=tokenizer)
    result = offq.quantize(ckpt, offq.QuantConfig(method="offq"))   # calibrates itself
    print(offq.perplexity(result, max_windows=4))          # WikiText-2, real 4-bit kernels
    offq.save(result, "runs/offq")
    model, tokenizer, config = offq.load_quantized("runs/offq")

- ``load``: a float model (``Checkpoint``) from a name, a path, or a config + state dict;
- ``QuantConfig``: every setting (method, bits, groups, rotations, calibration);
- ``quantize``: the recipe (fuse, calibrate, rotate, quantize, save) -> ``QuantizeResult``;
- ``perplexity``: offq's evaluation protocol on WikiText-2 (shipped) or any text;
- ``save`` / ``load_quantized``: the offq checkpoint directory;
- ``open_checkpoint``: the lower-level opener behind ``load``.

Where things live (one concern per module): ``offq.kernels`` (the C kernels on NumPy arrays),
``offq.model`` (architectures as data, the float32 decoder), ``offq.quant`` (grids, quantized
weights, fake and real linears), ``offq.quantizers`` (RTN, GPTQ, OSAQ), ``offq.recipe`` (the
pipeline, statistics, rotations, checkpoint store), ``offq.formats`` (safetensors, GGUF,
tokenizers, in-memory models), ``offq.data``, ``offq.eval``, ``offq.generate``, ``offq.outliers``
(activation statistics), ``offq.bench`` (benchmarks), ``offq.plots`` (figures, optional
matplotlib), ``offq.cli`` (the ``offq`` command).

Importing offq loads OpenBLAS from the scipy-openblas32 wheel (the C core links against it)
before the extension module ``offq._C``. OpenMP threads that finish a kernel sleep instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the environment already sets it): offq calls many
short kernels from Python, and spinning waiters steal the cores the next call needs; on a busy
2-core machine the default made W4A4 prefill about 3x slower.
"""
import os

#: OMP_WAIT_POLICY as the environment had it before offq's default (None: unset); programs offq
#: starts that are not offq (llama-bench in ``offq bench``) get it back
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import scipy_openblas32 as _openblas  # noqa: E402,F401  (loads libscipy_openblas with RTLD_GLOBAL)

try:
    from . import _C  # noqa: E402,F401
except ImportError:  # a source tree whose C core is not built (Python said "circular import")
    import importlib.machinery

    _here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.isfile(os.path.join(_here, "_C" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        raise  # built for this interpreter, and failing for another reason: say that one
    raise ImportError(
        f"offq's C core (offq._C) is not built in {_here}: this is a source tree. Build it there "
        "(pip install -e . or python setup.py build_ext --inplace), or use an installed offq "
        "from outside the source tree (python puts the current directory first on the path)"
    ) from None

__version__ = "0.1.0"

__all__ = ["__version__", "load", "QuantConfig", "quantize", "perplexity", "save",
           "load_quantized", "open_checkpoint"]


def __getattr__(name: str):
    """The public names, imported on first use so that ``import offq`` stays light."""
    if name == "QuantConfig":
        from .config import QuantConfig
        return QuantConfig
    if name in ("load", "quantize", "perplexity", "save"):
        from . import api
        return getattr(api, name)
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
               "formats", "config", "cli", "api", "bench", "outliers", "plots", "progress",
               "process")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
