"""DecodeSession: decoder -> stop strings -> reasoning, without a network."""

from __future__ import annotations

from typing import Any

from services.common.structs import from_struct, to_struct
from services.tokenizer.reasoning import create_reasoning_parser
from services.tokenizer.stream import DecodeOptions, DecodeSession


def run(session: DecodeSession, ids: list[int]) -> tuple[str, str, bool, str]:
    text = reasoning = matched = ""
    stopped = False
    for n, i in enumerate(ids):
        d = session.step([i], finished=n == len(ids) - 1)
        text += d.text
        reasoning += d.reasoning_text
        stopped, matched = stopped or d.stopped, matched or d.matched_stop
    return text, reasoning, stopped, matched


def test_stop_and_reasoning(loaded: Any) -> None:
    ids = loaded.encode("<think>plan</think>Answer: 42. END ignored")
    session = DecodeSession(loaded, DecodeOptions(stop=[" END"]), create_reasoning_parser("qwen3"))
    assert run(session, ids) == ("Answer: 42.", "plan", True, " END")


def test_special_tokens_kept_when_asked(loaded: Any) -> None:
    ids = [*loaded.encode("hi"), 2]
    assert run(DecodeSession(loaded, DecodeOptions(skip_special_tokens=False)), ids)[0] == \
        "hi<|im_end|>"
    assert run(DecodeSession(loaded, DecodeOptions()), ids)[0] == "hi"


def test_struct_numbers_keep_int_type() -> None:
    value = {"a": 1, "b": 1.5, "c": [2, {"d": 3, "e": []}], "e": None, "f": True, "g": {}}
    back = from_struct(to_struct(value))
    assert back == value
    assert isinstance(back["a"], int) and isinstance(back["c"][1]["d"], int)
