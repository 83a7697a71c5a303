"""Admission control: a concurrency limit, an optional request rate, and a FIFO wait queue.

SMG's ``--max-concurrent-requests`` / ``--queue-size`` / ``--queue-timeout-secs`` /
``--rate-limit-tokens-per-second``, with the two limits kept apart so each means one thing:

* at most ``max_concurrent`` requests hold a permit at once; a permit is returned when the
  request's stream ends (done, error or cancel), never earlier;
* with ``rate`` set, admissions are also metered by a token bucket refilled at ``rate`` tokens
  per second (burst ``max(1, rate)``); a token is spent per admission and not returned.

A request that cannot be admitted at once waits in a FIFO queue of ``queue_size`` places for at
most ``queue_timeout`` seconds. No place left (or ``queue_size == 0``) -> RESOURCE_EXHAUSTED
``ADMISSION_QUEUE_FULL`` (HTTP 429 at the gateway); waited too long -> UNAVAILABLE
``ADMISSION_QUEUE_TIMEOUT`` (503). Both carry a ``retry_after_secs`` hint.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable

from services.common.errors import ErrorCode, ServiceError

DOMAIN = "sglmesh.router"


def auto_max_concurrent() -> int:
    """SMG's ``-1``: 1024 per core, at least 4096."""
    return max(4096, 1024 * (os.cpu_count() or 1))


class Permit:
    """One admitted request; :meth:`release` (idempotent) gives the slot back."""

    __slots__ = ("_admission", "_released", "admitted_at", "waited")

    def __init__(self, admission: Admission | None, waited: float) -> None:
        self._admission = admission
        self._released = False
        self.admitted_at = time.monotonic()
        self.waited = waited

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._admission is not None:
                self._admission._release()

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    def __init__(self, max_concurrent: int = 0, queue_size: int = 100,
                 queue_timeout: float = 60.0, rate: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_concurrent`` 0 = no concurrency limit; ``rate`` 0 = no rate limit."""
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.rate = rate
        self._clock = clock
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._refilled = clock()
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[Permit]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.rejected_full = 0
        self.rejected_timeout = 0
        self.on_reject: Callable[[str], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_concurrent > 0 or self.rate > 0

    @property
    def queue_depth(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def _refill(self) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def _can_take(self) -> bool:
        if self.max_concurrent > 0 and self.in_flight >= self.max_concurrent:
            return False
        if self.rate > 0:
            self._refill()
            return self._tokens >= 1.0
        return True

    def _take(self, waited: float) -> Permit:
        self.in_flight += 1
        if self.rate > 0:
            self._tokens -= 1.0
        return Permit(self, waited)

    def try_acquire(self) -> Permit | None:
        """A permit now, or None (never queues; FIFO: not while others wait)."""
        if not self.enabled:
            return Permit(None, 0.0)
        if not self.queue_depth and self._can_take():
            return self._take(0.0)
        return None

    async def acquire(self) -> Permit:
        permit = self.try_acquire()
        if permit is not None:
            return permit
        if self.queue_depth >= self.queue_size:
            self._reject("full")
            raise ServiceError(
                ErrorCode.RESOURCE_EXHAUSTED, "ADMISSION_QUEUE_FULL",
                f"the router is at capacity ({self.max_concurrent} concurrent requests, "
                f"{self.queue_size} queued): retry later",
                {"max_concurrent_requests": str(self.max_concurrent),
                 "queue_size": str(self.queue_size), "retry_after_secs": "1"}, DOMAIN)
        start = self._clock()
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._schedule()
        try:
            await asyncio.wait({future}, timeout=self.queue_timeout)
        except BaseException:  # the caller went away while queued
            self._abandon(future)
            raise
        if future.done() and not future.cancelled():
            permit = future.result()
            permit.waited = self._clock() - start
            return permit
        self._abandon(future)
        self._reject("timeout")
        raise ServiceError(
            ErrorCode.UNAVAILABLE, "ADMISSION_QUEUE_TIMEOUT",
            f"the request waited {self.queue_timeout:g}s in the router's admission queue",
            {"queue_timeout_secs": f"{self.queue_timeout:g}", "retry_after_secs": "1"}, DOMAIN)

    def _abandon(self, future: asyncio.Future[Permit]) -> None:
        if future.done() and not future.cancelled():
            future.result().release()  # granted in the same instant: give it back
        else:
            future.cancel()
        try:
            self._waiters.remove(future)
        except ValueError:
            pass

    def _reject(self, why: str) -> None:
        if why == "full":
            self.rejected_full += 1
        else:
            self.rejected_timeout += 1
        if self.on_reject is not None:
            self.on_reject(why)

    def _release(self) -> None:
        self.in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        """Hands permits to waiters in arrival order while limits allow."""
        while self._waiters:
            head = self._waiters[0]
            if head.done():
                self._waiters.popleft()
                continue
            if not self._can_take():
                break
            self._waiters.popleft()
            head.set_result(self._take(0.0))
        self._schedule()

    def _schedule(self) -> None:
        """While the head waits only for rate tokens, wake up when the next one is due."""
        if self._timer is not None or self.rate <= 0 or not self.queue_depth:
            return
        if self.max_concurrent > 0 and self.in_flight >= self.max_concurrent:
            return  # a release will pump
        self._refill()
        delay = max(0.0, (1.0 - self._tokens) / self.rate)

        def fire() -> None:
            self._timer = None
            self._pump()

        self._timer = asyncio.get_running_loop().call_later(delay, fire)
