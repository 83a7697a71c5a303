"""Prometheus metrics shared by every gRPC service, and the /metrics endpoint."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger(__name__)

RPC_REQUESTS = Counter(
    "sglmesh_grpc_server_requests_total",
    "gRPC calls handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "sglmesh_grpc_server_duration_seconds",
    "gRPC call duration (whole stream for streaming calls).",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: MetricWrapperBase, *values: str) -> Any:
    """``metric.labels(*values)``, memoised: prometheus_client validates the values and takes a
    lock on every ``labels`` call, and the request path makes several per request. (sglmesh
    never removes a labelled child, so a memoised one is never stale.)"""
    key = (id(metric), values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


def start_metrics_server(host: str, port: int) -> int | None:
    """Serves /metrics on ``host:port`` (port 0 picks one); returns the bound port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
