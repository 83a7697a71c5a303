"""StopStringMatcher never emits part of a stop string and reports the match."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.tokenizer.incremental import StopStringMatcher


def feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool, str]:
    out = []
    for piece in pieces:
        result = matcher.push(piece)
        out.append(result.text)
        if result.stopped:
            return "".join(out), True, result.matched
    out.append(matcher.flush())  # a held stop string still stops here
    return "".join(out), matcher.stopped, matcher.matched


def test_stop_across_chunks() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("Hello ST").text == "Hello "
    assert m.held == "ST"
    result = m.push("OP and more")
    assert (result.text, result.stopped, result.matched) == ("", True, "STOP")
    assert m.push("later").text == ""


def test_no_stop_trim_keeps_stop() -> None:
    m = StopStringMatcher(["\n\n"], no_stop_trim=True)
    assert feed(m, ["a\n", "\nb"]) == ("a\n\n", True, "\n\n")


def test_false_alarm_text_order() -> None:
    m = StopStringMatcher(["</answer>"])
    out = m.push("x </ans").text + m.push("ly done").text + m.flush()
    assert out == "x </ansly done"


def test_earliest_stop_wins_and_flush() -> None:
    m = StopStringMatcher(["bar", "foo"])
    assert feed(m, ["xx fo", "o bar"]) == ("xx ", True, "foo")
    m = StopStringMatcher(["abc"])
    assert feed(m, ["zz a", "b"]) == ("zz ab", False, "")


def test_a_longer_stop_that_starts_first_wins_across_chunks() -> None:
    # "S" is complete after "TS", but "TSS" starts earlier and completes with the next chunk.
    assert feed(StopStringMatcher(["S", "TSS"]), ["TS", "S"]) == ("", True, "TSS")
    # It never completes: the shorter stop still ends the text where it starts.
    assert feed(StopStringMatcher(["S", "TSS"]), ["TS", "x"]) == ("T", True, "S")
    assert feed(StopStringMatcher(["S", "TSS"]), ["TS"]) == ("T", True, "S")


def test_no_stops_passthrough() -> None:
    m = StopStringMatcher([])
    assert m.push("anything").text == "anything"


@given(text=st.text(alphabet="abc ST", max_size=30),
       stops=st.lists(st.text(alphabet="abcST", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8))
def test_property(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    m = StopStringMatcher(stops)
    out, stopped, matched = feed(m, pieces)
    positions = [(text.find(s), -len(s), s) for s in stops if s in text]
    if positions:
        pos = min(positions)[0]
        assert stopped and text[pos:].startswith(matched) and matched in stops
        assert out == text[:pos]
    else:
        assert not stopped and out == text
    for stop in stops:
        assert stop not in out
