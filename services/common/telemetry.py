"""OpenTelemetry tracing: provider setup and W3C context propagation over gRPC metadata.

Every service calls :func:`setup_tracing` once. The server's handler wrapper (see
``grpc_server``) continues the caller's trace from the ``traceparent`` metadata; channels made
by ``net.create_channel`` add the current context to every outgoing call's metadata
(:func:`with_trace_metadata`), so one request is one trace across gateway, tokenizer, router,
worker and history.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

log = logging.getLogger(__name__)

_configured = False


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line (for tests and debugging)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            if ctx is None:
                continue
            lines.append(json.dumps({
                "name": span.name,
                "service": span.resource.attributes.get("service.name"),
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent else None,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "status": span.status.status_code.name,
                "attributes": dict(span.attributes or {}),
            }, default=str))
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def setup_tracing(service: str, trace_file: str = "", otlp_endpoint: str = "",
                  console: bool = False) -> None:
    """Installs the global tracer provider for this process.

    Exporters: OTLP/gRPC (batched), a JSON-lines file, the console; spans are flushed when the
    process exits. With none, no SDK provider is installed: OpenTelemetry's no-op tracer still
    carries an incoming ``traceparent`` on to every outgoing call, but nothing builds, times or
    buffers spans nobody reads (that cost tens of microseconds per span, several spans per
    request).
    """
    global _configured
    if _configured:
        return
    if not (trace_file or console or otlp_endpoint):
        log.debug("tracing off for %s (no exporter): trace context is propagated only", service)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"sglmesh-{service}"}))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
    if console:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.removeprefix("grpc://").removeprefix("http://")
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # a second shutdown is a no-op
    _configured = True


def shutdown_tracing() -> None:
    """Flushes and stops the exporters; call when the service stops, before interpreter exit."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=5000)
        provider.shutdown()


def tracing_enabled() -> bool:
    """Whether spans are recorded: an SDK tracer provider is installed (by
    :func:`setup_tracing` with an exporter, or by a test)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def server_span(tracer: trace.Tracer, name: str, carrier: Sequence[tuple[str, Any]],
                attributes: dict[str, Any]) -> AbstractContextManager[trace.Span]:
    """A server span continuing the caller's trace (``traceparent`` in ``carrier``, gRPC
    metadata or HTTP headers) while tracing is on. Off, no span is built: the caller's context
    is only made current, so outgoing calls still carry it."""
    if tracing_enabled():
        return tracer.start_as_current_span(name, context=extract_context(carrier),
                                            kind=trace.SpanKind.SERVER, attributes=attributes)
    for key, _ in carrier:
        if key.lower() == "traceparent":
            return _current(extract_context(carrier))
    return _NO_SPAN


def internal_span(tracer: trace.Tracer, name: str, attributes: dict[str, Any]
                  ) -> AbstractContextManager[trace.Span]:
    """``tracer.start_as_current_span``, or nothing to build while tracing is off."""
    if tracing_enabled():
        return tracer.start_as_current_span(name, attributes=attributes)
    return _NO_SPAN


@contextlib.contextmanager
def _current(ctx: otel_context.Context) -> Iterator[trace.Span]:
    token = otel_context.attach(ctx)
    try:
        yield trace.get_current_span()
    finally:
        otel_context.detach(token)


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The trace context carried by incoming gRPC metadata (or HTTP headers)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as headers (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


def with_trace_metadata(metadata: Any) -> Any:
    """``metadata`` (a sequence of pairs, ``grpc.aio.Metadata`` or None) with the current trace
    context added; keys the context sets replace the caller's. Unchanged when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata  # no trace to continue (the common case with tracing off): no work
    carrier = inject_headers()
    if not carrier:
        return metadata
    if not metadata:
        return tuple(carrier.items())
    return (*((k, v) for k, v in metadata if k not in carrier), *carrier.items())


def metadata_dict(metadata: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """gRPC metadata as a plain dict of its string values (last value wins)."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    return {k.lower(): v for k, v in items if isinstance(v, str)}
