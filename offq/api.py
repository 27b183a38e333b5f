"""The Python API for scripts and notebooks (every name here is importable from ``offq``).

::

    import offq
    ckpt = offq.load("smollm2-135m")                  # a name, HF directory or .gguf file
    ckpt = offq.load(hf_model.config.to_dict(), hf_model.state_dict(), tokenizer=hf_tok)
    result = offq.quantize(ckpt, offq.QuantConfig(method="offq"))   # calibrates by itself
    print(offq.perplexity(result, max_windows=4)["ppl"])             # WikiText-2, real kernels
    offq.save(result, "runs/offq")
    model, tokenizer, config = offq.load_quantized("runs/offq")
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load", "quantize", "perplexity", "save"]

logger = logging.getLogger(__name__)


def load(source: Any, state_dict: Mapping[str, Any] | None = None, *, tokenizer: Any = None,
         name: str | None = None) -> Any:
    """Open a float model for quantization or evaluation: a ``Checkpoint``.

    Args:
        source: a registered name (``"smollm2-135m"``), a HF checkpoint directory, a ``.gguf``
            file; or, with ``state_dict``, the model's HF config (a dict, or a transformers
            ``PretrainedConfig``).
        state_dict: HF tensor names -> arrays (``model.state_dict()``: torch tensors, bfloat16
            included, or NumPy arrays), for a model already in memory.
        tokenizer: with ``state_dict``: a path, a ``tokenizers.Tokenizer`` or a fast
            transformers tokenizer (optional; needed to calibrate or evaluate on text).
        name: display name (default: the registered name, file or directory name).

    Tensors are read lazily and converted to float32 on access; the checkpoint can be used as a
    context manager to release its files. An offq (quantized) checkpoint directory is opened with
    :func:`offq.load_quantized` instead.
    """
    if state_dict is not None:
        if isinstance(source, (str, os.PathLike)):
            raise TypeError("source: with state_dict=, the model's HF config (a dict or a "
                            "transformers PretrainedConfig), not a name or path")
        from .formats.memory import from_state_dict
        return from_state_dict(source, state_dict, tokenizer=tokenizer,
                               name=name or "in-memory")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a name or path (or a config with state_dict=), got "
                        f"{type(source).__name__}")
    if tokenizer is not None:
        raise ValueError("tokenizer: only for a model given in memory (state_dict=); a file "
                         "or directory brings its own")
    from .formats.checkpoint import is_offq_checkpoint
    if is_offq_checkpoint(source):
        raise ValueError(f"{source}: an offq (quantized) checkpoint; open it with "
                         "offq.load_quantized")
    from .formats import open_checkpoint
    ckpt = open_checkpoint(source)
    if name:
        ckpt.name = name
    return ckpt


def quantize(model: Any, config: Any = None, calibration: Any = None, *,
             out_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Quantize ``model`` with ``config`` (default ``QuantConfig()``: OffQ W4A4KV4, GPTQ).

    Args:
        model: a ``Checkpoint`` (:func:`load`), or a name / path (opened and closed here).
        config: an ``offq.QuantConfig``.
        calibration: token ids ``[samples, seqlen]``; or a corpus (``"wiki-vital"``;
            ``"wiki-vital-chat"``, the same summaries as exchanges in the model's chat
            template, for instruct models; a ``.txt``/``.jsonl`` path, or a list of strings)
            to draw ``config.calib_samples x config.calib_seqlen`` tokens from (seed
            ``config.seed``);
            None draws them from the default corpus when the method needs calibration.
        out_dir: write the offq checkpoint there as layers finish (resumable); None keeps the
            result in memory (:func:`save` writes it later).
        kwargs: passed to :func:`offq.recipe.pipeline.quantize` (``resume``, ``batch_size``,
            ``progress``, ``hold_freed_memory``).

    Returns:
        A ``QuantizeResult``: ``.model("real")`` runs it on the 4-bit kernels, ``.timings``
        holds each stage's seconds.
    """
    from .config import QuantConfig
    from .recipe.pipeline import needs_calibration
    from .recipe.pipeline import quantize as run_recipe

    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected an offq.QuantConfig, got {type(config).__name__}")
    if isinstance(model, (str, os.PathLike)):
        with load(model) as ckpt:
            return quantize(ckpt, config, calibration, out_dir=out_dir, **kwargs)
    if not (hasattr(model, "config") and hasattr(model, "tensors")):  # a Checkpoint, duck-typed
        raise TypeError(f"model: expected a Checkpoint (offq.load) or a model name / path, got "
                        f"{type(model).__name__}")
    if not needs_calibration(config):
        if calibration is not None:
            logger.warning("calibration ignored: %s needs none", config.describe())
        return run_recipe(model, config, None, out_dir=out_dir, **kwargs)
    if isinstance(calibration, (list, tuple)) and calibration and \
            all(isinstance(c, (list, tuple, np.ndarray)) for c in calibration):
        lengths = {len(c) for c in calibration}  # token ids as nested lists
        if len(lengths) > 1:
            raise ValueError(f"calibration: token id sequences must share one length, got "
                             f"lengths {sorted(lengths)}")
        calibration = np.asarray(calibration)
    elif isinstance(calibration, (list, tuple)) and calibration and \
            all(isinstance(c, (int, np.integer)) for c in calibration):
        raise ValueError("calibration: token ids go as [samples, seqlen] (a list of lists or a "
                         "2-D array), got one flat list of integers")
    if calibration is not None and not isinstance(calibration, (np.ndarray, str, os.PathLike,
                                                                 list, tuple)):
        raise TypeError(f"calibration: expected token ids [samples, seqlen], a corpus name or "
                        f"path, or a list of texts, got {type(calibration).__name__}")
    if calibration is None or not isinstance(calibration, np.ndarray):
        from .data import DEFAULT_CALIBRATION, sample_calibration
        source = DEFAULT_CALIBRATION if calibration is None else calibration
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("calibration: the model has no tokenizer to encode the corpus; pass "
                             "token ids [samples, seqlen] or a tokenizer to offq.load")
        calibration = sample_calibration(model.tokenizer, source, n=config.calib_samples,
                                         seqlen=config.calib_seqlen, seed=config.seed,
                                         add_bos=bool(model.config.add_bos))
        kwargs.setdefault("calibration_source", source if isinstance(source, (str, Path))
                          else "in-memory documents")
        kwargs.setdefault("calibration_seed", config.seed)
    return run_recipe(model, config, calibration, out_dir=out_dir, **kwargs)


def perplexity(model: Any, text: str | Sequence[int] | None = None, *, tokenizer: Any = None,
               seqlen: int = 2048, max_windows: int | None = None, mode: str = "real",
               attention: str = "float", **kwargs: Any) -> dict[str, Any]:
    """Perplexity with offq's protocol (non-overlapping windows, docs/METHODS.md section 7).

    Args:
        model: a ``QuantizeResult`` (run on the ``mode`` path), a runnable ``Model``, a
            ``Checkpoint`` (float32), or a name / path (an offq checkpoint directory runs on
            the ``mode`` path).
        text: the eval text or token ids; default the WikiText-2 test split shipped with offq.
        tokenizer: encodes ``text`` (default: the model's): offq's, a path to a tokenizer.json
            (or its directory), a ``tokenizers.Tokenizer`` or a fast transformers tokenizer.
        seqlen, max_windows: window length and how many windows (default all).
        mode: ``"real"`` (4-bit kernels), ``"fake"`` (float32 simulation), ``"fused"`` (the C
            decoders, W4A4KV4 and weight-only) or ``"auto"`` (fused where the model qualifies,
            else real). A built ``Model`` runs the path it was built for: "real" and "auto"
            accept it, another path is a ValueError; a float model runs float32 whatever the
            mode (a warning names an ignored one).
        attention: ``"int8"`` runs the fused decoder's opt-in 8-bit attention (mode ``"fused"``
            or ``"auto"``; every window through the C step), ``"float"`` (default) the float
            attention.
        kwargs: passed to :func:`offq.eval.perplexity` (``batch_size``, ``quiet``, ``name``).

    Returns:
        A dict with ``ppl``, ``nll``, ``tokens``, ``windows``, ``seqlen``, ``tokens_per_s`` and
        the protocol fields (``model``, ``method``, ``dataset``, ``add_bos``).
    """
    from .eval import load_model
    from .eval import perplexity as run_eval
    from .model import Model
    from .quant.assemble import MODES
    from .recipe.pipeline import QuantizeResult

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")

    dataset = kwargs.pop("dataset", "")
    if text is None:
        from .data import load_wikitext2_test
        text, dataset = load_wikitext2_test(), dataset or "wikitext2"
    if isinstance(model, QuantizeResult):
        runnable = model.model(mode, attention=attention)  # labelled by build_model
        runnable.name = runnable.name or model.name
        if tokenizer is None:
            tokenizer = model.tokenizer
        model = runnable
    elif isinstance(model, (str, os.PathLike)):
        model, tok = load_model(model, mode=mode, attention=attention)
        tokenizer = tokenizer if tokenizer is not None else tok
    elif attention != "float":
        raise ValueError(f"attention: {attention!r} is chosen when the model is built (an offq "
                         "checkpoint path or a QuantizeResult), not for a built Model; set its "
                         "fused_runner.attention instead")
    elif isinstance(model, Model) and model.built_mode is not None:
        # "real" (the default) and "auto" take the path the model was built for ("fused" gives
        # the same perplexity as "real"); another explicit path cannot be had from a built Model
        if mode not in ("real", "auto", model.built_mode):
            raise ValueError(f"mode: {mode!r} is chosen when the model is built (an offq "
                             "checkpoint path, a QuantizeResult or offq.load_quantized(mode=)); "
                             f"this Model was built for {model.built_mode!r}")
    elif not isinstance(model, Model):  # a Checkpoint (load_model warns of an ignored mode)
        model, tok = load_model(model, mode=mode)
        tokenizer = tokenizer if tokenizer is not None else tok
    elif mode not in ("real", "auto"):
        logger.warning("mode=%r ignored: %s is a float model, which runs in float32", mode,
                       model.name or "the model")
    return run_eval(model, tokenizer, text, seqlen=seqlen, max_windows=max_windows,
                    dataset=dataset, **kwargs)


def save(result: Any, out_dir: str | os.PathLike) -> Path:
    """Write a ``QuantizeResult`` kept in memory as an offq checkpoint directory (model
    safetensors, tokenizer, config.json written last, every file atomically)."""
    from .recipe.pipeline import QuantizeResult

    if not isinstance(result, QuantizeResult):
        raise TypeError(f"result: expected what offq.quantize returned, got "
                        f"{type(result).__name__}")
    return result.save(out_dir)
