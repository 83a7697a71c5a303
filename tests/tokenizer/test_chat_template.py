"""Chat templates render exactly like transformers' apply_chat_template."""

from __future__ import annotations

from typing import Any

import pytest

from services.tokenizer.chat_template import ChatTemplate, ChatTemplateError, normalize_messages

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello! 👋"},
        {"role": "user", "content": "Now in Japanese: こんにちは? Ünïcödé\ttabs  and spaces"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(loaded: Any, hf_tokenizer: Any, conversation: list[dict[str, Any]],
                              add_generation_prompt: bool) -> None:
    expected = hf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    prompt = loaded.chat_template.render(
        conversation, add_generation_prompt=add_generation_prompt,
        special_tokens=loaded.special_tokens)
    assert prompt == expected
    expected_ids = hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert loaded.encode(prompt) == expected_ids
    hf_ids = hf_tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):
        hf_ids = hf_ids["input_ids"]
    assert loaded.encode(prompt) == list(hf_ids)


def test_continue_final_message_matches_transformers(loaded: Any, hf_tokenizer: Any) -> None:
    conversation = [{"role": "user", "content": "Count to three."},
                    {"role": "assistant", "content": "One, two,"}]
    expected = hf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    prompt = loaded.chat_template.render(conversation, add_generation_prompt=False,
                                         continue_final_message=True)
    assert prompt == expected
    assert prompt.endswith("One, two,")


def test_content_parts_joined_for_string_templates(loaded: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "Hello\nworld"}]
    assert loaded.chat_template.render(parts) == loaded.chat_template.render(plain)


def test_content_list_kept_for_templates_that_iterate_parts() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}"
        "{% endfor %}")
    assert template.content_as_list
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
    assert template.render(messages) == "[a][b]"


def test_non_text_part_is_an_error(loaded: Any) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        loaded.chat_template.render(messages)


def test_tool_call_arguments_parsed_and_tojson_like_hf() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}:{{ c.function.arguments | tojson }}|"
        "{{ c.function.arguments.city }}{% endfor %}{% endfor %}"
        "{{ tools | tojson(indent=None, sort_keys=True) }}")
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Zürich <&>"}'}}]}]
    tools = [{"type": "function", "function": {"name": "weather", "b": 1, "a": 2}}]
    out = template.render(messages, tools=tools)
    assert out.startswith('weather:{"city": "Zürich <&>"}|Zürich <&>')
    assert out.endswith('[{"function": {"a": 2, "b": 1, "name": "weather"}, "type": "function"}]')
    # the caller's messages are left alone
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Zürich <&>"}'


def test_extra_kwargs_and_special_tokens() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}no-think"
        "{% endif %}{{ strftime_now('%Y') | length }}"
        "{% generation %}gen{% endgeneration %}")
    out = template.render([], special_tokens={"bos_token": "<s>"},
                          template_kwargs={"enable_thinking": False})
    assert out == "<s>no-think4gen"


def test_raise_exception_message() -> None:
    template = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="^Conversation roles must alternate$"):
        template.render([{"role": "user", "content": "x"}])


def test_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="syntax"):
        ChatTemplate("{% for m in messages %}")


def test_undefined_attribute_is_an_error() -> None:
    template = ChatTemplate("{{ messages[0].missing.deeper }}")
    with pytest.raises(ChatTemplateError, match="missing"):
        template.render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escape() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{% set _ = messages.append(1) %}x")
    with pytest.raises(ChatTemplateError):
        mutating.render([{"role": "user", "content": "x"}])


def test_normalize_leaves_non_json_arguments() -> None:
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                   "arguments": "not json"}}]}]
    assert normalize_messages(messages, False)[0]["tool_calls"][0]["function"]["arguments"] == \
        "not json"
