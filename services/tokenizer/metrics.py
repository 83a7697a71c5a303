"""Prometheus metrics of the tokenizer service (sglmesh_tokenizer_*).

Request counters and latency histograms are updated by server.py; the cache figures are read
from each loaded tokenizer's caches at scrape time by ``CacheCollector``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.tokenizer.registry import TokenizerRegistry

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1, 2.5, 5, 10)

REQUESTS = Counter("sglmesh_tokenizer_requests_total",
                   "Tokenizer operations handled, by method and outcome.", ["method", "outcome"])
LATENCY = Histogram("sglmesh_tokenizer_request_duration_seconds",
                    "Time to serve one operation (DecodeStream: the whole stream).", ["method"],
                    buckets=_BUCKETS + (30, 60, 120, 300))
DECODE_STEP = Histogram("sglmesh_tokenizer_decode_step_duration_seconds",
                        "CPU time of one DecodeStream step (detokenize, stops, parsers).",
                        buckets=_BUCKETS)
TOKENS = Counter("sglmesh_tokenizer_tokens_total",
                 "Token ids produced (Tokenize, RenderChat) or decoded (DecodeStream).",
                 ["method"])
TOOL_CALLS = Counter("sglmesh_tokenizer_tool_calls_total",
                     "Tool calls parsed from streamed output, by parser.", ["parser"])


class CacheCollector(Collector):
    """Hit/miss/eviction counters and size gauges of every loaded tokenizer's caches."""

    def __init__(self, registry: TokenizerRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["model", "cache"]
        hits = CounterMetricFamily("sglmesh_tokenizer_cache_hits",
                                   "Tokenization cache hits.", labels=labels)
        misses = CounterMetricFamily("sglmesh_tokenizer_cache_misses",
                                     "Tokenization cache misses.", labels=labels)
        evictions = CounterMetricFamily("sglmesh_tokenizer_cache_evictions",
                                        "Entries evicted (LRU) to stay within bounds.",
                                        labels=labels)
        entries = GaugeMetricFamily("sglmesh_tokenizer_cache_entries",
                                    "Entries held.", labels=labels)
        size = GaugeMetricFamily("sglmesh_tokenizer_cache_bytes",
                                 "Approximate memory held, bytes.", labels=labels)
        reused = CounterMetricFamily("sglmesh_tokenizer_prefix_cache_reused_tokens",
                                     "Token ids taken from the prefix cache instead of "
                                     "being tokenized.", labels=["model"])
        loaded = GaugeMetricFamily("sglmesh_tokenizer_loaded_models", "Tokenizers loaded.")
        models = self.registry.list()
        loaded.add_metric([], len(models))
        for tok in models:
            if tok.cache is None:
                continue
            for name, stats in tok.cache.stats().items():
                key = [tok.model, name]
                hits.add_metric(key, stats.hits)
                misses.add_metric(key, stats.misses)
                evictions.add_metric(key, stats.evictions)
                entries.add_metric(key, stats.entries)
                size.add_metric(key, stats.bytes)
                if name == "prefix":
                    reused.add_metric([tok.model], stats.tokens_reused)
        yield from (hits, misses, evictions, entries, size, reused, loaded)


def register_cache_collector(registry: TokenizerRegistry) -> CacheCollector:
    collector = CacheCollector(registry)
    REGISTRY.register(collector)
    return collector
