"""The router's Generate relays worker responses as bytes (end to end: test_processes)."""

from __future__ import annotations

from typing import Any

from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.router import relay


class _Server:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered = handlers


class _Servicer(pb_grpc.SglangSchedulerServicer):
    async def Generate(self, request: Any, context: Any) -> Any:
        yield relay.raw_responses()
        yield pb.GenerateResponse(request_id=request.request_id)


async def test_generate_is_registered_raw_and_the_rest_unchanged() -> None:
    server = _Server()
    relay.add_scheduler_to_server(_Servicer(), server)
    standard = _Server()
    pb_grpc.add_SglangSchedulerServicer_to_server(_Servicer(), standard)
    assert set(server.registered) == set(standard.registered)
    for name, handler in server.registered.items():
        if name != "Generate":
            assert handler.response_serializer == standard.registered[name].response_serializer
    generate = server.registered["Generate"]
    assert generate.request_deserializer == pb.GenerateRequest.FromString
    message = pb.GenerateResponse(request_id="r", chunk=pb.GenerateStreamChunk(token_ids=[7]))
    raw = message.SerializeToString()
    assert generate.response_serializer(raw) is raw  # bytes pass through untouched
    assert generate.response_serializer(message) == raw  # a message is serialised
    seen = [r async for r in generate.unary_stream(pb.GenerateRequest(request_id="x"), None)]
    assert seen[0] is True and seen[1].request_id == "x"  # raw relaying on inside the handler
    assert relay.raw_responses() is False  # and off again after it
