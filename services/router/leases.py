"""Worker leases: a selected worker held for one request attempt that another process relays.

HTTP workers take OpenAI JSON / SGLang's native body, not tokenized ``Generate`` calls, so the
gateway relays their requests itself. The router still decides and accounts: a lease is taken
with the model's policy over the routable workers (the same ``Router.select``), holds an
admission slot and one in-flight request on the worker until it is released (or expires), and
its outcome goes through the same rules as a gRPC attempt: ``classify`` for the circuit breaker,
``is_retryable`` + ``RetryConfig`` + ``backoff_secs`` for the retry decision.

Plain Python; the transport (``server.py``) maps RouterLeaseService onto :class:`LeaseTable`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.admission import Permit
from services.router.resilience import Outcome, RetryConfig, backoff_secs, classify, is_retryable
from services.router.workers import Worker

log = logging.getLogger(__name__)


@dataclass
class Lease:
    id: str
    worker: Worker
    model_id: str
    request_id: str
    attempt: int
    permit: Permit
    pinned: bool  # a target worker was forced: never retried elsewhere
    start: float = field(default_factory=time.monotonic)
    expires: float = 0.0


@dataclass(frozen=True)
class Release:
    """What a released lease means for the request: retry (after ``backoff`` s) or not."""

    retry: bool
    backoff: float
    outcome: Outcome
    final: bool  # the request is over (no retry follows)


class LeaseTable:
    """Live leases by id. Not thread-safe (the router runs on one event loop)."""

    def __init__(self, retry: RetryConfig, ttl_secs: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retry = retry
        self.ttl = ttl_secs
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._ids = itertools.count(1)
        self._prefix = f"lease-{os.getpid():x}-{int(time.time()):x}-"

    def __len__(self) -> int:
        return len(self._leases)

    def open(self, worker: Worker, model_id: str, request_id: str, attempt: int,
             permit: Permit, pinned: bool) -> Lease:
        lease = Lease(f"{self._prefix}{next(self._ids)}", worker, model_id, request_id, attempt,
                      permit, pinned)
        lease.expires = lease.start + self.ttl
        worker.hold()
        self._leases[lease.id] = lease
        return lease

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def close(self, lease_id: str, code: str, relayed: bool) -> tuple[Lease, Release] | None:
        """Ends a lease with the attempt's status code name; None if unknown or expired.

        A lease handed back unused (CANCELLED, nothing relayed: the caller took the gRPC path)
        does not count as a request of the worker nor as a breaker outcome."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        unused = code == "CANCELLED" and not relayed
        lease.worker.unhold(served=not unused)
        lease.permit.release()
        outcome = Outcome.IGNORED if unused else classify(code)
        if not unused:
            lease.worker.breaker.record(outcome)
        retry = (is_retryable(code) and not relayed and not lease.pinned and self.retry.enabled
                 and lease.attempt + 1 < self.retry.max_attempts)
        backoff = backoff_secs(lease.attempt, self.retry) if retry else 0.0
        return lease, Release(retry, backoff, outcome, final=not retry and not unused)

    def expired(self) -> list[Lease]:
        """The leases past their expiry (the caller releases them)."""
        now = self._clock()
        gone = [lease for lease in self._leases.values() if lease.expires <= now]
        for lease in gone:
            log.warning("lease %s on %s (request %s) expired unreleased", lease.id,
                        lease.worker.url, lease.request_id)
        return gone

    def workers_of_request(self, request_id: str) -> list[Worker]:
        return [lease.worker for lease in self._leases.values()
                if request_id and lease.request_id == request_id]
