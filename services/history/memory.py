"""``--history-backend memory``: the history in this process's memory, bounded, lost on restart.

Same behaviour as the SQL repository (tenancy, idempotency, ordering, pagination, chains,
validation, errors), for quick starts and tests. Each operation runs without awaiting, so under
asyncio it is atomic: every check comes before the first change, and a rejected write leaves
nothing behind.

Bounds (``MemoryLimits``): at most ``conversations`` conversations, ``responses`` responses and
``items`` items (over all tenants), and nothing older than ``max_age`` seconds since its last
write. To stay within them the least recently written conversation or response is dropped first
(with its items, unless something else still holds them); the object a write is storing is never
dropped by that write, and a write that alone needs more items than the bound is rejected
(INVALID_ARGUMENT). Idempotency keys are kept for as many requests as the bounds allow objects.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.history import checks, metrics
from services.history.backends import MEMORY
from services.history.domain import (
    DEFAULT_MAX_ITEM_BYTES,
    AlreadyExists,
    Conversation,
    InvalidInput,
    Item,
    NotFound,
    Page,
    ResponseUpdate,
    SortOrder,
    StoredResponse,
    new_id,
    require,
    utcnow,
)
from services.history.metrics import observed

CONVERSATION, RESPONSE, ITEMS = "conversation", "response", "conversation_items"


@dataclass(frozen=True)
class MemoryLimits:
    """Bounds of the memory backend; ``max_age`` 0 keeps objects until a count bound drops
    them."""

    conversations: int = 10_000
    responses: int = 10_000
    items: int = 100_000
    max_age: float = 86_400.0

    def __post_init__(self) -> None:
        for name in ("conversations", "responses", "items"):
            if getattr(self, name) < 1:
                raise ValueError(f"--memory-max-{name} must be >= 1, got {getattr(self, name)}")
        if self.max_age < 0:
            raise ValueError(f"--memory-max-age must be >= 0, got {self.max_age}")


@dataclass
class _ItemRec:
    item: Item
    refs: int = 0  # conversation memberships + response positions holding it


@dataclass
class _Conv:
    id: str
    metadata: dict[str, str]
    created_at: datetime
    items: list[str] = field(default_factory=list)  # in order
    members: set[str] = field(default_factory=set)


@dataclass
class _Resp:
    id: str
    model: str
    status: str
    previous_response_id: str
    conversation_id: str
    instructions: str
    inputs: list[str]
    outputs: list[str]
    usage: dict[str, Any]
    body: dict[str, Any]
    metadata: dict[str, str]
    in_conversation: bool
    created_at: datetime


@dataclass
class _Key:
    result_id: str
    result_items: list[str]
    created_at: datetime
    stamp: float


@dataclass
class _Tenant:
    conversations: dict[str, _Conv] = field(default_factory=dict)  # creation order
    responses: dict[str, _Resp] = field(default_factory=dict)
    items: dict[str, _ItemRec] = field(default_factory=dict)


OrderKey = tuple[str, str]  # (tenant, id)


class MemoryRepository:
    """Conversations, items and stored responses in memory; implements
    :class:`services.history.backends.Repository`."""

    backend = MEMORY

    def __init__(self, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                 limits: MemoryLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_item_bytes = max_item_bytes
        self.limits = limits or MemoryLimits()
        self.clock = clock
        self._tenants: dict[str, _Tenant] = {}
        # Least recently written first, per kind: the eviction order.
        self._order: dict[str, OrderedDict[OrderKey, float]] = {
            CONVERSATION: OrderedDict(), RESPONSE: OrderedDict()}
        self._keys: OrderedDict[tuple[str, str, str], _Key] = OrderedDict()
        self._max_keys = self.limits.conversations + self.limits.responses + self.limits.items
        self.item_total = 0

    async def close(self) -> None:
        self._tenants.clear()
        for order in self._order.values():
            order.clear()
        self._keys.clear()
        self.item_total = 0

    # ---- introspection (tests, docs) -------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Conversations, responses, items and idempotency keys held now (all tenants)."""
        return {"conversations": len(self._order[CONVERSATION]),
                "responses": len(self._order[RESPONSE]), "items": self.item_total,
                "keys": len(self._keys)}

    def item_count(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return len(t.items) if t else 0

    # ---- items -----------------------------------------------------------------------------

    def _tenant(self, tenant: str) -> _Tenant:
        """The tenant's store; a new one is registered only once something is written."""
        return self._tenants.get(tenant) or _Tenant()

    def _prune(self, tenant: str, t: _Tenant) -> None:
        if not (t.conversations or t.responses or t.items):
            self._tenants.pop(tenant, None)

    @staticmethod
    def _export(rec: _ItemRec) -> Item:
        it = rec.item
        return Item(id=it.id, type=it.type, role=it.role, status=it.status,
                    data=copy.deepcopy(it.data), created_at=it.created_at)

    def _items(self, t: _Tenant, ids: Iterable[str]) -> list[Item]:
        return [self._export(t.items[i]) for i in ids if i in t.items]

    def _upsert(self, t: _Tenant, items: Sequence[Item]) -> list[str]:
        """Stores items; an id the tenant already has names the same item (updated in place).
        The caller links every returned id."""
        now = utcnow()
        for it in items:
            rec = t.items.get(it.id)
            data = copy.deepcopy(it.data)
            if rec is None:
                t.items[it.id] = _ItemRec(Item(id=it.id, type=it.type, role=it.role,
                                               status=it.status, data=data, created_at=now))
                self.item_total += 1
            else:
                rec.item.type, rec.item.role, rec.item.status = it.type, it.role, it.status
                rec.item.data = data
        return [it.id for it in items]

    @staticmethod
    def _link(t: _Tenant, ids: Iterable[str]) -> None:
        for i in ids:
            t.items[i].refs += 1

    def _unlink(self, t: _Tenant, ids: Iterable[str]) -> None:
        for i in ids:
            rec = t.items[i]
            rec.refs -= 1
            if rec.refs <= 0:
                del t.items[i]
                self.item_total -= 1

    def _append(self, t: _Tenant, conv: _Conv, ids: Sequence[str]) -> None:
        """Appends the ids not in the conversation yet, in order."""
        for i in ids:
            if i not in conv.members:
                conv.members.add(i)
                conv.items.append(i)
                self._link(t, [i])

    def _check_fits(self, field_name: str, held: set[str]) -> None:
        """A write whose own objects would hold more items than the bound is rejected."""
        if len(held) > self.limits.items:
            raise InvalidInput(field_name, f"{field_name} would make one conversation or "
                                           f"response hold {len(held)} items; the memory "
                                           f"backend keeps at most {self.limits.items} "
                                           "(--memory-max-items)")

    # ---- bounds ----------------------------------------------------------------------------

    def _touch(self, kind: str, tenant: str, ident: str) -> None:
        order = self._order[kind]
        order[(tenant, ident)] = self.clock()
        order.move_to_end((tenant, ident))

    def _evict(self, kind: str, key: OrderKey, reason: str) -> None:
        tenant, ident = key
        t = self._tenants[tenant]
        if kind == CONVERSATION:
            self._drop_conversation(t, tenant, t.conversations[ident])
        else:
            self._drop_response(t, tenant, t.responses[ident])
        metrics.EVICTIONS.labels(kind, reason).inc()

    def _expire(self) -> None:
        """Drops what was last written more than ``max_age`` seconds ago."""
        if self.limits.max_age <= 0:
            return
        cutoff = self.clock() - self.limits.max_age
        for kind, order in self._order.items():
            while order:
                key, stamp = next(iter(order.items()))
                if stamp >= cutoff:
                    break
                self._evict(kind, key, "age")
        while self._keys:
            key_id, remembered = next(iter(self._keys.items()))
            if remembered.stamp >= cutoff:
                break
            del self._keys[key_id]

    def _enforce(self, *protected: tuple[str, OrderKey]) -> None:
        """Drops the least recently written objects (never ``protected``) until every count
        is within its bound."""
        keep = set(protected)

        def oldest(kind: str) -> OrderKey | None:
            for key in self._order[kind]:
                if (kind, key) not in keep:
                    return key
            return None

        for kind, bound, reason in ((CONVERSATION, self.limits.conversations, "conversations"),
                                    (RESPONSE, self.limits.responses, "responses")):
            while len(self._order[kind]) > bound and (key := oldest(kind)) is not None:
                self._evict(kind, key, reason)
        while self.item_total > self.limits.items:
            heads = [(self._order[k][key], k, key) for k in (CONVERSATION, RESPONSE)
                     if (key := oldest(k)) is not None]
            if not heads:
                break
            _, kind, key = min(heads)
            self._evict(kind, key, "items")

    def _remember(self, tenant: str, kind: str, request_id: str, result_id: str,
                  result_items: list[str] | None = None) -> None:
        if not request_id:
            return
        self._keys[(tenant, kind, request_id)] = _Key(result_id, list(result_items or []),
                                                      utcnow(), self.clock())
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)

    # ---- shared lookups --------------------------------------------------------------------

    def _conversation(self, tenant: str, conversation_id: str) -> tuple[_Tenant, _Conv]:
        t = self._tenants.get(tenant)
        conv = t.conversations.get(conversation_id) if t else None
        if t is None or conv is None:
            raise NotFound("conversation", conversation_id)
        return t, conv

    def _response(self, tenant: str, response_id: str) -> tuple[_Tenant, _Resp]:
        t = self._tenants.get(tenant)
        resp = t.responses.get(response_id) if t else None
        if t is None or resp is None:
            raise NotFound("response", response_id)
        return t, resp

    @staticmethod
    def _conv_out(conv: _Conv) -> Conversation:
        return Conversation(id=conv.id, metadata=dict(conv.metadata), created_at=conv.created_at)

    def _resp_out(self, t: _Tenant, r: _Resp) -> StoredResponse:
        return StoredResponse(
            id=r.id, model=r.model, status=r.status, previous_response_id=r.previous_response_id,
            conversation_id=r.conversation_id, instructions=r.instructions,
            input_items=self._items(t, r.inputs), output_items=self._items(t, r.outputs),
            usage=copy.deepcopy(r.usage), body=copy.deepcopy(r.body),
            metadata=dict(r.metadata), created_at=r.created_at)

    def _page(self, t: _Tenant, ids: list[str], size: int, page_token: str,
              order: SortOrder) -> Page[Item]:
        if order is SortOrder.DESC:
            ids = ids[::-1]
        start = 0
        if page_token:
            try:
                start = ids.index(page_token) + 1
            except ValueError:
                raise checks.unknown_item_token_error(page_token) from None
        window = ids[start:start + size + 1]
        more = len(window) > size
        window = window[:size]
        return Page(self._items(t, window), window[-1] if more else "")

    def _drop_conversation(self, t: _Tenant, tenant: str, conv: _Conv) -> None:
        del t.conversations[conv.id]
        self._order[CONVERSATION].pop((tenant, conv.id), None)
        self._unlink(t, conv.items)
        self._prune(tenant, t)

    def _drop_response(self, t: _Tenant, tenant: str, r: _Resp) -> None:
        del t.responses[r.id]
        self._order[RESPONSE].pop((tenant, r.id), None)
        self._unlink(t, [*r.inputs, *r.outputs])
        self._prune(tenant, t)

    # ---- conversations ---------------------------------------------------------------------

    @observed
    async def create_conversation(self, tenant: str, metadata: dict[str, str] | None = None,
                                  items: Sequence[Item] = (), request_id: str = ""
                                  ) -> tuple[Conversation, list[Item]]:
        meta, new_items = checks.create_conversation(metadata, items, request_id,
                                                     self.max_item_bytes)
        self._expire()
        t = self._tenant(tenant)
        key = self._keys.get((tenant, CONVERSATION, request_id)) if request_id else None
        if key is not None:
            _, conv = self._conversation(tenant, key.result_id)
            return self._conv_out(conv), self._items(t, key.result_items)
        conv = _Conv(id=new_id("conv"), metadata=meta, created_at=utcnow())
        ids = [it.id for it in new_items]
        checks.new_members(conv.id, ids, conv.members)
        self._check_fits("items", set(ids))
        self._tenants[tenant] = t
        self._upsert(t, new_items)
        t.conversations[conv.id] = conv
        self._append(t, conv, ids)
        self._remember(tenant, CONVERSATION, request_id, conv.id, ids)
        self._touch(CONVERSATION, tenant, conv.id)
        self._enforce((CONVERSATION, (tenant, conv.id)))
        return self._conv_out(conv), self._items(t, ids)

    @observed
    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        require(conversation_id, "conversation_id")
        self._expire()
        return self._conv_out(self._conversation(tenant, conversation_id)[1])

    @observed
    async def update_conversation(self, tenant: str, conversation_id: str,
                                  metadata: dict[str, str]) -> Conversation:
        meta = checks.update_conversation(conversation_id, metadata)
        self._expire()
        _, conv = self._conversation(tenant, conversation_id)
        conv.metadata = meta
        self._touch(CONVERSATION, tenant, conv.id)
        return self._conv_out(conv)

    @observed
    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        require(conversation_id, "conversation_id")
        self._expire()
        t, conv = self._conversation(tenant, conversation_id)
        self._drop_conversation(t, tenant, conv)

    @observed
    async def list_conversations(self, tenant: str, page_size: int = 0,
                                 page_token: str = "") -> Page[Conversation]:
        size = checks.listing(page_size, page_token)
        self._expire()
        t = self._tenant(tenant)
        newest_first = list(reversed(t.conversations))
        start = 0
        if page_token:
            if page_token not in t.conversations:
                raise checks.unknown_conversation_token_error(page_token)
            start = newest_first.index(page_token) + 1
        window = newest_first[start:start + size + 1]
        more = len(window) > size
        window = window[:size]
        return Page([self._conv_out(t.conversations[c]) for c in window],
                    window[-1] if more else "")

    # ---- conversation items ----------------------------------------------------------------

    @observed
    async def create_conversation_items(self, tenant: str, conversation_id: str,
                                        items: Sequence[Item], request_id: str = ""
                                        ) -> list[Item]:
        new_items = checks.create_items(conversation_id, items, request_id,
                                        self.max_item_bytes)
        self._expire()
        t, conv = self._conversation(tenant, conversation_id)
        key = self._keys.get((tenant, ITEMS, request_id)) if request_id else None
        if key is not None and key.result_id == conversation_id:
            return self._items(t, key.result_items)
        if key is not None:
            raise checks.request_id_reused_error()
        ids = [it.id for it in new_items]
        checks.new_members(conv.id, ids, conv.members)
        self._check_fits("items", conv.members | set(ids))
        self._upsert(t, new_items)
        self._append(t, conv, ids)
        self._remember(tenant, ITEMS, request_id, conversation_id, ids)
        self._touch(CONVERSATION, tenant, conv.id)
        self._enforce((CONVERSATION, (tenant, conv.id)))
        return self._items(t, ids)

    @observed
    async def list_conversation_items(self, tenant: str, conversation_id: str,
                                      page_size: int = 0, page_token: str = "",
                                      order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(conversation_id, "conversation_id")
        size = checks.listing(page_size, page_token)
        self._expire()
        t, conv = self._conversation(tenant, conversation_id)
        return self._page(t, conv.items, size, page_token, order)

    @observed
    async def get_conversation_item(self, tenant: str, conversation_id: str,
                                    item_id: str) -> Item:
        checks.item_ref(conversation_id, item_id)
        self._expire()
        t, conv = self._conversation(tenant, conversation_id)
        if item_id not in conv.members:
            raise NotFound("item", item_id)
        return self._export(t.items[item_id])

    @observed
    async def delete_conversation_item(self, tenant: str, conversation_id: str,
                                       item_id: str) -> Conversation:
        checks.item_ref(conversation_id, item_id)
        self._expire()
        t, conv = self._conversation(tenant, conversation_id)
        if item_id not in conv.members:
            raise NotFound("item", item_id)
        conv.members.discard(item_id)
        conv.items.remove(item_id)
        self._unlink(t, [item_id])
        self._touch(CONVERSATION, tenant, conv.id)
        return self._conv_out(conv)

    # ---- responses -------------------------------------------------------------------------

    @observed
    async def create_response(self, tenant: str, response: StoredResponse,
                              append_to_conversation: bool = False,
                              request_id: str = "") -> StoredResponse:
        new = checks.create_response(response, append_to_conversation, request_id,
                                     self.max_item_bytes)
        self._expire()
        t = self._tenant(tenant)
        key = self._keys.get((tenant, RESPONSE, request_id)) if request_id else None
        if key is not None:
            t, r = self._response(tenant, key.result_id)
            return self._resp_out(t, r)
        if new.id in t.responses:
            raise AlreadyExists("response", new.id)
        if response.previous_response_id and response.previous_response_id not in t.responses:
            raise NotFound("response", response.previous_response_id)
        conv = None
        if response.conversation_id:
            _, conv = self._conversation(tenant, response.conversation_id)
        in_ids = [it.id for it in new.input_items]
        out_ids = [it.id for it in new.output_items]
        held = set(in_ids) | set(out_ids)
        if append_to_conversation and conv is not None:
            held |= conv.members
        self._check_fits("response", held)
        self._tenants[tenant] = t
        self._upsert(t, [*new.input_items, *new.output_items])
        self._link(t, [*in_ids, *out_ids])
        r = _Resp(id=new.id, model=response.model, status=response.status,
                  previous_response_id=response.previous_response_id,
                  conversation_id=response.conversation_id, instructions=response.instructions,
                  inputs=in_ids, outputs=out_ids, usage=copy.deepcopy(response.usage),
                  body=copy.deepcopy(response.body), metadata=new.metadata,
                  in_conversation=bool(append_to_conversation), created_at=utcnow())
        t.responses[r.id] = r
        protected = [(RESPONSE, (tenant, r.id))]
        if append_to_conversation and conv is not None:
            self._append(t, conv, [*in_ids, *out_ids])
            self._touch(CONVERSATION, tenant, conv.id)
            protected.append((CONVERSATION, (tenant, conv.id)))
        self._remember(tenant, RESPONSE, request_id, r.id)
        self._touch(RESPONSE, tenant, r.id)
        self._enforce(*protected)
        return self._resp_out(t, r)

    @observed
    async def get_response(self, tenant: str, response_id: str) -> StoredResponse:
        require(response_id, "response_id")
        self._expire()
        t, r = self._response(tenant, response_id)
        return self._resp_out(t, r)

    @observed
    async def update_response(self, tenant: str, response_id: str,
                              update: ResponseUpdate) -> StoredResponse:
        meta, outputs = checks.update_response(response_id, update, self.max_item_bytes)
        self._expire()
        t, r = self._response(tenant, response_id)
        conv = None
        if r.in_conversation and r.conversation_id:
            conv = t.conversations.get(r.conversation_id)
        new_ids = [it.id for it in outputs] if outputs is not None else []
        if outputs is not None:
            held = set(r.inputs) | set(new_ids) | (conv.members if conv is not None else set())
            self._check_fits("response.output_items", held)
        if update.status is not None:
            r.status = update.status
        if update.usage is not None:
            r.usage = copy.deepcopy(update.usage)
        if update.body is not None:
            r.body = copy.deepcopy(update.body)
        if meta is not None:
            r.metadata = meta
        protected = [(RESPONSE, (tenant, r.id))]
        if outputs is not None:
            old = r.outputs
            self._upsert(t, outputs)  # before unlinking, so shared items survive
            keep = set(new_ids)
            if conv is not None:
                for stale in dict.fromkeys(old):
                    if stale not in keep and stale in conv.members:
                        conv.members.discard(stale)
                        conv.items.remove(stale)
                        self._unlink(t, [stale])
            r.outputs = new_ids
            self._link(t, new_ids)
            if conv is not None:
                self._append(t, conv, new_ids)
                self._touch(CONVERSATION, tenant, conv.id)
                protected.append((CONVERSATION, (tenant, conv.id)))
            self._unlink(t, old)
        self._touch(RESPONSE, tenant, r.id)
        self._enforce(*protected)
        return self._resp_out(t, r)

    @observed
    async def delete_response(self, tenant: str, response_id: str) -> None:
        require(response_id, "response_id")
        self._expire()
        t, r = self._response(tenant, response_id)
        self._drop_response(t, tenant, r)

    @observed
    async def list_response_input_items(self, tenant: str, response_id: str,
                                        page_size: int = 0, page_token: str = "",
                                        order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(response_id, "response_id")
        size = checks.listing(page_size, page_token)
        self._expire()
        t, r = self._response(tenant, response_id)
        return self._page(t, r.inputs, size, page_token, order)

    @observed
    async def get_response_chain(self, tenant: str, response_id: str,
                                 max_depth: int = 0) -> list[StoredResponse]:
        limit = checks.chain_limit(response_id, max_depth)
        self._expire()
        t, r = self._response(tenant, response_id)
        chain = [r]
        while len(chain) < limit and chain[-1].previous_response_id:
            parent = t.responses.get(chain[-1].previous_response_id)
            if parent is None:
                break
            chain.append(parent)
        return [self._resp_out(t, x) for x in reversed(chain)]

    # ---- retention -------------------------------------------------------------------------

    @observed
    async def purge_responses(self, older_than: datetime, batch: int = 500) -> int:
        """Deletes responses (and idempotency keys) created before ``older_than``."""
        self._expire()
        total = 0
        for tenant, t in list(self._tenants.items()):
            for r in [r for r in t.responses.values() if r.created_at < older_than]:
                self._drop_response(t, tenant, r)
                total += 1
        for key_id in [k for k, v in self._keys.items() if v.created_at < older_than]:
            del self._keys[key_id]
        return total
