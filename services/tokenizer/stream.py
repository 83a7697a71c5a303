"""One streamed generation: token ids -> text, reasoning and stop handling (plain Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.tokenizer.incremental import Decoder, IncrementalDecoder, StopStringMatcher
from services.tokenizer.reasoning import ThinkParser


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


class DecodeSession:
    """decoder -> stop strings -> reasoning split, for one choice of one generation."""

    def __init__(self, tokenizer: Decoder, options: DecodeOptions,
                 reasoning: ThinkParser | None = None) -> None:
        self.decoder = IncrementalDecoder(
            tokenizer, skip_special_tokens=options.skip_special_tokens,
            prompt_token_ids=options.prompt_token_ids)
        self.stops = StopStringMatcher(options.stop, options.no_stop_trim)
        self.reasoning = reasoning
        self.finished = False

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def step(self, token_ids: Sequence[int], finished: bool = False) -> StreamDelta:
        if self.finished:
            raise ValueError("this choice already finished")
        if self.stops.stopped:  # tokens after a stop are dropped
            self.finished = self.finished or finished
            return StreamDelta(stopped=True, matched_stop=self.stops.matched)
        text = self.decoder.step(token_ids)
        if finished:
            text += self.decoder.finish()
        result = self.stops.push(text)
        out = result.text
        end = finished or result.stopped
        if finished and not result.stopped:
            out += self.stops.flush()
        delta = StreamDelta(stopped=result.stopped, matched_stop=result.matched)
        if self.reasoning is not None:
            part = self.reasoning.push(out)
            delta.text, delta.reasoning_text = part.text, part.reasoning
            if end:
                tail = self.reasoning.flush()
                delta.text += tail.text
                delta.reasoning_text += tail.reasoning
        else:
            delta.text = out
        self.finished = finished
        return delta
