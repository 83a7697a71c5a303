"""Item validation and page tokens: INVALID_ARGUMENT naming the field, nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from services.history.domain import (
    DEFAULT_MAX_ITEM_BYTES,
    InvalidInput,
    Item,
    StoredResponse,
    item_size,
    normalize_item,
    validate_page_token,
)

from .conftest import OpenRepo


def msg(text: str = "hi", role: str = "user", **extra: Any) -> Item:
    return Item(type="message", role=role,
                data={"content": [{"type": "input_text", "text": text}], **extra})


@pytest.mark.parametrize(("item", "field"), [
    (Item(), "items[0]"),
    (Item(type="Message!", data={"content": "x"}), "items[0].type"),
    (Item(type="message", data={"content": "x"}), "items[0].role"),
    (Item(type="message", role="wizard", data={"content": "x"}), "items[0].role"),
    (Item(type="message", role="user"), "items[0].data.content"),
    (Item(type="message", role="user", data={"content": 7}), "items[0].data.content"),
    (Item(type="message", role="user", data={"content": [{"text": "no type"}]}),
     "items[0].data.content[0]"),
    (Item(type="message", role="user", data={"content": ["bare"]}), "items[0].data.content[0]"),
    (Item(type="message", role="user", data={"type": "reasoning", "content": "x"}),
     "items[0].type"),
    (Item(id="msg_a", type="message", role="user", data={"id": "msg_b", "content": "x"}),
     "items[0].id"),
    (Item(id="msg a", type="message", role="user", data={"content": "x"}), "items[0].id"),
    (Item(type="message", role="user", data={"role": 5, "content": "x"}), "items[0].data.role"),
    (Item(type="function_call", data={"arguments": "{}"}), "items[0].data.name"),
    (Item(type="function_call", data={"name": "f", "arguments": {"a": 1}}),
     "items[0].data.arguments"),
    (Item(type="function_call_output", data={"output": "x"}), "items[0].data.call_id"),
    (Item(type="function_call_output", data={"call_id": "c"}), "items[0].data.output"),
    (Item(type="message", role="user", status="s" * 33, data={"content": "x"}),
     "items[0].status"),
])
def test_malformed_items_name_the_field(item: Item, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        normalize_item(item, "items[0]")
    assert err.value.field == field, err.value.message


def test_well_formed_items_pass() -> None:
    assert normalize_item(msg(), "items[0]").id.startswith("msg_")
    assert normalize_item(Item(data={"type": "message", "role": "assistant",
                                     "content": "plain string"}), "i").role == "assistant"
    fc = normalize_item(Item(type="function_call",
                             data={"name": "f", "arguments": "{}", "call_id": "c1"}), "i")
    assert fc.id.startswith("fc_")
    out = normalize_item(Item(type="function_call_output",
                              data={"call_id": "c1", "output": "42"}), "i")
    assert out.type == "function_call_output"
    # Types the service does not know are stored as they are (reasoning, mcp_call, ...).
    assert normalize_item(Item(type="reasoning", data={"summary": []}), "i").id.startswith("rs_")


def test_item_size_limit() -> None:
    limit = 2048
    normalize_item(msg("x" * 1500), "items[0]", max_bytes=limit)
    with pytest.raises(InvalidInput) as err:
        normalize_item(msg("x" * 3000), "items[2]", max_bytes=limit)
    assert err.value.field == "items[2].data"
    assert "2048" in err.value.message and "--max-item-bytes" in err.value.message
    # Multi-byte text counts in UTF-8 bytes, not characters.
    with pytest.raises(InvalidInput):
        normalize_item(msg("é" * 1100), "items[0]", max_bytes=limit)
    assert DEFAULT_MAX_ITEM_BYTES == 1024 * 1024
    assert item_size({"a": "é"}) == len('{"a":"é"}'.encode())


def test_page_token_shape() -> None:
    assert validate_page_token("") == ""
    assert validate_page_token("msg_abc") == "msg_abc"
    for bad in ("x" * 129, "msg_\x00", "a\nb"):
        with pytest.raises(InvalidInput) as err:
            validate_page_token(bad)
        assert err.value.field == "page_token"


async def test_repository_rejects_and_writes_nothing(open_repo: OpenRepo, tenant: str) -> None:
    """Every storing backend (sql-sqlite, sql-postgres, memory) rejects and writes nothing."""
    repo = await open_repo(max_item_bytes=4096)
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation(tenant, items=[msg(), msg("y" * 5000)])
    assert err.value.field == "items[1].data"
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation(tenant, items=[msg(), Item()])
    assert err.value.field == "items[1]"
    assert (await repo.list_conversations(tenant)).items == []

    conv, _ = await repo.create_conversation(tenant, items=[msg("first")])
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation_items(tenant, conv.id,
                                             [msg(), Item(type="message", role="user")])
    assert err.value.field == "items[1].data.content"
    with pytest.raises(InvalidInput) as err:
        await repo.create_response(tenant, StoredResponse(
            model="m", input_items=[msg()], output_items=[msg("z" * 5000, "assistant")]))
    assert err.value.field == "response.output_items[0].data"
    assert len((await repo.list_conversation_items(tenant, conv.id)).items) == 1

    for call in (
        lambda: repo.list_conversation_items(tenant, conv.id, page_token="t" * 200),
        lambda: repo.list_conversations(tenant, page_token="conv_\x01"),
        lambda: repo.list_conversations(tenant, page_token="conv_nope"),
    ):
        with pytest.raises(InvalidInput) as err:
            await call()
        assert err.value.field == "page_token"
