"""Incremental decoding: the deltas add up to the full decode; no partial characters."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tokenizer.incremental import REPLACEMENT, IncrementalDecoder

SAMPLES = [
    "Hello, world! The capital of France is Paris.",
    "emoji 🎉👩‍👩‍👧‍👦 and CJK 你好世界, accents éàü, tabs\tand  double  spaces",
    "<|im_start|>assistant\nspecial tokens inside<|im_end|>",
    "def f(x):\n    return x ** 2  # 🐍\n",
]


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, pos, n = [], 0, 0
    while pos < len(ids):
        size = sizes[n % len(sizes)] if sizes else 1
        out.append(ids[pos:pos + size])
        pos += size
        n += 1
    return out


def _run(tok: Any, ids: list[int], sizes: list[int], skip: bool) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas = [decoder.step(chunk) for chunk in _chunks(ids, sizes)]
    deltas.append(decoder.finish())
    return deltas


def test_samples_one_token_at_a_time(loaded: Any) -> None:
    for text in SAMPLES:
        ids = loaded.encode(text)
        for skip in (True, False):
            deltas = _run(loaded, ids, [1], skip)
            assert "".join(deltas) == loaded.decode(ids, skip_special_tokens=skip)
            assert all(not d.endswith(REPLACEMENT) for d in deltas[:-1])
        assert "".join(_run(loaded, ids, [1], False)) == text


def test_emoji_is_never_split(loaded: Any) -> None:
    ids = loaded.encode("🎉")
    assert len(ids) > 1  # byte-level pieces
    decoder = IncrementalDecoder(loaded)
    deltas = [decoder.step([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_prompt_context_gives_leading_space(loaded: Any) -> None:
    prompt = loaded.encode("The capital of France is")
    out = loaded.encode(" Paris. Really")
    decoder = IncrementalDecoder(loaded, prompt_token_ids=prompt)
    text = "".join(decoder.step([i]) for i in out) + decoder.finish()
    assert text == " Paris. Really"


def test_window_stays_small(loaded: Any) -> None:
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return loaded.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = loaded.encode("word " * 400)
    decoder = IncrementalDecoder(Counting())
    for i in ids:
        decoder.step([i])
    assert max(calls) <= 4


def test_held_invalid_bytes_flush_at_finish(loaded: Any) -> None:
    lone = loaded.encode("🎉")[:1]  # the first byte of a 4-byte character only
    decoder = IncrementalDecoder(loaded)
    assert decoder.step(lone) == ""
    assert decoder.finish() == loaded.decode(lone)


FIXTURE_OK = [HealthCheck.function_scoped_fixture]
_SPECIAL = list(range(0, 17))
_BYTEISH = list(range(17, 300))  # single bytes and short pieces (incl. UTF-8 fragments)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_deltas_equal_full_decode(loaded: Any, data: st.DataObject) -> None:
    emoji_ids = [i for text in ("🎉", "你好", "é", "👩‍👧", "€") for i in loaded.encode(text)]
    token = st.one_of(
        st.sampled_from(_BYTEISH),
        st.sampled_from(emoji_ids),
        st.sampled_from(_SPECIAL),
        st.integers(min_value=0, max_value=loaded.vocab_size - 1),
    )
    ids = data.draw(st.lists(token, max_size=40))
    sizes = data.draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5))
    skip = data.draw(st.booleans())
    deltas = _run(loaded, ids, sizes, skip)
    assert "".join(deltas) == loaded.decode(ids, skip_special_tokens=skip)
    for delta in deltas[:-1]:
        assert not delta.endswith(REPLACEMENT)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                    max_size=40))
def test_round_trip_random_text(loaded: Any, text: str) -> None:
    ids = loaded.encode(text)
    deltas = _run(loaded, ids, [1], False)
    full = loaded.decode(ids, skip_special_tokens=False)
    assert "".join(deltas) == full
    if REPLACEMENT not in full:  # (a few characters lack byte tokens in this vocab)
        assert all(REPLACEMENT not in d for d in deltas)
