"""Text helpers shared by the streaming parsers (reasoning, tool calls, harmony)."""

from __future__ import annotations

from collections.abc import Iterable


def partial_marker(buf: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of a marker: text a
    streaming parser holds back, since the next chunk may complete the marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(buf), len(marker) - 1), best, -1):
            if marker.startswith(buf[-k:]):
                best = k
                break
    return best
