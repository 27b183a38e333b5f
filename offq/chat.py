"""Chat prompts for instruct models: a list of messages rendered with the model's chat template.

Instruct checkpoints (SmolLM2-135M-Instruct, Qwen2.5-Coder-Instruct, ...) are trained on
conversations laid out by a Jinja template that travels with the model: ``tokenizer.chat_template``
in a GGUF file, ``chat_template`` in a HF directory's ``tokenizer_config.json`` (or a
``chat_template.jinja`` file beside it). A plain continuation of "What is the capital of France?"
is not what such a model was trained to answer; the rendered conversation ending with the
assistant's header is.

The template comes from a file, so it is untrusted: it runs in Jinja's immutable sandbox (no
attribute access to Python internals, no mutation of the messages), and offq bounds what a
hostile one could make the process allocate: the template's size, the items of all its ``range``
calls together and of each repetition (``"x" * n``), large integer powers and the rendered text
(:data:`MAX_ITEMS`, :data:`MAX_OUTPUT_CHARS`). Its running time is not bounded (a template is
code the model file brings, as in transformers). Every failure (a syntax error, an error the
template raises itself, a message it cannot lay out, a bound) is a ``ValueError`` naming where
the template came from. The environment gives templates what the Hugging Face ecosystem's
templates use: ``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, a ``tojson``
filter, ``raise_exception(msg)`` and ``strftime_now(fmt)``.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

#: the largest template read (real ones: 0.3-20 KB; a bound keeps a hostile file from costing
#: a compile of megabytes)
MAX_TEMPLATE_CHARS = 1 << 20
#: items that all ``range`` calls of one rendering, and any one repetition, may produce
MAX_ITEMS = 1_000_000
#: the longest rendered text (4 Mi characters: ~1M tokens, beyond every model's context)
MAX_OUTPUT_CHARS = 4 << 20
#: the roles a message may have (what instruct templates lay out; "tool" for tool results)
ROLES = ("system", "user", "assistant", "tool")


def check_template(template: Any, source: str) -> str | None:
    """``template`` as read from ``source`` (a str or None) -> the template, or None when there is
    none (an empty string counts as none). ValueError for any other type or an oversized one."""
    if template is None or template == "":
        return None
    if not isinstance(template, str):
        raise ValueError(f"{source}: chat template: expected a string, got "
                         f"{type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"{source}: chat template of {len(template)} characters exceeds offq's "
                         f"limit of {MAX_TEMPLATE_CHARS}")
    return template


def template_from_config(value: Any, source: str) -> str | None:
    """The default template of a ``tokenizer_config.json`` ``chat_template`` entry: a string, or
    a list of ``{"name": ..., "template": ...}`` (the one named ``default``, else the only one)."""
    if isinstance(value, list):
        named: dict[str, Any] = {}
        for entry in value:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and "template" in entry):
                raise ValueError(f"{source}: chat_template: a list entry must be an object with "
                                 f"'name' and 'template', got {entry!r:.80}")
            named[entry["name"]] = entry["template"]
        if "default" in named:
            value = named["default"]
        elif len(named) == 1:
            value = next(iter(named.values()))
        else:
            value = None  # several named templates, none the default: the caller picks none
    return check_template(value, source)


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, Any]]:
    """Validate a conversation: a non-empty sequence of mappings, each with a ``role`` among
    :data:`ROLES` and a ``content`` string (None for an assistant's message that carries only
    ``tool_calls``) -> plain dicts (copies). ValueError/TypeError name the argument and the
    message's index."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{name}: expected a list of messages such as "
                        f"[{{'role': 'user', 'content': 'Hi'}}], got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{name}: empty (a conversation needs at least one message)")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"{name}[{i}]: expected a dict with 'role' and 'content', got "
                            f"{type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{name}[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        if content is None and m.get("tool_calls"):  # an assistant's tool call, no text
            out.append(dict(m))
            continue
        if not isinstance(content, str):
            raise TypeError(f"{name}[{i}]: content: expected a str, got {type(content).__name__}")
        try:  # lone surrogates (undecodable argv bytes) reach no tokenizer
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name}[{i}]: content is not valid UTF-8 text") from None
        out.append(dict(m))
    return out


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None,
                source: str = "chat template", **variables: Any) -> str:
    """The text of ``messages`` laid out by ``template`` (what the model reads before it answers
    when ``add_generation_prompt``). ``bos_token`` / ``eos_token`` are the strings templates may
    insert; ``variables`` are passed through (``tools=...`` for templates that lay them out)."""
    messages = check_messages(messages)
    template = check_template(template, source)
    if template is None:
        raise ValueError(f"{source}: no chat template")
    try:
        import jinja2
    except ImportError:  # a declared dependency; only a broken environment lacks it
        raise ImportError("offq's chat prompts need jinja2: pip install 'jinja2>=3.1'") from None
    env = _bounded_sandbox()
    try:
        compiled = env.from_string(template)
        pieces, length = [], 0
        for piece in compiled.generate(messages=messages,
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token or "", eos_token=eos_token or "",
                                       **variables):
            length += len(piece)
            if length > MAX_OUTPUT_CHARS:
                raise jinja2.exceptions.SecurityError(
                    f"the rendered text exceeds {MAX_OUTPUT_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{source}: chat template does not parse (line {e.lineno}): "
                         f"{e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"{source}: chat template refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), undefined names
        raise ValueError(f"{source}: chat template: {e}") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError,
            OverflowError, ZeroDivisionError, MemoryError) as e:  # inside its expressions
        raise ValueError(f"{source}: chat template failed on these messages: "
                         f"{type(e).__name__}: {e}") from None


def _bounded_sandbox():
    """Jinja's immutable sandbox with the Hugging Face templates' helpers and offq's bounds
    (module docstring): one per rendering, since the ``range`` budget is spent as it renders."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

    budget = [MAX_ITEMS]

    def bounded_range(*args: int) -> range:
        r = safe_range(*args)  # Jinja's own cap on one range
        budget[0] -= len(r)
        if budget[0] < 0:
            raise SecurityError(f"the template's ranges exceed {MAX_ITEMS} items together")
        return r

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                            and len(seq) * n > MAX_ITEMS):
                        raise SecurityError(f"a repetition of {len(seq)} x {n} items exceeds "
                                            f"{MAX_ITEMS}")
            elif (isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                  and right > 4096):  # 10 ** 10 ** 8 would run for hours
                raise SecurityError(f"an integer power with exponent {right}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
               sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(range=bounded_range, raise_exception=raise_exception,
                       strftime_now=strftime_now)
    return env
