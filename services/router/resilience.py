"""Per-worker circuit breaker and the retry schedule (SMG's semantics and defaults).

Plain Python: outcomes are gRPC status code *names* (``"UNAVAILABLE"``), so the breaker and the
retry rules are testable without a network and without importing grpc.

Circuit breaker (SMG ``worker/circuit_breaker.rs``): closed -> open after ``failure_threshold``
consecutive failures; open -> half-open once ``timeout_secs`` have passed (checked on read);
half-open -> closed after ``success_threshold`` consecutive successes, -> open on any failure.
RESOURCE_EXHAUSTED is back-pressure: retried, but recorded neither as a failure nor a success.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

# Codes a failed attempt may be retried on (SMG retries HTTP 408, 429, 500, 502, 503, 504; these
# are their gRPC counterparts). Everything else (INVALID_ARGUMENT, NOT_FOUND, CANCELLED, ...)
# is the caller's problem or final, and goes back to the caller at once.
RETRYABLE_CODES: frozenset[str] = frozenset({
    "UNAVAILABLE",         # 502/503: connection refused or reset, worker shutting down
    "DEADLINE_EXCEEDED",   # 408/504
    "RESOURCE_EXHAUSTED",  # 429: worker back-pressure
    "INTERNAL",            # 500
    "UNKNOWN",             # 500 (an exception the worker did not map)
    "ABORTED",             # a conflict the worker asks to retry
})

# Codes that say "the worker is at capacity", not "the worker is broken".
BACKPRESSURE_CODES: frozenset[str] = frozenset({"RESOURCE_EXHAUSTED"})

# Codes that count against the worker's breaker: retryable, less back-pressure.
FAILURE_CODES: frozenset[str] = RETRYABLE_CODES - BACKPRESSURE_CODES


def is_retryable(code: str) -> bool:
    return code in RETRYABLE_CODES


class Outcome(enum.Enum):
    """How an attempt counts for the breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # back-pressure, or the caller cancelled


def classify(code: str) -> Outcome:
    """The breaker outcome of an attempt that ended with status ``code`` ("OK" for success)."""
    if code in FAILURE_CODES:
        return Outcome.FAILURE
    if code in BACKPRESSURE_CODES or code == "CANCELLED":
        return Outcome.IGNORED
    return Outcome.SUCCESS  # OK, or a final answer from a worker that is alive (bad request, ...)


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class CircuitBreakerConfig:
    failure_threshold: int = 10
    success_threshold: int = 3
    timeout_secs: float = 60.0
    window_secs: float = 120.0  # accepted for SMG parity; SMG's state logic does not use it either
    enabled: bool = True


TransitionHook = Callable[["CircuitBreaker", CircuitState, CircuitState], None]


class CircuitBreaker:
    """One worker's breaker. Not thread-safe by design: the router runs on one event loop."""

    def __init__(self, config: CircuitBreakerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_transition: TransitionHook | None = None) -> None:
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._state = CircuitState.CLOSED
        self.closed = True  # fast path for the per-request filter
        self._opened_at = 0.0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.transitions = 0
        self.on_transition = on_transition

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose timeout has passed reads as half-open."""
        if (self._state is CircuitState.OPEN
                and self._clock() - self._opened_at >= self.config.timeout_secs):
            self._move(CircuitState.HALF_OPEN)
        return self._state

    def allows(self) -> bool:
        """Whether the worker may get a request (closed or half-open, or breakers disabled)."""
        return not self.config.enabled or self.state is not CircuitState.OPEN

    def record(self, outcome: Outcome) -> None:
        if outcome is Outcome.SUCCESS:
            self.record_success()
        elif outcome is Outcome.FAILURE:
            self.record_failure()

    def record_success(self) -> None:
        if not self.config.enabled:
            return
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        if (self.state is CircuitState.HALF_OPEN
                and self.consecutive_successes >= self.config.success_threshold):
            self._move(CircuitState.CLOSED)

    def record_failure(self) -> None:
        if not self.config.enabled:
            return
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        state = self.state
        if state is CircuitState.HALF_OPEN or (
            state is CircuitState.CLOSED
            and self.consecutive_failures >= self.config.failure_threshold
        ):
            self._opened_at = self._clock()
            self._move(CircuitState.OPEN)
        elif state is CircuitState.OPEN:
            self._opened_at = self._clock()

    def reset(self) -> None:
        self.consecutive_failures = self.consecutive_successes = 0
        if self._state is not CircuitState.CLOSED:
            self._move(CircuitState.CLOSED)

    def _move(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        self.closed = new is CircuitState.CLOSED
        self.transitions += 1
        if new is not CircuitState.CLOSED:
            self.consecutive_successes = 0
        if self.on_transition is not None:
            self.on_transition(self, old, new)


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 5
    initial_backoff_ms: float = 50.0
    max_backoff_ms: float = 30_000.0
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.2
    enabled: bool = True

    @property
    def max_attempts(self) -> int:
        return 1 + (self.max_retries if self.enabled else 0)


def backoff_secs(retry: int, config: RetryConfig, rng: random.Random | None = None) -> float:
    """Delay before retry number ``retry`` (0-based): ``min(initial * mult^retry, max)`` with
    uniform jitter of ``± jitter_factor * delay`` (SMG ``routers/common/retry.rs``)."""
    delay = min(config.initial_backoff_ms * config.backoff_multiplier ** retry,
                config.max_backoff_ms)
    if config.jitter_factor > 0:
        spread = delay * config.jitter_factor
        delay += (rng or random).uniform(-spread, spread)
    return max(0.0, delay) / 1000.0


class UpstreamError(Exception):
    """A worker call that failed with gRPC status ``code`` (a name); ``cause`` is the original
    exception, re-raised to the caller when the router gives up so its status and details are
    relayed unchanged."""

    def __init__(self, code: str, message: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.cause = cause

    @property
    def retryable(self) -> bool:
        return is_retryable(self.code)
