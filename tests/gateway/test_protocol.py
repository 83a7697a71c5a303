"""Request validation: a bad request names the offending parameter, OpenAI style."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.protocol import ChatCompletionRequest
from services.gateway.server import validation_error


def _error(body: dict) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(exc.value)
    assert error.status == 400 and error.type == "invalid_request_error"
    return error.param, error.message


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "messages"),
    ({"messages": MSG}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": MSG, "temperature": 2.5}, "temperature"),
    ({"model": "m", "messages": MSG, "temperature": -0.1}, "temperature"),
    ({"model": "m", "messages": MSG, "top_p": 0}, "top_p"),
    ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": MSG, "presence_penalty": 3}, "presence_penalty"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": MSG, "stop": [""]}, "stop"),
])
def test_invalid_fields_are_named(body: dict, param: str) -> None:
    assert _error(body)[0] == param


def test_missing_parameter_message() -> None:
    assert _error({"model": "m"})[1] == "Missing required parameter: 'messages'."


def test_unknown_fields_are_accepted_and_defaults_are_semantic() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "some_vendor_field": 1, "stop": "END"})
    assert request.temperature == 1.0 and request.top_p == 1.0 and request.top_k == -1
    assert request.stop_list == ["END"]
    assert request.max_new_tokens is None
    assert ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "max_completion_tokens": 7, "max_tokens": 9}
    ).max_new_tokens == 7
