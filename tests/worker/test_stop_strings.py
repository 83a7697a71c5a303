"""Stop strings over token ids, with a one-character-per-token decoder."""

from __future__ import annotations

from services.worker.stop_strings import StopStringMatcher

VOCAB = {i: ch for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz ")}
IDS = {ch: i for i, ch in VOCAB.items()}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def run(text: str, stops: list[str], no_stop_trim: bool = False
        ) -> tuple[list[int], str | None]:
    matcher = StopStringMatcher(stops, decode, no_stop_trim)
    out: list[int] = []
    released = 0
    sent: list[int] = []
    for ch in text:
        out.append(IDS[ch])
        check = matcher.check(out, released)
        assert check.release >= released or check.matched
        if check.matched:
            sent += out[released:check.release]
            return sent, check.matched
        sent += out[released:check.release]
        released = check.release
    return sent + out[released:], None


def test_no_stop_strings_release_everything() -> None:
    assert run("hello", []) == ([IDS[c] for c in "hello"], None)


def test_match_trims_and_holds_back() -> None:
    sent, matched = run("say stop now", ["stop"])
    assert matched == "stop" and decode(sent) == "say "
    matcher = StopStringMatcher(["stop"], decode)
    ids = [IDS[c] for c in "say st"]
    check = matcher.check(ids, 3)
    assert check.matched is None and check.release == 4  # "st" held back


def test_no_stop_trim_keeps_the_stop_string() -> None:
    sent, matched = run("say stop now", ["stop"], no_stop_trim=True)
    assert matched == "stop" and decode(sent) == "say stop"


def test_earliest_of_several_and_false_starts() -> None:
    sent, matched = run("a sto sta stop", ["stop", "sta"])
    assert matched == "sta" and decode(sent) == "a sto "
    sent, matched = run("a sto b", ["stop"])
    assert matched is None and decode(sent) == "a sto b"


def test_multi_char_tokens_straddling_the_match_are_kept() -> None:
    vocab = {0: "ab", 1: "cd", 2: "ef"}

    def dec(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    matcher = StopStringMatcher(["de"], dec)
    assert matcher.check([0], 0).release == 1
    check = matcher.check([0, 1], 1)
    assert check.matched is None and check.release == 1  # "cd" ends with "d": held
    check = matcher.check([0, 1, 2], 1)
    assert check.matched == "de" and check.release == 2  # "cd" straddles the match start
