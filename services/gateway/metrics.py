"""Gateway metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "sglmesh_gateway_requests_total", "HTTP requests by route and status.", ["route", "status"])
HTTP_LATENCY = Histogram(
    "sglmesh_gateway_request_duration_seconds", "HTTP request duration until the last byte.",
    ["route"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
TTFT = Histogram(
    "sglmesh_gateway_time_to_first_token_seconds", "Time from dispatch to the first text delta.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
OUTPUT_TOKENS = Counter("sglmesh_gateway_output_tokens_total", "Generated tokens.")
PROMPT_TOKENS = Counter("sglmesh_gateway_prompt_tokens_total", "Prompt tokens of finished requests.")
CACHED_TOKENS = Counter(
    "sglmesh_gateway_cached_tokens_total", "Prompt tokens the worker served from its prefix cache.")


def record_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
    """Token counters of one finished generation (the dashboard's cache hit rate reads them)."""
    OUTPUT_TOKENS.inc(completion_tokens)
    PROMPT_TOKENS.inc(prompt_tokens)
    CACHED_TOKENS.inc(cached_tokens)
