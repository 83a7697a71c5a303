"""``/v1/conversations``: OpenAI's Conversations API over the history service."""

from __future__ import annotations

from typing import Any

from sglmesh.history.v1 import history_pb2 as hpb

from services.gateway.errors import OpenAIError, invalid
from services.gateway.items import list_page, normalize_input_item
from services.gateway.storage import Storage, item_from_proto, item_to_proto

MAX_ITEMS_PER_CALL = 20


def conversation_json(conv: hpb.Conversation) -> dict[str, Any]:
    return {"id": conv.id, "object": "conversation", "created_at": conv.create_time.seconds,
            "metadata": dict(conv.metadata)}


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise invalid(param, f"Invalid value for '{param}': expected an object of strings.")
    if len(value) > 16:
        raise invalid(param, f"Invalid '{param}': at most 16 keys, got {len(value)}.")
    for k, v in value.items():
        if len(k) > 64 or len(v) > 512:
            raise invalid(param, f"Invalid '{param}': keys are at most 64 characters and "
                                 "values at most 512.")
    return value


async def list_call(storage: Storage, method: str, request: Any, request_id: str) -> Any:
    """A history list call; the history service's page token is the client's ``after``."""
    try:
        return await storage.call(method, request, request_id)
    except OpenAIError as exc:
        if exc.param == "page_token":
            exc.param = "after"
            exc.message = exc.message.replace("page_token", "after")
        raise


def page_params(limit: str | None, order: str | None, default_order: str = "desc"
                ) -> tuple[int, hpb.SortOrder]:
    """OpenAI's ``limit`` (1-100, default 20) and ``order`` (asc/desc) as history's."""
    size = 20
    if limit is not None:
        try:
            size = int(limit)
        except ValueError:
            size = 0
        if not 1 <= size <= 100:
            raise invalid("limit", f"Invalid value for 'limit': expected 1-100, got {limit!r}.")
    order = order or default_order
    if order not in ("asc", "desc"):
        raise invalid("order", f"Invalid value for 'order': expected 'asc' or 'desc', "
                               f"got {order!r}.")
    return size, hpb.SORT_ORDER_ASC if order == "asc" else hpb.SORT_ORDER_DESC


def _items(value: Any, param: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(param, f"Invalid value for '{param}': expected a list of items.")
    if len(value) > MAX_ITEMS_PER_CALL:
        raise invalid(param, f"Invalid '{param}': at most {MAX_ITEMS_PER_CALL} items per call, "
                             f"got {len(value)}.")
    return [normalize_input_item(item, f"{param}[{i}]") for i, item in enumerate(value)]


class ConversationService:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def create(self, tenant: str, body: dict[str, Any], idempotency_key: str,
                     request_id: str = "") -> dict[str, Any]:
        metadata = check_metadata(body.get("metadata"))
        items = _items(body.get("items"), "items")
        reply = await self.storage.call("CreateConversation", hpb.CreateConversationRequest(
            tenant=tenant, metadata=metadata, items=[item_to_proto(i) for i in items],
            request_id=idempotency_key), request_id)
        return conversation_json(reply.conversation)

    async def get(self, tenant: str, conversation_id: str, request_id: str = ""
                  ) -> dict[str, Any]:
        reply = await self.storage.call("GetConversation", hpb.GetConversationRequest(
            tenant=tenant, conversation_id=conversation_id), request_id)
        return conversation_json(reply.conversation)

    async def update(self, tenant: str, conversation_id: str, body: dict[str, Any],
                     request_id: str) -> dict[str, Any]:
        if "metadata" not in body:
            raise invalid("metadata", "Missing required parameter: 'metadata'.")
        metadata = check_metadata(body["metadata"])
        request = hpb.UpdateConversationRequest(
            tenant=tenant, conversation=hpb.Conversation(id=conversation_id, metadata=metadata))
        request.update_mask.paths.append("metadata")
        reply = await self.storage.call("UpdateConversation", request, request_id)
        return conversation_json(reply.conversation)

    async def delete(self, tenant: str, conversation_id: str, request_id: str
                     ) -> dict[str, Any]:
        await self.storage.call("DeleteConversation", hpb.DeleteConversationRequest(
            tenant=tenant, conversation_id=conversation_id), request_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def create_items(self, tenant: str, conversation_id: str, body: dict[str, Any],
                           idempotency_key: str, request_id: str = "") -> dict[str, Any]:
        if "items" not in body:
            raise invalid("items", "Missing required parameter: 'items'.")
        items = _items(body["items"], "items")
        if not items:
            raise invalid("items", "Invalid 'items': expected at least one item.")
        reply = await self.storage.call("CreateConversationItems",
                                        hpb.CreateConversationItemsRequest(
                                            tenant=tenant, conversation_id=conversation_id,
                                            items=[item_to_proto(i) for i in items],
                                            request_id=idempotency_key), request_id)
        return list_page([item_from_proto(i) for i in reply.items], False)

    async def list_items(self, tenant: str, conversation_id: str, after: str | None,
                         limit: str | None, order: str | None, request_id: str = ""
                         ) -> dict[str, Any]:
        size, sort = page_params(limit, order)
        reply = await list_call(self.storage, "ListConversationItems",
                                hpb.ListConversationItemsRequest(
                                    tenant=tenant, conversation_id=conversation_id,
                                    page_size=size, page_token=after or "", order=sort),
                                request_id)
        return list_page([item_from_proto(i) for i in reply.items], bool(reply.next_page_token))

    async def all_items(self, tenant: str, conversation_id: str, request_id: str = ""
                        ) -> list[dict[str, Any]]:
        """Every item, oldest first (the prompt of a response in this conversation)."""
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            reply = await self.storage.call(
                "ListConversationItems", hpb.ListConversationItemsRequest(
                    tenant=tenant, conversation_id=conversation_id, page_size=100,
                    page_token=token, order=hpb.SORT_ORDER_ASC), request_id)
            out += [item_from_proto(i) for i in reply.items]
            token = reply.next_page_token
            if not token:
                return out

    async def get_item(self, tenant: str, conversation_id: str, item_id: str,
                       request_id: str = "") -> dict[str, Any]:
        reply = await self.storage.call("GetConversationItem", hpb.GetConversationItemRequest(
            tenant=tenant, conversation_id=conversation_id, item_id=item_id), request_id)
        return item_from_proto(reply.item)

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str,
                          request_id: str) -> dict[str, Any]:
        reply = await self.storage.call("DeleteConversationItem",
                                        hpb.DeleteConversationItemRequest(
                                            tenant=tenant, conversation_id=conversation_id,
                                            item_id=item_id), request_id)
        return conversation_json(reply.conversation)
