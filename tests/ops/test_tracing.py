"""One request is one trace, exported over OTLP/gRPC from every process.

The spans go to a small OTLP trace receiver started by this test (the real OTLP protocol over
gRPC; an OpenTelemetry Collector binary cannot be installed here). The client sends its own
`traceparent`, which must become the parent of the gateway's span.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.common.net import free_port
from services.supervisor import Suite, SuiteConfig

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - OTLP method name
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "service": service, "name": span.name,
                            "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                        })
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(0)


WANTED = {"sglmesh-gateway", "sglmesh-tokenizer", "sglmesh-router", "sglmesh-worker"}


def complete(spans: list[dict]) -> bool:
    return WANTED <= {s["service"] for s in spans} and any(
        s["parent"] == CLIENT_SPAN for s in spans)


def wait_for_trace(sink: Receiver, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        with sink.lock:
            spans = [s for s in sink.spans if s["trace_id"] == CLIENT_TRACE]
        if complete(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_one_trace_across_every_service(receiver, tmp_path: Path,
                                        embedded_model_dir: Path, monkeypatch) -> None:
    sink, port = receiver
    config = SuiteConfig(port=free_port(), log_dir=tmp_path / "logs",
                         history_db=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}",
                         otlp_endpoint=f"127.0.0.1:{port}", startup_timeout=300)
    suite = Suite(config, out=io.StringIO(), env={
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export batches quickly
        "SGLMESH_MODEL_CACHE": str(embedded_model_dir.parent)})
    try:
        url = suite.start()
        reply = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]},
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert reply.status_code == 200
        # Batches leave every 200 ms; wait for the whole trace while everything still runs
        # (a span that ends after the reply reached us must not race the shutdown).
        spans = wait_for_trace(sink, 15)
    finally:
        suite.stop()  # every process also flushes its batched spans on a clean exit
    if not complete(spans):
        spans = wait_for_trace(sink, 10)
    by_id = {s["span_id"]: s for s in spans}
    assert WANTED <= {s["service"] for s in spans}, spans
    roots = [s for s in spans if s["parent"] == CLIENT_SPAN]
    gateway_spans = [s for s in spans if s["service"] == "sglmesh-gateway"]
    assert [r["service"] for r in roots] == ["sglmesh-gateway"], gateway_spans

    def ancestors(span: dict) -> list[str]:
        chain = []
        while span["parent"] in by_id:
            span = by_id[span["parent"]]
            chain.append(span["service"])
        return chain

    # Every span hangs off the gateway's span; the worker's Generate under the router's.
    for span in spans:
        if span is not roots[0]:
            assert ancestors(span)[-1] == "sglmesh-gateway", span
    worker_generate = [s for s in spans if s["service"] == "sglmesh-worker"
                       and s["name"].endswith("/Generate")]
    assert worker_generate and "sglmesh-router" in ancestors(worker_generate[0])
