"""The repository contract, run against every storing backend (real SQLite, real PostgreSQL,
memory; no mocks), plus the SQL-only schema, migration and outage tests."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import inspect

from services.common.net import free_port
from services.history.backends import Repository
from services.history.db import VERSION_TABLE, current_revision, make_engine, run_migrations
from services.history.domain import (
    AlreadyExists,
    InvalidInput,
    Item,
    NotFound,
    ResponseUpdate,
    SortOrder,
    StorageUnavailable,
    StoredResponse,
    utcnow,
)
from services.history.models import Base
from services.history.repository import HistoryRepository

from .conftest import count_items, fresh_pg_database


def msg(text: str, role: str = "user", item_id: str = "") -> Item:
    return Item(id=item_id, type="message", role=role,
                data={"content": [{"type": "input_text", "text": text}]})


def texts(items: list[Item]) -> list[str]:
    return [i.data["content"][0]["text"] for i in items]


async def test_conversation_crud(repo: Repository, tenant: str) -> None:
    conv, items = await repo.create_conversation(
        tenant, {"topic": "demo"}, [msg("hi"), msg("hello", role="assistant")])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "demo"}
    assert conv.created_at.tzinfo is not None
    assert [i.role for i in items] == ["user", "assistant"]
    assert all(i.id.startswith("msg_") for i in items)
    assert items[0].data["id"] == items[0].id and items[0].data["type"] == "message"

    got = await repo.get_conversation(tenant, conv.id)
    assert got.id == conv.id and got.metadata == {"topic": "demo"}
    assert abs((got.created_at - conv.created_at).total_seconds()) < 1e-3

    updated = await repo.update_conversation(tenant, conv.id, {"topic": "changed", "k": "v"})
    assert updated.metadata == {"topic": "changed", "k": "v"}
    assert (await repo.get_conversation(tenant, conv.id)).metadata == updated.metadata

    item = await repo.get_conversation_item(tenant, conv.id, items[1].id)
    assert texts([item]) == ["hello"] and item.role == "assistant"

    added = await repo.create_conversation_items(
        tenant, conv.id, [Item(type="function_call", data={"name": "f", "arguments": "{}"})])
    assert added[0].id.startswith("fc_")
    page = await repo.list_conversation_items(tenant, conv.id)
    assert [i.id for i in page.items] == [items[0].id, items[1].id, added[0].id]
    assert page.next_page_token == ""

    after = await repo.delete_conversation_item(tenant, conv.id, items[0].id)
    assert after.id == conv.id
    with pytest.raises(NotFound):
        await repo.get_conversation_item(tenant, conv.id, items[0].id)
    assert [i.id for i in (await repo.list_conversation_items(tenant, conv.id)).items] == [
        items[1].id, added[0].id]
    with pytest.raises(NotFound):
        await repo.delete_conversation_item(tenant, conv.id, items[0].id)

    await repo.delete_conversation(tenant, conv.id)
    with pytest.raises(NotFound) as err:
        await repo.get_conversation(tenant, conv.id)
    assert err.value.what == "conversation"
    with pytest.raises(NotFound):
        await repo.list_conversation_items(tenant, conv.id)
    with pytest.raises(NotFound):
        await repo.delete_conversation(tenant, conv.id)
    assert await count_items(repo, tenant) == 0  # no orphaned items left behind


async def test_item_ordering_and_pagination(repo: Repository, tenant: str) -> None:
    conv, first = await repo.create_conversation(tenant, items=[msg(f"m{i}") for i in range(20)])
    more = await repo.create_conversation_items(tenant, conv.id,
                                                [msg(f"m{i}") for i in range(20, 25)])
    ids = [i.id for i in first + more]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await repo.list_conversation_items(tenant, conv.id, page_size=10, page_token=token)
        seen += [i.id for i in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3

    desc = await repo.list_conversation_items(tenant, conv.id, page_size=7, order=SortOrder.DESC)
    assert [i.id for i in desc.items] == ids[::-1][:7]
    desc2 = await repo.list_conversation_items(tenant, conv.id, page_size=7,
                                               page_token=desc.next_page_token,
                                               order=SortOrder.DESC)
    assert [i.id for i in desc2.items] == ids[::-1][7:14]

    # page_token is OpenAI's `after`: any item id of the conversation.
    after = await repo.list_conversation_items(tenant, conv.id, page_size=3, page_token=ids[4])
    assert [i.id for i in after.items] == ids[5:8]
    default = await repo.list_conversation_items(tenant, conv.id)
    assert len(default.items) == 20 and default.next_page_token == ids[19]

    for size in (-1, 101):
        with pytest.raises(InvalidInput) as err:
            await repo.list_conversation_items(tenant, conv.id, page_size=size)
        assert err.value.field == "page_size"
    with pytest.raises(InvalidInput) as err:
        await repo.list_conversation_items(tenant, conv.id, page_token="msg_nope")
    assert err.value.field == "page_token"
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation_items(tenant, conv.id, [msg("x") for _ in range(21)])
    assert err.value.field == "items"
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation_items(tenant, conv.id, [msg("dup", item_id=ids[0])])
    assert err.value.field == "items"


async def test_list_conversations_newest_first(repo: Repository, tenant: str) -> None:
    ids = [(await repo.create_conversation(tenant, {"n": str(i)}))[0].id for i in range(5)]
    page = await repo.list_conversations(tenant, page_size=2)
    assert [c.id for c in page.items] == ids[::-1][:2]
    page2 = await repo.list_conversations(tenant, page_size=2, page_token=page.next_page_token)
    assert [c.id for c in page2.items] == ids[::-1][2:4]
    page3 = await repo.list_conversations(tenant, page_size=2, page_token=page2.next_page_token)
    assert [c.id for c in page3.items] == ids[:1] and page3.next_page_token == ""


async def test_tenant_isolation(repo: Repository, tenant: str) -> None:
    other = tenant + "-other"
    conv, items = await repo.create_conversation(tenant, {"a": "b"}, [msg("secret")])
    resp = await repo.create_response(tenant, StoredResponse(model="m", status="completed",
                                                             input_items=[msg("q")]))
    for call in (
        repo.get_conversation(other, conv.id),
        repo.update_conversation(other, conv.id, {}),
        repo.delete_conversation(other, conv.id),
        repo.list_conversation_items(other, conv.id),
        repo.get_conversation_item(other, conv.id, items[0].id),
        repo.delete_conversation_item(other, conv.id, items[0].id),
        repo.create_conversation_items(other, conv.id, [msg("x")]),
        repo.get_response(other, resp.id),
        repo.update_response(other, resp.id, ResponseUpdate(status="failed")),
        repo.delete_response(other, resp.id),
        repo.list_response_input_items(other, resp.id),
        repo.get_response_chain(other, resp.id),
        repo.create_response(other, StoredResponse(previous_response_id=resp.id)),
        repo.create_response(other, StoredResponse(conversation_id=conv.id)),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await repo.list_conversations(other)).items == []
    # The other tenant may use the same ids without touching ours.
    theirs, _ = await repo.create_conversation(other)
    mine = await repo.create_conversation_items(other, theirs.id,
                                                [msg("theirs", item_id=items[0].id)])
    assert mine[0].id == items[0].id
    assert texts([await repo.get_conversation_item(tenant, conv.id, items[0].id)]) == ["secret"]
    # Everything of ours is intact.
    assert (await repo.get_conversation(tenant, conv.id)).metadata == {"a": "b"}
    assert (await repo.get_response(tenant, resp.id)).status == "completed"


async def test_idempotent_retries(repo: Repository, tenant: str) -> None:
    conv1, items1 = await repo.create_conversation(tenant, {"x": "1"}, [msg("a")], request_id="r1")
    conv2, items2 = await repo.create_conversation(tenant, {"x": "1"}, [msg("a")], request_id="r1")
    assert conv1.id == conv2.id and [i.id for i in items1] == [i.id for i in items2]
    assert len((await repo.list_conversations(tenant)).items) == 1

    # Concurrent retries of one request still write once.
    results = await asyncio.gather(*[
        repo.create_conversation(tenant, request_id="r-concurrent") for _ in range(4)])
    assert len({c.id for c, _ in results}) == 1
    assert len((await repo.list_conversations(tenant)).items) == 2

    a = await repo.create_conversation_items(tenant, conv1.id, [msg("b")], request_id="r2")
    b = await repo.create_conversation_items(tenant, conv1.id, [msg("b")], request_id="r2")
    assert [i.id for i in a] == [i.id for i in b]
    assert len((await repo.list_conversation_items(tenant, conv1.id)).items) == 2

    r1 = await repo.create_response(tenant, StoredResponse(model="m", input_items=[msg("q")]),
                                    request_id="r3")
    r2 = await repo.create_response(tenant, StoredResponse(model="m", input_items=[msg("q")]),
                                    request_id="r3")
    assert r1.id == r2.id and r1.input_items[0].id == r2.input_items[0].id

    # Keys are per tenant.
    other, _ = await repo.create_conversation(tenant + "-b", request_id="r1")
    assert other.id != conv1.id

    with pytest.raises(AlreadyExists):
        await repo.create_response(tenant, StoredResponse(id=r1.id, model="m"))


async def test_metadata_limits(repo: Repository, tenant: str) -> None:
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    ok["k0"] = "x"
    ok["k" * 64] = ok.pop("k15")
    conv, _ = await repo.create_conversation(tenant, ok)
    bad = [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
    ]
    for metadata in bad:
        with pytest.raises(InvalidInput) as err:
            await repo.create_conversation(tenant, metadata)
        assert err.value.field == "metadata"
        with pytest.raises(InvalidInput) as err:
            await repo.update_conversation(tenant, conv.id, metadata)
        assert err.value.field == "metadata"
        with pytest.raises(InvalidInput) as err:
            await repo.create_response(tenant, StoredResponse(metadata=metadata))
        assert err.value.field == "response.metadata"
    assert len((await repo.list_conversations(tenant)).items) == 1
    assert (await repo.get_conversation(tenant, conv.id)).metadata == ok
    with pytest.raises(InvalidInput) as err:
        await repo.create_conversation(tenant, items=[msg("x") for _ in range(21)])
    assert err.value.field == "items"


async def test_failed_write_leaves_nothing(repo: Repository, tenant: str) -> None:
    # The second item repeats the first one's id: the whole create is rejected.
    with pytest.raises(InvalidInput):
        await repo.create_conversation(tenant, items=[msg("a", item_id="msg_same"),
                                                      msg("b", item_id="msg_same")])
    assert (await repo.list_conversations(tenant)).items == []
    assert await count_items(repo, tenant) == 0


async def test_responses_and_chain(repo: Repository, tenant: str) -> None:
    r1 = await repo.create_response(tenant, StoredResponse(
        model="m", status="completed", instructions="be brief",
        input_items=[msg("q1")], output_items=[msg("a1", role="assistant")],
        usage={"input_tokens": 3, "output_tokens": 2}, body={"object": "response"},
        metadata={"k": "v"}))
    assert r1.id.startswith("resp_") and r1.instructions == "be brief"
    assert r1.usage == {"input_tokens": 3, "output_tokens": 2}
    r2 = await repo.create_response(tenant, StoredResponse(
        id="resp_custom", model="m", status="in_progress", previous_response_id=r1.id,
        input_items=[msg("q2a"), msg("q2b")]))
    r3 = await repo.create_response(tenant, StoredResponse(
        model="m", status="completed", previous_response_id=r2.id,
        input_items=[msg("q3")], output_items=[msg("a3", role="assistant")]))
    with pytest.raises(NotFound):
        await repo.create_response(tenant, StoredResponse(previous_response_id="resp_missing"))

    got = await repo.get_response(tenant, r1.id)
    assert texts(got.input_items) == ["q1"] and texts(got.output_items) == ["a1"]
    assert got.metadata == {"k": "v"} and got.body == {"object": "response"}

    chain = await repo.get_response_chain(tenant, r3.id)
    assert [r.id for r in chain] == [r1.id, r2.id, r3.id]
    assert [texts(r.input_items) for r in chain] == [["q1"], ["q2a", "q2b"], ["q3"]]
    assert [texts(r.output_items) for r in chain] == [["a1"], [], ["a3"]]
    assert [r.id for r in await repo.get_response_chain(tenant, r3.id, max_depth=2)] == [
        r2.id, r3.id]
    assert [r.id for r in await repo.get_response_chain(tenant, r1.id)] == [r1.id]
    with pytest.raises(NotFound):
        await repo.get_response_chain(tenant, "resp_missing")

    page = await repo.list_response_input_items(tenant, r2.id, page_size=1)
    assert texts(page.items) == ["q2a"] and page.next_page_token
    page = await repo.list_response_input_items(tenant, r2.id, page_size=1,
                                                page_token=page.next_page_token)
    assert texts(page.items) == ["q2b"] and page.next_page_token == ""
    desc = await repo.list_response_input_items(tenant, r2.id, order=SortOrder.DESC)
    assert texts(desc.items) == ["q2b", "q2a"]

    updated = await repo.update_response(tenant, r2.id, ResponseUpdate(
        status="completed", output_items=[msg("a2", role="assistant")],
        usage={"total_tokens": 9}))
    assert updated.status == "completed" and texts(updated.output_items) == ["a2"]
    assert updated.usage == {"total_tokens": 9} and texts(updated.input_items) == ["q2a", "q2b"]
    again = await repo.update_response(tenant, r2.id, ResponseUpdate(
        output_items=[msg("a2 final", role="assistant", item_id=updated.output_items[0].id)]))
    assert texts(again.output_items) == ["a2 final"] and again.status == "completed"

    await repo.delete_response(tenant, r2.id)
    with pytest.raises(NotFound):
        await repo.get_response(tenant, r2.id)
    # The chain now ends where the deleted response was.
    assert [r.id for r in await repo.get_response_chain(tenant, r3.id)] == [r3.id]
    await repo.delete_response(tenant, r1.id)
    await repo.delete_response(tenant, r3.id)
    assert await count_items(repo, tenant) == 0


async def test_append_to_conversation(repo: Repository, tenant: str) -> None:
    conv, seed = await repo.create_conversation(tenant, items=[msg("system note", "system")])
    with pytest.raises(InvalidInput) as err:
        await repo.create_response(tenant, StoredResponse(), append_to_conversation=True)
    assert err.value.field == "append_to_conversation"
    r = await repo.create_response(tenant, StoredResponse(
        model="m", status="in_progress", conversation_id=conv.id, input_items=[msg("q")]),
        append_to_conversation=True)
    r = await repo.update_response(tenant, r.id, ResponseUpdate(
        status="completed", output_items=[msg("a", role="assistant")]))
    assert r.conversation_id == conv.id
    listed = (await repo.list_conversation_items(tenant, conv.id)).items
    assert texts(listed) == ["system note", "q", "a"]

    # Deleting the response keeps the conversation whole.
    await repo.delete_response(tenant, r.id)
    assert texts((await repo.list_conversation_items(tenant, conv.id)).items) == [
        "system note", "q", "a"]
    # Deleting the conversation takes its items along.
    await repo.delete_conversation(tenant, conv.id)
    assert await count_items(repo, tenant) == 0


async def test_delete_conversation_keeps_response_items(repo: Repository,
                                                        tenant: str) -> None:
    conv, _ = await repo.create_conversation(tenant)
    r = await repo.create_response(tenant, StoredResponse(
        conversation_id=conv.id, input_items=[msg("q")], output_items=[msg("a", "assistant")]),
        append_to_conversation=True)
    await repo.delete_conversation(tenant, conv.id)
    kept = await repo.get_response(tenant, r.id)
    assert texts(kept.input_items) == ["q"] and texts(kept.output_items) == ["a"]
    assert await count_items(repo, tenant) == 2


async def test_purge_old_responses(repo: Repository, tenant: str) -> None:
    old = await repo.create_response(tenant, StoredResponse(input_items=[msg("old")]),
                                     request_id="old")
    cutoff = utcnow() + timedelta(milliseconds=1)
    await asyncio.sleep(0.01)
    new = await repo.create_response(tenant, StoredResponse(input_items=[msg("new")]))
    assert await repo.purge_responses(cutoff) >= 1
    with pytest.raises(NotFound):
        await repo.get_response(tenant, old.id)
    assert (await repo.get_response(tenant, new.id)).id == new.id
    assert await count_items(repo, tenant) == 1


async def test_schema_matches_models(sql_repo: HistoryRepository) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def diff(connection):  # type: ignore[no-untyped-def]
        ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return compare_metadata(ctx, Base.metadata)

    async with sql_repo.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_migrations_upgrade_downgrade(backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def check(url: str) -> None:
        engine = make_engine(url)
        try:
            def tables(connection):  # type: ignore[no-untyped-def]
                return set(inspect(connection).get_table_names())

            await run_migrations(engine, "upgrade", "head")
            assert await current_revision(engine) == "0001_initial"
            async with engine.connect() as conn:
                assert {"conversations", "items", "conversation_items", "responses",
                        "response_items", "idempotency_keys"} <= await conn.run_sync(tables)
            await run_migrations(engine, "upgrade", "head")  # idempotent
            await run_migrations(engine, "downgrade", "base")
            assert await current_revision(engine) is None
            async with engine.connect() as conn:
                assert await conn.run_sync(tables) == {"history_alembic_version"}
            await run_migrations(engine, "upgrade", "head")
            repo = HistoryRepository(url)
            try:
                conv, _ = await repo.create_conversation("t", items=[msg("x")])
                assert (await repo.get_conversation("t", conv.id)).id == conv.id
            finally:
                await repo.close()
        finally:
            await engine.dispose()

    if backend == "sqlite":
        await check(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    else:
        with fresh_pg_database() as url:
            await check(url)


async def test_unreachable_database_fails_fast() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    repo = HistoryRepository(url, op_timeout=2.0)
    try:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await repo.migrate()
        with pytest.raises(StorageUnavailable):
            await repo.get_conversation("t", "conv_x")
        with pytest.raises(StorageUnavailable):
            await repo.create_conversation("t")
        assert time.monotonic() - start < 10
    finally:
        await repo.close()
