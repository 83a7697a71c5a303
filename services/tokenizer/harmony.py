"""OpenAI's harmony format (gpt-oss output), split into messages incrementally (plain Python).

A gpt-oss generation is a sequence of messages, each ``header <|message|> body END``:

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
    <|message|>{"city": "Paris"}<|call|>

The header names the channel (``analysis``: reasoning, ``final``: the answer, ``commentary``:
tool calls and preambles) and, for a tool call, the recipient (``to=functions.NAME``). END is
``<|end|>``, ``<|call|>`` or ``<|return|>``. The reasoning parser and the tool-call parser both
read messages through :class:`HarmonySplitter`; text outside any message (a model that does not
speak harmony) is passed on as text.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.tokenizer.markup import partial_marker

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
CALL = "<|call|>"  # ends a message that is a tool call
ENDS = ("<|end|>", CALL, "<|return|>")
# The special tokens the parsers must see in the decoded text.
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
_OPENERS = (START, CHANNEL)
MAX_HEADER = 1024


@dataclass
class HarmonyEvent:
    """``open`` (a header was read), ``body`` (a piece of the body), ``close`` (the end
    marker, "" when the output ended inside a body) or ``text`` (outside any message)."""

    kind: str
    text: str = ""
    channel: str = ""
    recipient: str = ""


def _word_after(header: str, key: str) -> str:
    pos = header.find(key)
    if pos < 0:
        return ""
    rest = header[pos + len(key):].lstrip()
    end = len(rest)
    for stop in (" ", "\t", "\n", "<|"):
        found = rest.find(stop)
        if 0 <= found < end:
            end = found
    return rest[:end]


class HarmonySplitter:
    def __init__(self) -> None:
        self._buf = ""
        self.state = "between"  # between | header | body
        self._ws = ""
        self._ws_before_header = ""
        self._seen_message = False

    def _text(self, run: str, events: list[HarmonyEvent]) -> None:
        body = run.rstrip()
        if body:
            events.append(HarmonyEvent("text", self._ws + body))
            self._ws = run[len(body):]
        else:
            self._ws += run

    def feed(self, text: str, final: bool = False) -> list[HarmonyEvent]:
        self._buf += text
        events: list[HarmonyEvent] = []
        while True:
            if self.state == "between":
                # Whitespace after text is held: framing if a message follows (or the output
                # ends after one), content if more text does.
                starts = [p for p in (self._buf.find(m) for m in _OPENERS) if p >= 0]
                if starts:
                    first = min(starts)
                    self._text(self._buf[:first], events)
                    self._ws_before_header, self._ws = self._ws, ""
                    self._buf, self.state = self._buf[first:], "header"
                    continue
                hold = 0 if final else partial_marker(self._buf, _OPENERS)
                self._text(self._buf[:len(self._buf) - hold], events)
                self._buf = self._buf[len(self._buf) - hold:]
                if final:
                    if self._ws and not self._seen_message:
                        events.append(HarmonyEvent("text", self._ws))
                    self._ws = ""
                return events
            if self.state == "header":
                pos = self._buf.find(MESSAGE)
                if pos < 0:
                    if final or len(self._buf) > MAX_HEADER:  # not harmony after all
                        events.append(HarmonyEvent("text", self._ws_before_header + self._buf))
                        self._buf, self.state = "", "between"
                        continue
                    return events
                self._seen_message = True
                header = self._buf[:pos]
                events.append(HarmonyEvent("open", header, _word_after(header, CHANNEL),
                                           _word_after(header, "to=")))
                self._buf, self.state = self._buf[pos + len(MESSAGE):], "body"
                continue
            # body
            ends = [(p, m) for m in ENDS if (p := self._buf.find(m)) >= 0]
            if ends:
                pos, marker = min(ends)
                if pos:
                    events.append(HarmonyEvent("body", self._buf[:pos]))
                events.append(HarmonyEvent("close", marker))
                self._buf, self.state = self._buf[pos + len(marker):], "between"
                continue
            hold = 0 if final else partial_marker(self._buf, ENDS)
            if len(self._buf) > hold:
                events.append(HarmonyEvent("body", self._buf[:len(self._buf) - hold]))
                self._buf = self._buf[len(self._buf) - hold:]
            if final:
                events.append(HarmonyEvent("close", ""))
                self.state = "between"
            return events


def call_name(recipient: str) -> str:
    """``functions.get_weather`` -> ``get_weather``; "" for other recipients."""
    return recipient[len("functions."):] if recipient.startswith("functions.") else ""
