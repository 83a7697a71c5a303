"""The router's Prometheus metrics, named after SMG's with an ``sglmesh_`` prefix.

Counters and histograms are updated as things happen; per-worker and per-model gauges (in
flight, health, breaker state, tree size, index blocks, queue depth) are read from the live
router at scrape time by :class:`RouterCollector`, so they can never drift from the state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.router.router import Router

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("sglmesh_router_requests_total",
                   "Generate requests the router finished, by model, leg mode and status code.",
                   ["model", "mode", "code"])
REQUEST_ERRORS = Counter("sglmesh_router_request_errors_total",
                         "Requests that ended with an error, by model and status code.",
                         ["model", "code"])
DURATION = Histogram("sglmesh_router_request_duration_seconds",
                     "Generate duration from admission to the end of the stream.", ["model"],
                     buckets=_BUCKETS)
TTFT = Histogram("sglmesh_router_ttft_seconds",
                 "Time from admission to the first relayed response.", ["model"],
                 buckets=_BUCKETS)
RETRIES = Counter("sglmesh_worker_retries_total",
                  "Attempts retried after a retryable failure, by the worker that failed.",
                  ["worker"])
RETRIES_EXHAUSTED = Counter("sglmesh_worker_retries_exhausted_total",
                            "Requests that failed after using every retry.", ["model"])
RETRY_BACKOFF = Histogram("sglmesh_worker_retry_backoff_seconds", "Backoff slept before retries.",
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
WORKER_ERRORS = Counter("sglmesh_worker_errors_total",
                        "Failed worker attempts, by worker and status code.", ["worker", "code"])
SELECTIONS = Counter("sglmesh_worker_selection_total",
                     "Times a policy picked the worker, by worker and policy.",
                     ["worker", "policy"])
CB_TRANSITIONS = Counter("sglmesh_worker_cb_transitions_total",
                         "Circuit breaker state changes.", ["worker", "from_state", "to_state"])
CB_OUTCOMES = Counter("sglmesh_worker_cb_outcomes_total",
                      "Attempt outcomes as the breaker counted them.", ["worker", "outcome"])
HEALTH_CHECKS = Counter("sglmesh_worker_health_checks_total", "Deep health checks run.",
                        ["worker", "result"])
ADMISSION_REJECTED = Counter("sglmesh_admission_queue_rejected_total",
                             "Requests refused by admission: full queue or queue timeout.",
                             ["reason"])
ADMISSION_WAIT = Histogram("sglmesh_admission_wait_seconds",
                           "Time admitted requests waited in the queue.", buckets=_BUCKETS)
PD_BOOTSTRAP_FAILURES = Counter("sglmesh_pd_bootstrap_failures_total",
                                "PD attempts where a leg failed.", ["leg"])
KV_SUBSCRIPTION_FAILURES = Counter("sglmesh_kv_event_subscription_failures_total",
                                   "KV-event stream failures, by worker and status code.",
                                   ["worker", "code"])

_CB_VALUE = {"closed": 0, "open": 1, "half_open": 2}


class RouterCollector(Collector):
    """Scrape-time gauges of the process's router (the last one started)."""

    def __init__(self) -> None:
        self.router: Router | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        router = self.router
        if router is None:
            return
        from services.router.policies import CacheAwarePolicy

        workers = router.registry.all()
        active = GaugeMetricFamily("sglmesh_worker_requests_active",
                                   "Requests in flight on the worker.", labels=["worker"])
        health = GaugeMetricFamily("sglmesh_worker_health",
                                   "1 when the worker is ready, else 0.", labels=["worker"])
        cb_state = GaugeMetricFamily("sglmesh_worker_cb_state",
                                     "Breaker state: 0 closed, 1 open, 2 half-open.",
                                     labels=["worker"])
        cb_failures = GaugeMetricFamily("sglmesh_worker_cb_consecutive_failures",
                                        "Consecutive failures the breaker counts.",
                                        labels=["worker"])
        for w in workers:
            active.add_metric([w.url], w.in_flight)
            health.add_metric([w.url], 1 if w.health.value == "ready" else 0)
            cb_state.add_metric([w.url], _CB_VALUE[w.breaker.state.value])
            cb_failures.add_metric([w.url], w.breaker.consecutive_failures)
        pool = GaugeMetricFamily("sglmesh_worker_pool_size", "Registered workers.",
                                 labels=["model", "worker_type"])
        for model, group in router.registry.models().items():
            by_type: dict[str, int] = {}
            for w in group:
                by_type[w.worker_type.value] = by_type.get(w.worker_type.value, 0) + 1
            for kind, count in by_type.items():
                pool.add_metric([model, kind], count)
        yield from (active, health, cb_state, cb_failures, pool)

        tree_tokens = GaugeMetricFamily("sglmesh_cache_tree_tokens",
                                        "Tokens in the cache_aware radix tree.",
                                        labels=["model", "leg"])
        tree_tenants = GaugeMetricFamily("sglmesh_cache_tree_tenants",
                                         "Workers with entries in the radix tree.",
                                         labels=["model", "leg"])
        hits = CounterMetricFamily("sglmesh_cache_aware_hits",
                                   "cache_aware selections that followed a cached prefix.",
                                   labels=["model", "leg"])
        misses = CounterMetricFamily("sglmesh_cache_aware_misses",
                                     "cache_aware selections without a usable cached prefix.",
                                     labels=["model", "leg"])
        spills = CounterMetricFamily("sglmesh_cache_aware_spills",
                                     "cache_aware choices moved to the least-loaded worker.",
                                     labels=["model", "leg"])
        pressure_moves = CounterMetricFamily(
            "sglmesh_cache_aware_pressure_moves",
            "cache_aware hits on a shared prefix moved off a worker that is evicting.",
            labels=["model", "leg"])
        for (model, leg), policy in router.policies().items():
            if isinstance(policy, CacheAwarePolicy):
                labels = [model, leg.value]
                tree_tokens.add_metric(labels, policy.tree.size)
                tree_tenants.add_metric(labels, len(policy.tree.tenant_sizes))
                hits.add_metric(labels, policy.stats.hits)
                misses.add_metric(labels, policy.stats.misses)
                spills.add_metric(labels, policy.stats.spills)
                pressure_moves.add_metric(labels, policy.stats.pressure_moves)
        yield from (tree_tokens, tree_tenants, hits, misses, spills, pressure_moves)

        blocks = GaugeMetricFamily("sglmesh_kv_index_blocks",
                                   "Distinct blocks in the KV-event index.", labels=["model"])
        live = GaugeMetricFamily("sglmesh_kv_index_live_workers",
                                 "Workers whose KV events are followed live.", labels=["model"])
        for model, index in router.kv_indexes.items():
            blocks.add_metric([model], index.blocks())
            live.add_metric([model], sum(index.is_live(u) for u in index.workers()))
        yield from (blocks, live)

        adm = router.admission
        depth = GaugeMetricFamily("sglmesh_admission_queue_depth",
                                  "Requests waiting for admission.")
        depth.add_metric([], adm.queue_depth)
        inflight = GaugeMetricFamily("sglmesh_admission_inflight",
                                     "Requests holding an admission permit.")
        inflight.add_metric([], adm.in_flight)
        yield from (depth, inflight)


COLLECTOR = RouterCollector()
REGISTRY.register(COLLECTOR)
