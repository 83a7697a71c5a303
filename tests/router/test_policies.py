"""Policies: cache_aware (approximate), consistent_hashing, manual, prefix_hash; breaker skips."""

from __future__ import annotations

import random
import time

from services.router.config import RouterConfig
from services.router.policies import (
    CacheAwarePolicy,
    ConsistentHashingPolicy,
    DispatchBookings,
    ManualPolicy,
    PolicyConfig,
    PrefixHashPolicy,
    SelectionInfo,
    create_policy,
    least_loaded,
)
from services.router.resilience import CircuitBreaker, CircuitBreakerConfig, Outcome
from services.router.router import Router
from services.router.workers import EngineLoad, Health, ModelCard, Worker, WorkerType


def workers(n: int) -> list[Worker]:
    return [Worker(url=f"grpc://w{i}:1", card=ModelCard("m"), health=Health.READY)
            for i in range(n)]


def info(tokens: list[int] | range = (), key: str = "") -> SelectionInfo:
    return SelectionInfo(token_ids=list(tokens), routing_key=key)


def test_least_loaded_breaks_ties_by_processed_then_order() -> None:
    ws = workers(3)
    assert least_loaded(ws) is ws[0]
    ws[0].processed = 5
    assert least_loaded(ws) is ws[1]
    ws[1].in_flight = 1
    assert least_loaded(ws) is ws[2]


def test_load_counts_what_the_worker_pushed_when_other_routers_add_to_it() -> None:
    """Behind several router replicas each sees only its own in-flight requests; the load a
    worker pushes on its KV-event stream (running + waiting) counts while it is fresh."""
    ws = workers(2)
    ws[0].in_flight = 1
    ws[0].engine_load = EngineLoad(running_requests=6, waiting_requests=2, source="events",
                                   update_time=time.monotonic())
    assert ws[0].load == 8 and least_loaded(ws) is ws[1]
    ws[0].engine_load.update_time -= 5  # stale: only this router's own count is known
    assert ws[0].load == 1
    ws[0].engine_load = EngineLoad(running_requests=6, source="poll",
                                   update_time=time.monotonic())
    assert ws[0].load == 1  # polled loads lag by a poll interval: not used for placement
    # A prefix holder another replica has loaded up spills like one this router loaded.
    policy = CacheAwarePolicy(PolicyConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    ws = workers(4)
    prompt = list(range(200))
    holder = policy.select_worker(ws, info(prompt))
    holder.engine_load = EngineLoad(running_requests=12, source="events",
                                    update_time=time.monotonic())
    spilled = policy.select_worker(ws, info(prompt))
    assert spilled is not holder and policy.stats.spills == 1


# ------------------------------------------------------------------- cache_aware


def test_a_new_prefix_goes_where_every_replica_would_send_it() -> None:
    """Misses among equally loaded, equally empty workers are placed by a hash of the prompt's
    opening: two policies (router replicas) that share nothing agree, and different prefixes
    still spread."""
    ws_a, ws_b = workers(8), workers(8)
    a, b = CacheAwarePolicy(PolicyConfig()), CacheAwarePolicy(PolicyConfig())
    systems = [list(range(s * 1000, s * 1000 + 300)) for s in range(8)]
    picks = [a.select_worker(ws_a, info(system + [7])).url for system in systems]
    assert picks == [b.select_worker(ws_b, info(system + [9])).url for system in systems]
    assert len(set(picks)) > 3  # not one worker for everything
    # Within one router the fewest requests sent breaks the tie first: a fresh prefix goes to
    # a worker that has none yet.
    policy = CacheAwarePolicy(PolicyConfig())
    ws = workers(4)
    used = set()
    for system in systems[:4]:
        chosen = policy.select_worker(ws, info(system))
        chosen.processed += 1
        used.add(chosen.url)
    assert len(used) == 4


def test_bookings_count_live_blocks_per_worker() -> None:
    now = [0.0]
    bookings = DispatchBookings(2.0, clock=lambda: now[0])
    bookings.book("a", [1, 2, 3])
    bookings.book("a", [1, 2, 3, 4])  # a longer prompt on the same prefix: one block more
    bookings.book("b", [1])
    assert (bookings.blocks("a"), bookings.blocks("b")) == (4, 1)
    now[0] = 2.5  # expired
    assert (bookings.blocks("a"), bookings.blocks("b")) == (0, 0)
    bookings.book("a", [5])
    bookings.forget("a")
    assert bookings.blocks("a") == 0 and bookings.match([5], 16) == {}




def test_cache_aware_follows_the_cache_above_the_threshold() -> None:
    ws = workers(4)
    policy = CacheAwarePolicy(PolicyConfig(cache_threshold=0.5))
    system = list(range(1000, 1100))
    first = policy.select_worker(ws, info(system + [1, 2, 3]))
    assert policy.stats.misses == 1
    first.processed += 1  # the router's guard counts it
    # Same long prefix: a hit, the holder wins although others are equally idle.
    for i in range(5):
        chosen = policy.select_worker(ws, info(system + [10 + i]))
        assert chosen is first
        chosen.processed += 1
    assert policy.stats.hits == 5
    # A different prompt is a miss: least loaded (processed breaks the tie away from `first`).
    other = policy.select_worker(ws, info(range(5000, 5100)))
    assert other is not first and policy.stats.misses == 2


def test_cache_aware_below_threshold_goes_least_loaded() -> None:
    ws = workers(2)
    policy = CacheAwarePolicy(PolicyConfig(cache_threshold=0.9))
    policy.select_worker(ws, info(range(100)))
    ws[0].in_flight = 3
    # 50% shared: below 0.9 -> a miss -> the least loaded, not the holder.
    assert policy.select_worker(ws, info(list(range(50)) + list(range(500, 550)))) is ws[1]


def test_cache_aware_spills_an_overloaded_holder() -> None:
    ws = workers(4)
    policy = CacheAwarePolicy(PolicyConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    prompt = list(range(200))
    holder = policy.select_worker(ws, info(prompt))
    holder.in_flight = 5  # mean 1.25: 5 > 1.875 but not > 5.25: stays
    assert policy.select_worker(ws, info(prompt)) is holder
    holder.in_flight = 12  # mean 3: 12 > 4.5 and > 7: spill to the least loaded
    spilled = policy.select_worker(ws, info(prompt))
    assert spilled is not holder and policy.stats.spills == 1
    # The spill target now also holds the prefix (hot prefixes replicate).
    assert policy.tree.prefix_match(prompt).tenants == {holder.url, spilled.url}


def test_cache_aware_eviction_and_removed_worker_purge() -> None:
    ws = workers(2)
    policy = CacheAwarePolicy(PolicyConfig(max_tree_size=150))
    policy.select_worker(ws, info(range(0, 100)))
    ws[0].processed += 1
    policy.select_worker(ws, info(range(1000, 1100)))
    assert policy.tree.size == 200
    policy.maintenance()
    assert policy.tree.size == 100
    assert policy.tree.prefix_match(range(0, 100)).matched == 0  # LRU went first
    policy.on_worker_removed(ws[1])
    assert policy.tree.size == 0


def test_cache_aware_without_tokens_is_least_loaded() -> None:
    ws = workers(2)
    ws[0].in_flight = 1
    assert CacheAwarePolicy().select_worker(ws, info()) is ws[1]


# ------------------------------------------------------------ sticky policies


def test_consistent_hashing_is_sticky_and_remaps_only_the_lost_workers_keys() -> None:
    ws = workers(5)
    policy = ConsistentHashingPolicy(rng=random.Random(0))
    keys = [f"conv-{i}" for i in range(300)]
    before = {k: policy.select_worker(ws, info(key=k)).url for k in keys}  # type: ignore[union-attr]
    assert len(set(before.values())) == 5  # spread over every worker
    again = {k: policy.select_worker(ws, info(key=k)).url for k in keys}  # type: ignore[union-attr]
    assert again == before
    # w2 becomes unhealthy (it is no longer offered): only its keys move.
    survivors = [w for w in ws if w.url != "grpc://w2:1"]
    after = {k: policy.select_worker(survivors, info(key=k)).url for k in keys}  # type: ignore[union-attr]
    for k in keys:
        if before[k] != "grpc://w2:1":
            assert after[k] == before[k]
        else:
            assert after[k] != "grpc://w2:1"
    # A second policy instance (another router replica) agrees.
    twin = ConsistentHashingPolicy()
    assert {k: twin.select_worker(ws, info(key=k)).url for k in keys} == before  # type: ignore[union-attr]


def test_manual_pins_survive_scale_up_and_move_only_when_unhealthy() -> None:
    ws = workers(3)
    policy = ManualPolicy()
    pins = {}
    for i in range(30):
        chosen = policy.select_worker(ws, info(key=f"k{i}"))
        assert chosen is not None
        chosen.processed += 1
        pins[f"k{i}"] = chosen.url
    assert len(set(pins.values())) == 3
    bigger = ws + workers(5)[3:]  # scale up: two new workers
    assert all(policy.select_worker(bigger, info(key=k)).url == u  # type: ignore[union-attr]
               for k, u in pins.items())
    without_w0 = [w for w in bigger if w.url != "grpc://w0:1"]
    moved = {k: policy.select_worker(without_w0, info(key=k)).url for k in pins}  # type: ignore[union-attr]
    for k, u in pins.items():
        assert (moved[k] == u) == (u != "grpc://w0:1")
    # w0 comes back: the re-mapped keys stay where they went.
    assert {k: policy.select_worker(bigger, info(key=k)).url for k in pins} == moved  # type: ignore[union-attr]


def test_manual_idle_keys_expire() -> None:
    now = [0.0]
    policy = ManualPolicy(PolicyConfig(max_idle_secs=10), clock=lambda: now[0])
    ws = workers(2)
    policy.select_worker(ws, info(key="a"))
    now[0] = 11
    policy.maintenance()
    assert policy.pinned_keys == 0


def test_prefix_hash_is_sticky_by_prefix_and_sheds_overload() -> None:
    ws = workers(4)
    policy = PrefixHashPolicy(PolicyConfig(prefix_token_count=8,
                                           prefix_hash_balance_abs_threshold=2))
    base = list(range(100, 108))
    target = policy.select_worker(ws, info(base + [1, 2]))
    assert target is not None
    assert all(policy.select_worker(ws, info(base + [i])) is target for i in range(20))
    target.in_flight = 10
    assert policy.select_worker(ws, info(base + [3])) is not target


def test_every_policy_skips_open_breakers() -> None:
    router = Router(RouterConfig())
    ws = workers(3)
    for w in ws:
        w.breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1))
        router.registry.add(w)
    ws[1].breaker.record(Outcome.FAILURE)
    for name in ("round_robin", "random", "power_of_two", "cache_aware", "consistent_hashing",
                 "manual", "prefix_hash"):
        router._policies[("m", WorkerType.REGULAR)] = create_policy(name)
        for i in range(40):
            chosen = router.select("m", info(range(i, i + 20), key=f"k{i}"))
            assert chosen is not ws[1], name


def test_dp_rank_is_the_least_loaded_then_round_robin() -> None:
    w = workers(1)[0]
    w.dp_size = 3
    assert [w.next_dp_rank() for _ in range(3)] == [0, 1, 2]
    with w.track(1), w.track(1), w.track(0):
        assert w.next_dp_rank() == 2
        assert w.rank_in_flight == [1, 2, 0]
    assert w.rank_in_flight == [0, 0, 0] and w.in_flight == 0
