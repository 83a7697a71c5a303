"""gRPC transport of the history service: proto <-> domain mapping only."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from sglmesh.history.v1 import history_pb2 as pb
from sglmesh.history.v1 import history_pb2_grpc

from services.common.errors import ErrorCode, ServiceError, invalid_argument, not_found
from services.history import domain
from services.history.backends import Repository

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HistoryService"].full_name
CONVERSATION_MASK = {"metadata"}
RESPONSE_MASK = {"status", "output_items", "usage", "body", "metadata"}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def to_service_error(exc: domain.HistoryError) -> ServiceError:
    if isinstance(exc, domain.NotStored):
        return ServiceError(ErrorCode.NOT_FOUND, "HISTORY_DISABLED", str(exc),
                            {exc.what: exc.ident, "backend": exc.backend})
    if isinstance(exc, domain.NotFound):
        return not_found(exc.what, exc.ident)
    if isinstance(exc, domain.InvalidInput):
        return invalid_argument(exc.field, exc.message)
    if isinstance(exc, domain.AlreadyExists):
        return ServiceError(ErrorCode.ALREADY_EXISTS, f"{exc.what.upper()}_ALREADY_EXISTS",
                            str(exc), {exc.what: exc.ident})
    return ServiceError(ErrorCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", str(exc))


def translated(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except domain.HistoryError as exc:
            if isinstance(exc, domain.StorageUnavailable):
                self.on_unavailable()
            raise to_service_error(exc) from exc

    return wrapper


# ---- mapping ---------------------------------------------------------------------------------

def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        json_format.ParseDict(value, out)
    return out


def _dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def item_to_proto(item: domain.Item) -> pb.Item:
    return pb.Item(id=item.id, type=item.type, role=item.role, status=item.status,
                   data=_struct(item.data), create_time=_timestamp(item.created_at))


def item_from_proto(item: pb.Item) -> domain.Item:
    return domain.Item(id=item.id, type=item.type, role=item.role, status=item.status,
                       data=_dict(item.data))


def items_from_proto(items: Iterable[pb.Item]) -> list[domain.Item]:
    return [item_from_proto(i) for i in items]


def conversation_to_proto(conv: domain.Conversation) -> pb.Conversation:
    return pb.Conversation(id=conv.id, metadata=conv.metadata,
                           create_time=_timestamp(conv.created_at))


def response_to_proto(r: domain.StoredResponse) -> pb.StoredResponse:
    return pb.StoredResponse(
        id=r.id, model=r.model, status=r.status, previous_response_id=r.previous_response_id,
        conversation_id=r.conversation_id, instructions=r.instructions,
        input_items=[item_to_proto(i) for i in r.input_items],
        output_items=[item_to_proto(i) for i in r.output_items],
        usage=_struct(r.usage), body=_struct(r.body), metadata=dict(r.metadata),
        create_time=_timestamp(r.created_at))


def response_from_proto(r: pb.StoredResponse) -> domain.StoredResponse:
    return domain.StoredResponse(
        id=r.id, model=r.model, status=r.status, previous_response_id=r.previous_response_id,
        conversation_id=r.conversation_id, instructions=r.instructions,
        input_items=items_from_proto(r.input_items),
        output_items=items_from_proto(r.output_items),
        usage=_dict(r.usage), body=_dict(r.body), metadata=dict(r.metadata))


def _order(order: int) -> domain.SortOrder:
    return domain.SortOrder.DESC if order == pb.SORT_ORDER_DESC else domain.SortOrder.ASC


def mask_paths(mask: field_mask_pb2.FieldMask, allowed: set[str]) -> set[str]:
    paths = set(mask.paths)
    unknown = sorted(paths - allowed)
    if unknown:
        raise invalid_argument(
            "update_mask", f"update_mask has unknown or read-only paths {unknown}; "
                           f"updatable: {sorted(allowed)}")
    return paths


# ---- servicer --------------------------------------------------------------------------------

class HistoryServicer(history_pb2_grpc.HistoryServiceServicer):
    """Maps each RPC onto a :class:`~services.history.backends.Repository` (any backend)."""

    def __init__(self, repo: Repository,
                 on_unavailable: Callable[[], None] = lambda: None) -> None:
        self.repo = repo
        self.ready = False
        self.not_ready_reason = "database schema not migrated yet"
        # Called when a request met an unreachable database (the health probe checks at once).
        self.on_unavailable = on_unavailable

    def _check_ready(self) -> None:
        if not self.ready:
            raise domain.StorageUnavailable(self.not_ready_reason)

    @translated
    async def CreateConversation(self, request: pb.CreateConversationRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.CreateConversationResponse:
        self._check_ready()
        conv, items = await self.repo.create_conversation(
            request.tenant, dict(request.metadata), items_from_proto(request.items),
            request.request_id)
        return pb.CreateConversationResponse(conversation=conversation_to_proto(conv),
                                             items=[item_to_proto(i) for i in items])

    @translated
    async def GetConversation(self, request: pb.GetConversationRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetConversationResponse:
        self._check_ready()
        conv = await self.repo.get_conversation(request.tenant, request.conversation_id)
        return pb.GetConversationResponse(conversation=conversation_to_proto(conv))

    @translated
    async def UpdateConversation(self, request: pb.UpdateConversationRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.UpdateConversationResponse:
        self._check_ready()
        paths = mask_paths(request.update_mask, CONVERSATION_MASK) or CONVERSATION_MASK
        conv_id = request.conversation.id
        if "metadata" in paths:
            conv = await self.repo.update_conversation(request.tenant, conv_id,
                                                       dict(request.conversation.metadata))
        else:  # pragma: no cover - metadata is the only updatable field
            conv = await self.repo.get_conversation(request.tenant, conv_id)
        return pb.UpdateConversationResponse(conversation=conversation_to_proto(conv))

    @translated
    async def DeleteConversation(self, request: pb.DeleteConversationRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.DeleteConversationResponse:
        self._check_ready()
        await self.repo.delete_conversation(request.tenant, request.conversation_id)
        return pb.DeleteConversationResponse(conversation_id=request.conversation_id)

    @translated
    async def ListConversations(self, request: pb.ListConversationsRequest,
                                context: grpc.aio.ServicerContext
                                ) -> pb.ListConversationsResponse:
        self._check_ready()
        page = await self.repo.list_conversations(request.tenant, request.page_size,
                                                  request.page_token)
        return pb.ListConversationsResponse(
            conversations=[conversation_to_proto(c) for c in page.items],
            next_page_token=page.next_page_token)

    @translated
    async def CreateConversationItems(self, request: pb.CreateConversationItemsRequest,
                                      context: grpc.aio.ServicerContext
                                      ) -> pb.CreateConversationItemsResponse:
        self._check_ready()
        items = await self.repo.create_conversation_items(
            request.tenant, request.conversation_id, items_from_proto(request.items),
            request.request_id)
        return pb.CreateConversationItemsResponse(items=[item_to_proto(i) for i in items])

    @translated
    async def ListConversationItems(self, request: pb.ListConversationItemsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.ListConversationItemsResponse:
        self._check_ready()
        page = await self.repo.list_conversation_items(
            request.tenant, request.conversation_id, request.page_size, request.page_token,
            _order(request.order))
        return pb.ListConversationItemsResponse(items=[item_to_proto(i) for i in page.items],
                                                next_page_token=page.next_page_token)

    @translated
    async def GetConversationItem(self, request: pb.GetConversationItemRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.GetConversationItemResponse:
        self._check_ready()
        item = await self.repo.get_conversation_item(request.tenant, request.conversation_id,
                                                     request.item_id)
        return pb.GetConversationItemResponse(item=item_to_proto(item))

    @translated
    async def DeleteConversationItem(self, request: pb.DeleteConversationItemRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> pb.DeleteConversationItemResponse:
        self._check_ready()
        conv = await self.repo.delete_conversation_item(request.tenant, request.conversation_id,
                                                        request.item_id)
        return pb.DeleteConversationItemResponse(conversation=conversation_to_proto(conv))

    @translated
    async def CreateResponse(self, request: pb.CreateResponseRequest,
                             context: grpc.aio.ServicerContext) -> pb.CreateResponseResponse:
        self._check_ready()
        stored = await self.repo.create_response(
            request.tenant, response_from_proto(request.response),
            request.append_to_conversation, request.request_id)
        return pb.CreateResponseResponse(response=response_to_proto(stored))

    @translated
    async def GetResponse(self, request: pb.GetResponseRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetResponseResponse:
        self._check_ready()
        stored = await self.repo.get_response(request.tenant, request.response_id)
        return pb.GetResponseResponse(response=response_to_proto(stored))

    @translated
    async def UpdateResponse(self, request: pb.UpdateResponseRequest,
                             context: grpc.aio.ServicerContext) -> pb.UpdateResponseResponse:
        self._check_ready()
        r = request.response
        paths = mask_paths(request.update_mask, RESPONSE_MASK)
        if not paths:  # no mask: every field the request sets
            paths = {name for name, present in (
                ("status", bool(r.status)), ("output_items", len(r.output_items) > 0),
                ("usage", r.HasField("usage")), ("body", r.HasField("body")),
                ("metadata", len(r.metadata) > 0)) if present}
        update = domain.ResponseUpdate(
            status=r.status if "status" in paths else None,
            output_items=items_from_proto(r.output_items) if "output_items" in paths else None,
            usage=_dict(r.usage) if "usage" in paths else None,
            body=_dict(r.body) if "body" in paths else None,
            metadata=dict(r.metadata) if "metadata" in paths else None)
        stored = await self.repo.update_response(request.tenant, r.id, update)
        return pb.UpdateResponseResponse(response=response_to_proto(stored))

    @translated
    async def DeleteResponse(self, request: pb.DeleteResponseRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteResponseResponse:
        self._check_ready()
        await self.repo.delete_response(request.tenant, request.response_id)
        return pb.DeleteResponseResponse(response_id=request.response_id)

    @translated
    async def ListResponseInputItems(self, request: pb.ListResponseInputItemsRequest,
                                     context: grpc.aio.ServicerContext
                                     ) -> pb.ListResponseInputItemsResponse:
        self._check_ready()
        page = await self.repo.list_response_input_items(
            request.tenant, request.response_id, request.page_size, request.page_token,
            _order(request.order))
        return pb.ListResponseInputItemsResponse(items=[item_to_proto(i) for i in page.items],
                                                 next_page_token=page.next_page_token)

    @translated
    async def GetResponseChain(self, request: pb.GetResponseChainRequest,
                               context: grpc.aio.ServicerContext
                               ) -> pb.GetResponseChainResponse:
        self._check_ready()
        chain = await self.repo.get_response_chain(request.tenant, request.response_id,
                                                   request.max_depth)
        return pb.GetResponseChainResponse(responses=[response_to_proto(r) for r in chain])


def add_to_server(servicer: HistoryServicer, server: grpc.aio.Server) -> None:
    history_pb2_grpc.add_HistoryServiceServicer_to_server(servicer, server)
