"""Stop strings on token ids: decode the tail of the output, stop on a match, hold back tokens
that might begin a stop string. Plain Python; the decoder is any ``list[int] -> str``.

Tokens are released (streamed) only once their text can no longer be part of a stop string,
so the streamed tokens always equal the final output. On a match the finish is "stop" with
``matched_stop_str``; unless ``no_stop_trim``, the held tokens that lie entirely inside the
matched string are dropped (a token that straddles the match start is kept: token ids cannot
be split). With ``no_stop_trim`` every generated token is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONTEXT_TOKENS = 4  # released tokens decoded along with the tail, for correct merges


@dataclass
class StopCheck:
    release: int  # output tokens that may be sent (the final output length when matched)
    matched: str | None = None


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str],
                 no_stop_trim: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.decode = decode
        self.no_stop_trim = no_stop_trim
        self.max_len = max((len(s) for s in self.stops), default=0)

    def check(self, output_ids: Sequence[int], released: int, allow_match: bool = True
              ) -> StopCheck:
        """After a new token: how many tokens may be released, and the matched stop string."""
        if not self.stops:
            return StopCheck(len(output_ids))
        ids = list(output_ids)
        ws = max(0, released - CONTEXT_TOKENS)
        base = len(self.decode(ids[ws:released]))
        full = self.decode(ids[ws:])
        if allow_match:
            best: tuple[int, str] | None = None
            search_from = max(0, base - self.max_len + 1)
            for stop in self.stops:
                pos = full.find(stop, search_from)
                if pos >= 0 and (best is None or pos < best[0]):
                    best = (pos, stop)
            if best is not None:
                pos, stop = best
                if self.no_stop_trim:
                    return StopCheck(len(ids), stop)
                keep = released
                for j in range(released, len(ids)):
                    if len(self.decode(ids[ws:j])) < pos:
                        keep = j + 1
                    else:
                        break
                return StopCheck(keep, stop)
        hold_from = len(full)
        for k in range(max(base, len(full) - self.max_len + 1), len(full)):
            tail = full[k:]
            if any(stop.startswith(tail) for stop in self.stops):
                hold_from = k
                break
        if hold_from == len(full):
            return StopCheck(len(ids))
        release = released
        for j in range(released, len(ids)):
            if len(self.decode(ids[ws:j + 1])) <= hold_from:
                release = j + 1
            else:
                break
        return StopCheck(release)
