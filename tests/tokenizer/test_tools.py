"""Tool definitions: validation with precise field names, and tool calls in DecodeSession."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tokenizers

from services.tokenizer.core import TokenizerCore
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.reasoning import create_reasoning_parser
from services.tokenizer.stream import DecodeOptions, DecodeSession
from services.tokenizer.tool_parsers import create_tool_parser
from services.tokenizer.tools import validate_tools


def fn(name: str = "get_weather", **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


WEATHER = fn(description="Weather in a city", parameters={
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]})


def test_valid_tools() -> None:
    assert validate_tools([WEATHER, fn("get_time", parameters={"type": "object"}),
                           fn("mcp.search:v2", strict=True)]) == \
        ["get_weather", "get_time", "mcp.search:v2"]
    assert validate_tools(None) == [] and validate_tools([]) == []


@pytest.mark.parametrize(("tools", "field", "words"), [
    ([WEATHER, "nope"], "tools[1]", "must be an object"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type", "'function'"),
    ([{"type": "function"}], "tools[0].function", "must be an object"),
    ([WEATHER, fn("")], "tools[1].function.name", "is required"),
    ([fn("get weather")], "tools[0].function.name", "1 to 64 characters"),
    ([fn("x" * 65)], "tools[0].function.name", "1 to 64 characters"),
    ([WEATHER, fn("get_weather")], "tools[1].function.name", "already the name of tools[0]"),
    ([fn(description=3)], "tools[0].function.description", "string"),
    ([fn(strict="yes")], "tools[0].function.strict", "boolean"),
    ([fn(parameters="{}")], "tools[0].function.parameters", "JSON Schema object"),
    ([fn(parameters={"type": "array"})], "tools[0].function.parameters.type", "'object'"),
    ([fn(parameters={"type": "object", "properties": {"city": {"type": "text"}}})],
     "tools[0].function.parameters.properties.city.type", "must be one of"),
    ([fn(parameters={"type": "object", "properties": []})],
     "tools[0].function.parameters.properties", "must be an object"),
    ([fn(parameters={"type": "object", "required": "city"})],
     "tools[0].function.parameters.required", "list of property names"),
    ([fn(parameters={"type": "object", "properties": {"a": {"anyOf": []}}})],
     "tools[0].function.parameters.properties.a.anyOf", "non-empty list"),
    ([fn(parameters={"type": "object", "properties": {"a": {"type": "array", "items": 3}}})],
     "tools[0].function.parameters.properties.a.items", "JSON Schema object"),
])
def test_invalid_tools(tools: list[Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_tools(tools)
    assert info.value.field == field
    assert words in str(info.value) and field in str(info.value)


def test_core_validates_tools(tmp_path: Any, tokenizer_dir: Any) -> None:
    core = TokenizerCore(tmp_path)
    core.load_dir("smollm2", str(tokenizer_dir))
    with pytest.raises(InvalidRequest) as info:
        core.render_chat("smollm2", [{"role": "user", "content": "hi"}],
                         tools=[WEATHER, fn("bad name")])
    assert info.value.field == "tools[1].function.name"
    with pytest.raises(InvalidRequest) as info:
        core.open_stream("smollm2", DecodeOptions(), tools=[{"function": {}}])
    assert info.value.field == "tools[0].function.name"
    with pytest.raises(InvalidRequest) as info:
        core.open_stream("smollm2", DecodeOptions(), tool_parser="nope", tools=[WEATHER])
    assert info.value.field == "tool_parser" and "hermes" in str(info.value)
    # no tools: no tool parsing, whatever the parser; auto: by model name, else JSON
    assert core.open_stream("smollm2", DecodeOptions(), tool_parser="hermes").tool_parser == ""
    core.load_dir("Qwen2.5-7B-Instruct", str(tokenizer_dir))
    assert core.open_stream("Qwen2.5-7B-Instruct", DecodeOptions(),
                            tools=[WEATHER]).tool_parser == "hermes"
    assert core.open_stream("smollm2", DecodeOptions(), tools=[WEATHER]).tool_parser == "json"
    spec = core.open_stream("smollm2", DecodeOptions(), reasoning_parser="passthrough")
    assert spec.new_session().reasoning is None
    # reasoning auto (the default): harmony for gpt-oss, whose raw output is markup; else none
    assert core.open_stream("smollm2", DecodeOptions()).reasoning_parser == ""
    core.load_dir("openai/gpt-oss-20b", str(tokenizer_dir))
    assert core.open_stream("openai/gpt-oss-20b", DecodeOptions()).reasoning_parser == "gpt_oss"
    assert core.open_stream("openai/gpt-oss-20b", DecodeOptions(),
                            reasoning_parser="passthrough").new_session().reasoning is None


def run(session: DecodeSession, ids: list[int]) -> tuple[str, str, list[dict[str, str]]]:
    text = reasoning = ""
    calls: list[dict[str, str]] = []
    for n, i in enumerate(ids):
        d = session.step([i], finished=n == len(ids) - 1)
        text += d.text
        reasoning += d.reasoning_text
        for c in d.tool_calls:
            if c.name:
                assert c.index == len(calls) and c.id
                calls.append({"name": c.name, "arguments": c.arguments})
            else:
                calls[c.index]["arguments"] += c.arguments
    return text, reasoning, calls


def test_session_reasoning_then_tool_calls(loaded: Any) -> None:
    output = ('<think>The user wants weather.</think>\nChecking.\n<tool_call>\n{"name": '
              '"get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>')
    ids = loaded.encode(output)
    session = DecodeSession(loaded, DecodeOptions(), create_reasoning_parser("qwen3"),
                            create_tool_parser("hermes", ["get_weather"]),
                            loaded.special_token_ids)
    text, reasoning, calls = run(session, ids)
    assert reasoning == "The user wants weather."
    assert text == "Checking.\n"
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Zürich"}'}]


def test_special_marker_tokens_survive_skip(tokenizer_dir: Any) -> None:
    """<|python_tag|> is a special token (Llama 3): kept for the parser, other specials not."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens(["<|python_tag|>", "<|eom_id|>"])
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    output = ('<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}<|eom_id|>')
    ids = tok.encode(output, add_special_tokens=False).ids
    session = DecodeSession(tok, DecodeOptions(), None,
                            create_tool_parser("llama3", ["get_time"]), special)
    text, _, calls = run(session, ids)
    assert text == ""  # <|eom_id|> still skipped
    assert calls == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]
    # without a tool parser, the marker is skipped like any special token
    plain = DecodeSession(tok, DecodeOptions(), None, None, special)
    assert run(plain, ids)[0] == json.dumps({"name": "get_time", "parameters": {"tz": "UTC"}})


def test_gpt_oss_harmony_tokens_through_a_session(tokenizer_dir: Any) -> None:
    """gpt-oss's framing tokens are special: both parsers see them, others stay skipped."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens(["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>",
                            "<|constrain|>", "<|return|>", "<|endoftext|>"])
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    output = ("<|channel|>analysis<|message|>Weather needed.<|end|><|start|>assistant"
              "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
              '{"city": "Oslo"}<|call|><|endoftext|>')
    ids = tok.encode(output, add_special_tokens=False).ids
    session = DecodeSession(tok, DecodeOptions(), create_reasoning_parser("gpt_oss"),
                            create_tool_parser("gpt_oss", ["get_weather"]), special)
    text, reasoning, calls = run(session, ids)
    assert (text, reasoning) == ("", "Weather needed.")
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    answer = ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
              "<|message|>Oslo is cold.<|return|>")
    session = DecodeSession(tok, DecodeOptions(), create_reasoning_parser("gpt_oss"), None,
                            special)
    assert run(session, tok.encode(answer, add_special_tokens=False).ids)[:2] == \
        ("Oslo is cold.", "Easy.")


def test_stop_string_ends_tool_parsing(loaded: Any) -> None:
    ids = loaded.encode('<tool_call>{"name": "f", "arguments": {}}</tool_call> STOP more')
    session = DecodeSession(loaded, DecodeOptions(stop=[" STOP"]), None,
                            create_tool_parser("hermes", ["f"]), loaded.special_token_ids)
    text, _, calls = run(session, ids)
    assert text == "" and calls == [{"name": "f", "arguments": "{}"}]
