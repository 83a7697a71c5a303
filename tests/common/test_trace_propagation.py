"""Trace propagation without grpc.aio interceptors: ``create_channel``'s calls carry the
current ``traceparent``; ``GrpcServer`` instruments handlers at registration (server span
continuing the caller's trace, metrics, ServiceError -> status). Real gRPC on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace

from services.common.errors import ErrorCode, error_details, invalid_argument
from services.common.grpc_server import InstrumentingRegistrar
from services.common.metrics import RPC_REQUESTS
from services.common.net import TracingChannel, create_channel
from services.common.telemetry import setup_tracing

SERVICE = "sglmesh.test.v1.EchoService"


def _add_echo(servicer: Any, server: Any) -> None:
    ident = (lambda b: b, lambda b: b)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary, *ident),
        "Stream": grpc.stream_stream_rpc_method_handler(servicer.Stream, *ident),
        "Fail": grpc.unary_unary_rpc_method_handler(servicer.Fail, *ident),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class Echo:
    """Answers with what it saw: the caller's metadata and the server span's trace id."""

    @staticmethod
    def _seen(context: grpc.aio.ServicerContext) -> bytes:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        span = trace.get_current_span().get_span_context()
        return (f"{md.get('traceparent', '')}|{md.get('x-request-id', '')}|"
                f"{span.trace_id:032x}").encode()

    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._seen(context)

    async def Stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield self._seen(context)

    async def Fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise invalid_argument("thing", "bad thing")


async def test_calls_carry_the_trace_and_server_spans_continue_it(tmp_path: Path) -> None:
    setup_tracing("test", trace_file=str(tmp_path / "spans.jsonl"))
    server = grpc.aio.server()
    _add_echo(Echo(), InstrumentingRegistrar(server, "echo"))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}")
    assert isinstance(channel, TracingChannel)
    ident = {"request_serializer": None, "response_deserializer": None}
    unary = channel.unary_unary(f"/{SERVICE}/Unary", **ident)
    stream = channel.stream_stream(f"/{SERVICE}/Stream", **ident)
    fail = channel.unary_unary(f"/{SERVICE}/Fail", **ident)
    try:
        # No current span: nothing injected, the caller's metadata goes as it was.
        seen = (await unary(b"x", metadata=(("x-request-id", "r1"),))).decode().split("|")
        assert seen[:2] == ["", "r1"]
        with trace.get_tracer("test").start_as_current_span("caller") as span:
            trace_id = f"{span.get_span_context().trace_id:032x}"
            seen = (await unary(b"x", metadata=(("x-request-id", "r2"),))).decode().split("|")
            assert seen[0].split("-")[1] == trace_id and seen[1] == "r2"
            assert seen[2] == trace_id  # the server span continues the caller's trace
            call = stream(metadata=grpc.aio.Metadata(("x-request-id", "r3")))
            await call.write(b"a")
            seen = (await call.read()).decode().split("|")
            await call.done_writing()
            assert seen[0].split("-")[1] == trace_id and seen[1] == "r3"
            assert seen[2] == trace_id
        before = RPC_REQUESTS.labels("echo", "Fail", "INVALID_ARGUMENT")._value.get()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fail(b"x")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(info.value).code == ErrorCode.INVALID_ARGUMENT
        after = RPC_REQUESTS.labels("echo", "Fail", "INVALID_ARGUMENT")._value.get()
        assert after == before + 1
    finally:
        await channel.close()
        await server.stop(None)


def test_without_an_exporter_no_spans_are_recorded_but_the_trace_still_propagates() -> None:
    """No exporter configured: no SDK provider (no per-span cost), yet a caller's traceparent
    reaches the next service unchanged. Its own interpreter: the provider is process-global."""
    code = """
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from services.common.telemetry import server_span, setup_tracing, with_trace_metadata
setup_tracing("gateway")
assert not isinstance(trace.get_tracer_provider(), TracerProvider)
incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
tracer = trace.get_tracer("t")
assert with_trace_metadata((("x-request-id", "r"),)) == (("x-request-id", "r"),)
with server_span(tracer, "s", [("traceparent", incoming)], {}) as span:
    assert not span.is_recording()
    print(dict(with_trace_metadata((("x-request-id", "r"),)))["traceparent"])
with server_span(tracer, "s", [("x-request-id", "r")], {}) as span:
    assert not span.get_span_context().is_valid and with_trace_metadata(None) is None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
