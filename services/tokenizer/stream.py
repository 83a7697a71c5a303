"""One streamed generation: token ids -> text, reasoning and stop handling (plain Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.tokenizer.incremental import Decoder, IncrementalDecoder, StopStringMatcher
from services.tokenizer.reasoning import HarmonyReasoningParser, ThinkParser
from services.tokenizer.tool_parsers import ToolCallDelta, ToolParser


@dataclass
class DecodeOptions:
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class StreamDelta:
    text: str = ""
    reasoning_text: str = ""
    stopped: bool = False
    matched_stop: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class DecodeSession:
    """decoder -> stop strings -> reasoning split -> tool calls, for one choice.

    ``special_token_ids`` (content -> id) lets a tool parser see its marker tokens (e.g.
    ``<|python_tag|>``, ``[TOOL_CALLS]``) while every other special token is still skipped.
    """

    def __init__(self, tokenizer: Decoder, options: DecodeOptions,
                 reasoning: ThinkParser | HarmonyReasoningParser | None = None,
                 tools: ToolParser | None = None,
                 special_token_ids: dict[str, int] | None = None) -> None:
        skip = options.skip_special_tokens
        self._drop: frozenset[int] = frozenset()
        # The parsers' marker tokens (tool-call tags, harmony's message framing) stay in the
        # text while every other special token is still skipped.
        markers = (*(reasoning.markers if reasoning else ()), *(tools.markers if tools else ()))
        if markers and skip and special_token_ids:
            keep = {special_token_ids[m] for m in markers if m in special_token_ids}
            if keep:
                self._drop = frozenset(special_token_ids.values()) - keep
                skip = False
        self.decoder = IncrementalDecoder(
            tokenizer, skip_special_tokens=skip,
            prompt_token_ids=self._filter(options.prompt_token_ids))
        self.stops = StopStringMatcher(options.stop, options.no_stop_trim)
        self.reasoning = reasoning
        self.tools = tools
        self.finished = False

    def _filter(self, ids: Sequence[int]) -> list[int]:
        if not self._drop:
            return list(ids)
        return [i for i in ids if i not in self._drop]

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def step(self, token_ids: Sequence[int], finished: bool = False) -> StreamDelta:
        if self.finished:
            raise ValueError("this choice already finished")
        if self.stops.stopped:  # tokens after a stop are dropped
            self.finished = self.finished or finished
            return StreamDelta(stopped=True, matched_stop=self.stops.matched)
        text = self.decoder.step(self._filter(token_ids))
        if finished:
            text += self.decoder.finish()
        result = self.stops.push(text)
        out = result.text
        end = finished or result.stopped
        if finished and not result.stopped:
            out += self.stops.flush()  # may still stop on a held stop string
        delta = StreamDelta(stopped=self.stops.stopped, matched_stop=self.stops.matched)
        if self.reasoning is not None:
            part = self.reasoning.push(out)
            delta.text, delta.reasoning_text = part.text, part.reasoning
            if end:
                tail = self.reasoning.flush()
                delta.text += tail.text
                delta.reasoning_text += tail.reasoning
        else:
            delta.text = out
        if self.tools is not None:
            parsed = self.tools.push(delta.text)
            if end:
                last = self.tools.flush()
                parsed.text += last.text
                parsed.calls.extend(last.calls)
            delta.text, delta.tool_calls = parsed.text, _merge(parsed.calls)
        self.finished = finished
        return delta


def _merge(calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Adjacent fragments of one call become one delta."""
    out: list[ToolCallDelta] = []
    for call in calls:
        if out and out[-1].index == call.index and not call.name:
            out[-1].arguments += call.arguments
        else:
            out.append(call)
    return out
