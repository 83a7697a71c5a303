"""Tool-call parsers on realistic model outputs, fed whole and in every chunking."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tokenizer.tool_parsers import (
    TOOL_PARSERS,
    ToolParser,
    create_tool_parser,
    detect_tool_parser,
    parse_tool_calls,
)

TOOLS = ["get_weather", "get_time", "search"]


def make(name: str, tools: list[str] | None = TOOLS,
         parameters: dict[str, Any] | None = None) -> ToolParser:
    counter = itertools.count()
    return create_tool_parser(name, tools, id_factory=lambda: f"call_{next(counter)}",
                              parameters=parameters)


def stream(name: str, pieces: list[str], tools: list[str] | None = TOOLS,
           parameters: dict[str, Any] | None = None) -> tuple[str, list[dict[str, str]]]:
    """Feeds pieces; checks OpenAI's delta rules; returns (content, calls) from the deltas."""
    parser = make(name, tools, parameters)
    content = ""
    calls: list[dict[str, str]] = []
    results = [parser.push(p) for p in pieces] + [parser.flush()]
    for result in results:
        content += result.text
        for delta in result.calls:
            if delta.index == len(calls):  # the first delta of a call
                assert delta.id and delta.name, delta
                calls.append({"id": delta.id, "name": delta.name, "arguments": delta.arguments})
            else:
                assert delta.index == len(calls) - 1, "deltas go to the newest call only"
                assert not delta.id and not delta.name, "id/name only on the first delta"
                assert delta.arguments, "no empty fragments"
                calls[delta.index]["arguments"] += delta.arguments
    # the parser's own record agrees with what was streamed
    assert [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parser.calls] == calls
    return content, calls


def chunkings(text: str) -> list[list[str]]:
    rnd = random.Random(len(text))
    out = [[text], list(text), [text[i:i + 2] for i in range(0, len(text), 2)],
           [text[i:i + 5] for i in range(0, len(text), 5)]]
    for _ in range(3 if len(text) > 2 else 0):
        cuts = sorted(rnd.sample(range(1, len(text)), min(6, len(text) - 1)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def check(name: str, text: str, want_content: str, want_calls: list[tuple[str, dict]],
          tools: list[str] | None = TOOLS, parameters: dict[str, Any] | None = None) -> None:
    whole_content, whole_calls = parse_tool_calls(name, text, tools, parameters)
    for pieces in chunkings(text):
        content, calls = stream(name, pieces, tools, parameters)
        assert content == whole_content == want_content, pieces
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.name, c.arguments) for c in whole_calls]
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == want_calls


WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"timezone": "Europe/Paris"})


# -- hermes / qwen ---------------------------------------------------------------------------


def test_hermes_qwen25_two_calls() -> None:
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
            '"arguments": {"timezone": "Europe/Paris"}}\n</tool_call>')
    check("hermes", text, "", [WEATHER, TIME])
    _, calls = parse_tool_calls("qwen", text, TOOLS)
    assert calls[0].arguments == '{"city": "Paris", "unit": "celsius"}'  # the model's own JSON


def test_hermes_content_before_and_after() -> None:
    text = ('Let me check the weather for you.\n\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n')
    check("qwen25", text, "Let me check the weather for you.\n\n", [WEATHER])


def test_hermes_plain_answer_and_lookalikes() -> None:
    check("hermes", "The weather in Paris is 18°C. Use <tool to see more.",
          "The weather in Paris is 18°C. Use <tool to see more.", [])
    check("hermes", "", "", [])


def test_hermes_unicode_escapes_and_nested_args() -> None:
    args = {"query": "café \"quoted\" } ] {", "filters": {"lang": ["fr", "en"], "n": 3,
                                                         "exact": True, "x": None}}
    text = ('<tool_call>\n{"name": "search", "arguments": ' + json.dumps(args, ensure_ascii=False)
            + "}\n</tool_call>")
    check("hermes", text, "", [("search", args)])


def test_hermes_missing_close_tag_at_eos() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'
    check("qwen3", text, "", [TIME])


def test_hermes_name_after_arguments_and_string_arguments() -> None:
    text = '<tool_call>{"arguments": {"timezone": "Europe/Paris"}, "name": "get_time"}</tool_call>'
    check("hermes", text, "", [TIME])
    text = ('<tool_call>{"name": "get_time", "arguments": "{\\"timezone\\": '
            '\\"Europe/Paris\\"}"}</tool_call>')
    check("hermes", text, "", [TIME])
    check("hermes", '<tool_call>{"name": "get_time"}</tool_call>', "", [("get_time", {})])


@pytest.mark.parametrize("text", [
    "<tool_call>\nthis is not json\n</tool_call> after",
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a declared tool
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_t',  # cut off before the name completes
])
def test_hermes_fallback_keeps_text(text: str) -> None:
    check("hermes", text, text, [])


def test_hermes_fallback_after_a_committed_call() -> None:
    good = '<tool_call>{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}</tool_call>'
    check("hermes", good + "\n<tool_call>oops</tool_call>", "\n<tool_call>oops</tool_call>",
          [TIME])
    # broken inside the arguments, after the call went out: the rest is content
    text = '<tool_call>{"name": "get_time", "arguments": {"a": 1]}</tool_call>'
    for pieces in chunkings(text):
        content, calls = stream("hermes", pieces)
        assert content == "]}</tool_call>"
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", '{"a": 1')]
    # cut off inside the arguments: the call keeps what came, nothing is invented
    cut, cut_calls = parse_tool_calls("hermes", '<tool_call>{"name": "search", '
                                      '"arguments": {"query": "par', TOOLS)
    assert cut == "" and cut_calls[0].arguments == '{"query": "par'


def test_unknown_names_allowed_without_tools() -> None:
    check("hermes", '<tool_call>{"name": "anything", "arguments": {}}</tool_call>', "",
          [("anything", {})], tools=None)


# -- json --------------------------------------------------------------------------------------


def test_json_list_and_object() -> None:
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
            '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}]')
    check("json", text, "", [WEATHER, TIME])
    check("json", '  {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}',
          "", [TIME])


def test_json_not_a_call_is_content() -> None:
    for text in ['{"answer": 42}', "Hello there", "[1, 2, 3]", '{"name": "get_time", "argu',
                 "[]"]:
        check("json", text, text, [])


# -- llama3 ------------------------------------------------------------------------------------


def test_llama3_python_tag_and_bare_json() -> None:
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
            '"unit": "celsius"}}')
    check("llama3", text, "", [WEATHER])
    text = ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}')
    check("llama", text, "", [WEATHER, TIME])


def test_llama3_text_then_tag_and_code_fallback() -> None:
    text = ('I will look that up.<|python_tag|>{"name": "get_time", "parameters": '
            '{"timezone": "Europe/Paris"}}')
    check("llama3", text, "I will look that up.", [TIME])
    code = '<|python_tag|>brave_search.call(query="paris")'
    check("llama3", code, code, [])
    check("llama3", "Paris is in France.", "Paris is in France.", [])


# -- mistral -----------------------------------------------------------------------------------


def test_mistral_v3_list() -> None:
    text = ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}, {"name": "get_time", "arguments": {"timezone": '
            '"Europe/Paris"}}]')
    check("mistral", text, "", [WEATHER, TIME])


def test_mistral_v11_name_args() -> None:
    text = ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
            '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}')
    check("mistral", text, "", [WEATHER, TIME])


def test_mistral_plain_and_broken() -> None:
    check("mistral", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", [])
    check("mistral", "[TOOL_CALLS] not a list", "[TOOL_CALLS] not a list", [])
    check("mistral", "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]get weather[ARGS]{}", [])


# -- pythonic ----------------------------------------------------------------------------------


def test_pythonic_llama4() -> None:
    text = ('[get_weather(city="Paris", unit=\'celsius\'), '
            'get_time(timezone="Europe/Paris")]')
    check("pythonic", text, "", [WEATHER, TIME])
    text = ('<|python_start|>[search(query="a, (b)", filters={"lang": ["fr"], "exact": True}, '
            'limit=None)]<|python_end|>')
    check("llama4", text, "",
          [("search", {"query": "a, (b)", "filters": {"lang": ["fr"], "exact": True},
                       "limit": None})])


def test_pythonic_fallbacks() -> None:
    for text in ["The list is [1, 2, 3].", "[1, 2, 3]", "[get_weather('Paris')]",
                 "[get_weather(city=some_var)]", "[unknown_tool(a=1)]", "[get_weather(city="]:
        check("pythonic", text, text, [])


# -- deepseek / kimi ---------------------------------------------------------------------------


def test_deepseek_v3() -> None:
    text = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
            'get_weather\n```json\n{"city": "Paris", "unit": "celsius"}\n```'
            "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
            '{"timezone": "Europe/Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    check("deepseekv3", text, "Let me check.", [WEATHER, TIME])
    _, calls = parse_tool_calls("deepseekv3", text, TOOLS)
    assert calls[0].arguments == '{"city": "Paris", "unit": "celsius"}'


def test_deepseek_v31_and_kimi() -> None:
    text = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>"
            '{"timezone": "Europe/Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    check("deepseekv31", text, "", [TIME])
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris", "unit": "celsius"}<|tool_call_end|>'
            "<|tool_calls_section_end|>")
    check("kimi_k2", text, "", [WEATHER])
    assert parse_tool_calls("kimi_k2", text, TOOLS)[1][0].id == "functions.get_weather:0"


def test_section_fallback() -> None:
    text = "<｜tool▁calls▁begin｜>garbage here"
    check("deepseekv31", text, text, [])
    text = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>nope<｜tool▁sep｜>{}"
            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    check("deepseekv31", text, text, [])


# -- qwen3_coder / glm45: one tagged element per argument, typed by the tool's schema ---------

SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "hours": {"type": "array"}, "where": {"type": ["object", "null"]}}},
    "search": {"type": "object", "properties": {"query": {"type": "string"},
                                                "limit": {"type": "number"}}},
}


def test_qwen3_coder_typed_arguments_and_two_calls() -> None:
    text = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n"
            "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n"
            "</parameter>\n<parameter=hours>\n[9, 12]\n</parameter>\n<parameter=where>\n"
            "{'lat': 40.7, 'near': None}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
            "<function=search>\n<parameter=query>\n007\n</parameter>\n<parameter=limit>\n2.5\n"
            "</parameter>\n</function>\n</tool_call>")
    check("qwen3_coder", text, "Let me check.\n", [
        ("get_weather", {"city": "New York", "days": 3, "metric": True, "hours": [9, 12],
                         "where": {"lat": 40.7, "near": None}}),
        ("search", {"query": "007", "limit": 2.5})], parameters=SCHEMAS)


def test_qwen3_coder_multiline_text_values_and_no_schema() -> None:
    code = "def f(x):\n    return x < 3 and x > 1\n"
    text = ("<tool_call>\n<function=search>\n<parameter=query>\n" + code + "\n</parameter>\n"
            "<parameter=limit>\n10\n</parameter>\n</function>\n</tool_call>")
    # With the schema, limit is a number; without one every value is text, as written.
    check("qwen3_coder", text, "", [("search", {"query": code, "limit": 10})],
          parameters=SCHEMAS)
    check("qwen3_coder", text, "", [("search", {"query": code, "limit": "10"})])


def test_qwen3_coder_no_arguments_eos_and_cut_off() -> None:
    check("qwen3_coder", "<tool_call>\n<function=get_time>\n</function>", "",
          [("get_time", {})])
    # max_tokens inside the second argument: the call keeps the first, the rest is content
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "<parameter=days>\n1")
    check("qwen3_coder", text, "<parameter=days>\n1", [("get_weather", {"city": "Oslo"})],
          parameters=SCHEMAS)


def test_qwen3_coder_lookalikes_and_unknown_tools_stay_content() -> None:
    for text in ["Use <tool_call> tags like <function=x>.", "a < b and <tool_call>",
                 "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>"]:
        check("qwen3_coder", text, text, [])


def test_glm45_and_glm47_formats() -> None:
    glm45 = ("I'll look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
             "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n"
             "<tool_call>get_time\n<arg_key>timezone</arg_key>\n<arg_value>Europe/Paris"
             "</arg_value>\n</tool_call>")
    check("glm45", glm45, "I'll look.\n", [("get_weather", {"city": "Paris", "days": 2}),
                                           TIME], parameters=SCHEMAS)
    glm47 = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
             "<arg_key>hours</arg_key><arg_value>[1, 2]</arg_value></tool_call>")
    check("glm47_moe", glm47, "", [("get_weather", {"city": "Paris", "hours": [1, 2]})],
          parameters=SCHEMAS)
    check("glm45", "<tool_call>get_time</tool_call>", "", [("get_time", {})])


def test_glm45_broken_markup_is_content() -> None:
    check("glm45", "<tool_call>nope\n</tool_call>", "<tool_call>nope\n</tool_call>", [])
    text = "<tool_call>get_time\n<arg_value>x</arg_value></tool_call> after"
    check("glm45", text, "<arg_value>x</arg_value></tool_call> after", [("get_time", {})])


def test_step3_section_and_typed_arguments() -> None:
    text = ("Let me check.<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜>"
            '<steptml:invoke name="get_weather"><steptml:parameter name="city">Paris'
            '</steptml:parameter><steptml:parameter name="days">2</steptml:parameter>'
            "</steptml:invoke><｜tool_call_end｜><｜tool_call_begin｜>function<｜tool_sep｜>"
            '<steptml:invoke name="get_time"><steptml:parameter name="timezone">Europe/Paris'
            "</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜>")
    check("step3", text, "Let me check.", [("get_weather", {"city": "Paris", "days": 2}), TIME],
          parameters=SCHEMAS)
    # with the newlines Step-3 writes between the elements
    spaced = ("Let me help you.\n<｜tool_calls_begin｜>\n<｜tool_call_begin｜>function<｜tool_sep｜>"
              '<steptml:invoke name="search">\n<steptml:parameter name="query">rust'
              '</steptml:parameter>\n<steptml:parameter name="limit">10</steptml:parameter>\n'
              "</steptml:invoke><｜tool_call_end｜>\n<｜tool_calls_end｜>\nHere are the results.")
    content, calls = parse_tool_calls("step3", spaced, TOOLS, SCHEMAS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("search", {"query": "rust", "limit": 10})]
    assert content.split() == ["Let", "me", "help", "you.", "Here", "are", "the", "results."]
    # an unknown tool: the call's markup stays content
    bad = ('<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="rm">'
           "</steptml:invoke><｜tool_call_end｜>")
    check("step3", bad, bad, [])


def test_gpt_oss_harmony_calls() -> None:
    # as the gpt_oss reasoning parser passes a call on
    text = ('<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris", '
            '"unit": "celsius"}<|call|>')
    check("gpt_oss", text, "", [WEATHER])
    # raw harmony without the reasoning parser: other messages are content without framing
    raw = ("<|channel|>analysis<|message|>Need time.<|end|><|start|>assistant<|channel|>"
           "commentary to=functions.get_time <|constrain|>json<|message|> "
           '{"timezone": "Europe/Paris"}<|call|>')
    check("gpt_oss", raw, "Need time.", [TIME])
    check("gpt_oss", "<|channel|>commentary to=functions.get_time<|message|><|call|>", "",
          [("get_time", {})])
    # a tool the request does not have, and a built-in recipient, stay content
    check("gpt_oss", "<|channel|>commentary to=functions.rm<|message|>{}<|call|>", "{}", [])
    check("gpt_oss", "<|channel|>analysis to=python<|message|>1+1<|call|>", "1+1", [])


# -- properties --------------------------------------------------------------------------------


_args = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text("abcxyz_", min_size=1, max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(prefix=st.text(st.characters(codec="utf-8"), max_size=20)
       .filter(lambda t: "<" not in t),
       calls=st.lists(st.tuples(st.sampled_from(TOOLS),
                                st.dictionaries(st.text("abc_", min_size=1, max_size=4), _args,
                                                max_size=3)), min_size=1, max_size=3),
       seed=st.integers(0, 1000))
def test_hermes_random_calls_any_chunking(prefix: str, calls: list[tuple[str, dict]],
                                          seed: int) -> None:
    text = prefix + "".join(
        "<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False)
        + "\n</tool_call>\n" for n, a in calls)
    rnd = random.Random(seed)
    cuts = sorted(set(rnd.randrange(1, len(text)) for _ in range(rnd.randrange(1, 20))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    content, streamed = stream("hermes", pieces)
    assert content == prefix
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls


def test_registry_and_detection() -> None:
    for name in ["json", "hermes", "qwen", "qwen25", "llama3", "llama", "mistral", "pythonic",
                 "deepseekv3", "deepseekv31", "kimi_k2"]:
        assert name in TOOL_PARSERS
    assert detect_tool_parser("Qwen/Qwen2.5-7B-Instruct") == "hermes"
    assert detect_tool_parser("meta-llama/Llama-3.1-8B-Instruct") == "llama3"
    assert detect_tool_parser("meta-llama/Llama-4-Scout-17B-16E") == "pythonic"
    assert detect_tool_parser("mistralai/Mistral-7B-Instruct-v0.3") == "mistral"
    assert detect_tool_parser("deepseek-ai/DeepSeek-V3.1") == "deepseekv31"
    assert detect_tool_parser("Qwen/Qwen3-Coder-480B-A35B-Instruct") == "qwen3_coder"
    assert detect_tool_parser("Qwen/Qwen3-8B") == "hermes"
    assert detect_tool_parser("zai-org/GLM-4.5-Air") == "glm45"
    assert detect_tool_parser("zai-org/GLM-4.7") == "glm45"
    assert detect_tool_parser("openai/gpt-oss-20b") == "gpt_oss"
    assert detect_tool_parser("stepfun-ai/step3") == "step3"
    assert detect_tool_parser("SmolLM2-135M-Instruct") == ""
    with pytest.raises(KeyError):
        create_tool_parser("nope")


_FRAGMENTS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]",
              "<|python_start|>", "<|python_end|>", "<｜tool▁calls▁begin｜>",
              "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "```json",
              '{"name": "get_time", ', '"arguments": ', '{"a": [1, "x"]}', "}", "]", "[",
              "get_time(", "a=1", ")", ",", ";", " ", "\n", "text", '"', "\\", "é",
              "<function=get_time>", "<parameter=a>", "</parameter>", "</function>",
              "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "get_time\n",
              "<|channel|>", "<|message|>", "<|call|>", "<|end|>", "<|start|>assistant",
              "commentary to=functions.get_time ", "analysis", "<｜tool_calls_begin｜>",
              "<｜tool_call_begin｜>function<｜tool_sep｜>", '<steptml:invoke name="get_time">',
              '<steptml:parameter name="a">', "</steptml:parameter>", "</steptml:invoke>",
              "<｜tool_call_end｜>", "<｜tool_calls_end｜>"]


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=14), seed=st.integers(0, 10**6))
@pytest.mark.parametrize("name", ["json", "hermes", "llama3", "mistral", "pythonic",
                                  "deepseekv3", "deepseekv31", "kimi_k2", "qwen3_coder",
                                  "glm45", "gpt_oss", "step3"])
def test_any_text_streams_like_whole(name: str, parts: list[str], seed: int) -> None:
    """Arbitrary text: chunking never changes the result, and no text is lost."""
    text = "".join(parts)
    whole_content, whole_calls = parse_tool_calls(name, text, TOOLS)
    rnd = random.Random(seed)
    cuts = sorted(set(rnd.randrange(1, len(text)) for _ in range(8))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for chunks in (pieces, list(text)):
        content, calls = stream(name, chunks)
        assert content == whole_content
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.name, c.arguments) for c in whole_calls]
    # (harmony's framing of complete messages and step3's section markers are not content)
    framing = {"gpt_oss": ("<|message|>",), "step3": ("<｜tool_calls_begin｜>",
                                                      "<｜tool_calls_end｜>")}
    if not whole_calls and not any(m in text for m in framing.get(name, ())):
        assert whole_content == text
