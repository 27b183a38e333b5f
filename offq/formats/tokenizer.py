"""The model's tokenizer: a thin wrapper over a ``tokenizers.Tokenizer``.

Two sources:

* `Tokenizer.from_hf_dir(path)`: ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``config.json``
  for the BOS / EOS tokens, and the chat template from ``tokenizer_config.json`` or
  ``chat_template.jinja``) of a HuggingFace checkpoint directory.
* ``offq.formats.gguf.build_gguf_tokenizer(reader_or_path)``: rebuilt from the GGUF metadata
  (``tokenizer.ggml.*``, and ``tokenizer.chat_template``).

`encode` never adds special tokens by itself; ``add_bos=True`` prepends ``bos_id``. Whether a model
*wants* a BOS (what its own tokenizer does when asked for special tokens) is `adds_bos`, which the
loaders copy into ``ModelConfig.add_bos``. offq never pads or truncates: a ``padding`` /
``truncation`` block of a tokenizer.json is dropped.

Tokenizer files are untrusted: every call into ``tokenizers`` goes through `_guarded`, which turns
its errors (a plain ``Exception``, or a Rust panic, a ``BaseException``) into a ValueError naming
the file. What cannot be caught that way, an allocation failure, which aborts the process, is
refused before loading: a normalizer that can turn one character into more than
`MAX_NORMALIZER_GROWTH` (`normalizer_growth`).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import tokenizers

from ..chat import MAX_TEMPLATE_CHARS, check_template, render_chat, template_from_config
from ..model.config import as_json_bool
from .files import atomic_write_text, read_json_object

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _guarded(source: str, doing: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``, a ``tokenizers`` call, with its failures as a ValueError
    "``source``: ``doing``: ...". A malformed file makes ``tokenizers`` raise a plain Exception
    or panic (pyo3's PanicException derives from BaseException, so ``except Exception`` misses
    it); only the interpreter's own control-flow exceptions pass through."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:
        msg = str(e)
        msg = msg if len(msg) <= 300 else msg[:300] + "..."  # a panic message may quote the input
        raise ValueError(f"{source}: {doing}: {type(e).__name__}: {msg}") from e


def _no_padding_or_truncation(backend: tokenizers.Tokenizer, source: str) -> tokenizers.Tokenizer:
    """``backend`` without padding or truncation (a copy when it had either, so a caller's object
    is left alone): a file's ``padding`` block would pad every encode (to 2**40 ids: an abort
    in Rust's allocator) and a ``truncation`` block would silently cut eval / calibration text."""
    if backend.padding is None and backend.truncation is None:
        return backend
    backend = _guarded(source, "copying the tokenizer", tokenizers.Tokenizer.from_str,
                       backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


class Tokenizer:
    """Text <-> token ids for one model.

    Args:
        backend: the ``tokenizers.Tokenizer`` doing the work (no post-processor needed); its
            padding / truncation, if any, are dropped (on a copy).
        bos_id, eos_id: special token ids (``None`` when the model has none).
        adds_bos: whether the model's reference tokenizer prepends BOS when encoding.
        name: where it came from (the tokenizer file, for messages).
        chat_template: the model's Jinja chat template (instruct models), or None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 adds_bos: bool = False, name: str = "", chat_template: str | None = None) -> None:
        self.backend = _no_padding_or_truncation(backend, name or "tokenizer")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.adds_bos = bool(adds_bos)
        self.name = name
        self.chat_template = check_template(chat_template, name or "tokenizer")
        n = self.vocab_size
        for label, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not (0 <= value < n):
                raise ValueError(f"{name}: {label}={value} outside the vocabulary [0, {n})")

    # ------------------------------------------------------------------ core API
    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary + added tokens)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``, without special tokens except BOS when ``add_bos``.

        Special-token strings occurring in the text (e.g. ``<|im_start|>``) map to their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = _guarded(self.name, f"the tokenizer failed on the input text ({len(text)} characters)",
                       self.backend.encode, text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name}: add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not (0 <= i < n)]
        if bad:
            raise ValueError(f"ids: {bad[:5]} outside the vocabulary [0, {n})")
        return _guarded(self.name, f"the tokenizer failed to decode {len(ids)} ids",
                        self.backend.decode, ids, skip_special_tokens=skip_special_tokens)

    def require_chat_template(self) -> None:
        """ValueError, saying what to do instead, when the model has no chat template."""
        if self.chat_template is None:
            raise ValueError(f"{self.name or 'tokenizer'}: the model has no chat template "
                             "(tokenizer.chat_template in a GGUF file, chat_template in "
                             "tokenizer_config.json); continue plain text instead")

    def apply_chat_template(self, messages: Sequence[Any], *, add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """The text of a conversation (``[{"role": "user", "content": "..."}, ...]``) laid out
        by the model's chat template, ending with the assistant's header when
        ``add_generation_prompt``; encode it with ``add_bos=False`` (a template that wants BOS
        writes it). ValueError when the model has no template (a base model: continue plain
        text instead) or the template fails on these messages."""
        self.require_chat_template()
        token = self.id_to_token
        return render_chat(self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=token(self.bos_id) if self.bos_id is not None else None,
                           eos_token=token(self.eos_id) if self.eos_id is not None else None,
                           source=self.name or "tokenizer", **variables)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts (parallel inside ``tokenizers``)."""
        texts = list(texts)
        encs = _guarded(self.name, f"the tokenizer failed on the input text ({len(texts)} texts)",
                        self.backend.encode_batch, texts, add_special_tokens=False)
        prefix = [self.bos_id] if add_bos else []
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.name}: add_bos=True but this tokenizer has no BOS token")
        return [prefix + e.ids for e in encs]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, adds_bos={self.adds_bos})")

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (HF layout) into ``directory``.

        Written atomically (temp file + ``os.replace``) so an offq checkpoint directory is usable
        by both offq and transformers.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # never a padding / truncation block into a checkpoint, even if set on .backend since
        atomic_write_text(directory / "tokenizer.json",
                          _no_padding_or_truncation(self.backend, self.name).to_str())
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.id_to_token(self.eos_id) if self.eos_id is not None else None,
            "add_bos_token": self.adds_bos,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:  # where transformers looks for it too
            cfg["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(cfg, indent=2))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` of a HF checkpoint directory.

        BOS/EOS come from ``tokenizer_config.json`` (``bos_token``/``eos_token``), else from
        ``config.json`` (``bos_token_id``/``eos_token_id``). `adds_bos` is measured: whether the
        tokenizer (with its post-processor) puts BOS first when encoding with special tokens, or
        ``add_bos_token`` in tokenizer_config.json when that is set. The chat template is
        ``chat_template.jinja`` when present (transformers' newer layout), else
        ``tokenizer_config.json``'s ``chat_template``.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (offq reads the fast-tokenizer "
                                    "file; convert a sentencepiece model with transformers first)")
        try:
            text = tok_file.read_bytes().decode("utf-8")
            spec = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{tok_file}: not a valid tokenizers file: not UTF-8 JSON: "
                             f"{e}") from None
        if isinstance(spec, dict):
            check_normalizer_growth(spec.get("normalizer"), str(tok_file))
        backend = _guarded(str(tok_file), "not a valid tokenizers file",
                           tokenizers.Tokenizer.from_str, text)
        # offq never pads or truncates (before the probe below, which a padding block would blow up)
        backend.no_padding()
        backend.no_truncation()
        tcfg = _read_json_if_exists(path / "tokenizer_config.json")
        mcfg = _read_json_if_exists(path / "config.json")

        def special(key: str) -> int | None:
            tok = tcfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                tid = backend.token_to_id(tok)
                if tid is not None:
                    return int(tid)
            value = mcfg.get(key + "_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path / 'config.json'}: {key}_id must be an integer, got {value!r}")
            return value

        bos, eos = special("bos_token"), special("eos_token")
        if "add_bos_token" in tcfg and tcfg["add_bos_token"] is not None:
            try:  # bool("false") is True
                flag = as_json_bool("add_bos_token", tcfg["add_bos_token"])
            except ValueError as e:
                raise ValueError(f"{path / 'tokenizer_config.json'}: {e}") from None
            adds_bos = flag and bos is not None
        else:
            adds_bos = puts_bos_first(backend, bos, str(tok_file))
        return cls(backend, bos_id=bos, eos_id=eos, adds_bos=adds_bos, name=str(tok_file),
                   chat_template=_read_chat_template(path, tcfg))


# How many characters one input character can become, at most, through one normalizer of each
# type: Unicode's compatibility decompositions reach 18 (U+FDFA), canonical ones 4 and
# recomposition 3; a lowercase mapping 3; BERT's puts spaces around CJK characters (3) after
# stripping accents by NFD (4); byte-level maps each UTF-8 byte to a character (4).
_NORMALIZER_GROWTH = {"NFKC": 18, "NFKD": 18, "NFD": 4, "NFC": 3, "Lowercase": 3,
                      "BertNormalizer": 12, "ByteLevel": 4}
MAX_NORMALIZER_GROWTH = 1024  # real files: 1 (Llama 2, Mistral) to 18 (NFKC, sentencepiece maps)


def normalizer_growth(spec: Any, depth: int = 0) -> float:
    """An upper bound on the characters one input character becomes through the normalizer
    ``spec`` (a tokenizer.json ``normalizer`` block): the product over a Sequence. A Replace of
    pattern p by content c grows text at most len(c) / len(p) (a regex, which may match empty
    text, 1 + len(c)); Prepend adds its text once; a Precompiled map at most its longest
    replacement. A block this cannot read counts 1: tokenizers itself refuses it. Sequences
    nested past 64 levels (real files nest one or two) count as unbounded."""
    if depth > 64:
        return float("inf")
    if not isinstance(spec, dict):
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        growth = 1.0
        for part in spec.get("normalizers") or []:
            growth *= normalizer_growth(part, depth + 1)
        return growth
    if kind == "Replace":
        pattern, content = spec.get("pattern"), spec.get("content")
        if not isinstance(pattern, dict) or not isinstance(content, str):
            return 1.0
        text = pattern.get("String")
        if isinstance(text, str) and text:
            return max(1.0, len(content) / len(text))
        return 1.0 + len(content)
    if kind == "Prepend":
        prepend = spec.get("prepend")
        return 1.0 + len(prepend) if isinstance(prepend, str) else 1.0
    if kind == "Precompiled":
        return float(_longest_precompiled_replacement(spec.get("precompiled_charsmap")))
    return float(_NORMALIZER_GROWTH.get(kind, 1))


def _longest_precompiled_replacement(charsmap: Any) -> int:
    """The longest replacement string of a sentencepiece character map (base64: a little-endian
    u32 trie size, the trie, then the NUL-separated replacements); 1 when it cannot be read."""
    if not isinstance(charsmap, str):
        return 1
    try:
        blob = base64.b64decode(charsmap, validate=False)
    except (ValueError, binascii.Error):
        return 1
    if len(blob) < 4:
        return 1
    trie_end = 4 + int.from_bytes(blob[:4], "little")
    return max([1] + [len(r.decode("utf-8", "replace")) for r in blob[trie_end:].split(b"\0")])


def check_normalizer_growth(spec: Any, source: str) -> None:
    """Refuse a normalizer that can blow text up: 8 Replaces of "a" by 16 "a"s turned the
    one-character BOS probe into 4.3e9 characters, and the tokenizers library aborts the process
    when an allocation fails (no exception to catch)."""
    growth = normalizer_growth(spec)
    if growth > MAX_NORMALIZER_GROWTH:
        raise ValueError(f"{source}: its normalizer can turn one character into up to "
                         f"{growth:.3g} characters (offq takes at most {MAX_NORMALIZER_GROWTH}): "
                         "encoding text with it could exhaust memory")


def puts_bos_first(backend: tokenizers.Tokenizer, bos_id: int | None, source: str) -> bool:
    """Whether ``backend`` (without padding: a padded probe starts with a pad token) puts
    ``bos_id`` first when it encodes with its special tokens: what ``Tokenizer.adds_bos`` records
    when no setting says so."""
    if bos_id is None:
        return False
    probe = _guarded(source, "the tokenizer failed on the input text 'a'", backend.encode, "a",
                     add_special_tokens=True).ids
    return len(probe) > 0 and probe[0] == bos_id


def _read_json_if_exists(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _read_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """A HF directory's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string or a list of named ones), else None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        size = jinja.stat().st_size
        if size > 4 * MAX_TEMPLATE_CHARS:  # before reading: an untrusted file (UTF-8: <= 4 B/char)
            raise ValueError(f"{jinja}: chat template of {size} bytes exceeds offq's limit of "
                             f"{MAX_TEMPLATE_CHARS} characters")
        try:
            text = jinja.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja}: not UTF-8 text: {e}") from None
        return check_template(text, str(jinja))
    return template_from_config(tokenizer_config.get("chat_template"),
                                str(directory / "tokenizer_config.json"))
