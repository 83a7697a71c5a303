"""Worker Prometheus metrics (served on ``--metrics-port`` with the shared gRPC metrics).

Counters and histograms are fed by the servicer from engine outputs, so every engine gets
them; the gauges (running / waiting requests, KV usage, cache hit rate, throughput) are read
from the bound engine's ``loads()`` at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REQUESTS = Counter("sglmesh_worker_requests_total",
                   "Generate requests finished, by finish reason (stop, length, abort, error).",
                   ["finish_reason"])
PROMPT_TOKENS = Counter("sglmesh_worker_prompt_tokens_total",
                        "Prompt tokens of Generate requests (once per sample).")
CACHED_TOKENS = Counter("sglmesh_worker_cached_tokens_total",
                        "Prompt tokens served from the prefix cache.")
GENERATION_TOKENS = Counter("sglmesh_worker_generation_tokens_total", "Output tokens generated.")
TTFT = Histogram("sglmesh_worker_time_to_first_token_seconds",
                 "Time from a Generate request's arrival to its first output token.",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
E2E = Histogram("sglmesh_worker_request_duration_seconds",
                "Time from a Generate request's arrival to its last output.",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))


class EngineCollector(Collector):
    """Gauges read from the current engine's ``loads()`` at scrape time."""

    def __init__(self) -> None:
        self.engine: Any = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        if engine is None:
            return
        try:
            loads = engine.loads()
        except Exception:  # a scrape never fails on the engine
            return
        values = {
            "running_requests": ("Samples being prefilled or decoded.", loads.num_running),
            "waiting_requests": ("Samples queued for admission.", loads.num_waiting),
            "used_tokens": ("KV tokens held (running + prefix cache).", loads.num_used_tokens),
            "token_usage": ("KV usage in [0, 1].", loads.token_usage),
            "cache_hit_rate": ("Prompt tokens served from the prefix cache / prompt tokens.",
                               loads.cache_hit_rate),
            "gen_throughput": ("Output tokens per second (recent window).",
                               loads.gen_throughput),
        }
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(f"sglmesh_worker_{name}", doc, value=float(value))


ENGINE_GAUGES = EngineCollector()
REGISTRY.register(ENGINE_GAUGES)


def bind_engine(engine: Any) -> None:
    ENGINE_GAUGES.engine = engine
