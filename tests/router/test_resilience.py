"""Circuit breaker, retries, load accounting, unhealthy-worker removal and the load monitor.

Unit tests drive the plain classes with a fake clock; the rest run the Router against real
``sim`` workers served in this process (see ``fleet.py``): ``sim_error_rate=1`` makes a worker
fail every request with UNAVAILABLE while its health probes still pass.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from services.router.resilience import (
    BACKPRESSURE_CODES,
    RETRYABLE_CODES,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    Outcome,
    RetryConfig,
    backoff_secs,
    classify,
)
from services.router.router import DispatchState, RequestHints
from services.router.workers import Health
from tests.router.fleet import gen, generate, running_router, sim_config, sim_fleet, url


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ unit


def test_retryable_codes_are_explicit() -> None:
    assert RETRYABLE_CODES == {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                               "INTERNAL", "UNKNOWN", "ABORTED"}
    for final in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                  "UNIMPLEMENTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "CANCELLED",
                  "ALREADY_EXISTS", "DATA_LOSS"):
        assert final not in RETRYABLE_CODES
    assert BACKPRESSURE_CODES == {"RESOURCE_EXHAUSTED"}


def test_outcomes_for_the_breaker() -> None:
    assert classify("OK") is Outcome.SUCCESS
    assert classify("UNAVAILABLE") is Outcome.FAILURE
    assert classify("INTERNAL") is Outcome.FAILURE
    assert classify("RESOURCE_EXHAUSTED") is Outcome.IGNORED  # back-pressure, not failure
    assert classify("CANCELLED") is Outcome.IGNORED
    assert classify("INVALID_ARGUMENT") is Outcome.SUCCESS  # the worker answered


def test_breaker_defaults_are_smgs() -> None:
    cfg = CircuitBreakerConfig()
    assert (cfg.failure_threshold, cfg.success_threshold, cfg.timeout_secs,
            cfg.window_secs) == (10, 3, 60.0, 120.0)


def test_breaker_state_machine() -> None:
    clock = Clock()
    seen: list[tuple[CircuitState, CircuitState]] = []
    cb = CircuitBreaker(CircuitBreakerConfig(failure_threshold=3, success_threshold=2,
                                             timeout_secs=10), clock,
                        on_transition=lambda _b, old, new: seen.append((old, new)))
    for _ in range(2):
        cb.record(Outcome.FAILURE)
    cb.record(Outcome.SUCCESS)  # resets the consecutive count
    for _ in range(2):
        cb.record(Outcome.FAILURE)
    assert cb.state is CircuitState.CLOSED and cb.allows()
    cb.record(Outcome.FAILURE)
    assert cb.state is CircuitState.OPEN and not cb.allows()
    clock.now += 9.9
    assert not cb.allows()
    clock.now += 0.1
    assert cb.state is CircuitState.HALF_OPEN and cb.allows()
    cb.record(Outcome.FAILURE)  # any failure half-open -> open again
    assert cb.state is CircuitState.OPEN
    clock.now += 10
    assert cb.state is CircuitState.HALF_OPEN
    cb.record(Outcome.SUCCESS)
    cb.record(Outcome.IGNORED)  # back-pressure changes nothing
    assert cb.state is CircuitState.HALF_OPEN
    cb.record(Outcome.SUCCESS)
    assert cb.state is CircuitState.CLOSED
    assert seen == [(CircuitState.CLOSED, CircuitState.OPEN),
                    (CircuitState.OPEN, CircuitState.HALF_OPEN),
                    (CircuitState.HALF_OPEN, CircuitState.OPEN),
                    (CircuitState.OPEN, CircuitState.HALF_OPEN),
                    (CircuitState.HALF_OPEN, CircuitState.CLOSED)]


def test_backpressure_never_opens_the_breaker() -> None:
    cb = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1))
    for _ in range(100):
        cb.record(classify("RESOURCE_EXHAUSTED"))
    assert cb.state is CircuitState.CLOSED


def test_disabled_breaker_never_opens() -> None:
    cb = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, enabled=False))
    cb.record(Outcome.FAILURE)
    assert cb.allows()


def test_backoff_defaults_growth_cap_and_jitter() -> None:
    cfg = RetryConfig()
    assert (cfg.max_retries, cfg.initial_backoff_ms, cfg.max_backoff_ms, cfg.backoff_multiplier,
            cfg.jitter_factor) == (5, 50.0, 30000.0, 1.5, 0.2)
    flat = RetryConfig(jitter_factor=0)
    assert [round(backoff_secs(i, flat) * 1000, 3) for i in range(4)] == [50, 75, 112.5, 168.75]
    assert backoff_secs(100, flat) == 30.0
    rng = random.Random(7)
    samples = [backoff_secs(2, cfg, rng) * 1000 for _ in range(2000)]
    assert min(samples) >= 112.5 * 0.8 and max(samples) <= 112.5 * 1.2
    assert max(samples) - min(samples) > 112.5 * 0.3  # it really jitters
    assert RetryConfig(enabled=False).max_attempts == 1 and cfg.max_attempts == 6


# ---------------------------------------------------------------- against sim workers


# Resilience must not depend on how Generate is read (services.router.generate_h2).
TRANSPORTS = pytest.mark.parametrize("transport", ["grpcio", "grpclib"])


@TRANSPORTS
async def test_failed_attempt_is_retried_on_another_worker(transport: str) -> None:
    async with sim_fleet(sim_config(sim_error_rate=1.0), sim_config()) as (bad, good), \
            running_router([bad, good], policy="round_robin",
                           worker_transport=transport) as router:
        for i in range(6):
            out, state = await generate(router, gen(range(10, 30), f"r{i}"))
            assert out[-1].WhichOneof("response") == "complete"
            assert state.worker is not None and state.worker.url == url(good)
            assert state.tried[-1] == url(good) and state.attempts == len(state.tried)
        failing = router.registry.get(url(bad))
        assert failing is not None and failing.breaker.consecutive_failures >= 1
        assert all(w.in_flight == 0 for w in router.registry.all())


@TRANSPORTS
async def test_disable_retries_relays_the_workers_error(transport: str) -> None:
    async with sim_fleet(sim_config(sim_error_rate=1.0)) as (bad,), \
            running_router([bad], disable_retries=True, worker_transport=transport) as router:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(router, gen(range(5, 20), "x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "injected failure" in (err.value.details() or "")
        assert router.registry.get(url(bad)).breaker.consecutive_failures == 1  # type: ignore[union-attr]


async def test_retries_are_bounded_and_the_last_error_stands() -> None:
    async with sim_fleet(sim_config(sim_error_rate=1.0)) as (bad,), \
            running_router([bad], retry_max_retries=2) as router:
        state = DispatchState()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in router.generate(gen(range(5, 20), "x"), RequestHints(), state):
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert state.attempts == 3  # the same (only) worker is retried
        assert router.registry.get(url(bad)).in_flight == 0  # type: ignore[union-attr]


async def test_open_breaker_is_skipped_and_shows_in_list_workers() -> None:
    from sglmesh.router.v1 import router_admin_pb2 as admin_pb

    from services.router.server import RouterAdmin

    async with sim_fleet(sim_config(sim_error_rate=1.0), sim_config()) as (bad, good), \
            running_router([bad, good], cb_failure_threshold=2, disable_retries=True,
                           policy="round_robin") as router:
        failures = 0
        for i in range(8):
            try:
                await generate(router, gen(range(5, 20), f"r{i}"))
            except grpc.aio.AioRpcError:
                failures += 1
        assert failures == 2  # then the bad worker's breaker is open and it gets nothing
        listed = await RouterAdmin(router).ListWorkers(admin_pb.ListWorkersRequest(), None)  # type: ignore[arg-type]
        states = {w.url: w.circuit_state for w in listed.workers}
        assert states == {url(bad): admin_pb.CIRCUIT_STATE_OPEN,
                          url(good): admin_pb.CIRCUIT_STATE_CLOSED}


@TRANSPORTS
async def test_no_retry_after_the_first_token(transport: str) -> None:
    slow = sim_config(sim_decode_ms=100.0)
    async with sim_fleet(slow, slow) as workers, \
            running_router(workers, worker_transport=transport) as router:
        state = DispatchState()
        got = []
        with pytest.raises(grpc.aio.AioRpcError):
            async for response in router.generate(gen(range(5, 20), "mid", max_new=50),
                                                  RequestHints(), state):
                got.append(response)
                if len(got) == 1:
                    victim = next(w for w in workers if url(w) == state.worker.url)  # type: ignore[union-attr]
                    await victim.stop(0)
        assert state.attempts == 1 and len(got) >= 1
        assert all(w.in_flight == 0 for w in router.registry.all())


@TRANSPORTS
async def test_load_never_leaks_on_done_error_and_cancel(transport: str) -> None:
    slow = sim_config(sim_decode_ms=50.0)
    async with sim_fleet(slow, sim_config(sim_error_rate=1.0)) as (ok, bad), \
            running_router([ok, bad], disable_retries=True, worker_transport=transport) as router:
        good_worker = router.registry.get(url(ok))
        assert good_worker is not None
        # done
        await generate(router, gen(range(5, 20), "d", max_new=2), RequestHints(target_worker=url(ok)))
        # error
        with pytest.raises(grpc.aio.AioRpcError):
            await generate(router, gen(range(5, 20), "e"), RequestHints(target_worker=url(bad)))
        # cancel mid-stream (task cancelled) and early close (consumer stops iterating)
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in router.generate(gen(range(5, 20), "c", max_new=100),
                                           RequestHints(target_worker=url(ok))):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert good_worker.in_flight == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stream = router.generate(gen(range(5, 20), "g", max_new=100),
                                 RequestHints(target_worker=url(ok)))
        await stream.__anext__()
        await stream.aclose()
        assert all(w.in_flight == 0 for w in router.registry.all())
        assert router.worker_of_request("c") is None and router.worker_of_request("g") is None
        # the worker was told to stop both cancelled requests
        for _ in range(100):
            if ok.engine.loads().num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert ok.engine.loads().num_running == 0


async def test_failed_workers_are_removed_when_configured() -> None:
    async with sim_fleet(sim_config(), sim_config()) as (a, b), \
            running_router([a, b], remove_unhealthy_workers=True, health_failure_threshold=1,
                           health_check_timeout_secs=1) as router:
        await a.stop(0)
        for _ in range(2):
            await router.check_all()
        assert router.registry.get(url(a)).health is Health.NOT_READY  # type: ignore[union-attr]
        await router.check_all()  # the third failure (3 x threshold): removal is queued
        await asyncio.sleep(0.2)  # the removal job
        assert router.registry.get(url(a)) is None
        assert router.registry.get(url(b)) is not None


async def test_a_new_worker_passes_the_success_threshold_at_registration() -> None:
    """SMG's defaults (2 successes, checks every 60 s) must not leave a new worker pending for
    a minute: registration runs the checks back to back, and routes to it at once."""
    from services.router.config import RouterConfig

    defaults = RouterConfig()
    assert (defaults.health_success_threshold, defaults.health_check_interval_secs) == (2, 60)
    async with sim_fleet(sim_config()) as (w,), \
            running_router([w], policy="round_robin", health_success_threshold=2,
                           health_check_interval_secs=60) as router:
        worker = router.registry.get(url(w))
        assert worker is not None and worker.health is Health.READY
        assert worker.consecutive_successes == 2
        await generate(router, gen(range(5, 20), "first"))


async def test_a_worker_that_fails_its_registration_checks_serves_once_it_can() -> None:
    """Checks every 60 s, but a still-pending worker is probed every second in between: one
    that was draining when it registered is routable about a second after it recovers.
    Probe failures do not count toward its removal."""
    from services.router.config import RouterConfig
    from services.router.router import Router

    async with sim_fleet(sim_config()) as (w,):
        w.servicer.draining = True  # health checks fail: "draining"
        router = Router(RouterConfig(worker_urls=[url(w)], policy="round_robin",
                                     health_check_interval_secs=60,
                                     remove_unhealthy_workers=True,
                                     disable_load_monitoring=True))
        await router.start()
        try:
            for _ in range(200):
                worker = router.registry.get(url(w))
                if worker is not None:
                    break
                await asyncio.sleep(0.01)
            assert worker is not None and worker.health is Health.PENDING
            failures = worker.consecutive_failures
            await asyncio.sleep(2.5)  # two probes or more, all failing
            assert worker.health is Health.PENDING and not worker.removing
            assert worker.consecutive_failures == failures  # probes do not count failures
            w.servicer.draining = False
            for _ in range(50):
                if worker.health is Health.READY:
                    break
                await asyncio.sleep(0.1)
            assert worker.health is Health.READY  # two probe successes, well before 60 s
            await generate(router, gen(range(5, 20), "after"))
        finally:
            await router.stop()


async def test_unhealthy_workers_stay_without_the_flag() -> None:
    async with sim_fleet(sim_config(), sim_config()) as (a, b), \
            running_router([a, b], health_failure_threshold=1,
                           health_check_timeout_secs=1) as router:
        await a.stop(0)
        for _ in range(5):
            await router.check_all()
        assert router.registry.get(url(a)).health is Health.NOT_READY  # type: ignore[union-attr]


async def test_load_monitor_reads_get_loads() -> None:
    async with sim_fleet(sim_config()) as (w,), \
            running_router([w], policy="round_robin") as router:
        await generate(router, gen(range(5, 40), "l"))
        await router.poll_loads()
        worker = router.registry.get(url(w))
        assert worker is not None and worker.engine_load is not None
        assert worker.engine_load.source == "poll"
        assert worker.engine_load.running_requests == 0


async def test_loads_pushed_on_the_kv_event_stream_replace_polling() -> None:
    async with sim_fleet(sim_config()) as (w,), \
            running_router([w], policy="cache_aware") as router:
        await generate(router, gen(range(5, 40), "l"))
        worker = router.registry.get(url(w))
        assert worker is not None
        for _ in range(200):
            if worker.engine_load is not None and worker.engine_load.source == "events":
                break
            await asyncio.sleep(0.01)
        pushed = worker.engine_load
        assert pushed is not None and pushed.source == "events"
        await router.poll_loads()
        assert worker.engine_load is pushed or worker.engine_load.source == "events"


async def test_dp_aware_sets_the_rank_the_worker_checks() -> None:
    """The sim worker has one DP rank and rejects any other: pretending it has two makes
    every second request carry rank 1, which the worker refuses (INVALID_ARGUMENT, no retry)."""
    async with sim_fleet(sim_config()) as (w,), \
            running_router([w], dp_aware=True, policy="round_robin") as router:
        worker = router.registry.get(url(w))
        assert worker is not None and worker.dp_size == 1
        await generate(router, gen(range(5, 20), "one"))  # dp_size 1: no rank set
        worker.dp_size = 2
        await generate(router, gen(range(5, 20), "r0"))  # rank 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(router, gen(range(5, 20), "r1"))  # rank 1
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one DP rank (0), got 1" in (err.value.details() or "")
        assert worker.rank_in_flight == [0, 0] and worker.in_flight == 0
