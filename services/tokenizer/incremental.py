"""Incremental detokenization and stop-string matching (plain Python, per generation).

``IncrementalDecoder`` keeps two offsets into the token ids (vLLM/TGI style): ``prefix``
marks the start of the last emitted window and ``read`` its end. Each step decodes only
``ids[prefix:]`` and ``ids[prefix:read]`` and emits the difference, so the work per token is
bounded by the window, not the sequence. Text ending in U+FFFD (an incomplete UTF-8
character) is held back until the character completes or the generation finishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output so its first token gets the right leading space.
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Turns token ids, a few at a time, into text deltas whose concatenation is the text."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True,
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT:]) if prompt_token_ids else []
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self.finished = False

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_ids: Iterable[int]) -> str:
        """Adds tokens; returns the new complete text (may be empty)."""
        if self.finished:
            raise RuntimeError("decoder already finished")
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def finish(self) -> str:
        """Flushes whatever was held back (incomplete characters decode as U+FFFD)."""
        if self.finished:
            return ""
        self.finished = True
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


@dataclass
class StopResult:
    """What may be emitted now; ``stopped`` once a stop string matched (then nothing more)."""

    text: str
    stopped: bool = False
    matched: str = ""


class StopStringMatcher:
    """Never emits any part of a stop string: holds back a tail that could start one."""

    def __init__(self, stops: Iterable[str], no_stop_trim: bool = False) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.no_stop_trim = no_stop_trim
        self._held = ""
        self.stopped = False
        self.matched = ""

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> StopResult:
        if self.stopped:
            return StopResult("", True, self.matched)
        if not self.stops:
            return StopResult(text)
        buf = self._held + text
        best = self._earliest(buf)
        if best is not None:
            pos, stop = best
            # A longer stop that starts earlier may still be completing ("TS" of "TSS" when
            # "S" already matched): the earliest start wins, so wait for it to resolve.
            pending = self._pending_start(buf, pos)
            if pending is None:
                return self._stop(buf, pos, stop)
            self._held = buf[pending:]
            return StopResult(buf[:pending])
        hold = self._holdback(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return StopResult(buf[:len(buf) - hold])

    def _earliest(self, buf: str) -> tuple[int, str] | None:
        """The stop that starts first in ``buf`` (the longest of those starting there)."""
        best: tuple[int, int, str] | None = None  # (position, -length, stop)
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or (pos, -len(stop)) < best[:2]):
                best = (pos, -len(stop), stop)
        return None if best is None else (best[0], best[2])

    def _stop(self, buf: str, pos: int, stop: str) -> StopResult:
        self.stopped, self.matched, self._held = True, stop, ""
        return StopResult(buf[:pos + len(stop)] if self.no_stop_trim else buf[:pos], True, stop)

    def _pending_start(self, buf: str, before: int) -> int | None:
        """The first position before ``before`` where the rest of ``buf`` is a proper prefix
        of a stop (one that may still complete and would then start first)."""
        longest = max(len(s) for s in self.stops)
        for q in range(max(0, len(buf) - longest + 1), before):
            tail = buf[q:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return q
        return None

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(len(buf), longest), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """At the end of the generation the held tail is plain text, up to a stop it holds
        (one that waited on a longer candidate that never completed); then ``stopped``."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        best = self._earliest(held) if self.stops else None
        if best is not None:
            return self._stop(held, *best).text
        return held
