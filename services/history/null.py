"""``--history-backend none``: every RPC answers, nothing is stored.

Creates are checked like everywhere else (the same INVALID_ARGUMENT for a bad request) and
return the object with ids and times assigned, so the gateway can answer ``store=true``; with a
``request_id`` the ids derive from it, so a retried create answers the same ids. Anything that
names an existing id (reads, lists of items, chains, updates, deletes, appends, a
``previous_response_id`` or ``conversation_id`` reference) is NOT_FOUND, raised as
:class:`~services.history.domain.NotStored` (ErrorInfo reason ``HISTORY_DISABLED``) with a
message saying the backend stores nothing. Listing conversations answers an empty page.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.history import checks
from services.history.backends import NONE
from services.history.checks import IdMaker
from services.history.domain import (
    DEFAULT_MAX_ITEM_BYTES,
    Conversation,
    Item,
    NotStored,
    Page,
    ResponseUpdate,
    SortOrder,
    StoredResponse,
    derived_id,
    new_id,
    require,
    utcnow,
)
from services.history.metrics import observed


def _ids(tenant: str, kind: str, request_id: str) -> IdMaker | None:
    if not request_id:
        return None

    def make(prefix: str, index: int) -> str:
        return derived_id(prefix, tenant, kind, request_id, str(index))

    return make


def _own_id(prefix: str, tenant: str, kind: str, request_id: str) -> str:
    return derived_id(prefix, tenant, kind, request_id) if request_id else new_id(prefix)


def _stamped(items: list[Item]) -> list[Item]:
    now = utcnow()
    for item in items:
        item.created_at = now
    return items


class NullRepository:
    """Answers every operation and stores nothing; implements
    :class:`services.history.backends.Repository`."""

    backend = NONE

    def __init__(self, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> None:
        self.max_item_bytes = max_item_bytes

    async def close(self) -> None:
        return None

    @staticmethod
    def _missing(what: str, ident: str) -> NotStored:
        return NotStored(what, ident, NONE)

    # ---- conversations ---------------------------------------------------------------------

    @observed
    async def create_conversation(self, tenant: str, metadata: dict[str, str] | None = None,
                                  items: Sequence[Item] = (), request_id: str = ""
                                  ) -> tuple[Conversation, list[Item]]:
        meta, new_items = checks.create_conversation(
            metadata, items, request_id, self.max_item_bytes,
            _ids(tenant, "conversation", request_id))
        conv = Conversation(id=_own_id("conv", tenant, "conversation", request_id),
                            metadata=meta, created_at=utcnow())
        checks.new_members(conv.id, [it.id for it in new_items])
        return conv, _stamped(new_items)

    @observed
    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        require(conversation_id, "conversation_id")
        raise self._missing("conversation", conversation_id)

    @observed
    async def update_conversation(self, tenant: str, conversation_id: str,
                                  metadata: dict[str, str]) -> Conversation:
        checks.update_conversation(conversation_id, metadata)
        raise self._missing("conversation", conversation_id)

    @observed
    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        require(conversation_id, "conversation_id")
        raise self._missing("conversation", conversation_id)

    @observed
    async def list_conversations(self, tenant: str, page_size: int = 0,
                                 page_token: str = "") -> Page[Conversation]:
        checks.listing(page_size, page_token)
        if page_token:
            raise checks.unknown_conversation_token_error(page_token)
        return Page([])

    # ---- conversation items ----------------------------------------------------------------

    @observed
    async def create_conversation_items(self, tenant: str, conversation_id: str,
                                        items: Sequence[Item], request_id: str = ""
                                        ) -> list[Item]:
        checks.create_items(conversation_id, items, request_id, self.max_item_bytes)
        raise self._missing("conversation", conversation_id)

    @observed
    async def list_conversation_items(self, tenant: str, conversation_id: str,
                                      page_size: int = 0, page_token: str = "",
                                      order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(conversation_id, "conversation_id")
        checks.listing(page_size, page_token)
        raise self._missing("conversation", conversation_id)

    @observed
    async def get_conversation_item(self, tenant: str, conversation_id: str,
                                    item_id: str) -> Item:
        checks.item_ref(conversation_id, item_id)
        raise self._missing("conversation", conversation_id)

    @observed
    async def delete_conversation_item(self, tenant: str, conversation_id: str,
                                       item_id: str) -> Conversation:
        checks.item_ref(conversation_id, item_id)
        raise self._missing("conversation", conversation_id)

    # ---- responses -------------------------------------------------------------------------

    @observed
    async def create_response(self, tenant: str, response: StoredResponse,
                              append_to_conversation: bool = False,
                              request_id: str = "") -> StoredResponse:
        new = checks.create_response(
            response, append_to_conversation, request_id, self.max_item_bytes,
            response_id=_own_id("resp", tenant, "response", request_id),
            make_id=_ids(tenant, "response", request_id))
        if response.previous_response_id:
            raise self._missing("response", response.previous_response_id)
        if response.conversation_id:
            raise self._missing("conversation", response.conversation_id)
        return StoredResponse(
            id=new.id, model=response.model, status=response.status,
            instructions=response.instructions, input_items=_stamped(new.input_items),
            output_items=_stamped(new.output_items), usage=dict(response.usage),
            body=dict(response.body), metadata=new.metadata, created_at=utcnow())

    @observed
    async def get_response(self, tenant: str, response_id: str) -> StoredResponse:
        require(response_id, "response_id")
        raise self._missing("response", response_id)

    @observed
    async def update_response(self, tenant: str, response_id: str,
                              update: ResponseUpdate) -> StoredResponse:
        checks.update_response(response_id, update, self.max_item_bytes)
        raise self._missing("response", response_id)

    @observed
    async def delete_response(self, tenant: str, response_id: str) -> None:
        require(response_id, "response_id")
        raise self._missing("response", response_id)

    @observed
    async def list_response_input_items(self, tenant: str, response_id: str,
                                        page_size: int = 0, page_token: str = "",
                                        order: SortOrder = SortOrder.ASC) -> Page[Item]:
        require(response_id, "response_id")
        checks.listing(page_size, page_token)
        raise self._missing("response", response_id)

    @observed
    async def get_response_chain(self, tenant: str, response_id: str,
                                 max_depth: int = 0) -> list[StoredResponse]:
        checks.chain_limit(response_id, max_depth)
        raise self._missing("response", response_id)

    # ---- retention -------------------------------------------------------------------------

    @observed
    async def purge_responses(self, older_than: datetime, batch: int = 500) -> int:
        return 0
