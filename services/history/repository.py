"""The history repository: every RPC as one async method over SQLAlchemy, no transport types.

One ``AsyncSession`` per operation owns its transaction; a write is one transaction, so a
failure leaves nothing half-written. Each operation is bounded by ``op_timeout``. Database
failures leave this module as :class:`StorageUnavailable`, missing or foreign rows as
:class:`NotFound`, bad input as :class:`InvalidInput`. Every query filters by tenant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, delete, func, literal_column, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.history import checks
from services.history.backends import SQL
from services.history.db import WRITE_OPTION, make_engine, run_migrations
from services.history.domain import (
    DEFAULT_MAX_ITEM_BYTES,
    AlreadyExists,
    Conversation,
    HistoryError,
    InvalidInput,
    Item,
    NotFound,
    Page,
    ResponseUpdate,
    SortOrder,
    StorageUnavailable,
    StoredResponse,
    as_utc,
    new_id,
    require,
    utcnow,
)
from services.history.metrics import observed
from services.history.models import (
    ConversationItemRow,
    ConversationRow,
    IdempotencyKeyRow,
    ItemRow,
    ResponseItemRow,
    ResponseRow,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
Op = Callable[[AsyncSession], Awaitable[R]]

KIND_CONVERSATION = "conversation"
KIND_ITEMS = "conversation_items"
KIND_RESPONSE = "response"
INPUT, OUTPUT = "input", "output"


def _item(row: ItemRow) -> Item:
    return Item(id=row.id, type=row.type, role=row.role or "", status=row.status or "",
                data=dict(row.data or {}), created_at=as_utc(row.created_at))


def _conversation(row: ConversationRow) -> Conversation:
    return Conversation(id=row.id, metadata=dict(row.meta or {}),
                        created_at=as_utc(row.created_at))


class HistoryRepository:
    """Conversations, items and stored responses in one SQL database (``--history-backend
    sql``); implements :class:`services.history.backends.Repository`."""

    backend = SQL

    def __init__(self, url: str, *, pool_size: int = 5, op_timeout: float = 5.0,
                 max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> None:
        self.url = url
        self.op_timeout = op_timeout
        self.max_item_bytes = max_item_bytes
        self.pool_size = pool_size
        self.engine = make_engine(url, pool_size=pool_size, op_timeout=op_timeout)
        self._read = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write = async_sessionmaker(
            self.engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        )
        # SQLite has one writer at a time: writers of this process queue here, in order,
        # instead of polling the file lock (busy_timeout backs off up to 100 ms per try).
        # Other processes on the same file still meet the file lock and its busy timeout.
        self._write_lock: asyncio.Lock | None = (
            asyncio.Lock() if self.engine.dialect.name == "sqlite" else None)

    # ---- lifecycle -------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Brings the schema to the newest revision (idempotent)."""
        await self._guard(run_migrations(self.engine, "upgrade", "head"), "migrate")

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self, timeout: float | None = None) -> None:
        """One ``SELECT 1`` round trip; raises :class:`StorageUnavailable` when it fails."""
        async def go() -> None:
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")

        await self._guard(go(), "ping", timeout)

    def pool_in_use(self) -> int:
        """Connections checked out of the pool right now."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if callable(checkedout) else 0

    # ---- plumbing --------------------------------------------------------------------------

    async def _guard(self, work: Awaitable[R], what: str, timeout: float | None = None) -> R:
        timeout = self.op_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(work, timeout)
        except HistoryError:
            raise
        except TimeoutError as exc:
            raise StorageUnavailable(
                f"database operation {what} timed out after {timeout:g}s") from exc
        except sa_exc.IntegrityError:
            raise
        except sa_exc.DataError as exc:
            raise InvalidInput("request", f"value rejected by the database: {exc.orig}") from exc
        except (sa_exc.SQLAlchemyError, OSError, ConnectionError) as exc:
            log.debug("database error in %s: %s", what, exc)
            detail = getattr(exc, "orig", None) or exc
            raise StorageUnavailable(f"database unavailable ({what}): {detail}") from exc

    async def _run(self, op: Op[R], *, write: bool, what: str) -> R:
        maker = self._write if write else self._read

        async def go() -> R:
            if write and self._write_lock is not None:
                async with self._write_lock, maker() as session, session.begin():
                    return await op(session)
            async with maker() as session, session.begin():
                return await op(session)

        if not write:
            return await self._guard(go(), what)
        # A unique-key race (a concurrent retry with the same request_id, the same new item id)
        # is retried once: the second attempt sees the winner's rows.
        for attempt in range(2):
            try:
                return await self._guard(go(), what)
            except sa_exc.IntegrityError as exc:
                if attempt == 1:
                    raise StorageUnavailable(
                        f"conflicting concurrent write ({what}); retry") from exc
        raise AssertionError("unreachable")

    # ---- shared queries --------------------------------------------------------------------

    @staticmethod
    async def _conversation_row(s: AsyncSession, tenant: str, conversation_id: str,
                                lock: bool = False) -> ConversationRow:
        stmt = select(ConversationRow).where(ConversationRow.tenant == tenant,
                                             ConversationRow.id == conversation_id)
        if lock:
            stmt = stmt.with_for_update()
        row = (await s.execute(stmt)).scalar_one_or_none()
        if row is None:
            raise NotFound("conversation", conversation_id)
        return row

    @staticmethod
    async def _response_row(s: AsyncSession, tenant: str, response_id: str,
                            lock: bool = False) -> ResponseRow:
        stmt = select(ResponseRow).where(ResponseRow.tenant == tenant,
                                         ResponseRow.id == response_id)
        if lock:
            stmt = stmt.with_for_update()
        row = (await s.execute(stmt)).scalar_one_or_none()
        if row is None:
            raise NotFound("response", response_id)
        return row

    @staticmethod
    async def _idempotency(s: AsyncSession, tenant: str, kind: str,
                           request_id: str) -> IdempotencyKeyRow | None:
        if not request_id:
            return None
        return await s.get(IdempotencyKeyRow, (tenant, kind, request_id))

    @staticmethod
    def _remember(s: AsyncSession, tenant: str, kind: str, request_id: str, result_id: str,
                  result_items: list[str] | None = None) -> None:
        if request_id:
            s.add(IdempotencyKeyRow(tenant=tenant, kind=kind, request_id=request_id,
                                    result_id=result_id, result_items=result_items,
                                    created_at=utcnow()))

    @staticmethod
    async def _store_items(s: AsyncSession, tenant: str, items: Sequence[Item]) -> list[ItemRow]:
        """Inserts items; an id the tenant already has names the same item (updated in place)."""
        if not items:
            return []
        ids = list(dict.fromkeys(it.id for it in items))
        existing = {r.id: r for r in (await s.execute(
            select(ItemRow).where(ItemRow.tenant == tenant, ItemRow.id.in_(ids)))).scalars()}
        now = utcnow()
        rows: list[ItemRow] = []
        for it in items:
            row = existing.get(it.id)
            if row is None:
                row = ItemRow(id=it.id, tenant=tenant, type=it.type, role=it.role,
                              status=it.status, data=it.data, created_at=now)
                s.add(row)
                existing[it.id] = row
            else:
                row.type, row.role, row.status, row.data = it.type, it.role, it.status, it.data
            rows.append(row)
        await s.flush()
        return rows

    @staticmethod
    async def _items_by_ids(s: AsyncSession, tenant: str, ids: Sequence[str]) -> list[Item]:
        if not ids:
            return []
        rows = {r.id: r for r in (await s.execute(
            select(ItemRow).where(ItemRow.tenant == tenant, ItemRow.id.in_(list(ids))))).scalars()}
        return [_item(rows[i]) for i in ids if i in rows]

    @staticmethod
    async def _append(s: AsyncSession, conversation: ConversationRow, rows: Sequence[ItemRow],
                      skip_linked: bool) -> None:
        """Appends items to a conversation after its last one (caller holds the row lock)."""
        if not rows:
            return
        last = (await s.execute(select(func.max(ConversationItemRow.position)).where(
            ConversationItemRow.conversation_pk == conversation.pk))).scalar()
        linked = set((await s.execute(select(ConversationItemRow.item_pk).where(
            ConversationItemRow.conversation_pk == conversation.pk,
            ConversationItemRow.item_pk.in_([r.pk for r in rows])))).scalars())
        position = last or 0
        for row in rows:
            if row.pk in linked:
                if skip_linked:
                    continue
                raise checks.already_in_conversation_error(row.id, conversation.id)
            linked.add(row.pk)
            position += 1
            s.add(ConversationItemRow(conversation_pk=conversation.pk, position=position,
                                      item_pk=row.pk))
        await s.flush()

    @staticmethod
    async def _drop_orphans(s: AsyncSession, item_pks: Iterable[int]) -> None:
        """Deletes those of ``item_pks`` that no conversation or response links to."""
        pks = list(set(item_pks))
        if not pks:
            return
        in_conversation = select(ConversationItemRow.item_pk).where(
            ConversationItemRow.item_pk == ItemRow.pk).exists()
        in_response = select(ResponseItemRow.item_pk).where(
            ResponseItemRow.item_pk == ItemRow.pk).exists()
        await s.execute(delete(ItemRow).where(ItemRow.pk.in_(pks), ~in_conversation,
                                              ~in_response))

    @staticmethod
    async def _load_responses(s: AsyncSession, rows: Sequence[ResponseRow]) -> list[StoredResponse]:
        """Responses with their input and output items, loaded in one query."""
        items: dict[tuple[int, str], list[Item]] = {}
        if rows:
            result = await s.execute(
                select(ResponseItemRow.response_pk, ResponseItemRow.kind, ItemRow)
                .join(ItemRow, ItemRow.pk == ResponseItemRow.item_pk)
                .where(ResponseItemRow.response_pk.in_([r.pk for r in rows]))
                .order_by(ResponseItemRow.response_pk, ResponseItemRow.kind,
                          ResponseItemRow.position))
            for response_pk, kind, item in result.all():
                items.setdefault((response_pk, kind), []).append(_item(item))
        return [StoredResponse(
            id=r.id, model=r.model or "", status=r.status or "",
            previous_response_id=r.previous_response_id or "",
            conversation_id=r.conversation_id or "", instructions=r.instructions or "",
            input_items=items.get((r.pk, INPUT), []), output_items=items.get((r.pk, OUTPUT), []),
            usage=dict(r.usage or {}), body=dict(r.body or {}), metadata=dict(r.meta or {}),
            created_at=as_utc(r.created_at),
        ) for r in rows]

    @staticmethod
    async def _page_items(s: AsyncSession, link: Any, owner: ColumnElement[bool], size: int,
                          page_token: str, order: SortOrder) -> Page[Item]:
        """One page of items linked through ``link`` (ordered by position; token = item id)."""
        stmt: Select[Any] = (select(ItemRow).join(link, link.item_pk == ItemRow.pk).where(owner))
        if page_token:
            anchor = (await s.execute(
                select(link.position).join(ItemRow, link.item_pk == ItemRow.pk)
                .where(owner, ItemRow.id == page_token))).scalar()
            if anchor is None:
                raise checks.unknown_item_token_error(page_token)
            stmt = stmt.where(link.position > anchor if order is SortOrder.ASC
                              else link.position < anchor)
        stmt = stmt.order_by(link.position.asc() if order is SortOrder.ASC
                             else link.position.desc()).limit(size + 1)
        rows = list((await s.execute(stmt)).scalars())
        more = len(rows) > size
        rows = rows[:size]
        return Page([_item(r) for r in rows], rows[-1].id if more else "")

    # ---- conversations ---------------------------------------------------------------------

    @observed
    async def create_conversation(self, tenant: str, metadata: dict[str, str] | None = None,
                                  items: Sequence[Item] = (), request_id: str = ""
                                  ) -> tuple[Conversation, list[Item]]:
        meta, new_items = checks.create_conversation(metadata, items, request_id,
                                                     self.max_item_bytes)

        async def op(s: AsyncSession) -> tuple[Conversation, list[Item]]:
            key = await self._idempotency(s, tenant, KIND_CONVERSATION, request_id)
            if key is not None:
                row = await self._conversation_row(s, tenant, key.result_id)
                return _conversation(row), await self._items_by_ids(s, tenant,
                                                                    key.result_items or [])
            row = ConversationRow(id=new_id("conv"), tenant=tenant, meta=meta,
                                  created_at=utcnow())
            s.add(row)
            await s.flush()
            rows = await self._store_items(s, tenant, new_items)
            await self._append(s, row, rows, skip_linked=False)
            self._remember(s, tenant, KIND_CONVERSATION, request_id, row.id,
                           [r.id for r in rows])
            return _conversation(row), [_item(r) for r in rows]

        return await self._run(op, write=True, what="create_conversation")

    @observed
    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        require(conversation_id, "conversation_id")

        async def op(s: AsyncSession) -> Conversation:
            return _conversation(await self._conversation_row(s, tenant, conversation_id))

        return await self._run(op, write=False, what="get_conversation")

    @observed
    async def update_conversation(self, tenant: str, conversation_id: str,
                                  metadata: dict[str, str]) -> Conversation:
        meta = checks.update_conversation(conversation_id, metadata)

        async def op(s: AsyncSession) -> Conversation:
            row = await self._conversation_row(s, tenant, conversation_id, lock=True)
            row.meta = meta
            await s.flush()
            return _conversation(row)

        return await self._run(op, write=True, what="update_conversation")

    @observed
    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        require(conversation_id, "conversation_id")

        async def op(s: AsyncSession) -> None:
            row = await self._conversation_row(s, tenant, conversation_id, lock=True)
            item_pks = list((await s.execute(select(ConversationItemRow.item_pk).where(
                ConversationItemRow.conversation_pk == row.pk))).scalars())
            await s.execute(delete(ConversationItemRow).where(
                ConversationItemRow.conversation_pk == row.pk))
            await s.execute(delete(ConversationRow).where(ConversationRow.pk == row.pk))
            await self._drop_orphans(s, item_pks)

        await self._run(op, write=True, what="delete_conversation")

    @observed
    async def list_conversations(self, tenant: str, page_size: int = 0,
                                 page_token: str = "") -> Page[Conversation]:
        size = checks.listing(page_size, page_token)

        async def op(s: AsyncSession) -> Page[Conversation]:
            stmt = select(ConversationRow).where(ConversationRow.tenant == tenant)
            if page_token:
                anchor = (await s.execute(select(ConversationRow.pk).where(
                    ConversationRow.tenant == tenant, ConversationRow.id == page_token))).scalar()
                if anchor is None:
                    raise checks.unknown_conversation_token_error(page_token)
                stmt = stmt.where(ConversationRow.pk < anchor)
            rows = list((await s.execute(
                stmt.order_by(ConversationRow.pk.desc()).limit(size + 1))).scalars())
            more = len(rows) > size
            rows = rows[:size]
            return Page([_conversation(r) for r in rows], rows[-1].id if more else "")

        return await self._run(op, write=False, what="list_conversations")

    # ---- conversation items ----------------------------------------------------------------

    @observed
    async def create_conversation_items(self, tenant: str, conversation_id: str,
                                        items: Sequence[Item], request_id: str = ""
                                        ) -> list[Item]:
        new_items = checks.create_items(conversation_id, items, request_id,
                                        self.max_item_bytes)

        async def op(s: AsyncSession) -> list[Item]:
            conversation = await self._conversation_row(s, tenant, conversation_id, lock=True)
            key = await self._idempotency(s, tenant, KIND_ITEMS, request_id)
            if key is not None and key.result_id == conversation_id:
                return await self._items_by_ids(s, tenant, key.result_items or [])
            if key is not None:
                raise checks.request_id_reused_error()
            rows = await self._store_items(s, tenant, new_items)
            await self._append(s, conversation, rows, skip_linked=False)
            self._remember(s, tenant, KIND_ITEMS, request_id, conversation_id,
                           [r.id for r in rows])
            return [_item(r) for r in rows]

        return await self._run(op, write=True, what="create_conversation_items")

    @observed
    async def list_conversation_items(self, tenant: str, conversation_id: str,
                                      page_size: int = 0, page_token: str = "",
                                      order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(conversation_id, "conversation_id")
        size = checks.listing(page_size, page_token)

        async def op(s: AsyncSession) -> Page[Item]:
            row = await self._conversation_row(s, tenant, conversation_id)
            return await self._page_items(
                s, ConversationItemRow, ConversationItemRow.conversation_pk == row.pk, size,
                page_token, order)

        return await self._run(op, write=False, what="list_conversation_items")

    @observed
    async def get_conversation_item(self, tenant: str, conversation_id: str,
                                    item_id: str) -> Item:
        checks.item_ref(conversation_id, item_id)

        async def op(s: AsyncSession) -> Item:
            row = await self._conversation_row(s, tenant, conversation_id)
            item = (await s.execute(
                select(ItemRow).join(ConversationItemRow, ConversationItemRow.item_pk == ItemRow.pk)
                .where(ConversationItemRow.conversation_pk == row.pk, ItemRow.tenant == tenant,
                       ItemRow.id == item_id))).scalar_one_or_none()
            if item is None:
                raise NotFound("item", item_id)
            return _item(item)

        return await self._run(op, write=False, what="get_conversation_item")

    @observed
    async def delete_conversation_item(self, tenant: str, conversation_id: str,
                                       item_id: str) -> Conversation:
        checks.item_ref(conversation_id, item_id)

        async def op(s: AsyncSession) -> Conversation:
            row = await self._conversation_row(s, tenant, conversation_id, lock=True)
            item_pk = (await s.execute(
                select(ItemRow.pk).join(ConversationItemRow,
                                        ConversationItemRow.item_pk == ItemRow.pk)
                .where(ConversationItemRow.conversation_pk == row.pk, ItemRow.tenant == tenant,
                       ItemRow.id == item_id))).scalar()
            if item_pk is None:
                raise NotFound("item", item_id)
            await s.execute(delete(ConversationItemRow).where(
                ConversationItemRow.conversation_pk == row.pk,
                ConversationItemRow.item_pk == item_pk))
            await self._drop_orphans(s, [item_pk])
            return _conversation(row)

        return await self._run(op, write=True, what="delete_conversation_item")

    # ---- responses -------------------------------------------------------------------------

    @observed
    async def create_response(self, tenant: str, response: StoredResponse,
                              append_to_conversation: bool = False,
                              request_id: str = "") -> StoredResponse:
        new = checks.create_response(response, append_to_conversation, request_id,
                                     self.max_item_bytes)
        response_id, meta, inputs, outputs = (new.id, new.metadata, new.input_items,
                                              new.output_items)

        async def op(s: AsyncSession) -> StoredResponse:
            key = await self._idempotency(s, tenant, KIND_RESPONSE, request_id)
            if key is not None:
                row = await self._response_row(s, tenant, key.result_id)
                return (await self._load_responses(s, [row]))[0]
            exists = (await s.execute(select(ResponseRow.pk).where(
                ResponseRow.tenant == tenant, ResponseRow.id == response_id))).scalar()
            if exists is not None:
                raise AlreadyExists("response", response_id)
            if response.previous_response_id:
                await self._response_row(s, tenant, response.previous_response_id)
            conversation = None
            if response.conversation_id:
                conversation = await self._conversation_row(
                    s, tenant, response.conversation_id, lock=append_to_conversation)
            row = ResponseRow(
                id=response_id, tenant=tenant, model=response.model, status=response.status,
                previous_response_id=response.previous_response_id or None,
                conversation_id=response.conversation_id or None,
                instructions=response.instructions or None, usage=dict(response.usage),
                body=dict(response.body), meta=meta,
                in_conversation=bool(append_to_conversation), created_at=utcnow())
            s.add(row)
            await s.flush()
            stored = await self._store_items(s, tenant, [*inputs, *outputs])
            in_rows, out_rows = stored[:len(inputs)], stored[len(inputs):]
            self._link_response(s, row, INPUT, in_rows)
            self._link_response(s, row, OUTPUT, out_rows)
            if append_to_conversation and conversation is not None:
                await self._append(s, conversation, stored, skip_linked=True)
            self._remember(s, tenant, KIND_RESPONSE, request_id, response_id)
            await s.flush()
            return (await self._load_responses(s, [row]))[0]

        return await self._run(op, write=True, what="create_response")

    @staticmethod
    def _link_response(s: AsyncSession, row: ResponseRow, kind: str,
                       items: Sequence[ItemRow]) -> None:
        for position, item in enumerate(items):
            s.add(ResponseItemRow(response_pk=row.pk, kind=kind, position=position,
                                  item_pk=item.pk))

    @observed
    async def get_response(self, tenant: str, response_id: str) -> StoredResponse:
        require(response_id, "response_id")

        async def op(s: AsyncSession) -> StoredResponse:
            row = await self._response_row(s, tenant, response_id)
            return (await self._load_responses(s, [row]))[0]

        return await self._run(op, write=False, what="get_response")

    @observed
    async def update_response(self, tenant: str, response_id: str,
                              update: ResponseUpdate) -> StoredResponse:
        meta, outputs = checks.update_response(response_id, update, self.max_item_bytes)

        async def op(s: AsyncSession) -> StoredResponse:
            row = await self._response_row(s, tenant, response_id, lock=True)
            if update.status is not None:
                row.status = update.status
            if update.usage is not None:
                row.usage = dict(update.usage)
            if update.body is not None:
                row.body = dict(update.body)
            if meta is not None:
                row.meta = meta
            if outputs is not None:
                await self._replace_outputs(s, tenant, row, outputs)
            await s.flush()
            return (await self._load_responses(s, [row]))[0]

        return await self._run(op, write=True, what="update_response")

    async def _replace_outputs(self, s: AsyncSession, tenant: str, row: ResponseRow,
                               outputs: list[Item]) -> None:
        old = list((await s.execute(select(ResponseItemRow.item_pk).where(
            ResponseItemRow.response_pk == row.pk, ResponseItemRow.kind == OUTPUT))).scalars())
        await s.execute(delete(ResponseItemRow).where(ResponseItemRow.response_pk == row.pk,
                                                      ResponseItemRow.kind == OUTPUT))
        conversation = None
        if row.in_conversation and row.conversation_id:
            conversation = (await s.execute(select(ConversationRow).where(
                ConversationRow.tenant == tenant, ConversationRow.id == row.conversation_id)
                .with_for_update())).scalar_one_or_none()
        stored = await self._store_items(s, tenant, outputs)
        keep = {r.pk for r in stored}
        if conversation is not None and old:
            stale = [pk for pk in old if pk not in keep]
            if stale:
                await s.execute(delete(ConversationItemRow).where(
                    ConversationItemRow.conversation_pk == conversation.pk,
                    ConversationItemRow.item_pk.in_(stale)))
        self._link_response(s, row, OUTPUT, stored)
        if conversation is not None:
            await self._append(s, conversation, stored, skip_linked=True)
        await s.flush()
        await self._drop_orphans(s, old)

    @observed
    async def delete_response(self, tenant: str, response_id: str) -> None:
        require(response_id, "response_id")

        async def op(s: AsyncSession) -> None:
            row = await self._response_row(s, tenant, response_id, lock=True)
            await self._delete_responses(s, [row.pk])

        await self._run(op, write=True, what="delete_response")

    async def _delete_responses(self, s: AsyncSession, pks: list[int]) -> None:
        item_pks = list((await s.execute(select(ResponseItemRow.item_pk).where(
            ResponseItemRow.response_pk.in_(pks)))).scalars())
        await s.execute(delete(ResponseItemRow).where(ResponseItemRow.response_pk.in_(pks)))
        await s.execute(delete(ResponseRow).where(ResponseRow.pk.in_(pks)))
        await self._drop_orphans(s, item_pks)

    @observed
    async def list_response_input_items(self, tenant: str, response_id: str,
                                        page_size: int = 0, page_token: str = "",
                                        order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(response_id, "response_id")
        size = checks.listing(page_size, page_token)

        async def op(s: AsyncSession) -> Page[Item]:
            row = await self._response_row(s, tenant, response_id)
            owner = (ResponseItemRow.response_pk == row.pk) & (ResponseItemRow.kind == INPUT)
            return await self._page_items(s, ResponseItemRow, owner, size, page_token, order)

        return await self._run(op, write=False, what="list_response_input_items")

    @observed
    async def get_response_chain(self, tenant: str, response_id: str,
                                 max_depth: int = 0) -> list[StoredResponse]:
        """The chain ending at ``response_id``, oldest first: one recursive query walks
        previous_response_id, one more loads every response's items."""
        limit = checks.chain_limit(response_id, max_depth)

        async def op(s: AsyncSession) -> list[StoredResponse]:
            table = ResponseRow.__table__
            chain = (select(table.c.pk, table.c.previous_response_id.label("prev"),
                            literal_column("1").label("depth"))
                     .where(table.c.tenant == tenant, table.c.id == response_id)
                     .cte("chain", recursive=True))
            parent = table.alias("parent")
            chain = chain.union_all(
                select(parent.c.pk, parent.c.previous_response_id,
                       chain.c.depth + literal_column("1"))
                .where(parent.c.tenant == tenant, parent.c.id == chain.c.prev,
                       chain.c.depth < limit))
            rows = list((await s.execute(
                select(ResponseRow).join(chain, ResponseRow.pk == chain.c.pk)
                .order_by(chain.c.depth.desc()))).scalars())
            if not rows:
                raise NotFound("response", response_id)
            return await self._load_responses(s, rows)

        return await self._run(op, write=False, what="get_response_chain")

    # ---- retention -------------------------------------------------------------------------

    @observed
    async def purge_responses(self, older_than: datetime, batch: int = 500) -> int:
        """Deletes responses (and idempotency keys) created before ``older_than``."""
        total = 0
        while True:
            async def op(s: AsyncSession) -> int:
                pks = list((await s.execute(
                    select(ResponseRow.pk).where(ResponseRow.created_at < older_than)
                    .order_by(ResponseRow.pk).limit(batch))).scalars())
                if pks:
                    await self._delete_responses(s, pks)
                else:
                    await s.execute(delete(IdempotencyKeyRow).where(
                        IdempotencyKeyRow.created_at < older_than))
                return len(pks)

            count = await self._run(op, write=True, what="purge_responses")
            total += count
            if count < batch:
                if count:
                    continue  # one more round clears the idempotency keys
                return total
