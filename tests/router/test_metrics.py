"""Router metrics (``sglmesh_`` names mirroring SMG's) and trace spans, against sim workers."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest

from services.router.router import RequestHints
from tests.router.fleet import gen, generate, running_router, sim_config, sim_fleet, url


def _exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in metrics")


async def test_metrics_and_spans() -> None:
    exporter = _exporter()
    async with sim_fleet(sim_config(sim_error_rate=1.0), sim_config()) as (bad, good), \
            running_router([bad, good], policy="cache_aware", cb_failure_threshold=1,
                           max_concurrent_requests=8) as router:
        model = router.registry.all()[0].model_id
        for i in range(4):
            await generate(router, gen(range(100 + i, 180 + i), f"m{i}"))
        with pytest.raises(grpc.aio.AioRpcError):
            await generate(router, gen(range(5, 30), "t"), RequestHints(target_worker=url(bad)))
        text = generate_latest(REGISTRY).decode()
    assert _value(text, "sglmesh_router_requests_total", model=model, code="OK") >= 4
    assert _value(text, "sglmesh_router_request_errors_total", model=model,
                  code="UNAVAILABLE") >= 1
    assert _value(text, "sglmesh_router_ttft_seconds_count", model=model) >= 4
    assert _value(text, "sglmesh_router_request_duration_seconds_count", model=model) >= 5
    assert _value(text, "sglmesh_worker_retries_total", worker=url(bad)) >= 1
    assert _value(text, "sglmesh_worker_cb_state", worker=url(bad)) == 1  # open
    assert _value(text, "sglmesh_worker_cb_state", worker=url(good)) == 0
    assert _value(text, "sglmesh_worker_cb_transitions_total", worker=url(bad),
                  from_state="closed", to_state="open") >= 1
    assert _value(text, "sglmesh_worker_requests_active", worker=url(good)) == 0
    assert _value(text, "sglmesh_worker_health", worker=url(good)) == 1
    assert _value(text, "sglmesh_cache_aware_misses_total", model=model) >= 1
    # sim workers publish KV events: the precise index is used, the approximate tree stays empty
    assert _value(text, "sglmesh_cache_tree_tokens", model=model) == 0
    assert _value(text, "sglmesh_kv_index_live_workers", model=model) >= 1
    assert _value(text, "sglmesh_admission_queue_depth") == 0
    assert _value(text, "sglmesh_admission_inflight") == 0
    assert _value(text, "sglmesh_worker_selection_total", worker=url(good),
                  policy="cache_aware") >= 1
    assert _value(text, "sglmesh_kv_index_blocks", model=model) >= 0
    spans = exporter.get_finished_spans()
    selects = [s for s in spans if s.name == "router.select"]
    attempts = [s for s in spans if s.name == "router.attempt"]
    assert selects and attempts
    assert {s.attributes["sglmesh.worker"] for s in attempts} == {url(bad), url(good)}  # type: ignore[index]
    failed = [s for s in attempts if s.attributes["rpc.grpc.status_code"] == "UNAVAILABLE"]  # type: ignore[index]
    assert failed and all(s.status.status_code.name == "ERROR" for s in failed)
    # the worker's server span is a child of the router's attempt span
    attempt_ids = {s.context.span_id for s in attempts}
    assert any(s.parent is not None and s.parent.span_id in attempt_ids and s.name.endswith(
        "/Generate") for s in spans)
