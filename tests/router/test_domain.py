"""Router domain logic without a network: policies, health state machine, registry, selection."""

from __future__ import annotations

import random

import pytest

from services.common.errors import ErrorCode, ServiceError
from services.router.config import RouterConfig, worker_url_problem
from services.router.policies import (
    POLICY_NAMES,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SelectionInfo,
    create_policy,
)
from services.router.router import Router, normalize_url
from services.router.workers import Health, ModelCard, Worker, WorkerRegistry, WorkerType


def make_worker(url: str, model: str = "m", health: Health = Health.READY) -> Worker:
    return Worker(url=url, card=ModelCard(model_id=model), health=health)


def test_round_robin_cycles_in_order() -> None:
    workers = [make_worker(f"grpc://w{i}:1") for i in range(3)]
    policy = RoundRobinPolicy()
    picks = [policy.select_worker(workers, SelectionInfo()).url for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [w.url for w in workers] * 2


def test_policies_return_none_without_workers() -> None:
    for name in POLICY_NAMES:
        assert create_policy(name).select_worker([], SelectionInfo()) is None


def test_power_of_two_prefers_the_less_loaded() -> None:
    busy, idle = make_worker("grpc://busy:1"), make_worker("grpc://idle:1")
    busy.in_flight = 10
    policy = PowerOfTwoPolicy(random.Random(0))
    assert all(policy.select_worker([busy, idle], SelectionInfo()) is idle for _ in range(20))


def test_random_spreads() -> None:
    workers = [make_worker(f"grpc://w{i}:1") for i in range(4)]
    policy = RandomPolicy(random.Random(1))
    seen = {policy.select_worker(workers, SelectionInfo()).url for _ in range(200)}  # type: ignore[union-attr]
    assert seen == {w.url for w in workers}


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        create_policy("fastest")


def test_load_guard_releases_on_error() -> None:
    worker = make_worker("grpc://w:1")
    with pytest.raises(RuntimeError), worker.track():
        assert worker.in_flight == 1
        raise RuntimeError("boom")
    assert worker.in_flight == 0
    assert worker.processed == 1


def test_a_probe_failure_breaks_a_run_of_successes_without_counting() -> None:
    worker = make_worker("grpc://w:1", health=Health.PENDING)
    worker.record_health(False, "warming up", 2, 3)  # a regular check: counted
    worker.record_health(True, "ok", 2, 3)
    worker.record_health(False, "busy", 2, 3, count_failure=False)  # a probe
    assert (worker.consecutive_successes, worker.consecutive_failures) == (0, 0)
    assert worker.health is Health.PENDING and worker.health_message == "busy"
    worker.record_health(True, "ok", 2, 3)
    assert worker.health is Health.PENDING  # the probe broke the run: one success so far
    worker.record_health(True, "ok", 2, 3)
    assert worker.health is Health.READY


def test_health_state_machine() -> None:
    worker = make_worker("grpc://w:1", health=Health.PENDING)
    assert worker.record_health(True, "ok", success_threshold=2, failure_threshold=2) is False
    assert worker.health is Health.PENDING
    assert worker.record_health(True, "ok", 2, 2) is True
    assert worker.health is Health.READY
    worker.record_health(False, "down", 2, 2)
    assert worker.health is Health.READY  # one failure is not enough
    worker.record_health(False, "down", 2, 2)
    assert worker.health is Health.NOT_READY
    assert worker.health_message == "down"
    worker.record_health(True, "ok", 2, 2)
    assert worker.health is Health.NOT_READY  # needs two successes in a row again
    worker.record_health(True, "ok", 2, 2)
    assert worker.health is Health.READY


def test_registry_resolves_models() -> None:
    registry = WorkerRegistry()
    registry.add(make_worker("grpc://a:1", "m1"))
    assert registry.resolve_model("") == "m1"  # the only model
    registry.add(make_worker("grpc://b:1", "m2"))
    assert registry.resolve_model("") is None  # ambiguous
    assert registry.resolve_model("m2") == "m2"
    assert registry.resolve_model("nope") is None
    with pytest.raises(ValueError):
        registry.add(make_worker("grpc://a:1", "m1"))


def _router_with(*workers: Worker) -> Router:
    router = Router(RouterConfig())
    for worker in workers:
        router.registry.add(worker)
        router._policies.setdefault((worker.model_id, WorkerType.REGULAR), RoundRobinPolicy())
    return router


def test_select_errors_say_why() -> None:
    router = _router_with(make_worker("grpc://a:1", "m1", Health.NOT_READY))
    with pytest.raises(ServiceError) as exc:
        router.select("m1", SelectionInfo())
    assert exc.value.code is ErrorCode.UNAVAILABLE and exc.value.reason == "NO_HEALTHY_WORKER"
    with pytest.raises(ServiceError) as exc:
        router.select("other", SelectionInfo())
    assert exc.value.code is ErrorCode.NOT_FOUND and exc.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(ServiceError) as exc:
        router.select("m1", SelectionInfo(), target_url="grpc://zzz:1")
    assert exc.value.reason == "WORKER_NOT_FOUND"


def test_select_skips_unhealthy_workers() -> None:
    good = make_worker("grpc://good:1", "m")
    router = _router_with(make_worker("grpc://bad:1", "m", Health.NOT_READY), good)
    assert {router.select("m", SelectionInfo()).url for _ in range(4)} == {good.url}


def test_urls_are_normalized() -> None:
    assert normalize_url("127.0.0.1:5") == "grpc://127.0.0.1:5"
    assert normalize_url("grpc://127.0.0.1:5/") == "grpc://127.0.0.1:5"


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:30000", "127.0.0.1:30000", "grpc://[::1]:5/",
                                 "worker-0.svc:30000", "http://h", "https://h:8443/"])
def test_worker_urls_that_name_a_worker(url: str) -> None:
    assert worker_url_problem(url) is None


@pytest.mark.parametrize(("url", "says"), [
    ("", "required"), ("ftp://h:1", "unsupported scheme 'ftp://'"),
    ("grpcs://h:1", "TLS to gRPC workers is not supported"), ("grpc://h", "needs a host and a port"),
    ("h:port", "needs a host and a port"), ("grpc://:5", "needs a host and a port"),
    ("grpc://h:70000", "needs a host and a port"), ("http://", "has no host"),
])
def test_worker_urls_that_cannot_are_refused_with_the_reason(url: str, says: str) -> None:
    assert says in (worker_url_problem(url) or "")
    with pytest.raises(ValueError, match="--worker-urls"):
        RouterConfig(worker_urls=[url])
