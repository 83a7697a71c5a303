"""The gateway's view of the history service: tenant-scoped calls, storage errors as 503."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
from sglmesh.history.v1 import history_pb2 as hpb
from sglmesh.history.v1 import history_pb2_grpc

from services.common.structs import from_struct, to_struct
from services.gateway.errors import OpenAIError, from_history
from services.gateway.items import stored_item

DEFAULT_TENANT = "default"
REQUEST_ID_KEY = "x-request-id"


def tenant_for_key(api_key: str | None) -> str:
    """Each API key is its own tenant, named by a hash: the key itself is never stored."""
    if not api_key:
        return DEFAULT_TENANT
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


def item_to_proto(item: dict[str, Any]) -> hpb.Item:
    data = {k: v for k, v in item.items() if k not in ("id",)}
    return hpb.Item(id=item.get("id", ""), type=item.get("type", "message"),
                    role=item.get("role", "") if item.get("type") == "message" else "",
                    status=item.get("status", ""), data=to_struct(data))


def item_from_proto(item: hpb.Item) -> dict[str, Any]:
    return stored_item(from_struct(item.data), item.id, item.type, item.role, item.status)


class Storage:
    """Calls HistoryService for one gateway; every call names the tenant and request id."""

    def __init__(self, stub: history_pb2_grpc.HistoryServiceStub | None, timeout: float) -> None:
        self.stub = stub
        self.timeout = timeout

    async def call(self, method: str, request: Any, request_id: str = "") -> Any:
        if self.stub is None:
            raise OpenAIError(503, "This gateway has no history service (--history); "
                                   "conversations and stored responses are unavailable.",
                              code="storage_unavailable")
        metadata = ((REQUEST_ID_KEY, request_id),) if request_id else None
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout,
                                                    metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_history(exc) from exc
