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


class Health(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"


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


@dataclass(eq=False)
class Worker:
    """One registered worker. Load counters are released by :meth:`track` when a call ends."""

    url: str
    card: ModelCard
    worker_type: WorkerType = WorkerType.REGULAR
    labels: dict[str, str] = field(default_factory=dict)
    health: Health = Health.PENDING
    health_message: str = ""
    register_time: float = field(default_factory=time.time)
    in_flight: int = 0
    processed: int = 0
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def is_routable(self) -> bool:
        return self.health is Health.READY

    @contextmanager
    def track(self) -> Iterator[None]:
        """Counts one in-flight request for the duration of the block (RAII-style guard)."""
        with self._lock:
            self.in_flight += 1
            self.processed += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def record_health(self, healthy: bool, message: str, success_threshold: int,
                      failure_threshold: int) -> bool:
        """Feeds one health-check result into the state machine; returns True on a change.

        pending/not-ready -> ready after ``success_threshold`` consecutive successes;
        ready/pending -> not-ready after ``failure_threshold`` consecutive failures.
        """
        before = self.health
        self.health_message = message
        if healthy:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if self.health is not Health.READY and self.consecutive_successes >= success_threshold:
                self.health = Health.READY
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if self.health is not Health.NOT_READY and (
                self.consecutive_failures >= failure_threshold
            ):
                self.health = Health.NOT_READY
        return self.health is not before


class WorkerRegistry:
    """Registered workers by url, with per-model views for routing."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def add(self, worker: Worker) -> None:
        if worker.url in self._workers:
            raise ValueError(f"worker {worker.url} is already registered")
        self._workers[worker.url] = worker

    def remove(self, url: str) -> Worker | None:
        return self._workers.pop(url, None)

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def all(self) -> list[Worker]:
        return sorted(self._workers.values(), key=lambda w: w.url)

    def for_model(self, model_id: str) -> list[Worker]:
        return [w for w in self.all() if w.model_id == model_id]

    def models(self) -> dict[str, list[Worker]]:
        grouped: dict[str, list[Worker]] = {}
        for worker in self.all():
            grouped.setdefault(worker.model_id, []).append(worker)
        return grouped

    def resolve_model(self, requested: str) -> str | None:
        """The model a request names; an empty name means the only model, if there is one."""
        models = self.models()
        if requested:
            return requested if requested in models else None
        return next(iter(models)) if len(models) == 1 else None

    def __len__(self) -> int:
        return len(self._workers)
