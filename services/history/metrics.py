"""Prometheus metrics of the history service (served on ``--metrics-port`` with the rest).

``sglmesh_history_operations_total{operation,outcome}``: repository operations by outcome
(ok, not_found, invalid_argument, already_exists, unavailable, error);
``sglmesh_history_operation_duration_seconds{operation}``: their latency, database time
included; ``sglmesh_history_pool_connections_in_use`` / ``..._pool_size``: the connection
pool; ``sglmesh_history_database_up``: the background probe's last answer (1 or 0; always 1
for the memory and none backends); ``sglmesh_history_memory_evictions_total{kind,reason}``:
what the memory backend dropped to stay within its bounds (reason: conversations, responses,
items, age).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from services.history import domain

OPERATIONS = Counter(
    "sglmesh_history_operations_total",
    "History repository operations, by operation and outcome.",
    ["operation", "outcome"],
)
OPERATION_LATENCY = Histogram(
    "sglmesh_history_operation_duration_seconds",
    "History repository operation latency (one transaction, retries included).",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
POOL_IN_USE = Gauge(
    "sglmesh_history_pool_connections_in_use",
    "Database connections checked out of the pool right now.",
)
POOL_SIZE = Gauge(
    "sglmesh_history_pool_size",
    "Connections the pool keeps open (its overflow may add as many again).",
)
DATABASE_UP = Gauge(
    "sglmesh_history_database_up",
    "1 while the background probe reaches the database, 0 while it does not.",
)

EVICTIONS = Counter(
    "sglmesh_history_memory_evictions_total",
    "Conversations and responses the memory backend dropped to stay within its bounds.",
    ["kind", "reason"],
)


def outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of an operation that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, domain.NotFound):
        return "not_found"
    if isinstance(exc, domain.InvalidInput):
        return "invalid_argument"
    if isinstance(exc, domain.AlreadyExists):
        return "already_exists"
    if isinstance(exc, domain.StorageUnavailable):
        return "unavailable"
    return "error"


def record(operation: str, seconds: float, exc: BaseException | None) -> None:
    OPERATIONS.labels(operation, outcome(exc)).inc()
    OPERATION_LATENCY.labels(operation).observe(seconds)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def observed(method: F) -> F:
    """Counts a repository operation by outcome and times it (validation failures included);
    every backend's operations are wrapped with it."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await method(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            record(name, time.perf_counter() - start, error)

    return cast(F, wrapper)


def watch_pool(in_use: Callable[[], float], size: int) -> None:
    """Points the pool gauges at a live pool (read at scrape time)."""
    POOL_IN_USE.set_function(in_use)
    POOL_SIZE.set(size)
