"""Perplexity of a model on a text (docs/METHODS.md section 7, the perplexity protocol).

Protocol, stated with every number offq prints:

1. The eval text is read as UTF-8 and tokenized **once** as a whole, without special tokens.
2. The token stream is cut into non-overlapping windows; the remainder that does not fill a
   window is dropped. Every window is one model input of exactly ``seqlen`` tokens:
   * models that use a BOS (``ModelConfig.add_bos``, i.e. the model's own tokenizer prepends
     one): ``[BOS] + seqlen - 1`` text tokens, and all ``seqlen - 1`` text tokens are predicted;
   * models without one (SmolLM2: its GGUF says ``tokenizer.ggml.add_bos_token = false`` and
     its HF tokenizer adds no BOS): ``seqlen`` text tokens, the last ``seqlen - 1`` predicted.
   Either way a window contributes ``seqlen - 1`` predicted positions.
3. ``nll`` is the mean negative log-likelihood (natural log) over all predicted positions of all
   windows, ``ppl = exp(nll)``. ``max_windows=N`` evaluates only the first N windows.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import as_token_ids, check_positive, token_windows
from .model.decoder import Model
from .progress import Progress

log = logging.getLogger(__name__)

__all__ = ["EvalWindows", "make_windows", "perplexity", "load_model", "resolve_dataset",
           "load_dataset", "DATASETS"]

#: Named eval sets -> description (paths are found by `resolve_dataset`).
DATASETS: dict[str, str] = {"wikitext2": "WikiText-2 (raw) test split, wiki.test.raw"}


@dataclass(frozen=True)
class EvalWindows:
    """Token windows of the protocol: ``ids[windows, seqlen]`` int64 and the BOS flag."""

    ids: np.ndarray
    seqlen: int
    add_bos: bool
    stream_tokens: int  # tokens in the whole tokenized text


def _exp(x: float) -> float:
    """exp, saturating to inf (a broken model's mean NLL can exceed 709) instead of raising."""
    return math.exp(x) if x < 709.0 else float("inf")


def make_windows(tokens: Sequence[int] | np.ndarray, seqlen: int, *, bos_id: int | None = None,
                 max_windows: int | None = None) -> EvalWindows:
    """The windows of protocol step 2 (``offq.data.token_windows``), with the stream length.

    With ``bos_id`` each window is ``[bos_id] + seqlen - 1`` stream tokens, otherwise ``seqlen``
    stream tokens. The remainder is dropped; ``max_windows`` keeps the first N windows.
    """
    stream = as_token_ids(tokens)
    ids = token_windows(stream, seqlen, bos_id=bos_id, max_windows=max_windows)
    return EvalWindows(ids=ids, seqlen=int(seqlen), add_bos=bos_id is not None,
                       stream_tokens=int(stream.size))


def resolve_dataset(name_or_path: str | os.PathLike) -> Path:
    """Path of an eval text: an existing file, or a name of `DATASETS` (``wikitext2``: the
    WikiText-2 raw test split shipped inside the package)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    key = str(name_or_path).lower()
    if key not in DATASETS:
        raise ValueError(f"dataset: {str(name_or_path)!r} is neither a file nor a known dataset "
                         f"(known: {sorted(DATASETS)})")
    from .data import wikitext2_test_path
    return wikitext2_test_path()


def load_dataset(name_or_path: str | os.PathLike) -> str:
    """The eval text as one string (UTF-8; WikiText-2 is checked against its SHA-256)."""
    path = resolve_dataset(name_or_path)
    if str(name_or_path).lower() == "wikitext2":
        from .data import load_wikitext2_test
        return load_wikitext2_test(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8: {e}") from e


def load_model(model: Any, *, mode: str = "real", attention: str = "float",
               **kwargs: Any) -> tuple[Model, Any]:
    """``(Model, tokenizer)`` from a Model, a Checkpoint, or a path / registered name.

    A path to an offq checkpoint directory (quantized), or to a GPTQ-layout directory
    (``offq.formats.gptq_export``), is run by ``offq.quant.assemble.load_quantized`` with the
    real W4A4 kernels (``mode="real"``), on the fused C decoder (``"fused"``; ``"auto"`` takes it
    where the checkpoint qualifies, else "real") or simulated in float32 (``mode="fake"``);
    anything else is opened by ``offq.formats.open_checkpoint`` and runs in float32.
    ``attention="int8"``: the fused W4A4KV4 decoder's opt-in 8-bit attention (offq checkpoints
    only, see ``load_quantized``). ``kwargs`` go to ``Model.from_checkpoint``.
    """
    from .formats.checkpoint import is_offq_checkpoint

    if attention != "float" and not (isinstance(model, (str, os.PathLike))
                                     and is_offq_checkpoint(model)):
        raise ValueError(f"attention: {attention!r} runs on the fused C decoder of an offq "
                         "W4A4KV4 checkpoint directory; this model is not one")
    if isinstance(model, Model):
        return model, model.tokenizer
    if isinstance(model, (str, os.PathLike)):
        from .quant.assemble import load_quantized
        from .formats.gptq_export import is_gptq_export, load_gptq_export
        if is_offq_checkpoint(model) or is_gptq_export(model):
            load = load_quantized if is_offq_checkpoint(model) else load_gptq_export
            m, tok, qcfg = (load(model, mode=mode, attention=attention)
                            if load is load_quantized else load(model, mode=mode))
            m.tokenizer = tok
            if load is not load_quantized:  # (load_quantized's models carry their label)
                m.method = (f"gptq-format export W{qcfg.w_bits} group {qcfg.w_group_size} "
                            f"{'sym' if qcfg.w_symmetric else 'asym'} "
                            f"({m.built_mode})")
            return m, tok
        from .formats import open_checkpoint
        model = open_checkpoint(model)
    elif not (hasattr(model, "config") and hasattr(model, "tensors")):
        raise TypeError(f"model: expected a Model, a Checkpoint, or a name / path, got "
                        f"{type(model).__name__}")
    if mode not in ("real", "auto"):  # a float model has no other path to choose
        log.warning("mode=%r ignored: %s is a float model, which runs in float32", mode,
                       getattr(model, "name", "the model"))
    m = Model.from_checkpoint(model, **kwargs)
    return m, m.tokenizer


def perplexity(model: Any, tokenizer: Any = None, text: str | Sequence[int] | None = None, *,
               seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int | None = None, add_bos: bool | None = None,
               quiet: bool | None = None, dataset: str = "", name: str | None = None
               ) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` with the protocol of the module docstring.

    Args:
        model: an ``offq.model.Model``, a Checkpoint, or a path / registered name.
        tokenizer: encodes the text (default: the checkpoint's): offq's, a path to a
            tokenizer.json (or its directory), a ``tokenizers.Tokenizer`` or a fast transformers
            tokenizer (its special tokens are not added: the protocol's BOS is ``add_bos``).
        text: the eval text, or an already tokenized stream (list of ids).
        seqlen: model input length per window.
        max_windows: evaluate only the first N windows.
        batch_size: windows per forward pass (default 1 for resident models, 4 when layers are
            streamed, so each layer is read once per 4 windows).
        add_bos: BOS per window; default ``model.config.add_bos``.
        quiet: True hides the progress; None (default) shows a bar on a terminal and a log line
            every few seconds otherwise (``offq.progress``).
        dataset: label recorded in the result.
        name: model label (default the model's name).

    Returns:
        dict with ``ppl``, ``nll`` (mean, nats), ``tokens`` (predicted positions), ``windows``,
        ``seqlen``, ``model``, ``method``, ``add_bos``, ``dataset``, ``stream_tokens``,
        ``seconds`` and ``tokens_per_s`` (model input tokens per second).
    """
    m, tok = load_model(model)
    if tokenizer is not None:  # a transformers / tokenizers one wrapped: encode(add_bos=False)
        from .formats.memory import as_tokenizer
        tokenizer = as_tokenizer(tokenizer)
    else:
        tokenizer = tok
    if text is None:
        raise ValueError("text: the eval text (or token ids) is required")
    context = getattr(m.config, "max_position_embeddings", None)
    if isinstance(seqlen, int) and not isinstance(seqlen, bool) and context is not None \
            and seqlen > int(context):
        raise ValueError(f"seqlen: {seqlen} tokens per window exceed the model's context of "
                         f"{int(context)} positions")
    if add_bos is None:
        add_bos = bool(getattr(m.config, "add_bos", False))
    elif not isinstance(add_bos, (bool, np.bool_)):
        raise ValueError(f"add_bos: expected True, False or None (the model's), got {add_bos!r}")
    bos_id = None
    if add_bos:
        bos_id = getattr(m.config, "bos_token_id", None)
        if bos_id is None and tokenizer is not None:
            bos_id = getattr(tokenizer, "bos_id", None)
        if bos_id is None:
            raise ValueError("add_bos: the model has no BOS token id")
    if isinstance(text, (bytes, bytearray)):
        raise TypeError("text: expected a str (or token ids), got bytes; decode it first")
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError(f"tokenizer: needed to encode the text, and {m.name or 'the model'}"
                             " has none (no tokenizer.json beside its weights): put the "
                             "model's tokenizer.json there, or from Python pass tokenizer= or "
                             "token ids")
        t0 = time.perf_counter()
        stream = tokenizer.encode(text, add_bos=False)
        log.info("tokenized %d characters -> %d tokens in %.1fs", len(text), len(stream),
                 time.perf_counter() - t0)
    else:
        stream = text
    win = make_windows(stream, seqlen, bos_id=bos_id, max_windows=max_windows)
    n = win.ids.shape[0]
    if batch_size is None:
        batch_size = 1 if m.resident else 4
    check_positive("batch_size", batch_size)
    batch_size = int(batch_size)
    label = name if name is not None else (m.name or "model")
    total_nll = 0.0
    count = 0
    t0 = time.perf_counter()
    with Progress(n * seqlen, f"ppl {label}", unit="tok",
                  show=None if quiet is None else not quiet) as bar:
        for s in range(0, n, batch_size):
            ids = win.ids[s:s + batch_size]
            nll = m.nll(ids)
            if not np.all(np.isfinite(nll)):  # would print nll=nan ppl=inf and succeed
                raise ValueError(f"{label}: window {s + int(np.argmax(~np.isfinite(nll).all(-1)))}"
                                 " has a NaN or Inf log-likelihood: the model computes non-finite "
                                 "values (NaN/Inf weights, or activations that overflow float32)")
            total_nll += float(nll.sum())
            count += nll.size
            bar.set_postfix(f"ppl {_exp(total_nll / count):.3f}")
            bar.update(ids.size)
    seconds = time.perf_counter() - t0
    mean = total_nll / count
    return {
        "model": label,
        "method": getattr(m, "method", "fp32"),
        "dataset": dataset,
        "seqlen": int(seqlen),
        "windows": int(n),
        "tokens": int(count),
        "add_bos": bool(add_bos),
        "stream_tokens": win.stream_tokens,
        "nll": mean,
        "ppl": _exp(mean),
        "seconds": seconds,
        "tokens_per_s": n * seqlen / seconds if seconds > 0 else float("nan"),
    }
