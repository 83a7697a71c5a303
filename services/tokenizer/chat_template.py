"""Chat templates with HuggingFace ``apply_chat_template`` semantics (plain Python).

The template runs in jinja2's immutable sandbox with ``trim_blocks``/``lstrip_blocks``, HF's
``tojson`` (no HTML escaping, ``ensure_ascii=False``), ``raise_exception``, ``strftime_now``
and the ``{% generation %}`` tag. OpenAI messages are normalised first: content-part lists
become strings for templates that expect strings, and tool-call arguments given as JSON
strings become objects.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed to compile or render; the message is the template's own."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Like transformers: jinja's built-in tojson escapes HTML characters, which templates
    # do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# Signs that a template walks OpenAI content parts itself (then lists are passed as is).
_CONTENT_LIST_PATTERNS = [
    re.compile(r"for\s+\w+\s+in\s+[\w.\[\]'\"]*content"),
    re.compile(r"content[\]'\"]*\s+is\s+(not\s+)?(string|iterable|sequence|mapping)"),
    re.compile(r"content[\]'\"]*\s*\[\s*0\s*\]"),
    re.compile(r"content[\]'\"]*\s*\|\s*(selectattr|map|first|last)"),
]


def expects_content_list(source: str) -> bool:
    """Whether the template iterates over content parts (OpenAI format) itself."""
    return any(p.search(source) for p in _CONTENT_LIST_PATTERNS)


def _join_text_parts(content: list[Any]) -> str:
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and "text" in part:
            texts.append(str(part["text"]))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(
                f"content part of type {kind!r} is not supported by this model's chat template")
    return "\n".join(texts)


def normalize_messages(messages: list[dict[str, Any]],
                       content_as_list: bool) -> list[dict[str, Any]]:
    """OpenAI messages -> what HF templates expect (copies; the input is left alone)."""
    out = []
    for message in messages:
        m = copy.deepcopy(message)
        content = m.get("content")
        if isinstance(content, list) and not content_as_list:
            m["content"] = _join_text_parts(content)
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                except ValueError:
                    pass  # not JSON: the template gets the string as the client sent it
        out.append(m)
    return out


def _final_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and "text" in part:
                return str(part["text"])
        raise ChatTemplateError("continue_final_message: the final message has no text part")
    if not isinstance(content, str):
        raise ChatTemplateError("continue_final_message: the final message has no content")
    return content


class ChatTemplate:
    """A compiled chat template; ``render`` is thread-safe."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error: {exc.message} "
                                    f"(line {exc.lineno})") from exc
        self.content_as_list = expects_content_list(source)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        special_tokens: dict[str, str] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set")
        if continue_final_message and not messages:
            raise ChatTemplateError("continue_final_message needs at least one message")
        chat = normalize_messages(messages, self.content_as_list)
        variables: dict[str, Any] = dict(special_tokens or {})
        variables.update(template_kwargs or {})
        variables.update(messages=chat, tools=tools or None, documents=documents or None,
                         add_generation_prompt=add_generation_prompt)
        try:
            rendered = self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(exc.message or str(exc)) from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if continue_final_message:
            rendered = _cut_after_final(rendered, _final_text(messages[-1]))
        return rendered


def _cut_after_final(rendered: str, final: str) -> str:
    """HF's continue_final_message: drop what the template adds after the final message."""
    if final.strip() not in rendered:
        raise ChatTemplateError("continue_final_message: the final message does not appear in "
                                "the rendered chat")
    loc = rendered.rindex(final.strip())
    if rendered[loc:loc + len(final.lstrip())] == final:
        return rendered[:loc + len(final.lstrip())]
    return rendered[:loc + len(final.strip())]
