"""The Generate data plane relays the worker's responses as raw bytes.

The router reads a ``GenerateRequest`` once (routing needs its token ids) but never looks
inside a ``GenerateResponse``: parsing each one from the worker and serialising it again for
the caller is wasted work, once per streamed chunk. So the router's ``Generate`` is
registered with an identity response serializer (:func:`add_scheduler_to_server`), and while
that handler runs, worker calls made for it return the worker's bytes as they came
(:func:`raw_responses`, :func:`raw_generate`). Everything else — selection, retries before
the first chunk, PD, load accounting, aborts — is unchanged: it never depended on the
responses' contents.

In-process users of ``Router.generate`` (tests, benchmarks) still get parsed messages: raw
relaying is on only inside the registered handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.inprocess import method_handlers

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
GENERATE = f"/{SERVICE}/Generate"

_RAW: ContextVar[bool] = ContextVar("sglmesh_router_raw_relay", default=False)


def raw_responses() -> bool:
    """Whether the Generate call being served relays the worker's responses as bytes."""
    return _RAW.get()


def raw_generate(channel: grpc.aio.Channel) -> Callable[..., Any]:
    """A Generate multi-callable on ``channel`` whose responses are the undecoded bytes."""
    return channel.unary_stream(
        GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=None)


def raw_handler(generate: Callable[..., AsyncIterator[Any]]
                ) -> Callable[..., AsyncIterator[Any]]:
    """``generate`` (the servicer's Generate) with raw relaying on while it runs."""

    async def handler(request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        token = _RAW.set(True)
        try:
            async for response in generate(request, context):
                yield response
        finally:
            _RAW.reset(token)

    return handler


def _serialize(response: Any) -> bytes:
    """Bytes pass through; a message (an error path or a test double) is serialised."""
    if type(response) is bytes:
        return response
    return response.SerializeToString()  # type: ignore[no-any-return]


def add_scheduler_to_server(servicer: pb_grpc.SglangSchedulerServicer, server: Any) -> None:
    """``add_SglangSchedulerServicer_to_server`` with Generate relayed as raw bytes."""
    handlers = method_handlers(pb_grpc.add_SglangSchedulerServicer_to_server, servicer)
    handlers["Generate"] = grpc.unary_stream_rpc_method_handler(
        raw_handler(servicer.Generate), request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


__all__ = ["GENERATE", "add_scheduler_to_server", "raw_generate", "raw_responses"]
