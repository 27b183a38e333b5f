"""The model's tokenizer: a thin wrapper over a ``tokenizers.Tokenizer``.

Two sources:

* `Tokenizer.from_hf_dir(path)`: ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``config.json``
  for the BOS / EOS tokens) of a HuggingFace checkpoint directory.
* ``offq.formats.gguf.build_gguf_tokenizer(reader_or_path)``: rebuilt from the GGUF metadata
  (``tokenizer.ggml.*``).

`encode` never adds special tokens by itself; ``add_bos=True`` prepends ``bos_id``. Whether a model
*wants* a BOS (what its own tokenizer does when asked for special tokens) is `adds_bos`, which the
loaders copy into ``ModelConfig.add_bos``. offq never pads or truncates: a ``padding`` /
``truncation`` block of a tokenizer.json is dropped.

Tokenizer files are untrusted: every call into ``tokenizers`` goes through `_guarded`, which turns
its errors (a plain ``Exception``, or a Rust panic, a ``BaseException``) into a ValueError naming
the file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import tokenizers

from ..model.config import as_json_bool
from .files import atomic_write_text

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
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 adds_bos: bool = False, name: str = "") -> None:
        self.backend = _no_padding_or_truncation(backend, name or "tokenizer")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.adds_bos = bool(adds_bos)
        self.name = name
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
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(cfg, indent=2))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` of a HF checkpoint directory.

        BOS/EOS come from ``tokenizer_config.json`` (``bos_token``/``eos_token``), else from
        ``config.json`` (``bos_token_id``/``eos_token_id``). `adds_bos` is measured: whether the
        tokenizer (with its post-processor) puts BOS first when encoding with special tokens, or
        ``add_bos_token`` in tokenizer_config.json when that is set.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (offq reads the fast-tokenizer "
                                    "file; convert a sentencepiece model with transformers first)")
        backend = _guarded(str(tok_file), "not a valid tokenizers file",
                           tokenizers.Tokenizer.from_file, str(tok_file))
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
        return cls(backend, bos_id=bos, eos_id=eos, adds_bos=adds_bos, name=str(tok_file))


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
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: invalid JSON: {e!r}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
