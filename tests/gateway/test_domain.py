"""Plain-Python parts of the gateway: items, schema checks, the Responses event builder."""

from __future__ import annotations

import pytest

from services.gateway.errors import OpenAIError
from services.gateway.items import integral, items_to_messages, normalize_input
from services.gateway.schema import check_json_schema
from services.gateway.serving_chat import Delta, ToolCallPart, _tool_delta
from services.gateway.serving_responses import OutputBuilder


def test_input_normalisation_and_messages() -> None:
    items = normalize_input([
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ])
    assert items[0] == {"role": "user", "type": "message", "status": "completed",
                        "content": [{"type": "input_text", "text": "hi"}]}
    assert items_to_messages(items) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    with pytest.raises(OpenAIError) as exc:
        normalize_input([{"type": "function_call", "call_id": "c"}])
    assert exc.value.param == "input[0].name"


def test_struct_numbers_come_back_as_ints() -> None:
    assert integral({"a": 3.0, "b": [1.5, 2.0]}) == {"a": 3, "b": [1.5, 2]}


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "objekt"}, "s.type"),
    ({"properties": {"a": {"type": "string", "pattern": "("}}}, "s.properties.a.pattern"),
    ({"anyOf": []}, "s.anyOf"),
    ({"required": "a"}, "s.required"),
    ({"$ref": "#/$defs/x"}, "s.$ref"),
    ({"items": 5}, "s.items"),
    ({"minLength": -1}, "s.minLength"),
])
def test_bad_schemas_name_the_path(schema: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as exc:
        check_json_schema(schema, "s")
    assert exc.value.status == 400 and exc.value.param == param


def test_good_schema_passes() -> None:
    check_json_schema({"type": "object", "$defs": {"x": {"type": "string"}},
                       "properties": {"a": {"$ref": "#/$defs/x"}, "b": {"type": ["null", "integer"],
                                                                         "minimum": 0}},
                       "required": ["a"], "additionalProperties": False}, "s")


def test_tool_deltas_follow_openai_rules() -> None:
    assert _tool_delta(ToolCallPart(0, "call_1", "f", "")) == {
        "index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert _tool_delta(ToolCallPart(0, "", "", '{"a"')) == {
        "index": 0, "function": {"arguments": '{"a"'}}


def test_output_builder_events() -> None:
    b = OutputBuilder()
    b.add(Delta(reasoning="think"))
    b.add(Delta(text="Hel"))
    b.add(Delta(text="lo"))
    b.add(Delta(tool_calls=[ToolCallPart(0, "c1", "f", '{"x":')]))
    b.add(Delta(tool_calls=[ToolCallPart(0, "", "", "1}")]))
    b.close()
    kinds = [e["type"] for e in b.take()]
    assert kinds == [
        "response.output_item.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done"]
    assert [o["type"] for o in b.output] == ["reasoning", "message", "function_call"]
    assert b.output[1]["content"][0]["text"] == "Hello"
    assert b.output[2]["arguments"] == '{"x":1}' and b.output[2]["call_id"] == "c1"
    assert all(o["status"] == "completed" for o in b.output)
