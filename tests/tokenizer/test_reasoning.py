"""The <think> reasoning parser, streamed in arbitrary chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tokenizer.reasoning import ThinkParser, create_reasoning_parser


def run(parser: ThinkParser, pieces: list[str]) -> tuple[str, str]:
    reasoning, text = "", ""
    for piece in pieces:
        d = parser.push(piece)
        reasoning += d.reasoning
        text += d.text
    d = parser.flush()
    return reasoning + d.reasoning, text + d.text


def split_every(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100])
def test_qwen3_explicit_block(n: int) -> None:
    text = "<think>\nLet me think.\n</think>\n\nThe answer is 4."
    assert run(create_reasoning_parser("qwen3"), split_every(text, n)) == \
        ("\nLet me think.\n", "The answer is 4.")


@pytest.mark.parametrize("n", [1, 4, 100])
def test_deepseek_starts_in_reasoning(n: int) -> None:
    text = "pondering...</think>Done."
    assert run(create_reasoning_parser("deepseek-r1"), split_every(text, n)) == \
        ("pondering...", "Done.")
    # an explicit start tag from the model is dropped
    assert run(create_reasoning_parser("deepseek-r1"), split_every("<think>" + text, n)) == \
        ("pondering...", "Done.")


def test_qwen3_without_thinking_is_content() -> None:
    assert run(create_reasoning_parser("qwen3"), ["Just ", "an answer <think> tag"]) == \
        ("", "Just an answer <think> tag")


def test_reasoning_open_honoured() -> None:
    assert run(create_reasoning_parser("qwen3", reasoning_open=True), ["a</th", "ink>b"]) == \
        ("a", "b")


def test_unterminated_reasoning_flushes_as_reasoning() -> None:
    assert run(create_reasoning_parser("qwen3"), ["<think>still going </thi"]) == \
        ("still going </thi", "")


def test_unknown_parser() -> None:
    with pytest.raises(KeyError):
        create_reasoning_parser("nope")


@given(reasoning=st.text(alphabet="ab </>thk\n", max_size=20).filter(lambda s: "</think>" not in s),
       answer=st.text(alphabet="xy <>\n", max_size=20).filter(lambda s: s == s.lstrip()),
       size=st.integers(min_value=1, max_value=9))
def test_chunking_does_not_matter(reasoning: str, answer: str, size: int) -> None:
    text = "<think>" + reasoning + "</think>" + answer
    whole = run(create_reasoning_parser("qwen3"), [text])
    assert run(create_reasoning_parser("qwen3"), split_every(text, size)) == whole
    assert whole == (reasoning, answer)


@pytest.mark.parametrize("n", [1, 3, 100])
def test_more_parsers(n: int) -> None:
    assert run(create_reasoning_parser("kimi"),
               split_every("◁think▷plan◁/think▷Answer.", n)) == ("plan", "Answer.")
    assert run(create_reasoning_parser("glm45"),
               split_every("<think>plan</think>Answer.", n)) == ("plan", "Answer.")
    assert run(create_reasoning_parser("step3"), split_every("plan</think>Answer.", n)) == \
        ("plan", "Answer.")
    assert run(create_reasoning_parser("deepseek_r1"), split_every("x</think>y", n)) == ("x", "y")
    assert run(create_reasoning_parser("qwen3_thinking"), split_every("x</think>y", n)) == \
        ("x", "y")


# -- gpt-oss (harmony) -------------------------------------------------------------------------

HARMONY_ANSWER = ("<|channel|>analysis<|message|>User asks capital. Easy.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>")
HARMONY_CALL = ("<|channel|>analysis<|message|>Need the weather tool.<|end|>"
                "<|start|>assistant<|channel|>commentary to=functions.get_weather "
                "<|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")


@pytest.mark.parametrize("n", [1, 2, 5, 1000])
def test_gpt_oss_analysis_is_reasoning_final_is_content(n: int) -> None:
    assert run(create_reasoning_parser("gpt_oss"), split_every(HARMONY_ANSWER, n)) == \
        ("User asks capital. Easy.", "Paris is the capital.")


@pytest.mark.parametrize("n", [1, 3, 1000])
def test_gpt_oss_call_goes_on_for_the_tool_parser(n: int) -> None:
    reasoning, text = run(create_reasoning_parser("gpt-oss"), split_every(HARMONY_CALL, n))
    assert reasoning == "Need the weather tool."
    assert text == ('<|channel|>commentary to=functions.get_weather<|message|>'
                    '{"city": "Paris"}<|call|>')


def test_gpt_oss_preamble_cut_off_and_plain_text() -> None:
    preamble = ("<|channel|>commentary<|message|>Let me check.<|end|>"
                "<|start|>assistant<|channel|>analysis<|message|>still thinking")
    assert run(create_reasoning_parser("gpt_oss"), [preamble]) == \
        ("still thinking", "Let me check.")
    # a model that does not speak harmony: its text is content, untouched
    assert run(create_reasoning_parser("gpt_oss"), split_every("Just <text>.", 2)) == \
        ("", "Just <text>.")
