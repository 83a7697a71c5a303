"""gRPC server bootstrap: health, reflection, telemetry, error translation, graceful stop.

A service's ``__main__`` builds its domain objects, then::

    server = GrpcServer(config)
    server.add_service(add_FooServicer_to_server, FooServicer(domain), "pkg.FooService")
    await server.start()
    server.set_serving(True)          # once warm
    await wait_for_shutdown()
    await server.stop()
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.common.config import ServiceConfig
from services.common.errors import ServiceError
from services.common.metrics import RPC_LATENCY, RPC_REQUESTS, start_metrics_server
from services.common.net import dial_target, format_target
from services.common.telemetry import server_span

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


_UNTRACED = ("/grpc.health.", "/grpc.reflection.")


def instrument_handler(service: str, method: str, handler: grpc.RpcMethodHandler,
                       tracer: trace.Tracer | None = None) -> grpc.RpcMethodHandler:
    """``handler`` wrapped for one method: per call a server span continuing the caller's trace
    (``traceparent`` metadata), metrics, and ServiceError / upstream errors -> gRPC status.

    Done once per method when the service is registered; a call pays for its span and
    metrics, a streamed message for one generator step, and nothing else.
    """
    tracer = tracer or trace.get_tracer(f"sglmesh.{service}")
    short = method.rsplit("/", 1)[-1]
    latency = RPC_LATENCY.labels(service, short)
    counters: dict[str, Any] = {}
    attributes = {"rpc.system": "grpc", "rpc.method": method}

    def finish(context: grpc.aio.ServicerContext, span: trace.Span, start: float,
               error: BaseException | None) -> None:
        code = _code_name(context)
        if isinstance(error, ServiceError):
            code = error.code.grpc_code.name
        elif isinstance(error, asyncio.CancelledError):
            code = "CANCELLED"
        elif error is not None and code == "OK":
            code = "UNKNOWN"
        counter = counters.get(code)
        if counter is None:
            counter = counters[code] = RPC_REQUESTS.labels(service, short, code)
        counter.inc()
        latency.observe(time.perf_counter() - start)
        span.set_attribute("rpc.grpc.status_code", code)
        if code not in ("OK", "CANCELLED"):
            span.set_status(Status(StatusCode.ERROR, code))

    async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            await context.abort_with_status(exc.to_status())
        if isinstance(exc, NotImplementedError):
            # The generated servicer base class raises this for RPCs a service leaves out.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        if isinstance(exc, grpc.aio.AioRpcError):
            # An upstream call failed: relay its code, message and ErrorInfo unchanged.
            trailers = tuple(
                (k, v) for k, v in (exc.trailing_metadata() or ())
                if k == "grpc-status-details-bin"
            )
            await context.abort(exc.code(), exc.details() or "", trailers)
        log.exception("unhandled error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            with server_span(tracer, method, context.invocation_metadata() or (),
                             attributes) as span:
                error: BaseException | None = None
                try:
                    return await behavior(request, context)
                except (ServiceError, Exception) as exc:
                    error = exc
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await abort(context, exc)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, span, start, error)

        return wrapped

    def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]
                    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            with server_span(tracer, method, context.invocation_metadata() or (),
                             attributes) as span:
                error: BaseException | None = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except (ServiceError, Exception) as exc:
                    error = exc
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await abort(context, exc)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, span, start, error)

        return wrapped

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer,
            handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer,
            handler.response_serializer)
    return handler


class _MethodTable(grpc.GenericRpcHandler):
    """Fully qualified method name -> (instrumented) handler."""

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)


class _PerCall(grpc.GenericRpcHandler):
    """A generic handler of unknown shape: its answers are instrumented as they come."""

    def __init__(self, inner: grpc.GenericRpcHandler, service: str) -> None:
        self.inner, self.service_name = inner, service
        self.cache: dict[tuple[str, int], grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(handler_call_details)
        method = handler_call_details.method or "unknown"
        if handler is None or method.startswith(_UNTRACED):
            return handler
        key = (method, id(handler))
        wrapped = self.cache.get(key)
        if wrapped is None:
            wrapped = self.cache[key] = instrument_handler(self.service_name, method, handler)
        return wrapped


class InstrumentingRegistrar:
    """Stands in for the grpc.aio server while a generated ``add_XServicer_to_server`` (or any
    code that registers handlers) runs: every method handler is instrumented once, here."""

    def __init__(self, server: grpc.aio.Server, service: str) -> None:
        self.server = server
        self.service = service
        self.tracer = trace.get_tracer(f"sglmesh.{service}")

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.startswith(_UNTRACED):
            return handler
        return instrument_handler(self.service, method, handler, self.tracer)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        wrapped: list[grpc.GenericRpcHandler] = []
        for handler in handlers:
            table = getattr(handler, "_method_handlers", None)
            if isinstance(table, dict):  # grpc.method_handlers_generic_handler(...)
                wrapped.append(_MethodTable(
                    {m: self._wrap(m, h) for m, h in table.items()}))
            else:
                wrapped.append(_PerCall(handler, self.service))
        self.server.add_generic_rpc_handlers(tuple(wrapped))

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, grpc.RpcMethodHandler]
                                       ) -> None:
        self.server.add_registered_method_handlers(service_name, {
            m: self._wrap(f"/{service_name}/{m}", h) for m, h in method_handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The same instrumentation as a grpc.aio server interceptor, for servers not built by
    :class:`GrpcServer` (which instruments handlers once, at registration, instead: an
    interceptor costs an extra coroutine and handler per call)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.tracer = trace.get_tracer(f"sglmesh.{service}")

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method or "unknown"
        if method.startswith(_UNTRACED):
            return handler
        return instrument_handler(self.service, method, handler, self.tracer)


class GrpcServer:
    """One grpc.aio server with standard health and reflection, bound to ``config``."""

    def __init__(self, config: ServiceConfig, service: str | None = None) -> None:
        self.config = config
        self.service = service or config.service_name
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port: int = 0
        self.metrics_port: int | None = None

    def add_service(self, add_to_server: Callable[[Any, grpc.aio.Server], None],
                    servicer: Any, full_name: str) -> None:
        """Registers a servicer; its health status starts NOT_SERVING until set_serving.

        Its handlers are instrumented as they are registered (span, metrics, errors)."""
        add_to_server(servicer, InstrumentingRegistrar(self.server, self.service))  # type: ignore[arg-type]
        self._service_names.append(full_name)

    async def start(self) -> int:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = format_target(self.config.host, self.config.port)
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics_port = start_metrics_server(self.config.host, self.config.metrics_port)
        log.info("%s listening on %s (dial %s)", self.service,
                 format_target(self.config.host, self.port),
                 dial_target(self.config.host, self.port))
        return self.port

    async def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)


async def wait_for_shutdown() -> None:
    """Returns on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs a service's async main on uvloop when available."""
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())

