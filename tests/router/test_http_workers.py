"""HTTP workers in the router's domain: connection mode as one field, leases, the text tree."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ServiceError
from services.router.admission import Permit
from services.router.config import RouterConfig
from services.router.http_client import parse_loads, status_code_name
from services.router.leases import LeaseTable
from services.router.policies import CacheAwarePolicy, PrefixHashPolicy, SelectionInfo
from services.router.resilience import CircuitBreakerConfig, CircuitState, RetryConfig
from services.router.router import Router, normalize_url
from services.router.workers import ConnectionMode, Health, ModelCard, Worker


def worker(url: str, model: str = "m") -> Worker:
    return Worker(url=url, card=ModelCard(model), health=Health.READY,
                  connection_mode=ConnectionMode.of_url(url))


def test_connection_mode_and_urls() -> None:
    assert ConnectionMode.of_url("http://h:1") is ConnectionMode.HTTP
    assert ConnectionMode.of_url("https://h") is ConnectionMode.HTTP
    assert ConnectionMode.of_url("grpc://h:1") is ConnectionMode.GRPC
    assert normalize_url("http://h:1/") == "http://h:1"
    assert normalize_url("h:1") == "grpc://h:1"


def test_cache_aware_routes_text_with_a_character_tree() -> None:
    policy = CacheAwarePolicy()
    a, b = worker("http://a:1"), worker("http://b:1")
    convo = "system: be brief\nuser: tell me about the history of the roman empire\n"
    first = policy.select_worker([a, b], SelectionInfo(text=convo))
    assert first is not None
    first.in_flight += 1  # the other worker is now the least loaded...
    follow_up = policy.select_worker([a, b], SelectionInfo(
        text=convo + "assistant: it began in 27 BC.\nuser: and its end?\n"))
    assert follow_up is first  # ...but the conversation's prefix lives on the first
    assert policy.text_tree.size > 0 and policy.tree.size == 0  # tokens and text never mix
    other = policy.select_worker([a, b], SelectionInfo(text="user: something else entirely"))
    assert other is not first  # a miss goes to the least loaded
    policy.on_worker_removed(first)
    assert first.url not in policy.text_tree.tenants()


def test_prefix_hash_hashes_text_when_untokenized() -> None:
    policy = PrefixHashPolicy()
    workers = [worker(f"http://w{i}:1") for i in range(4)]
    picks = {policy.select_worker(workers, SelectionInfo(text="same prompt " * 10)).url
             for _ in range(5)}
    assert len(picks) == 1
    assert policy.key_of(SelectionInfo(text="abc")) == b"abc"


def test_lease_accounting_and_retry_decisions() -> None:
    table = LeaseTable(RetryConfig(max_retries=2, initial_backoff_ms=10, jitter_factor=0),
                       ttl_secs=60)
    w = worker("http://a:1")
    lease = table.open(w, "m", "r1", 0, Permit(None, 0), pinned=False)
    assert w.in_flight == 1 and w.processed == 1
    closed = table.close(lease.id, "UNAVAILABLE", relayed=False)
    assert closed is not None
    _, release = closed
    assert release.retry and release.backoff == pytest.approx(0.01) and w.in_flight == 0
    assert table.close(lease.id, "OK", False) is None  # released once

    # Relayed bytes, a pinned worker or the last attempt: never retried.
    for attempt, pinned, relayed in ((0, False, True), (0, True, False), (2, False, False)):
        lease = table.open(w, "m", "r", attempt, Permit(None, 0), pinned=pinned)
        assert not table.close(lease.id, "UNAVAILABLE", relayed)[1].retry  # type: ignore[index]
    # A client error is final and the worker counts as alive.
    lease = table.open(w, "m", "r", 0, Permit(None, 0), pinned=False)
    release = table.close(lease.id, "INVALID_ARGUMENT", False)[1]  # type: ignore[index]
    assert not release.retry and release.final and release.outcome.value == "success"
    # Handed back unused (the gateway took the gRPC path): no request, no breaker outcome.
    processed = w.processed
    lease = table.open(w, "m", "r", 0, Permit(None, 0), pinned=False)
    release = table.close(lease.id, "CANCELLED", False)[1]  # type: ignore[index]
    assert not release.final and w.processed == processed and w.in_flight == 0


def test_failed_leases_open_the_breaker_and_expire() -> None:
    from services.router.resilience import CircuitBreaker

    clock = [0.0]
    table = LeaseTable(RetryConfig(), ttl_secs=5, clock=lambda: clock[0])
    w = worker("http://a:1")
    w.breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2))
    for _ in range(2):
        lease = table.open(w, "m", "r", 0, Permit(None, 0), pinned=False)
        table.close(lease.id, "UNAVAILABLE", False)
    assert w.breaker.state is CircuitState.OPEN and not w.is_routable
    lease = table.open(w, "m", "r", 0, Permit(None, 0), pinned=False)
    lease.expires = 3.0
    clock[0] = 4.0
    assert table.expired() == [lease]


def test_router_data_plane_skips_http_workers_leases_do_not() -> None:
    async def run() -> None:
        router = Router(RouterConfig(policy="round_robin"))
        http, grpc_w = worker("http://a:1"), worker("grpc://b:1")
        router.registry.add(http)
        picks = set()
        with pytest.raises(ServiceError) as info:
            router.select("m", SelectionInfo())
        assert info.value.reason == "NO_HEALTHY_WORKER"
        router.registry.add(grpc_w)
        assert router.select("m", SelectionInfo()) is grpc_w
        for i in range(4):
            lease = await router.acquire_lease("m", SelectionInfo(request_id=f"r{i}"))
            picks.add(lease.worker.url)
            assert router.workers_of_request(f"r{i}") == [lease.worker]
            release = router.release_lease(lease.id, "OK", relayed=True)
            assert release.final and not release.retry
        assert picks == {http.url, grpc_w.url}
        assert http.in_flight == grpc_w.in_flight == 0 and len(router.leases) == 0
        with pytest.raises(ServiceError):
            router.release_lease("lease-nope", "OK", False)
        with pytest.raises(ServiceError):  # the data plane cannot be pinned to an HTTP worker
            router.select("m", SelectionInfo(), target_url=http.url)

    asyncio.run(run())


def test_http_status_and_loads_parsing() -> None:
    assert [status_code_name(s) for s in (200, 400, 408, 429, 500, 502, 503, 504)] == [
        "OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL",
        "UNAVAILABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED"]
    load = parse_loads({"loads": [{"num_running_reqs": 3, "num_waiting_reqs": 1,
                                   "token_usage": 0.5, "gen_throughput": 10.0},
                                  {"num_running_reqs": 1, "token_usage": 0.7}]})
    assert (load.running_requests, load.waiting_requests, load.token_usage) == (4, 1, 0.7)
    legacy = parse_loads([{"num_reqs": 5, "num_waiting_reqs": 2}])
    assert (legacy.running_requests, legacy.waiting_requests) == (3, 2)
