"""Text generation with the KV cache: greedy (default) or temperature sampling.

The prompt is prefilled in one forward pass; then one token at a time is decoded against the
cache (whatever ``kv_codec`` the layers use, so a KV4 model generates from its 4-bit cache).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .data import as_token_ids
from .model.decoder import Model

logger = logging.getLogger(__name__)

__all__ = ["GenerationConfig", "generate_ids", "generate"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens.

    Attributes:
        max_new_tokens: tokens to generate at most.
        temperature: 0 -> greedy (argmax); > 0 -> sample from ``softmax(logits / temperature)``.
        top_k: sample only among the k most likely tokens (None: all).
        seed: seed of the ``numpy.random.Generator`` used for sampling.
        stop_at_eos: stop when the model emits its EOS token (which is not returned).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an integer >= 0, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not (self.temperature >= 0.0) or not np.isfinite(self.temperature):
            raise ValueError(f"temperature: expected a finite value >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k: expected a positive integer or None, got {self.top_k!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pick(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    # shift first: the largest logit becomes 0, so a tiny temperature gives -inf, never NaN
    with np.errstate(over="ignore"):  # -x / tiny -> -inf, the intended limit
        z = (logits.astype(np.float64) - float(np.max(logits))) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def generate_ids(model: Model, prompt_ids: list[int], cfg: GenerationConfig = GenerationConfig()
                 ) -> Iterator[int]:
    """Yield generated token ids one by one after ``prompt_ids`` (non-empty). Generation stops
    early, with a warning, when the model's context (``max_position_embeddings``) is full."""
    ids = as_token_ids(prompt_ids, "prompt_ids")
    if ids.size == 0:
        raise ValueError("prompt_ids: the prompt must contain at least one token")
    rng = np.random.default_rng(cfg.seed)
    eos = getattr(model.config, "eos_token_id", None)
    context = int(getattr(model.config, "max_position_embeddings", 1 << 62))
    cache = model.new_cache()
    logits = model.forward(ids[None, :], cache=cache, last_only=True)[0, -1]
    for i in range(cfg.max_new_tokens):
        if not np.all(np.isfinite(logits)):  # argmax would pick token 0 again and again
            raise ValueError(f"logits: NaN or Inf at position {ids.size + i - 1}: the model "
                             "computes non-finite values (NaN/Inf weights, or activations that "
                             "overflow float32)")
        nxt = _pick(logits, cfg, rng)
        if cfg.stop_at_eos and eos is not None and nxt == eos:
            return
        yield nxt
        if i + 1 == cfg.max_new_tokens:
            return
        if ids.size + i >= context:  # token i would sit at position P + i, past the last
            logger.warning("generation stopped after %d tokens: the model's context of %d "
                           "positions is full", i + 1, context)
            return
        logits = model.forward(np.asarray([[nxt]], dtype=np.int64), cache=cache,
                               last_only=True)[0, -1]


def generate(model: Model, tokenizer, prompt: str, cfg: GenerationConfig = GenerationConfig(), *,
             on_token: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of ``prompt``; returns the generated text (without the prompt).

    ``on_token`` receives each newly decoded piece of text as it is produced (streaming output).
    A BOS is prepended to the prompt when the model uses one (``config.add_bos``).
    """
    add_bos = bool(getattr(model.config, "add_bos", False)) and tokenizer.bos_id is not None
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    out: list[int] = []
    shown = ""
    for t in generate_ids(model, ids, cfg):
        out.append(t)
        if on_token is not None:
            text = tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
                on_token(text[len(shown):])
                shown = text
    text = tokenizer.decode(out)
    if on_token is not None and len(text) > len(shown):
        on_token(text[len(shown):])
    return text
