"""What holds for every backend (sql-sqlite, sql-postgres, memory, none), then the memory
backend's bounds and the none backend's answers.

The full repository contract (test_repository.py, test_validation.py) runs on every storing
backend; here ``any_repo`` adds ``none`` for what a backend that stores nothing must share:
the same INVALID_ARGUMENT for a bad request, NOT_FOUND for unknown ids.
"""

from __future__ import annotations

import ast
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.config import parse_config
from services.history.backends import BACKENDS, Repository, open_repository
from services.history.config import HistoryConfig
from services.history.domain import (
    InvalidInput,
    Item,
    NotFound,
    NotStored,
    ResponseUpdate,
    SortOrder,
    StoredResponse,
    utcnow,
)
from services.history.memory import MemoryLimits, MemoryRepository
from services.history.null import NullRepository
from services.history.repository import HistoryRepository

ROOT = Path(__file__).resolve().parents[2]


def msg(text: str, role: str = "user", item_id: str = "") -> Item:
    return Item(id=item_id, type="message", role=role,
                data={"content": [{"type": "input_text", "text": text}]})


# ---- every backend ----------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, Callable[[Repository, str], Awaitable[Any]]]] = [
    ("metadata", lambda r, t: r.create_conversation(t, {f"k{i}": "v" for i in range(17)})),
    ("items", lambda r, t: r.create_conversation(t, items=[msg("x") for _ in range(21)])),
    ("items[0]", lambda r, t: r.create_conversation(t, items=[Item()])),
    ("items[0].data.content",
     lambda r, t: r.create_conversation(t, items=[Item(type="message", role="user")])),
    ("items", lambda r, t: r.create_conversation(t, items=[msg("a", item_id="msg_1"),
                                                           msg("b", item_id="msg_1")])),
    ("request_id", lambda r, t: r.create_conversation(t, request_id="r" * 257)),
    ("conversation.id", lambda r, t: r.update_conversation(t, "", {})),
    ("conversation_id", lambda r, t: r.get_conversation(t, "")),
    ("conversation_id", lambda r, t: r.create_conversation_items(t, "", [msg("x")])),
    ("items", lambda r, t: r.create_conversation_items(t, "conv_x", [])),
    ("item_id", lambda r, t: r.get_conversation_item(t, "conv_x", "")),
    ("page_size", lambda r, t: r.list_conversations(t, page_size=101)),
    ("page_token", lambda r, t: r.list_conversations(t, page_token="conv_nope")),
    ("page_token", lambda r, t: r.list_conversation_items(t, "conv_x", page_token="\x01")),
    ("page_size", lambda r, t: r.list_response_input_items(t, "resp_x", page_size=-1)),
    ("response.metadata", lambda r, t: r.create_response(t, StoredResponse(
        metadata={"k": "v" * 513}))),
    ("append_to_conversation", lambda r, t: r.create_response(t, StoredResponse(), True)),
    ("response.output_items[0].data.call_id", lambda r, t: r.create_response(t, StoredResponse(
        output_items=[Item(type="function_call_output", data={"output": "1"})]))),
    ("response.id", lambda r, t: r.create_response(t, StoredResponse(id="r" * 200))),
    ("response.status", lambda r, t: r.update_response(t, "resp_x", ResponseUpdate(
        status="s" * 33))),
    ("max_depth", lambda r, t: r.get_response_chain(t, "resp_x", max_depth=-1)),
    ("response_id", lambda r, t: r.get_response(t, "")),
]


@pytest.mark.parametrize(("field", "call"), BAD_REQUESTS,
                         ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD_REQUESTS)])
async def test_bad_requests_rejected_alike(any_repo: Repository, tenant: str, field: str,
                                           call: Callable[[Repository, str], Awaitable[Any]]
                                           ) -> None:
    with pytest.raises(InvalidInput) as err:
        await call(any_repo, tenant)
    assert err.value.field == field, err.value.message


UNKNOWN_IDS: list[tuple[str, Callable[[Repository, str], Awaitable[Any]]]] = [
    ("conversation", lambda r, t: r.get_conversation(t, "conv_x")),
    ("conversation", lambda r, t: r.update_conversation(t, "conv_x", {"a": "b"})),
    ("conversation", lambda r, t: r.delete_conversation(t, "conv_x")),
    ("conversation", lambda r, t: r.create_conversation_items(t, "conv_x", [msg("x")])),
    ("conversation", lambda r, t: r.list_conversation_items(t, "conv_x")),
    ("conversation", lambda r, t: r.get_conversation_item(t, "conv_x", "msg_x")),
    ("conversation", lambda r, t: r.delete_conversation_item(t, "conv_x", "msg_x")),
    ("conversation", lambda r, t: r.create_response(t, StoredResponse(conversation_id="conv_x"))),
    ("response", lambda r, t: r.create_response(t, StoredResponse(
        previous_response_id="resp_x"))),
    ("response", lambda r, t: r.get_response(t, "resp_x")),
    ("response", lambda r, t: r.update_response(t, "resp_x", ResponseUpdate(status="done"))),
    ("response", lambda r, t: r.delete_response(t, "resp_x")),
    ("response", lambda r, t: r.list_response_input_items(t, "resp_x")),
    ("response", lambda r, t: r.get_response_chain(t, "resp_x")),
]


async def test_unknown_ids_not_found_alike(any_repo: Repository, tenant: str) -> None:
    for what, call in UNKNOWN_IDS:
        with pytest.raises(NotFound) as err:
            await call(any_repo, tenant)
        assert err.value.what == what
        assert isinstance(err.value, NotStored) == (any_repo.backend == "none")
    assert (await any_repo.list_conversations(tenant)).items == []
    assert await any_repo.purge_responses(utcnow()) >= 0


async def test_creates_answer_with_ids(any_repo: Repository, tenant: str) -> None:
    conv, items = await any_repo.create_conversation(
        tenant, {"k": "v"}, [msg("hi"), Item(type="function_call", data={"name": "f"})])
    assert conv.id.startswith("conv_") and conv.metadata == {"k": "v"} and conv.created_at
    assert items[0].id.startswith("msg_") and items[1].id.startswith("fc_")
    assert items[0].data["id"] == items[0].id and items[0].created_at is not None
    resp = await any_repo.create_response(tenant, StoredResponse(
        model="m", status="completed", instructions="be brief", input_items=[msg("q")],
        output_items=[msg("a", "assistant")], usage={"total_tokens": 3}, metadata={"a": "b"}))
    assert resp.id.startswith("resp_") and resp.model == "m" and resp.status == "completed"
    assert resp.instructions == "be brief" and resp.usage == {"total_tokens": 3}
    assert [i.role for i in resp.input_items + resp.output_items] == ["user", "assistant"]
    assert resp.metadata == {"a": "b"} and resp.created_at is not None
    custom = await any_repo.create_response(tenant, StoredResponse(id="resp_mine", model="m"))
    assert custom.id == "resp_mine"


async def test_every_backend_implements_the_protocol(tmp_path: Path) -> None:
    kinds = {}
    for backend in BACKENDS:
        config = HistoryConfig(history_backend=backend,
                               history_db=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
        repo = open_repository(config)
        assert isinstance(repo, Repository) and repo.backend == backend
        kinds[backend] = type(repo)
        await repo.close()
    assert kinds == {"sql": HistoryRepository, "memory": MemoryRepository,
                     "none": NullRepository}
    assert not (tmp_path / "h.db").exists()  # the SQL backend connects lazily


def test_servicer_depends_on_the_protocol_only() -> None:
    tree = ast.parse((ROOT / "services/history/server.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "services.history.backends" in imported
    assert not imported & {"services.history.repository", "services.history.memory",
                           "services.history.null", "sqlalchemy"}


def test_backend_flags() -> None:
    config = parse_config(HistoryConfig, ["--history-backend", "memory",
                                          "--memory-max-conversations", "3",
                                          "--memory-max-items", "50", "--memory-max-age", "0"],
                          env={})
    assert config.history_backend == "memory" and config.memory_max_conversations == 3
    assert config.memory_max_items == 50 and config.memory_max_age == 0
    assert parse_config(HistoryConfig, [], env={}).history_backend == "sql"
    from_env = parse_config(HistoryConfig, [], env={"SGLMESH_HISTORY_HISTORY_BACKEND": "none"})
    assert from_env.history_backend == "none"
    for bad in ({"history_backend": "redis"}, {"memory_max_items": 0},
                {"memory_max_age": -1.0}):
        with pytest.raises(ValueError, match="--(history-backend|memory-max)"):
            HistoryConfig(**bad)  # type: ignore[arg-type]


# ---- memory: bounds ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory(clock: Clock | None = None, **limits: Any) -> MemoryRepository:
    return MemoryRepository(limits=MemoryLimits(**limits), clock=clock or Clock())


async def test_memory_evicts_least_recently_written_conversation() -> None:
    repo = memory(conversations=3)
    ids = [(await repo.create_conversation("t", items=[msg(str(i))]))[0].id for i in range(3)]
    await repo.update_conversation("t", ids[0], {"touched": "yes"})  # now the newest write
    fourth, _ = await repo.create_conversation("t")
    with pytest.raises(NotFound):
        await repo.get_conversation("t", ids[1])  # the least recently written went
    kept = [c.id for c in (await repo.list_conversations("t")).items]
    assert kept == [fourth.id, ids[2], ids[0]]  # listing stays newest-created first
    assert repo.counts() == {"conversations": 3, "responses": 0, "items": 2, "keys": 0}


async def test_memory_evicts_responses_and_items() -> None:
    repo = memory(responses=2, items=6)
    r = [await repo.create_response("t", StoredResponse(input_items=[msg(f"q{i}")],
                                                        output_items=[msg(f"a{i}", "assistant")]))
         for i in range(3)]
    with pytest.raises(NotFound):
        await repo.get_response("t", r[0].id)
    assert repo.counts()["responses"] == 2 and repo.counts()["items"] == 4
    # Items: a conversation of 4 items pushes out the oldest response (2 items) to stay at 6.
    conv, _ = await repo.create_conversation("t", items=[msg(str(i)) for i in range(4)])
    assert repo.counts()["items"] == 4 + 2
    with pytest.raises(NotFound):
        await repo.get_response("t", r[1].id)
    assert (await repo.get_response("t", r[2].id)).id == r[2].id
    # A write never evicts what it writes: appending 2 more drops the other response.
    await repo.create_conversation_items("t", conv.id, [msg("x"), msg("y")])
    assert repo.counts() == {"conversations": 1, "responses": 0, "items": 6, "keys": 0}
    # A write that alone would exceed the bound is rejected, and changes nothing.
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation_items("t", conv.id, [msg("too many")])
    assert err.value.field == "items" and "--memory-max-items" in err.value.message
    with pytest.raises(InvalidInput) as err:
        await repo.create_response("t", StoredResponse(input_items=[msg(str(i))
                                                                    for i in range(7)]))
    assert err.value.field == "response"
    assert len((await repo.list_conversation_items("t", conv.id)).items) == 6


async def test_memory_shared_items_survive_eviction() -> None:
    repo = memory(responses=1)
    conv, _ = await repo.create_conversation("t")
    r1 = await repo.create_response("t", StoredResponse(
        conversation_id=conv.id, input_items=[msg("q")], output_items=[msg("a", "assistant")]),
        append_to_conversation=True)
    await repo.create_response("t", StoredResponse(input_items=[msg("next")]))
    with pytest.raises(NotFound):
        await repo.get_response("t", r1.id)
    items = (await repo.list_conversation_items("t", conv.id)).items
    assert [i.id for i in items] == [r1.input_items[0].id, r1.output_items[0].id]


async def test_memory_max_age() -> None:
    clock = Clock()
    repo = memory(clock, max_age=60)
    old, _ = await repo.create_conversation("t", items=[msg("old")], request_id="k1")
    stale = await repo.create_response("t", StoredResponse(input_items=[msg("q")]))
    clock.now += 45
    await repo.create_conversation_items("t", old.id, [msg("refresh")])  # a write: age resets
    fresh = await repo.create_response("t", StoredResponse(input_items=[msg("q2")]))
    clock.now += 30
    assert (await repo.get_conversation("t", old.id)).id == old.id
    assert (await repo.get_response("t", fresh.id)).id == fresh.id
    with pytest.raises(NotFound):
        await repo.get_response("t", stale.id)
    clock.now += 61
    with pytest.raises(NotFound):
        await repo.get_conversation("t", old.id)
    assert repo.counts() == {"conversations": 0, "responses": 0, "items": 0, "keys": 0}
    # The idempotency key went with its age: the same request id creates anew.
    again, _ = await repo.create_conversation("t", request_id="k1")
    assert again.id != old.id


async def test_memory_idempotency_keys_are_bounded() -> None:
    repo = memory(conversations=1, responses=1, items=1, max_age=0)
    for i in range(10):
        await repo.create_conversation(f"t{i}", request_id="same")
    assert repo.counts()["keys"] == 3 and repo.counts()["conversations"] == 1


async def test_memory_returns_copies() -> None:
    repo = memory()
    conv, items = await repo.create_conversation("t", {"k": "v"}, [msg("hi")])
    items[0].data["content"][0]["text"] = "changed by the caller"
    conv.metadata["k"] = "changed"
    got = (await repo.list_conversation_items("t", conv.id)).items[0]
    assert got.data["content"][0]["text"] == "hi"
    assert (await repo.get_conversation("t", conv.id)).metadata == {"k": "v"}


async def test_memory_update_outputs_in_conversation() -> None:
    repo = memory()
    conv, _ = await repo.create_conversation("t")
    r = await repo.create_response("t", StoredResponse(
        conversation_id=conv.id, input_items=[msg("q")], output_items=[msg("draft", "assistant")]),
        append_to_conversation=True)
    await repo.update_response("t", r.id, ResponseUpdate(output_items=[msg("final", "assistant")]))
    listed = (await repo.list_conversation_items("t", conv.id, order=SortOrder.DESC)).items
    assert [i.data["content"][0]["text"] for i in listed] == ["final", "q"]
    assert repo.item_count("t") == 2
    assert await repo.purge_responses(utcnow() + timedelta(seconds=1)) == 1
    assert repo.item_count("t") == 2  # the conversation still holds them


# ---- none: nothing stored ---------------------------------------------------------------------

async def test_none_answers_and_stores_nothing() -> None:
    repo = NullRepository()
    conv, items = await repo.create_conversation("t", items=[msg("hi")])
    with pytest.raises(NotStored) as err:
        await repo.get_conversation("t", conv.id)
    assert err.value.what == "conversation" and err.value.ident == conv.id
    assert "stores nothing" in str(err.value) and "--history-backend" in str(err.value)
    with pytest.raises(NotStored):
        await repo.get_conversation_item("t", conv.id, items[0].id)
    resp = await repo.create_response("t", StoredResponse(model="m", input_items=[msg("q")]))
    with pytest.raises(NotStored) as err:
        await repo.get_response("t", resp.id)
    assert err.value.what == "response" and "stores nothing" in str(err.value)
    for call in (repo.get_response_chain("t", resp.id), repo.delete_response("t", resp.id),
                 repo.list_response_input_items("t", resp.id),
                 repo.delete_conversation("t", conv.id)):
        with pytest.raises(NotStored):
            await call
    assert (await repo.list_conversations("t")).items == []


async def test_none_retried_creates_answer_the_same_ids() -> None:
    repo = NullRepository()
    a = await repo.create_conversation("t", items=[msg("x"), msg("y")], request_id="r1")
    b = await repo.create_conversation("t", items=[msg("x"), msg("y")], request_id="r1")
    assert a[0].id == b[0].id and [i.id for i in a[1]] == [i.id for i in b[1]]
    assert len({i.id for i in a[1]}) == 2
    other = await repo.create_conversation("t2", request_id="r1")
    assert other[0].id != a[0].id  # per tenant
    r1 = await repo.create_response("t", StoredResponse(input_items=[msg("q")],
                                                        output_items=[msg("a", "assistant")]),
                                    request_id="r2")
    r2 = await repo.create_response("t", StoredResponse(input_items=[msg("q")],
                                                        output_items=[msg("a", "assistant")]),
                                    request_id="r2")
    assert r1.id == r2.id and r1.output_items[0].id == r2.output_items[0].id
    assert r1.input_items[0].id != r1.output_items[0].id
    fresh = await repo.create_conversation("t")
    assert fresh[0].id != (await repo.create_conversation("t"))[0].id
