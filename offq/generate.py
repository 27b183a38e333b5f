"""Text generation with the KV cache: greedy (default) or temperature sampling.

The prompt is prefilled in one forward pass (through the C step on the fused decoder); then one
token at a time is decoded against the cache (whatever ``kv_codec`` the layers use, so a KV4
model generates from its 4-bit cache). :func:`chat` answers a conversation with an instruct
model: the messages laid out by the model's chat template (offq/chat.py), then the reply.
:class:`Conversation` holds a chat across turns and keeps its KV cache between them, so that a
turn prefills only the tokens after what the cache already holds.
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

__all__ = ["GenerationConfig", "generate_ids", "generate", "chat", "Conversation"]


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
    context = _context(model)
    if ids.size > context:
        raise ValueError(f"{name}: {ids.size} tokens exceed the model's context of "
                         f"{context} positions")
    cache = model.new_cache()
    logits = _prompt_logits(model, ids, cache)
    yield from _decode(model, cache, logits, cfg, _stops(model, extra_stops))


def _context(model: Model) -> int:
    """Positions the model can attend over (its ``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 1 << 62))


def _stops(model: Model, extra_stops: tuple[int | None, ...]) -> set[int]:
    """The ids that end a generation: the model's EOS and ``extra_stops``."""
    return {t for t in (getattr(model.config, "eos_token_id", None), *extra_stops)
            if t is not None}


def _decode(model: Model, cache, logits: np.ndarray, cfg: GenerationConfig, stops: set[int],
            fed: list[int] | None = None) -> Iterator[int]:
    """Pick tokens from ``logits`` (the last cached position's) on, each fed back through
    ``cache``; every token fed is appended to ``fed`` as well, so that a caller knows what the
    cache holds (a stop token and the last token are not fed)."""
    rng = np.random.default_rng(cfg.seed)
    context = _context(model)
    for i in range(cfg.max_new_tokens):
        if not np.all(np.isfinite(logits)):  # argmax would pick token 0 again and again
            raise ValueError(f"logits: NaN or Inf at position {cache.length - 1}: the model "
                             "computes non-finite values (NaN/Inf weights, or activations that "
                             "overflow float32)")
        nxt = _pick(logits, cfg, rng)
        if cfg.stop_at_eos and nxt in stops:
            return
        yield nxt
        if i + 1 == cfg.max_new_tokens:
            return
        if cache.length >= context:  # the token would sit past the last position
            logger.warning("generation stopped after %d tokens: the model's context of %d "
                           "positions is full", i + 1, context)
            return
        logits = model.forward(np.asarray([[nxt]], dtype=np.int64), cache=cache,
                               last_only=True)[0, -1]
        if fed is not None:
            fed.append(nxt)


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


class Conversation:
    """A chat with an instruct model held across turns, its KV cache kept between them.

    Each :meth:`say` lays out the whole conversation with the chat template, as :func:`chat`
    does, but prefills only the tokens after the longest prefix the cache already holds (the
    earlier turns, and the last reply as it was generated); the cache is cut back to that prefix
    first. The reply is what :func:`chat` gives on the same messages, up to float rounding of
    a prompt that is prefilled in two pieces instead of one (greedy replies may then differ
    where two tokens' logits tie to ~1e-5). When the conversation and the next reply's budget
    (``cfg.max_new_tokens``, at most half the context) no longer fit the model's context, the
    oldest exchanges (a user message and its reply) are dropped, with a warning; the system
    message stays. A turn that fails (an error, an interrupt) leaves :attr:`messages` as they
    were and the cache holding the part of its prompt it shared with the turns before.

    Example::

        model, tokenizer, _ = offq.load_quantized("runs/offq")
        talk = Conversation(model, system="Answer briefly.")
        print(talk.say("What is the capital of France?"))
        print(talk.say("And of Italy?"))          # prefills this turn's tokens only

    Attributes:
        messages: the conversation so far (system, then user and assistant turns); read it,
            :meth:`reset` clears it.
        last_reused: tokens of the last turn's prompt that the cache already held.
        last_prefilled: tokens the last turn prefilled.
    """

    def __init__(self, model: Model, tokenizer=None, *, system: str | None = None,
                 cfg: GenerationConfig = GenerationConfig()) -> None:
        self._tokenizer = _text_arguments(model, tokenizer, cfg, None)
        self._model, self.cfg = model, cfg
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system: expected a str or None, got {type(system).__name__}")
        self._system = system
        self._tokenizer.require_chat_template()  # now, not at the first turn
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message stays) and the cache."""
        self.messages: list[dict[str, str]] = (
            [] if self._system is None else [{"role": "system", "content": self._system}])
        self._cache = None
        self._cached: list[int] = []  # the token ids whose K/V the cache holds, in order
        self.last_reused = self.last_prefilled = 0

    def say(self, content: str, *, on_token: Callable[[str], None] | None = None) -> str:
        """The assistant's reply to the user message ``content``, which both join
        :attr:`messages`; ``on_token`` as in :func:`generate`. When this fails (an error, an
        interrupt) :attr:`messages` are left as they were before the call."""
        if not isinstance(content, str):
            raise TypeError(f"content: expected a str, got {type(content).__name__}")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token: expected a callable taking each new piece of text, got "
                            f"{type(on_token).__name__}")
        messages, ids = self._fitted(self.messages + [{"role": "user", "content": content}])
        cache = self._cache
        keep = _common_prefix(self._cached, ids) if cache is not None else 0
        keep = min(keep, len(ids) - 1)  # the last prompt token gives the first logits
        if keep == 0:
            cache = self._model.new_cache()
        else:
            cache.truncate(keep)
        # Whatever fails from here on, every layer's first `keep` positions stay as they are
        # (a forward only writes after them), so a failed turn leaves a cache of that prefix.
        self._cache, self._cached = cache, ids[:keep]
        logits = _prompt_logits(self._model, np.asarray(ids[keep:], dtype=np.int64), cache)
        fed = list(ids)
        tokens = _decode(self._model, cache, logits, self.cfg,
                         _stops(self._model, (self._tokenizer.eos_id,)), fed)
        reply = _stream_tokens(self._tokenizer, tokens, on_token)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self._cached = fed
        self.last_reused, self.last_prefilled = keep, len(ids) - keep
        return reply

    def _fitted(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
        """``messages`` without their oldest exchanges as far as needed for the prompt and the
        reply's budget (``cfg.max_new_tokens``, at most half the context) to fit the context,
        and the prompt's token ids; ValueError when the system message and the new one alone
        do not fit (with room for less of a reply, the reply stops early, with a warning)."""
        context = _context(self._model)
        room = min(max(1, self.cfg.max_new_tokens), max(1, context // 2))
        first = 1 if self._system is not None else 0
        while True:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = list(self._tokenizer.encode(text, add_bos=False))
            if len(ids) + room <= context or len(messages) <= first + 1:
                break
            messages = messages[:first] + messages[first + 2:]
            logger.warning("the conversation fills the model's context of %d positions: its "
                           "oldest exchange is dropped", context)
        if not ids:
            raise ValueError("messages: the chat template renders them as no tokens")
        if len(ids) > context:
            raise ValueError(f"content: the prompt's {len(ids)} tokens exceed the model's "
                             f"context of {context} positions")
        return messages, ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
    return _stream_tokens(tokenizer, _generate_ids(model, ids, cfg, name, extra_stops), on_token)


def _stream_tokens(tokenizer, tokens: Iterator[int],
                   on_token: Callable[[str], None] | None) -> str:
    """The text of ``tokens``, each complete piece passed to ``on_token`` as it comes."""
    out: list[int] = []
    shown = ""
    for t in tokens:
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
