"""Streaming reasoning parsers: split ``<think>...</think>`` from the answer (plain Python)."""

from __future__ import annotations

from dataclasses import dataclass

from services.tokenizer.harmony import CALL, CHANNEL, MARKERS, MESSAGE, HarmonySplitter, call_name
from services.tokenizer.markup import partial_marker


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    text: str = ""


class ThinkParser:
    """Splits streamed text into reasoning and content, safe across chunk boundaries.

    ``in_reasoning``: the generation starts inside the block (the template opened it, or the
    model always thinks, as DeepSeek-R1 does). An explicit start tag is recognised only
    before any content; the end tag switches to content, and whitespace right after it is
    dropped.
    """

    markers: tuple[str, ...] = ()  # no special tokens of its own to keep in the text

    def __init__(self, start: str = "<think>", end: str = "</think>",
                 in_reasoning: bool = False) -> None:
        self.start, self.end = start, end
        self.in_reasoning = in_reasoning
        self._buf = ""
        self._at_block_start = in_reasoning  # an explicit start tag may still come
        self._seen_content = False
        self._strip_leading = False

    def push(self, text: str) -> ReasoningDelta:
        self._buf += text
        out = ReasoningDelta()
        while self._buf:
            if self.in_reasoning:
                if self._at_block_start:
                    stripped = self._buf.lstrip()
                    if stripped.startswith(self.start):
                        self._buf = stripped[len(self.start):]
                        self._at_block_start = False
                        continue
                    if self.start.startswith(stripped):
                        break  # could still become the start tag
                    self._at_block_start = False
                pos = self._buf.find(self.end)
                if pos >= 0:
                    out.reasoning += self._buf[:pos]
                    self._buf = self._buf[pos + len(self.end):]
                    self.in_reasoning = False
                    self._seen_content = True  # no second block after the first
                    self._strip_leading = True
                    continue
                hold = partial_marker(self._buf, (self.end,))
                out.reasoning += self._buf[:len(self._buf) - hold]
                self._buf = self._buf[len(self._buf) - hold:]
                break
            if self._strip_leading:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._strip_leading = False
            if not self._seen_content:
                stripped = self._buf.lstrip()
                if stripped.startswith(self.start):
                    self._buf = stripped[len(self.start):]
                    self.in_reasoning = True
                    continue
                if stripped and self.start.startswith(stripped):
                    break
                if not stripped:
                    break  # only whitespace so far: it may precede a start tag
                self._seen_content = True
            out.text += self._buf
            self._buf = ""
        return out

    def flush(self) -> ReasoningDelta:
        held, self._buf = self._buf, ""
        if self.in_reasoning:
            return ReasoningDelta(reasoning=held)
        return ReasoningDelta(text=held)


class HarmonyReasoningParser:
    """``gpt_oss``: harmony's ``analysis`` channel is reasoning; ``final`` and ``commentary``
    bodies are content without their framing; a tool call (``to=functions.NAME``) goes on
    as ``<|channel|>commentary to=functions.NAME<|message|>ARGS<|call|>`` for the ``gpt_oss``
    tool-call parser."""

    markers = MARKERS

    def __init__(self) -> None:
        self._splitter = HarmonySplitter()
        self._mode = "text"

    def push(self, text: str, final: bool = False) -> ReasoningDelta:
        out = ReasoningDelta()
        for event in self._splitter.feed(text, final):
            if event.kind == "open":
                if event.channel == "analysis":
                    self._mode = "reasoning"
                elif call_name(event.recipient):
                    self._mode = "call"
                    out.text += f"{CHANNEL}commentary to={event.recipient}{MESSAGE}"
                else:
                    self._mode = "text"
            elif event.kind == "body":
                if self._mode == "reasoning":
                    out.reasoning += event.text
                else:
                    out.text += event.text
            elif event.kind == "close":
                if self._mode == "call":
                    out.text += CALL
                self._mode = "text"
            else:
                out.text += event.text
        return out

    def flush(self) -> ReasoningDelta:
        return self.push("", final=True)


@dataclass(frozen=True)
class ReasoningSpec:
    start: str = "<think>"
    end: str = "</think>"
    in_reasoning: bool = False  # the generation starts inside the block by default


_R1 = ReasoningSpec(in_reasoning=True)
_QWEN3 = ReasoningSpec()
_KIMI = ReasoningSpec("◁think▷", "◁/think▷")

# Names as SGLang and SMG spell them (both "-" and "_" forms are accepted).
REASONING_SPECS: dict[str, ReasoningSpec] = {
    "deepseek-r1": _R1, "deepseek_r1": _R1,
    "qwen3": _QWEN3,
    "qwen3-thinking": _R1, "qwen3_thinking": _R1,
    "kimi": _KIMI,
    "glm45": _QWEN3,
    "step3": _R1,
    "deepseek_v31": _QWEN3,
}
PASSTHROUGH = "passthrough"
HARMONY = ("gpt_oss", "gpt-oss")
# name -> whether the generation starts inside the reasoning block by default.
REASONING_PARSERS: dict[str, bool] = {
    **{name: spec.in_reasoning for name, spec in REASONING_SPECS.items()},
    **{name: False for name in HARMONY}, PASSTHROUGH: False}


def detect_reasoning_parser(model: str) -> str:
    """For ``auto``: ``gpt_oss`` for gpt-oss models, whose raw output is harmony markup rather
    than text; "" (none) for every other model, whose raw output reads fine."""
    return "gpt_oss" if "gpt-oss" in model.lower() else ""


def create_reasoning_parser(name: str, reasoning_open: bool = False
                            ) -> ThinkParser | HarmonyReasoningParser:
    """A parser by name; KeyError for an unknown one (``passthrough`` means: none)."""
    if name in HARMONY:
        return HarmonyReasoningParser()
    spec = REASONING_SPECS[name]
    return ThinkParser(spec.start, spec.end, in_reasoning=spec.in_reasoning or reasoning_open)
