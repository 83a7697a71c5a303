"""Workers as the router sees them: identity, health state machine, load accounting.

Plain Python: the gRPC client of a worker lives in ``worker_client``; this module only keeps
state, so policies and the registry are unit-testable without a network.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.router.resilience import CircuitBreaker


class Health(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"


class ConnectionMode(enum.Enum):
    """How the router reaches a worker: the one field that tells HTTP workers apart.

    Policies, breakers, health, loads, admission and retries treat both alike; only the
    transport differs (gRPC: the router relays ``Generate``; HTTP: the gateway relays the HTTP
    request under a lease, see :mod:`services.router.leases`)."""

    GRPC = "grpc"
    HTTP = "http"

    @classmethod
    def of_url(cls, url: str) -> ConnectionMode:
        return cls.HTTP if url.startswith(("http://", "https://")) else cls.GRPC


class WorkerType(enum.Enum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class ModelCard:
    """What a worker told us about its model at registration (GetModelInfo)."""

    model_id: str
    max_context_length: int = 0
    is_generation: bool = True
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int = 0
    architectures: tuple[str, ...] = ()
    num_labels: int = 0

    @property
    def is_reranker(self) -> bool:
        """A cross-encoder: a non-generative sequence-classification model with one score."""
        return not self.is_generation and (self.num_labels == 1 or any(
            a.endswith("ForSequenceClassification") for a in self.architectures))


REPORTED_LOAD_TTL_S = 1.0  # a pushed load older than this no longer counts (heartbeats: 2 s)


@dataclass
class EngineLoad:
    """The engine's own view of its load (GetLoads poll, or pushed on the KV-event stream)."""

    running_requests: int = 0
    waiting_requests: int = 0
    token_usage: float = 0.0
    gen_throughput: float = 0.0
    waiting_uncached_tokens: int = 0
    source: str = "poll"  # "poll" or "events"
    update_time: float = 0.0  # time.monotonic() of the report


@dataclass(eq=False)
class Worker:
    """One registered worker. Load counters are released by :meth:`track` when a call ends."""

    url: str
    card: ModelCard
    worker_type: WorkerType = WorkerType.REGULAR
    labels: dict[str, str] = field(default_factory=dict)
    connection_mode: ConnectionMode = ConnectionMode.GRPC
    health: Health = Health.PENDING
    health_message: str = ""
    register_time: float = field(default_factory=time.time)
    in_flight: int = 0
    processed: int = 0
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    bootstrap_port: int | None = None
    dp_size: int = 1
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker, repr=False)
    engine_load: EngineLoad | None = None
    removing: bool = False
    _dp_cursor: int = 0
    rank_in_flight: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def is_routable(self) -> bool:
        """Healthy and its circuit breaker lets requests through (every policy sees only these)."""
        return self.health is Health.READY and self.breaker.allows()

    @property
    def load(self) -> int:
        """The load policies compare: requests this router has in flight on the worker, or what
        the worker itself last pushed on its KV-event stream (running + waiting) if that is
        more and recent. Behind several router replicas the worker's own count is the only one
        that includes the other replicas' requests."""
        reported = self.engine_load
        if (reported is None or reported.source != "events"
                or time.monotonic() - reported.update_time > REPORTED_LOAD_TTL_S):
            return self.in_flight
        return max(self.in_flight, reported.running_requests + reported.waiting_requests)

    def next_dp_rank(self) -> int:
        """Data-parallel rank for the next request: the rank with the fewest of this router's
        requests in flight, ties broken round robin."""
        size = max(1, self.dp_size)
        if len(self.rank_in_flight) != size:
            self.rank_in_flight = [0] * size
        start = self._dp_cursor % size
        self._dp_cursor += 1
        return min(range(size), key=lambda r: (self.rank_in_flight[r], (r - start) % size))

    @contextmanager
    def track(self, dp_rank: int | None = None) -> Iterator[None]:
        """Counts one in-flight request (and its DP rank's) for the duration of the block."""
        ranked = dp_rank is not None and 0 <= dp_rank < len(self.rank_in_flight)
        with self._lock:
            self.in_flight += 1
            self.processed += 1
            if ranked:
                self.rank_in_flight[dp_rank] += 1  # type: ignore[index]
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                if ranked:
                    self.rank_in_flight[dp_rank] -= 1  # type: ignore[index]

    def hold(self) -> None:
        """Counts one in-flight request held by a lease (the gateway relays it)."""
        with self._lock:
            self.in_flight += 1
            self.processed += 1

    def unhold(self, served: bool = True) -> None:
        """Ends :meth:`hold`; ``served=False`` (the lease was handed back unused) also takes the
        request out of ``processed``."""
        with self._lock:
            self.in_flight -= 1
            if not served:
                self.processed -= 1

    def record_health(self, healthy: bool, message: str, success_threshold: int,
                      failure_threshold: int, count_failure: bool = True) -> bool:
        """Feeds one health-check result into the state machine; returns True on a change.

        pending/not-ready -> ready after ``success_threshold`` consecutive successes;
        ready/pending -> not-ready after ``failure_threshold`` consecutive failures. A failure
        with ``count_failure`` False (a probe between regular checks) only breaks a run of
        successes: the failure counts that decide a removal stay the regular checks'.
        """
        before = self.health
        self.health_message = message
        if healthy:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if self.health is not Health.READY and self.consecutive_successes >= success_threshold:
                self.health = Health.READY
        elif not count_failure:
            self.consecutive_successes = 0
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if self.health is not Health.NOT_READY and (
                self.consecutive_failures >= failure_threshold
            ):
                self.health = Health.NOT_READY
        return self.health is not before

    def should_remove(self, failure_threshold: int) -> bool:
        """SMG's "failed" state: pending for 10xF failed checks, or not-ready for 3xF."""
        if self.health is Health.NOT_READY:
            return self.consecutive_failures >= 3 * failure_threshold
        if self.health is Health.PENDING:
            return self.consecutive_failures >= 10 * failure_threshold
        return False


class WorkerRegistry:
    """Registered workers by url, with per-model views for routing.

    The url-ordered list and the per-model lists are snapshots rebuilt only when a worker is
    added or removed (the hot path reads them per request); treat them as read-only.
    """

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._all: list[Worker] | None = None
        self._by_model: dict[str, list[Worker]] = {}

    def _invalidate(self) -> None:
        self._all = None

    def _snapshot(self) -> list[Worker]:
        if self._all is None:
            self._all = sorted(self._workers.values(), key=lambda w: w.url)
            grouped: dict[str, list[Worker]] = {}
            for worker in self._all:
                grouped.setdefault(worker.model_id, []).append(worker)
            self._by_model = grouped
        return self._all

    def add(self, worker: Worker) -> None:
        if worker.url in self._workers:
            raise ValueError(f"worker {worker.url} is already registered")
        self._workers[worker.url] = worker
        self._invalidate()

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url, None)
        self._invalidate()
        return worker

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def all(self) -> list[Worker]:
        return self._snapshot()

    def for_model(self, model_id: str) -> list[Worker]:
        self._snapshot()
        return self._by_model.get(model_id, [])

    def models(self) -> dict[str, list[Worker]]:
        self._snapshot()
        return self._by_model

    def resolve_model(self, requested: str) -> str | None:
        """The model a request names; an empty name means the only model, if there is one."""
        models = self.models()
        if requested:
            return requested if requested in models else None
        return next(iter(models)) if len(models) == 1 else None

    def __len__(self) -> int:
        return len(self._workers)
