"""Tool-call parsers: model output text -> content + OpenAI tool calls (plain Python).

One implementation serves both modes: ``parse(text)`` is ``push(text)`` + ``flush()``, so a
response parsed whole and the same response streamed in any chunking give the same calls.

Streaming follows OpenAI's delta rules: a call gets one ``index``; its first delta carries
``id`` and ``name`` (never empty, never repeated), later deltas only ``arguments``
fragments, whose concatenation is the call's arguments (the model's own JSON text).

A parser commits to a call only once it has read the call's name (and checked it against the
request's tools). Until then everything it holds back is returned as content if the text
turns out not to be a call (not JSON, no name, unknown tool, broken markup): text is never
dropped. After such a failure the parser passes the rest of the output through as content.
Once a call is committed, a broken tail (e.g. a generation cut off by max_tokens) leaves that
call with the arguments streamed so far and returns whatever follows as content.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.tokenizer.harmony import MARKERS as HARMONY_MARKERS
from services.tokenizer.harmony import HarmonySplitter, call_name
from services.tokenizer.markup import partial_marker

_WS = " \t\r\n"


@dataclass
class ToolCallDelta:
    """One streamed fragment of a call (``id``/``name`` only on the call's first fragment)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str


@dataclass
class ToolParseResult:
    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class _Invalid(Exception):
    """The held text is not (or no longer) a well-formed call."""


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


_PRIMITIVE_CHARS = set("-+.0123456789eEtruefalsn")


class _JsonValue:
    """Incremental scanner of one JSON value: finds where it ends, checks bracket nesting."""

    def __init__(self) -> None:
        self.kind = ""  # container | string | primitive
        self.stack: list[str] = []
        self.in_str = False
        self.esc = False
        self.done = False
        self.reached = 0  # where a failed feed stopped

    def feed(self, s: str, i: int, final: bool) -> int:
        """Consumes ``s`` from ``i``; returns the index reached (after the value when done)."""
        n = len(s)
        if not self.kind:
            if i >= n:
                return i
            c = s[i]
            if c in "{[":
                self.kind, self.stack = "container", [c]
                i += 1
            elif c == '"':
                self.kind, self.in_str = "string", True
                i += 1
            elif c in _PRIMITIVE_CHARS:
                self.kind = "primitive"
            else:
                self.reached = i
                raise _Invalid(f"unexpected {c!r}")
        while i < n:
            c = s[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.kind == "string":
                        self.done = True
                        return i + 1
                i += 1
                continue
            if self.kind == "primitive":
                if c in _WS or c in ",}];":
                    self.done = True
                    return i
                if c not in _PRIMITIVE_CHARS:
                    self.reached = i
                    raise _Invalid(f"unexpected {c!r}")
                i += 1
                continue
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.stack.append(c)
            elif c in "}]":
                if not self.stack or self.stack[-1] != ("{" if c == "}" else "["):
                    self.reached = i
                    raise _Invalid("mismatched bracket")
                self.stack.pop()
                if not self.stack:
                    self.done = True
                    return i + 1
            i += 1
        if final and self.kind == "primitive":
            self.done = True
        return i


def _decode_arguments(raw: str, kind: str) -> str:
    """Arguments held back whole (not streamed) -> the OpenAI arguments string."""
    if kind == "container":
        return raw
    if kind == "string":  # arguments sent as a JSON-encoded string
        value = json.loads(raw)
        return value if value.strip() else "{}"
    if raw == "null":
        return "{}"
    raise _Invalid("arguments must be an object")


class _Emitter:
    """Collects one push's output; merges fragments of the same call into one delta."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.result = ToolParseResult()

    def text(self, s: str) -> None:
        self.parser._emit_text(s, self.result)

    def begin(self, name: str, call_id: str = "") -> None:
        p = self.parser
        p._flush_ws_hold(self.result, drop=True)
        index = len(p.calls)
        call = ToolCall(index, call_id or p._id_factory(), name, "")
        p.calls.append(call)
        self.result.calls.append(ToolCallDelta(index, call.id, name, ""))

    def args(self, fragment: str) -> None:
        if not fragment:
            return
        p = self.parser
        call = p.calls[-1]
        call.arguments += fragment
        last = self.result.calls[-1] if self.result.calls else None
        if last is not None and last.index == call.index:
            last.arguments += fragment
        else:
            self.result.calls.append(ToolCallDelta(call.index, arguments=fragment))


class _JsonCall:
    """Incremental scan of one ``{"name": ..., "arguments"|"parameters": ...}`` object.

    Positions are indexes into the caller's buffer, which must not be trimmed meanwhile.
    The arguments stream as they arrive once the name is known; when the name comes after
    them they are held and sent with the name.
    """

    ARG_KEYS = ("arguments", "parameters")

    def __init__(self, parser: ToolParser, pos: int) -> None:
        self.parser = parser
        self.pos = pos
        self.state = "open"
        self.key = ""
        self.name: str | None = None
        self.pending_args: str | None = None
        self.args_seen = False
        self.value: _JsonValue | None = None
        self.value_start = 0
        self.streaming = False
        self.committed = False
        self.done = False

    def _commit(self, out: _Emitter) -> None:
        if not self.committed:
            assert self.name is not None
            out.begin(self.name)
            self.committed = True

    def advance(self, s: str, out: _Emitter, final: bool) -> None:
        while not self.done:
            if self.state == "value":
                assert self.value is not None
                start = self.pos
                try:
                    self.pos = self.value.feed(s, self.pos, final)
                except _Invalid:
                    if self.streaming:  # what was valid so far has gone out (or goes now)
                        out.args(s[start:self.value.reached])
                        self.pos = self.value.reached
                    raise
                if self.streaming:
                    out.args(s[start:self.pos])
                if not self.value.done:
                    return
                self._value_done(s[self.value_start:self.pos], self.value.kind, out)
                self.state = "after"
                continue
            i = _skip_ws(s, self.pos)
            if i >= len(s):
                return
            c = s[i]
            if self.state == "open":
                if c != "{":
                    raise _Invalid("not a JSON object")
                self.pos, self.state = i + 1, "key_or_end"
            elif self.state in ("key", "key_or_end"):
                if c == "}" and self.state == "key_or_end":
                    self.pos = i + 1
                    self._close(out)
                    return
                if c != '"':
                    raise _Invalid("expected a key")
                key = _JsonValue()
                end = key.feed(s, i, False)
                if not key.done:
                    return
                self.key = json.loads(s[i:end])
                self.pos, self.state = end, "colon"
            elif self.state == "colon":
                if c != ":":
                    raise _Invalid("expected ':'")
                self.pos, self.state = i + 1, "value_start"
            elif self.state == "value_start":
                self.value, self.value_start, self.pos = _JsonValue(), i, i
                if self.key in self.ARG_KEYS:
                    if self.args_seen:
                        raise _Invalid("arguments given twice")
                    self.args_seen = True
                    if self.name is not None and c in "{[":
                        self._commit(out)
                        self.streaming = True
                self.state = "value"
            elif self.state == "after":
                if c == ",":
                    self.pos, self.state = i + 1, "key"
                elif c == "}":
                    self.pos = i + 1
                    self._close(out)
                    return
                else:
                    raise _Invalid("expected ',' or '}'")

    def _value_done(self, raw: str, kind: str, out: _Emitter) -> None:
        if self.key == "name":
            if kind != "string" or self.name is not None:
                raise _Invalid("bad name")
            self.name = self.parser._check_name(json.loads(raw))
            if self.pending_args is not None:
                self._commit(out)
                out.args(self.pending_args)
                self.pending_args = None
        elif self.key in self.ARG_KEYS:
            if self.streaming:
                self.streaming = False
            else:
                args = _decode_arguments(raw, kind)
                if self.name is None:
                    self.pending_args = args
                else:
                    self._commit(out)
                    out.args(args)

    def _close(self, out: _Emitter) -> None:
        if self.name is None:
            raise _Invalid("no name")
        if not self.committed:
            self._commit(out)
            out.args(self.pending_args if self.pending_args is not None else "{}")
        elif not self.args_seen:
            out.args("{}")
        self.done = True


class ToolParser:
    """Base of the streaming parsers. Subclasses implement ``_scan`` over ``self._buf``.

    ``_scan`` consumes ``self._buf`` from the front, keeping the start of an uncommitted call
    at index 0 so that, on failure, the whole call is returned as content.
    """

    name = ""
    # Special tokens the parser needs to see in the text (kept when others are skipped).
    markers: tuple[str, ...] = ()

    def __init__(self, tools: Iterable[str] | None = None,
                 id_factory: Callable[[], str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        names = list(tools) if tools is not None else []
        self.tool_names: frozenset[str] | None = frozenset(names) if names else None
        # Tool name -> its JSON-schema ``parameters``: parsers of formats whose argument
        # values are bare text (XML-like tags) read the declared types from it.
        self.tool_parameters: Mapping[str, Any] = parameters or {}
        self._id_factory = id_factory or _new_call_id
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._call: _JsonCall | None = None
        self._passthrough = False
        self._ws_hold = ""
        self._pos = 0
        self.state = "start"
        self.finished = False

    # -- public ---------------------------------------------------------------------------------

    def push(self, text: str) -> ToolParseResult:
        if self.finished:
            raise RuntimeError("tool parser already flushed")
        self._buf += text
        return self._run(final=False)

    def flush(self) -> ToolParseResult:
        if self.finished:
            return ToolParseResult()
        result = self._run(final=True)
        self.finished = True
        return result

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Non-streaming: the content and the complete calls of a whole output."""
        first = self.push(text)
        last = self.flush()
        return first.text + last.text, self.calls

    # -- machinery ------------------------------------------------------------------------------

    def _run(self, final: bool) -> ToolParseResult:
        out = _Emitter(self)
        if not self._passthrough:
            try:
                self._scan(out, final)
                if final and self._buf:
                    raise _Invalid("incomplete tool call")
            except _Invalid:
                start = self._call.pos if self._call is not None and self._call.committed else 0
                rest = self._buf[start:]
                self._buf, self._call, self._passthrough = rest, None, True
        if self._passthrough:
            rest, self._buf = self._buf, ""
            out.text(rest)
        if final:
            self._flush_ws_hold(out.result, drop=True)
        return out.result

    def _emit_text(self, s: str, result: ToolParseResult) -> None:
        if not s:
            return
        if self.calls:  # whitespace between or after calls is not content
            s = self._ws_hold + s
            body = s.rstrip(_WS)
            # trailing whitespace waits: content if more text follows, else dropped
            self._ws_hold = s[len(body):]
            s = body
        result.text += s

    def _flush_ws_hold(self, result: ToolParseResult, drop: bool) -> None:
        held, self._ws_hold = self._ws_hold, ""
        if not drop:
            result.text += held

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not name.strip():
            raise _Invalid("empty name")
        name = name.strip()
        if self.tool_names is not None and name not in self.tool_names:
            raise _Invalid(f"unknown tool {name!r}")
        return name

    def _text_until(self, markers: tuple[str, ...], out: _Emitter, final: bool) -> str | None:
        """Emits text up to the first marker (left at buf[0]); None when there is none yet."""
        best = -1
        found = None
        for marker in markers:
            pos = self._buf.find(marker)
            if pos >= 0 and (best < 0 or pos < best):
                best, found = pos, marker
        if found is not None:
            out.text(self._buf[:best])
            self._buf = self._buf[best:]
            return found
        hold = 0 if final else partial_marker(self._buf, markers)
        out.text(self._buf[:len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold:]
        return None

    def _json_call(self, out: _Emitter, start: int, final: bool) -> bool:
        """Runs the JSON call that starts at buf[start]; True once it is complete.

        On completion the buffer is trimmed to what follows the call.
        """
        if self._call is None:
            self._call = _JsonCall(self, start)
        self._call.advance(self._buf, out, final)
        if not self._call.done:
            return False
        self._buf = self._buf[self._call.pos:]
        self._call = None
        return True

    def _json_array_step(self, out: _Emitter, final: bool, end_state: str) -> bool:
        """One step through a JSON list of calls (states ``array_item``/``array_next``);
        ``end_state`` follows the closing ``]``. False: more input is needed."""
        if self.state == "array_item":
            if not self._json_call(out, self._pos, final):
                return False
            self.state = "array_next"
            return True
        i = _skip_ws(self._buf, 0)
        if i >= len(self._buf):
            return False
        if self._buf[i] == ",":
            j = _skip_ws(self._buf, i + 1)
            if j >= len(self._buf):
                return False
            self._buf = self._buf[j:]
            self.state, self._pos = "array_item", 0
        elif self._buf[i] == "]":
            self._buf = self._buf[i + 1:]
            self.state = end_state
        else:
            raise _Invalid("expected ',' or ']'")
        return True

    def _scan(self, out: _Emitter, final: bool) -> None:
        raise NotImplementedError


class JsonToolParser(ToolParser):
    """``json``: the whole output is a call object or a list of them (tool_choice=required).

    ``{"name": "f", "arguments": {...}}`` or ``[{...}, {...}]``; ``parameters`` is accepted
    for ``arguments``. Output that does not start with ``{`` or ``[`` is content.
    """

    name = "json"

    def _scan(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state == "start":
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    return
                if self._buf[i] == "[":
                    self.state, self._pos = "array_open", i + 1
                elif self._buf[i] == "{":
                    self.state = "object"
                else:
                    raise _Invalid("not JSON")
            elif self.state == "array_open":
                i = _skip_ws(self._buf, self._pos)
                if i >= len(self._buf):
                    return
                if self._buf[i] != "{":
                    raise _Invalid("not a list of calls")
                self.state = "array_item"
                self._pos = i
            elif self.state in ("array_item", "array_next"):
                if not self._json_array_step(out, final, "done"):
                    return
            elif self.state == "object":
                if not self._json_call(out, _skip_ws(self._buf, 0), final):
                    return
                self.state = "object_next"
            elif self.state == "object_next":  # more objects separated by ';' or ','
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    return
                if self._buf[i] in ";,":
                    j = _skip_ws(self._buf, i + 1)
                    if j >= len(self._buf):
                        return
                    if self._buf[j] == "{":
                        self._buf = self._buf[j:]
                        self.state = "object"
                        continue
                self.state = "done"
            else:  # done: the rest is content
                out.text(self._buf)
                self._buf = ""
                return


class HermesToolParser(ToolParser):
    """``hermes`` (Qwen2.5/Qwen3, NousResearch Hermes): ``<tool_call>{json}</tool_call>``."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def _scan(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state in ("start", "text"):
                if self._text_until((self.START,), out, final) is None:
                    return
                self.state = "call"
            elif self.state == "call":
                if self._call is None:
                    start = _skip_ws(self._buf, len(self.START))
                    if start >= len(self._buf):
                        return
                    self._call = _JsonCall(self, start)
                if not self._json_call(out, self._call.pos, final):
                    return
                self.state = "close"
            elif self.state == "close":
                i = _skip_ws(self._buf, 0)
                rest = self._buf[i:]
                if rest.startswith(self.END):
                    self._buf = rest[len(self.END):]
                    self.state = "text"
                elif not rest or (self.END.startswith(rest) and not final):
                    if final:  # EOS right after the JSON, without </tool_call>
                        self._buf = ""
                    return
                else:
                    raise _Invalid("expected </tool_call>")


class Llama3ToolParser(ToolParser):
    """``llama3``: ``<|python_tag|>{"name": ..., "parameters": ...}`` (several joined by
    ``;``), or a bare JSON call at the start of the output (Llama 3.1/3.2/3.3 JSON tools)."""

    name = "llama3"
    TAG = "<|python_tag|>"
    markers = (TAG,)

    def _scan(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state == "start":
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    if final:
                        out.text(self._buf)
                        self._buf = ""
                    return
                if self._buf[i] == "{":
                    self.state = "call"
                    self._call = _JsonCall(self, i)
                else:
                    self.state = "text"
            elif self.state == "text":
                if self._text_until((self.TAG,), out, final) is None:
                    return
                self.state = "tag"
            elif self.state == "tag":
                i = _skip_ws(self._buf, len(self.TAG))
                if i >= len(self._buf):
                    return
                self._call = _JsonCall(self, i)  # not JSON: _Invalid -> content
                self.state = "call"
            elif self.state == "call":
                assert self._call is not None
                if not self._json_call(out, self._call.pos, final):
                    return
                self.state = "next"
            elif self.state == "next":
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    return
                if self._buf[i] == ";":
                    j = _skip_ws(self._buf, i + 1)
                    if j >= len(self._buf):
                        if final:
                            self._buf = ""
                        return
                    self._buf = self._buf[j:]
                    self._call = _JsonCall(self, 0)
                    self.state = "call"
                else:
                    self.state = "text"


class MistralToolParser(ToolParser):
    """``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`` (v3 tokenizers) or
    ``[TOOL_CALLS]name[ARGS]{...}`` (v11+), several calls in a row."""

    name = "mistral"
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    markers = (TAG, ARGS)

    def __init__(self, tools: Iterable[str] | None = None,
                 id_factory: Callable[[], str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(tools, id_factory, parameters)
        self._value: _JsonValue | None = None

    def _scan(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state in ("start", "text"):
                if self._text_until((self.TAG,), out, final) is None:
                    return
                self.state = "tag"
            elif self.state == "tag":
                i = _skip_ws(self._buf, len(self.TAG))
                if i >= len(self._buf):
                    return
                c = self._buf[i]
                if c == "[":
                    self.state, self._pos = "array_open", i + 1
                elif c == "{":
                    self.state, self._pos = "object", i
                else:
                    self.state, self._pos = "name", i
            elif self.state == "array_open":
                i = _skip_ws(self._buf, self._pos)
                if i >= len(self._buf):
                    return
                if self._buf[i] != "{":
                    raise _Invalid("not a list of calls")
                self.state, self._pos = "array_item", i
            elif self.state in ("array_item", "array_next"):
                if not self._json_array_step(out, final, "text"):
                    return
            elif self.state == "object":
                if not self._json_call(out, self._pos, final):
                    return
                self.state = "text"
            elif self.state == "name":
                pos = self._buf.find(self.ARGS, self._pos)
                if pos < 0:
                    tail = self._buf[self._pos:]
                    body = tail[:len(tail) - partial_marker(tail, (self.ARGS,))]
                    if final or len(body) > 256 or not all(
                            ch.isalnum() or ch in "_.-" for ch in body):
                        raise _Invalid("no [ARGS] after the name")
                    return
                name = self._check_name(self._buf[self._pos:pos])
                out.begin(name)
                self._buf = self._buf[pos + len(self.ARGS):]
                self._value, self._pos = _JsonValue(), 0
                self.state = "args_start"
                self._call = None
            elif self.state == "args_start":
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    return
                self._buf = self._buf[i:]
                self.state = "args"
            elif self.state == "args":
                assert self._value is not None
                try:
                    end = self._value.feed(self._buf, 0, final)
                except _Invalid:
                    out.args(self._buf[:self._value.reached])
                    self._buf = self._buf[self._value.reached:]
                    raise
                if self._value.kind != "container":
                    raise _Invalid("arguments must be an object")
                out.args(self._buf[:end])
                self._buf = self._buf[end:]
                if not self._value.done:
                    return
                self.state = "text"


class PythonicToolParser(ToolParser):
    """``pythonic`` (Llama 4, Llama 3.2 pythonic): ``[get_weather(city="Paris"), f(x=1)]``,
    optionally inside ``<|python_start|>...<|python_end|>``. Arguments are Python literals,
    sent as JSON; a call is sent whole once its closing parenthesis arrives."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"
    markers = (START, END)

    def _scan(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state == "start":
                i = _skip_ws(self._buf, 0)
                if self._buf.startswith(self.START, i):
                    i = _skip_ws(self._buf, i + len(self.START))
                elif self.START.startswith(self._buf[i:]) and i < len(self._buf) and not final:
                    return
                if i >= len(self._buf):
                    if final:
                        raise _Invalid("empty")
                    return
                if self._buf[i] != "[":
                    raise _Invalid("not a call list")
                self._pos, self.state = i + 1, "call"
            elif self.state == "call":
                i = _skip_ws(self._buf, self._pos)
                end = _python_call_end(self._buf, i)
                if end is None:
                    if final:
                        raise _Invalid("incomplete call")
                    return
                name, args = self._parse_call(self._buf[i:end])
                out.begin(name)
                out.args(args)
                self._buf = self._buf[end:]
                self.state = "next"
            elif self.state == "next":
                i = _skip_ws(self._buf, 0)
                if i >= len(self._buf):
                    return
                if self._buf[i] == ",":
                    self._buf, self._pos, self.state = self._buf[i + 1:], 0, "call"
                elif self._buf[i] == "]":
                    self._buf = self._buf[i + 1:]
                    self.state = "end"
                else:
                    raise _Invalid("expected ',' or ']'")
            elif self.state == "end":
                i = _skip_ws(self._buf, 0)
                rest = self._buf[i:]
                if rest.startswith(self.END):
                    self._buf = rest[len(self.END):]
                elif self.END.startswith(rest) and not final:
                    return
                self.state = "done"
            else:
                out.text(self._buf)
                self._buf = ""
                return

    def _parse_call(self, src: str) -> tuple[str, str]:
        try:
            node = ast.parse(src, mode="eval").body
        except SyntaxError as exc:
            raise _Invalid("not a call") from exc
        if not isinstance(node, ast.Call) or node.args:
            raise _Invalid("only keyword arguments are supported")
        func = node.func
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            raise _Invalid("not a function name")
        parts.append(func.id)
        name = self._check_name(".".join(reversed(parts)))
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise _Invalid("**kwargs")
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, SyntaxError, TypeError) as exc:
                raise _Invalid(f"argument {kw.arg} is not a literal") from exc
        try:
            return name, json.dumps(args, ensure_ascii=False)
        except (TypeError, ValueError) as exc:  # sets, bytes, complex
            raise _Invalid("arguments are not JSON") from exc


def _python_call_end(s: str, i: int) -> int | None:
    """End (after ``)``) of the call expression at ``s[i]``; None while incomplete."""
    n = len(s)
    j = i
    while j < n and (s[j].isalnum() or s[j] in "_."):
        j += 1
    if j >= n:
        return None
    if j == i or s[j] != "(":
        raise _Invalid("not a call")
    depth = 0
    quote = ""
    esc = False
    while j < n:
        c = s[j]
        if quote:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                if c != ")":
                    raise _Invalid("mismatched bracket")
                return j + 1
        j += 1
    return None


class SectionToolParser(ToolParser):
    """Calls framed by special tokens: ``SECTION_BEGIN (CALL_BEGIN header NAME_SEP args
    ARGS_END)* SECTION_END``; the arguments are raw JSON, streamed as they arrive."""

    SECTION_BEGIN = SECTION_END = CALL_BEGIN = NAME_SEP = ARGS_END = ""
    MAX_HEADER = 512

    def __init__(self, tools: Iterable[str] | None = None,
                 id_factory: Callable[[], str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(tools, id_factory, parameters)
        self.markers = (self.SECTION_BEGIN, self.SECTION_END, self.CALL_BEGIN, self.NAME_SEP,
                        self.ARGS_END)
        self._args_started = False

    def _header(self, header: str) -> tuple[str, str]:
        """The call's header text -> (function name, call id or "")."""
        return header, ""

    def _scan(self, out: _Emitter, final: bool) -> None:
        # Until a call commits, its markers stay in the buffer (self._pos is past them), so
        # a failure returns them as content too.
        while True:
            if self.state in ("start", "text"):
                if self._text_until((self.SECTION_BEGIN,), out, final) is None:
                    return
                self._pos = len(self.SECTION_BEGIN)
                self.state = "section"
            elif self.state == "section":
                i = _skip_ws(self._buf, self._pos)
                rest = self._buf[i:]
                if rest.startswith(self.CALL_BEGIN):
                    self._pos, self.state = i + len(self.CALL_BEGIN), "header"
                elif rest.startswith(self.SECTION_END):
                    self._buf, self.state = rest[len(self.SECTION_END):], "text"
                elif not rest:
                    if final and self.calls:
                        self._buf = ""  # EOS before the section's end marker
                    return
                elif not final and (self.CALL_BEGIN.startswith(rest)
                                    or self.SECTION_END.startswith(rest)):
                    return
                else:
                    raise _Invalid("expected a call")
            elif self.state == "header":
                pos = self._buf.find(self.NAME_SEP, self._pos)
                if pos < 0:
                    if len(self._buf) - self._pos > self.MAX_HEADER:
                        raise _Invalid("no name separator")
                    return
                name, call_id = self._header(self._buf[self._pos:pos].strip())
                out.begin(self._check_name(name), call_id)
                self._buf = self._buf[pos + len(self.NAME_SEP):]
                self._pos = 0
                self.state = "args"
                self._args_started = False
            elif self.state == "args":
                if not self._args_started:
                    self._buf = self._buf[_skip_ws(self._buf, 0):]
                    if not self._buf:
                        return
                    self._args_started = True
                pos = self._buf.find(self.ARGS_END)
                if pos >= 0:
                    out.args(self._buf[:pos].rstrip(_WS))
                    self._buf = self._buf[pos + len(self.ARGS_END):]
                    self._pos, self.state = 0, "section"
                    continue
                if final:
                    out.args(self._buf.rstrip(_WS))  # cut off: the call keeps what came
                    self._buf = ""
                    return
                body = self._buf[:len(self._buf) - partial_marker(self._buf, (self.ARGS_END,))]
                emit = body.rstrip(_WS)  # trailing whitespace may precede the end marker
                out.args(emit)
                self._buf = self._buf[len(emit):]
                return


class DeepSeekV3ToolParser(SectionToolParser):
    """``deepseekv3``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json {...} ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>``."""

    name = "deepseekv3"
    SECTION_BEGIN, SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL_BEGIN, NAME_SEP, ARGS_END = "<｜tool▁call▁begin｜>", "```json", "```<｜tool▁call▁end｜>"
    SEP = "<｜tool▁sep｜>"

    def _header(self, header: str) -> tuple[str, str]:
        return header.rpartition(self.SEP)[2], ""


class DeepSeekV31ToolParser(SectionToolParser):
    """``deepseekv31``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}
    <｜tool▁call▁end｜><｜tool▁calls▁end｜>``."""

    name = "deepseekv31"
    SECTION_BEGIN, SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL_BEGIN, NAME_SEP, ARGS_END = ("<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                      "<｜tool▁call▁end｜>")


class KimiK2ToolParser(SectionToolParser):
    """``kimi_k2``: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
    <|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>``; the
    header (``functions.NAME:0``) is the call id, as Kimi's template expects it back."""

    name = "kimi_k2"
    SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    CALL_BEGIN, NAME_SEP, ARGS_END = ("<|tool_call_begin|>", "<|tool_call_argument_begin|>",
                                      "<|tool_call_end|>")

    def _header(self, header: str) -> tuple[str, str]:
        name = header.split(":", 1)[0]
        if name.startswith("functions."):
            name = name[len("functions."):]
        return name, header


def typed_argument(raw: str, schema: Any) -> Any:
    """A tag-delimited argument value (bare text) as the JSON value its schema declares: text
    for strings (and for undeclared arguments), parsed JSON or a Python literal otherwise,
    the text itself when it parses as neither."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    kinds = set(kinds) if isinstance(kinds, list) else {kinds} if kinds else set()
    if not kinds or "string" in kinds:
        return raw
    text = raw.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)  # models often write Python literals: {'a': True}
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw
    return value if isinstance(value, (int, float, bool, list, dict, str)) else raw


class TaggedArgumentsToolParser(ToolParser):
    """Calls whose arguments are one tagged element per argument, the value as bare text:
    ``CALL_START header ARG... CALL_END``. Subclasses say how the header names the function
    (``_name``) and how one argument reads: the tags of ``PARAMETER key KEY_END value
    PARAMETER_END``, or their own ``_argument``.

    The name goes out as soon as it is read; each argument goes out when its closing tag has
    arrived, as the next fragment of a JSON object (``{"a": 1``, ``, "b": "x"``, ``}``), so the
    fragments always concatenate to the call's arguments. A call cut off mid-way is closed
    with what it had (its arguments stay valid JSON) and the unfinished rest is content.
    """

    CALL_START = CALL_END = ""
    # Closes the call's wrapper after CALL_END when present (optional at EOS).
    CALL_TRAILER = ""
    # Special tokens around a run of calls (a section's begin and end): framing, not content.
    FRAMING: tuple[str, ...] = ()
    # The default argument shape: PARAMETER key KEY_END value PARAMETER_END.
    PARAMETER = KEY_END = PARAMETER_END = ""
    MAX_HEADER = 512

    def __init__(self, tools: Iterable[str] | None = None,
                 id_factory: Callable[[], str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(tools, id_factory, parameters)
        self._arguments_open = False

    def _name(self, buf: str, final: bool) -> tuple[str, int] | None:
        """(function name, header length) once the header after CALL_START is complete."""
        raise NotImplementedError

    def _argument(self, buf: str, final: bool) -> tuple[str, str, int] | None:
        """(key, raw value, length) of the argument at ``buf[0]``; None: more input needed.
        Raises _Invalid when ``buf`` cannot start an argument."""
        found = _tagged(buf, self.PARAMETER, self.PARAMETER_END, final)
        if found is None:
            return None
        body, length = found
        key, sep, value = body.partition(self.KEY_END)
        if not sep or not key.strip():
            raise _Invalid(f"bad {self.PARAMETER}...")
        return key.strip(), self._value(value), length

    def _value(self, raw: str) -> str:
        """An argument's text as written, less the format's framing around it."""
        return raw

    def _close_arguments(self, out: _Emitter) -> None:
        out.args("}" if self._arguments_open else "{}")
        self._arguments_open = False

    def _scan(self, out: _Emitter, final: bool) -> None:
        try:
            self._scan_calls(out, final)
        except _Invalid:
            if self.state == "arguments":  # committed: close the call before giving up
                self._close_arguments(out)
            raise
        if final and self.state == "arguments":
            self._close_arguments(out)  # EOS inside a call (max_tokens): keep what came
            raise _Invalid("call cut off")

    def _scan_calls(self, out: _Emitter, final: bool) -> None:
        while True:
            if self.state in ("start", "text"):
                found = self._text_until((self.CALL_START, *self.FRAMING), out, final)
                if found is None:
                    return
                if found != self.CALL_START:
                    self._buf = self._buf[len(found):]
                    continue
                self.state = "header"
            elif self.state == "trailer":
                i = _skip_ws(self._buf, 0)
                rest = self._buf[i:]
                if rest.startswith(self.CALL_TRAILER):
                    self._buf, self.state = rest[len(self.CALL_TRAILER):], "text"
                elif not final and (not rest or self.CALL_TRAILER.startswith(rest)):
                    return
                else:
                    self.state = "text"  # no trailer: what follows is content
            elif self.state == "header":
                # Until the call commits its start tag stays in the buffer, so a failure
                # returns it as content too.
                header = self._name(self._buf[len(self.CALL_START):], final)
                if header is None:
                    if len(self._buf) > self.MAX_HEADER + len(self.CALL_START):
                        raise _Invalid("no function name")
                    return
                name, length = header
                out.begin(self._check_name(name))
                self._buf = self._buf[len(self.CALL_START) + length:]
                self.state, self._arguments_open = "arguments", False
            elif self.state == "arguments":
                # Whitespace between a call's elements is framing, never content.
                rest = self._buf = self._buf[_skip_ws(self._buf, 0):]
                if rest.startswith(self.CALL_END):
                    self._close_arguments(out)
                    self._buf = rest[len(self.CALL_END):]
                    self.state = "trailer" if self.CALL_TRAILER else "text"
                    continue
                if not rest or (not final and self.CALL_END.startswith(rest)):
                    return
                argument = self._argument(rest, final)
                if argument is None:
                    return
                key, raw, length = argument
                schema = self.tool_parameters.get(self.calls[-1].name)
                declared = (schema or {}).get("properties", {}) if isinstance(schema, dict) else {}
                value = typed_argument(raw, declared.get(key) if isinstance(declared, dict)
                                       else None)
                out.args(("{" if not self._arguments_open else ", ")
                         + json.dumps(key, ensure_ascii=False) + ": "
                         + json.dumps(value, ensure_ascii=False))
                self._arguments_open = True
                self._buf = rest[length:]


def _tagged(buf: str, open_tag: str, close_tag: str, final: bool) -> tuple[str, int] | None:
    """The text of ``open_tag ... close_tag`` at ``buf[0]`` and the element's length."""
    if not buf.startswith(open_tag):
        if final or not open_tag.startswith(buf):
            raise _Invalid(f"expected {open_tag}")
        return None
    end = buf.find(close_tag, len(open_tag))
    if end < 0:
        return None
    return buf[len(open_tag):end], end + len(close_tag)


class Qwen3CoderToolParser(TaggedArgumentsToolParser):
    """``qwen3_coder`` (Qwen3-Coder, SGLang's ``qwen3_coder``, SMG's ``qwen_xml``):
    ``<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n
    </tool_call>``."""

    name = "qwen3_coder"
    CALL_START, CALL_END, CALL_TRAILER = "<tool_call>", "</function>", "</tool_call>"
    markers = ("<tool_call>", "</tool_call>")
    FUNCTION = "<function="
    PARAMETER, KEY_END, PARAMETER_END = "<parameter=", ">", "</parameter>"

    def _name(self, buf: str, final: bool) -> tuple[str, int] | None:
        i = _skip_ws(buf, 0)
        rest = buf[i:]
        if not rest.startswith(self.FUNCTION):
            if final or not self.FUNCTION.startswith(rest):
                raise _Invalid("expected <function=")
            return None
        end = rest.find(">", len(self.FUNCTION))
        if end < 0:
            return None
        return rest[len(self.FUNCTION):end], i + end + 1

    def _value(self, raw: str) -> str:
        # The template puts the value on its own lines: one newline each side is framing.
        return raw.removeprefix("\n").removesuffix("\n")


class Glm45ToolParser(TaggedArgumentsToolParser):
    """``glm45`` (GLM-4.5 / 4.6 / 4.7, SMG's ``glm45_moe`` / ``glm47_moe``):
    ``<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n</tool_call>``
    (4.7 writes it without the newlines)."""

    name = "glm45"
    CALL_START, CALL_END = "<tool_call>", "</tool_call>"
    KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
    markers = ("<tool_call>", "</tool_call>", KEY, KEY_END, VALUE, VALUE_END)

    def _name(self, buf: str, final: bool) -> tuple[str, int] | None:
        ends = [p for p in (buf.find("\n"), buf.find(self.KEY), buf.find(self.CALL_END))
                if p >= 0]
        if not ends:
            if final:
                raise _Invalid("no function name")
            return None
        end = min(ends)
        return buf[:end].strip(), end

    def _argument(self, buf: str, final: bool) -> tuple[str, str, int] | None:
        key = _tagged(buf, self.KEY, self.KEY_END, final)
        if key is None:
            return None
        name, length = key
        i = _skip_ws(buf, length)
        if i >= len(buf):
            if final:
                raise _Invalid("argument without a value")
            return None
        value = _tagged(buf[i:], self.VALUE, self.VALUE_END, final)
        if value is None:
            return None
        if not name.strip():
            raise _Invalid("empty argument name")
        return name.strip(), value[0], i + value[1]


class GptOssToolParser(ToolParser):
    """``gpt_oss``: harmony messages (see :mod:`services.tokenizer.harmony`). A message to
    ``functions.NAME`` is a call, its body the arguments (streamed); other messages are
    content without their framing (``analysis`` too, unless the ``gpt_oss`` reasoning
    parser took it first); a call to a tool the request does not have stays content."""

    name = "gpt_oss"
    markers = HARMONY_MARKERS

    def __init__(self, tools: Iterable[str] | None = None,
                 id_factory: Callable[[], str] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(tools, id_factory, parameters)
        self._splitter = HarmonySplitter()
        self._in_call = False
        self._args_seen = False

    def _scan(self, out: _Emitter, final: bool) -> None:
        text, self._buf = self._buf, ""
        for event in self._splitter.feed(text, final):
            if event.kind == "open":
                name = call_name(event.recipient)
                self._in_call = bool(name) and (self.tool_names is None
                                                or name in self.tool_names)
                if self._in_call:
                    out.begin(name)
                    self._args_seen = False
            elif event.kind == "body":
                if not self._in_call:
                    out.text(event.text)
                    continue
                fragment = event.text if self._args_seen else event.text.lstrip(_WS)
                if fragment:
                    self._args_seen = True
                    out.args(fragment)
            elif event.kind == "close":
                if self._in_call and not self._args_seen:
                    out.args("{}")
                self._in_call = False
            else:
                out.text(event.text)


class Step3ToolParser(TaggedArgumentsToolParser):
    """``step3`` (StepFun Step-3): ``<｜tool_calls_begin｜><｜tool_call_begin｜>function
    <｜tool_sep｜><steptml:invoke name="NAME"><steptml:parameter name="KEY">VALUE
    </steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜>``."""

    name = "step3"
    CALL_START, CALL_END = "<｜tool_call_begin｜>", "</steptml:invoke>"
    CALL_TRAILER = "<｜tool_call_end｜>"
    FRAMING = ("<｜tool_calls_begin｜>", "<｜tool_calls_end｜>")
    markers = (*FRAMING, CALL_START, CALL_TRAILER, "<｜tool_sep｜>")
    INVOKE = '<steptml:invoke name="'
    PARAMETER, KEY_END, PARAMETER_END = ('<steptml:parameter name="', '">',
                                         "</steptml:parameter>")

    def _name(self, buf: str, final: bool) -> tuple[str, int] | None:
        start = buf.find(self.INVOKE)
        end = buf.find('">', start + len(self.INVOKE)) if start >= 0 else -1
        if end < 0:
            if final:
                raise _Invalid("no <steptml:invoke name=...>")
            return None
        if buf[:start].strip() not in ("", "function<｜tool_sep｜>"):
            raise _Invalid("unexpected call header")
        return buf[start + len(self.INVOKE):end], end + 2


# name -> parser class; aliases as SGLang / SMG spell them.
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "json": JsonToolParser,
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "qwen25": HermesToolParser,
    "qwen2.5": HermesToolParser,
    "qwen3": HermesToolParser,
    "llama3": Llama3ToolParser,
    "llama": Llama3ToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "llama4": PythonicToolParser,
    "deepseekv3": DeepSeekV3ToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek": DeepSeekV3ToolParser,
    "deepseekv31": DeepSeekV31ToolParser,
    "deepseek31": DeepSeekV31ToolParser,
    "kimi_k2": KimiK2ToolParser,
    "kimik2": KimiK2ToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "qwen_coder": Qwen3CoderToolParser,
    "qwen_xml": Qwen3CoderToolParser,
    "glm45": Glm45ToolParser,
    "glm": Glm45ToolParser,
    "glm4": Glm45ToolParser,
    "glm4_moe": Glm45ToolParser,
    "glm45_moe": Glm45ToolParser,
    "glm47_moe": Glm45ToolParser,
    "step3": Step3ToolParser,
    "gpt_oss": GptOssToolParser,
    "gpt-oss": GptOssToolParser,
}

# Model-name globs (lower case) -> parser, first match wins (SMG's ParserFactory::map_model).
MODEL_PATTERNS: list[tuple[str, str]] = [
    ("*qwen3-coder*", "qwen3_coder"),
    ("*qwen3coder*", "qwen3_coder"),
    ("*qwen*", "hermes"),
    ("*hermes*", "hermes"),
    ("*llama-4*", "pythonic"),
    ("*llama4*", "pythonic"),
    ("*llama-3*", "llama3"),
    ("*llama3*", "llama3"),
    ("*mistral*", "mistral"),
    ("*mixtral*", "mistral"),
    ("*deepseek-v3.1*", "deepseekv31"),
    ("*deepseek-v3*", "deepseekv3"),
    ("*deepseek-r1*", "deepseekv3"),
    ("*kimi-k2*", "kimi_k2"),
    ("*glm-4.5*", "glm45"),
    ("*glm-4.6*", "glm45"),
    ("*glm-4.7*", "glm45"),
    ("*gpt-oss*", "gpt_oss"),
    ("*step3*", "step3"),
    ("*step-3*", "step3"),
]


def detect_tool_parser(model: str) -> str:
    """The parser for a model name, or "" when no pattern matches."""
    lowered = model.lower()
    for pattern, parser in MODEL_PATTERNS:
        if fnmatch.fnmatchcase(lowered, pattern):
            return parser
    return ""


def create_tool_parser(name: str, tools: Iterable[str] | None = None,
                       id_factory: Callable[[], str] | None = None,
                       parameters: Mapping[str, Any] | None = None) -> ToolParser:
    """A fresh parser (one per generation); KeyError for an unknown name. ``parameters``:
    tool name -> its JSON-schema parameters (typed values for tag-delimited formats)."""
    return TOOL_PARSERS[name](tools, id_factory, parameters)


def parse_tool_calls(name: str, text: str, tools: Iterable[str] | None = None,
                     parameters: Mapping[str, Any] | None = None
                     ) -> tuple[str, list[ToolCall]]:
    """Non-streaming parse of a whole output: (content, calls)."""
    return create_tool_parser(name, tools, parameters=parameters).parse(text)
