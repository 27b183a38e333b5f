"""Conversations held across turns (``offq.generate.Conversation``): each turn prefills only what
the KV cache does not hold yet, cutting the cache back where the new prompt departs from it, and
answers as :func:`offq.generate.chat` answers the same messages from an empty cache. Run on every
cache offq has: the float32 decoder's, the NumPy real path's packed 4-bit one, the fused W4A4KV4
decoder's and the fused weight-only decoder's."""
import logging

import pytest

from offq.config import QuantConfig
from offq.formats.tokenizer import Tokenizer
from offq.generate import Conversation, GenerationConfig, chat
from offq.kernels import threads
from offq.model import Model
from offq.recipe import pipeline
from tiny_models import calibration, tiny_checkpoint

#: roles as words of the tiny tokenizer (w7 system, w8 user, w9 assistant), w6 ends a turn
ROLES = "{% set r = {'system': 'w7', 'user': 'w8', 'assistant': 'w9'} %}"
VERBATIM = (ROLES + "{% for m in messages %}{{ r[m.role] }} {{ m.content }} w6 {% endfor %}"
            "{% if add_generation_prompt %}w9 {% endif %}")
#: earlier replies rendered as a fixed summary (as templates that drop a reply's reasoning
#: do): the cache holds the reply as generated, so each turn cuts it back to before the reply
REWRITES = VERBATIM.replace("{{ m.content }}",
                            "{{ 'w10 w11' if m.role == 'assistant' else m.content }}")
QUESTIONS = ["w20 w21 w22", "w30 w31", "w40 w41 w42 w43"]


def _tokenizer(template: str | None) -> Tokenizer:
    import tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 101)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_id=1, eos_id=2, chat_template=template, name="tiny")


@pytest.fixture(scope="module", params=["float", "w4a4kv4-numpy", "w4a4kv4-fused",
                                        "weight-only-fused"])
def model(request):
    """A tiny Llama (101 tokens, 512 positions) as each runtime offq has runs it; its LM head
    is its own (tied, the tiny models predict the last token's word whatever came before)."""
    ckpt = tiny_checkpoint(5, tie=False)
    if request.param == "float":
        return Model.from_checkpoint(ckpt)
    cfg = (QuantConfig(method="offq") if request.param.startswith("w4a4kv4")
           else QuantConfig(method="rtn", w_bits=4, w_group_size=32, a_bits=16, kv_bits=16))
    with threads(2):
        result = pipeline.quantize(ckpt, cfg, calibration(ckpt, 8, 48, 1), progress=False)
    model = result.model("real" if request.param.endswith("numpy") else "fused")
    assert (model.fused_runner is None) == request.param.endswith("numpy")
    return model


@pytest.mark.parametrize("template", [VERBATIM, REWRITES], ids=["verbatim", "rewrites"])
def test_turns_reuse_the_cache_and_answer_as_chat(model, template):
    tok = _tokenizer(template)
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    talk = Conversation(model, tok, system="w12 w13", cfg=cfg)
    reused = []
    for question in QUESTIONS:
        reply = talk.say(question)
        assert talk.messages[-2:] == [{"role": "user", "content": question},
                                      {"role": "assistant", "content": reply}]
        assert reply == chat(model, tok, talk.messages[:-1], cfg)
        prompt = tok.encode(tok.apply_chat_template(talk.messages[:-1]))
        assert talk.last_reused + talk.last_prefilled == len(prompt)
        reused.append(talk.last_reused)
    assert len(talk.messages) == 7 and reused[0] == 0
    first = len(tok.encode(tok.apply_chat_template(talk.messages[:2])))
    if template == VERBATIM:  # all but the new message and the reply's last token (not fed)
        assert reused[1] == first + 6 - 1
    else:  # the first prompt: the reply as the template renders it departs from the cache
        assert reused[1] == first
    assert reused[2] > reused[1]
    talk.reset()
    assert talk.messages == [{"role": "system", "content": "w12 w13"}]
    assert talk.say(QUESTIONS[0]) == chat(model, tok, talk.messages[:-1], cfg)
    assert talk.last_reused == 0


def test_a_failed_turn_leaves_the_conversation_as_it_was(model):
    tok = _tokenizer(REWRITES)
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    talk = Conversation(model, tok, cfg=cfg)
    talk.say(QUESTIONS[0])
    before = list(talk.messages)

    def interrupted(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        talk.say(QUESTIONS[1], on_token=interrupted)
    assert talk.messages == before
    # the cache keeps what the interrupted turn shared with the first (its later positions,
    # half-written, are cut off): the retried turn reuses that prefix and answers as chat does
    first = len(tok.encode(tok.apply_chat_template(talk.messages[:1])))
    assert talk.say(QUESTIONS[1]) == chat(model, tok, talk.messages[:-1], cfg)
    assert talk.last_reused == first  # REWRITES: up to the first reply as rendered

    def failing(piece):
        raise ValueError("on_token failed")

    with pytest.raises(ValueError, match="on_token failed"):
        talk.say(QUESTIONS[2], on_token=failing)
    assert talk.say(QUESTIONS[2]) == chat(model, tok, talk.messages[:-1], cfg)
    if model.fused_runner is None:  # a prefill that fails half way through the layers
        calls = []
        layer_forward = model.layer_forward

        def second_layer_fails(layer, h, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return layer_forward(layer, h, **kwargs)

        model.layer_forward = second_layer_fails
        try:
            with pytest.raises(KeyboardInterrupt):
                talk.say(QUESTIONS[0])
        finally:
            del model.layer_forward
        assert talk.say(QUESTIONS[0]) == chat(model, tok, talk.messages[:-1], cfg)


def test_the_oldest_exchanges_leave_when_the_context_is_full(model, caplog):
    tok = _tokenizer(VERBATIM)
    cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
    talk = Conversation(model, tok, system="w12", cfg=cfg)
    line = " ".join(f"w{3 + i % 90}" for i in range(150))
    with caplog.at_level(logging.WARNING, logger="offq.generate"):
        for _ in range(5):
            reply = talk.say(line)
    prompt = tok.encode(tok.apply_chat_template(talk.messages[:-1]))
    assert len(prompt) < 512 and talk.messages[0]["role"] == "system"
    assert len(talk.messages) < 11 and caplog.text.count("oldest exchange is dropped") >= 2
    assert reply == chat(model, tok, talk.messages[:-1], cfg)
    with pytest.raises(ValueError, match="exceed the model's context of 512 positions"):
        talk.say(" ".join(["w3"] * 600))


def test_arguments_are_checked():
    model = Model.from_checkpoint(tiny_checkpoint(5))
    with pytest.raises(ValueError, match="tiny: the model has no chat template"):
        Conversation(model, _tokenizer(None))
    with pytest.raises(TypeError, match="system"):
        Conversation(model, _tokenizer(VERBATIM), system=["w3"])
    with pytest.raises(TypeError, match="cfg"):
        Conversation(model, _tokenizer(VERBATIM), cfg={"max_new_tokens": 3})
    talk = Conversation(model, _tokenizer(VERBATIM))
    with pytest.raises(TypeError, match="content"):
        talk.say(b"w3")
    with pytest.raises(TypeError, match="on_token"):
        talk.say("w3", on_token="print")
    assert talk.messages == []


def test_the_default_model_holds_a_conversation(smollm2_checkpoint):
    """SmolLM2-135M-Instruct (float32, greedy): an elliptical second question is answered from
    the first turn's context, and the second turn prefills only its own tokens."""
    model = Model.from_checkpoint(smollm2_checkpoint)
    tok = smollm2_checkpoint.tokenizer
    cfg = GenerationConfig(max_new_tokens=24)
    talk = Conversation(model, tok, cfg=cfg)
    reply = talk.say("What is the capital of France?")
    assert "Paris" in reply and talk.last_reused == 0
    first = talk.last_prefilled
    assert "Rome" in talk.say("And the capital of Italy?")
    # the first prompt and the whole reply (fed before the end-of-turn token was picked)
    assert talk.last_reused == first + len(tok.encode(reply))
    assert talk.last_prefilled < 20
    assert talk.messages[-1]["content"] == chat(model, tok, talk.messages[:-1], cfg)
