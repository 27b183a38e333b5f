"""Text generation with the KV cache: greedy (default) or temperature sampling.

The prompt is prefilled in one forward pass (through the C step on the fused decoder); then one
token at a time is decoded against the cache (whatever ``kv_codec`` the layers use, so a KV4
model generates from its 4-bit cache). :func:`chat` answers a conversation with an instruct
model: the messages laid out by the model's chat template (offq/chat.py), then the reply.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .data import as_token_ids
from .model.decoder import Model

logger = logging.getLogger(__name__)

__all__ = ["GenerationConfig", "generate_ids", "generate", "chat"]


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
        if isinstance(self.temperature, (bool, np.bool_)) or \
                not isinstance(self.temperature, (int, float, np.integer, np.floating)) \
                or not (self.temperature >= 0.0) or not np.isfinite(self.temperature):
            raise ValueError(f"temperature: expected a finite value >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k: expected a positive integer or None, got {self.top_k!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if not isinstance(self.stop_at_eos, (bool, np.bool_)):
            raise ValueError(f"stop_at_eos: expected True or False, got {self.stop_at_eos!r}")


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
    return _generate_ids(model, prompt_ids, cfg, "prompt_ids")


def _generate_ids(model: Model, prompt_ids: list[int], cfg: GenerationConfig, name: str,
                  extra_stops: tuple[int | None, ...] = ()) -> Iterator[int]:
    """:func:`generate_ids`, its errors about the prompt naming ``name`` (the argument the
    caller gave: token ids, or the text of :func:`generate`); with ``cfg.stop_at_eos`` it stops
    at the model's EOS and at the ids of ``extra_stops`` too."""
    _check_arguments(model, cfg)
    ragged = ValueError(f"{name}: expected one prompt (a flat list of token ids), got nested "
                        "lists of different lengths")
    try:
        with warnings.catch_warnings():  # NumPy < 1.24 warns and makes an object array
            warnings.simplefilter("ignore")
            ids = np.asarray(prompt_ids)
    except ValueError:  # ragged nested lists (NumPy >= 1.24)
        raise ragged from None
    if ids.dtype == object and any(isinstance(p, (list, tuple, np.ndarray)) for p in ids.flat):
        raise ragged
    if ids.ndim == 2 and ids.shape[0] == 1:  # one prompt as a batch of one (return_tensors)
        ids = ids[0]
    if ids.ndim > 1:  # a batch would be read as one prompt
        raise ValueError(f"{name}: expected one prompt (a flat list of token ids), got "
                         f"shape {ids.shape}")
    ids = as_token_ids(ids, name)
    if ids.size == 0:
        raise ValueError(f"{name}: empty (a prompt needs at least one token)")
    rng = np.random.default_rng(cfg.seed)
    stops = {t for t in (getattr(model.config, "eos_token_id", None), *extra_stops)
             if t is not None}
    context = int(getattr(model.config, "max_position_embeddings", 1 << 62))
    if ids.size > context:
        raise ValueError(f"{name}: {ids.size} tokens exceed the model's context of "
                         f"{context} positions")
    cache = model.new_cache()
    logits = _prompt_logits(model, ids, cache)
    for i in range(cfg.max_new_tokens):
        if not np.all(np.isfinite(logits)):  # argmax would pick token 0 again and again
            raise ValueError(f"logits: NaN or Inf at position {ids.size + i - 1}: the model "
                             "computes non-finite values (NaN/Inf weights, or activations that "
                             "overflow float32)")
        nxt = _pick(logits, cfg, rng)
        if cfg.stop_at_eos and nxt in stops:
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


def _prompt_logits(model: Model, ids: np.ndarray, cache) -> np.ndarray:
    """The last position's logits after prefilling ``ids`` into ``cache``. The fused C decoder
    runs prompts through its NumPy path by default (``prefill="numpy"``), so that a perplexity
    equals the real path's to the bit; a generation needs no such identity, and takes
    ``prefill="auto"``: the C step, 1.4-3x faster on prompts of 64-256 tokens (SmolLM2-135M,
    2 threads, 2026-12-07; benchmarks/results_speed.md)."""
    runner = getattr(model, "fused_runner", None)
    if getattr(runner, "prefill", None) != "numpy":
        return model.forward(ids[None, :], cache=cache, last_only=True)[0, -1]
    runner.prefill = "auto"
    try:
        return model.forward(ids[None, :], cache=cache, last_only=True)[0, -1]
    finally:
        runner.prefill = "numpy"


def _check_arguments(model: object, cfg: object) -> None:
    """TypeError naming ``model`` or ``cfg`` when they are not what generation runs on."""
    if not (callable(getattr(model, "forward", None)) and callable(getattr(model, "new_cache",
                                                                            None))):
        raise TypeError(f"model: expected a runnable offq Model (offq.load_quantized(...)[0], "
                        f"QuantizeResult.model(), Model.from_checkpoint(...)), got "
                        f"{type(model).__name__}")
    if not isinstance(cfg, GenerationConfig):
        raise TypeError(f"cfg: expected an offq.generate.GenerationConfig, got "
                        f"{type(cfg).__name__}")


def generate(model: Model, tokenizer, prompt: str, cfg: GenerationConfig = GenerationConfig(), *,
             on_token: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of ``prompt``; returns the generated text (without the prompt).

    ``tokenizer``: None takes the model's (``model.tokenizer``, set by ``load_quantized``).
    ``on_token`` receives each newly decoded piece of text as it is produced (streaming output).
    A BOS is prepended to the prompt when the model uses one (``config.add_bos``).
    """
    tokenizer = _text_arguments(model, tokenizer, cfg, on_token)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a str (token ids go to generate_ids), got "
                        f"{type(prompt).__name__}")
    # the model's BOS first, as perplexity takes it (a raw tokenizers.Tokenizer knows none)
    bos = getattr(model.config, "bos_token_id", None)
    bos = tokenizer.bos_id if bos is None else bos
    add_bos = bool(getattr(model.config, "add_bos", False)) and bos is not None
    ids = ([int(bos)] if add_bos else []) + list(tokenizer.encode(prompt, add_bos=False))
    return _stream_text(model, tokenizer, ids, cfg, on_token, "prompt")


def chat(model: Model, tokenizer, messages: list[dict[str, str]],
         cfg: GenerationConfig = GenerationConfig(), *,
         on_token: Callable[[str], None] | None = None) -> str:
    """The assistant's reply to a conversation, for instruct models.

    ``messages``: ``[{"role": "system" | "user" | "assistant", "content": "..."}, ...]``, laid
    out by the model's chat template (``Tokenizer.apply_chat_template``; the template writes any
    BOS it wants) and followed by the assistant's header; the reply ends at the model's EOS or
    the tokenizer's (the end-of-turn token of instruct models: a Llama-3 Instruct config lists
    several EOS ids, of which offq keeps the first, while its tokenizer's is ``<|eot_id|>``), or
    after ``cfg.max_new_tokens``. ``tokenizer`` and ``on_token`` as in :func:`generate`.
    ValueError when the model has no chat template.
    """
    tokenizer = _text_arguments(model, tokenizer, cfg, on_token)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return _stream_text(model, tokenizer, list(tokenizer.encode(text, add_bos=False)), cfg,
                        on_token, "messages", extra_stops=(tokenizer.eos_id,))


def _text_arguments(model: Model, tokenizer, cfg: GenerationConfig,
                    on_token: Callable[[str], None] | None):
    """Check what :func:`generate` and :func:`chat` share -> the tokenizer as offq's own."""
    _check_arguments(model, cfg)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("tokenizer: the model has none (no tokenizer.json beside its "
                             "weights); pass one, or call generate_ids with token ids")
    from .formats.memory import as_tokenizer

    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token: expected a callable taking each new piece of text, got "
                        f"{type(on_token).__name__}")
    return as_tokenizer(tokenizer)  # a transformers one must not add its BOS on its own


def _stream_text(model: Model, tokenizer, ids: list[int], cfg: GenerationConfig,
                 on_token: Callable[[str], None] | None, name: str,
                 extra_stops: tuple[int | None, ...] = ()) -> str:
    """Generate after ``ids`` and return the new text, passing each complete piece to
    ``on_token``; errors about the prompt name ``name``."""
    out: list[int] = []
    shown = ""
    for t in _generate_ids(model, ids, cfg, name, extra_stops):
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
