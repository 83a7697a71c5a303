"""Router configuration. Flag names follow SMG where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from services.common.config import ServiceConfig, option
from services.common.net import split_host_port
from services.router.policies import POLICY_NAMES, PolicyConfig
from services.router.resilience import CircuitBreakerConfig, RetryConfig


def worker_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a worker (None when it can): ``grpc://host:port``, a bare
    ``host:port`` (gRPC) or ``http(s)://host[:port]``."""
    if not url.strip():
        return "url is required, e.g. grpc://127.0.0.1:30000"
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("http", "https"):
        return None if rest.strip("/") else f"{url!r} has no host"
    if sep and scheme == "grpcs":
        return f"{url!r}: TLS to gRPC workers is not supported; use grpc://host:port"
    if sep and scheme != "grpc":
        return (f"{url!r}: unsupported scheme {scheme + '://'!r}; expected grpc://host:port "
                "or http(s)://host[:port]")
    try:
        host, port = split_host_port(url)
    except ValueError:  # a port that is not a number
        host, port = "", 0
    if not host or not 0 < port < 65536:
        return f"{url!r}: a gRPC worker needs a host and a port, e.g. grpc://127.0.0.1:30000"
    return None


def parse_prefill(tokens: list[str]) -> list[tuple[str, int | None]]:
    """``URL [PORT|none] URL ...`` -> [(url, bootstrap port or None)] (SMG's --prefill)."""
    result: list[tuple[str, int | None]] = []
    for token in tokens:
        if token.lower() == "none" or token.isdigit():
            if not result or result[-1][1] is not None:
                raise ValueError(f"--prefill: {token!r} must follow a worker URL")
            if token.isdigit():
                port = int(token)
                if not 0 < port < 65536:
                    raise ValueError(f"--prefill: bootstrap port {port} is out of range")
                result[-1] = (result[-1][0], port)
            continue
        result.append((token, None))
    return result


def merge_repeated_flags(argv: list[str], flags: tuple[str, ...] = ("--prefill", "--decode")
                         ) -> list[str]:
    """``--prefill A 1 --prefill B`` -> ``--prefill A 1 B`` (SMG repeats these flags)."""
    rest: list[str] = []
    gathered: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        if argv[i] in flags:
            values = gathered.setdefault(argv[i], [])
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    for flag, values in gathered.items():
        rest += [flag, *values]
    return rest


@dataclass
class RouterConfig(ServiceConfig):
    """sglmesh router: routes SglangScheduler calls to workers; admin API on the same port."""

    service_name: ClassVar[str] = "router"

    worker_urls: list[str] = option(
        [], help="Workers to register at start-up: grpc://host:port (SGLang --grpc-mode, sglmesh "
                 "workers) or http://host:port (an SGLang HTTP server or any OpenAI-compatible "
                 "server; the gateway relays its requests under a lease).")
    policy: str = option("cache_aware", help="Load-balancing policy (SMG's default: "
                                             "cache_aware; precise when workers publish KV "
                                             "events, else approximate).",
                         metadata={"choices": POLICY_NAMES})
    service_discovery: bool = option(
        False, help="Find workers as Kubernetes pods (label selectors; in-cluster config or "
                    "KUBECONFIG).")
    selector: list[str] = option([], help="Pod labels of regular workers: k=v ...")
    prefill_selector: list[str] = option([], help="Pod labels of PD prefill workers: k=v ...")
    decode_selector: list[str] = option([], help="Pod labels of PD decode workers: k=v ...")
    service_discovery_namespace: str = option(
        "", help="Namespace to watch (empty = every namespace).")
    service_discovery_port: int = option(80, help="The workers' gRPC port on each pod.")
    bootstrap_port_annotation: str = option(
        "sglang.ai/bootstrap-port", help="Pod annotation with a prefill pod's bootstrap port.")
    service_discovery_relist_secs: float = option(
        60.0, help="Full re-list period (the watch's timeout), so no stale pod survives a "
                   "missed event.")
    dp_aware: bool = option(
        False, help="Pick the data-parallel rank of workers with dp_size > 1 (least loaded) and "
                    "set GenerateRequest.data_parallel_rank, on every leg.")
    pd_disaggregation: bool = option(
        False, help="Prefill/decode disaggregation: each request goes to a prefill and a "
                    "decode worker (--prefill, --decode).")
    prefill: list[str] = option(
        [], help="PD prefill workers: URL [BOOTSTRAP_PORT|none] ... (the flag may repeat).")
    decode: list[str] = option([], help="PD decode workers: URL ... (the flag may repeat).")
    prefill_policy: str = option(
        "", help="Policy of the prefill leg (default: --policy).",
        metadata={"choices": ("", *POLICY_NAMES)})
    decode_policy: str = option(
        "", help="Policy of the decode leg (default: --policy).",
        metadata={"choices": ("", *POLICY_NAMES)})
    prefill_workers: list[tuple[str, int | None]] = field(init=False, default_factory=list)
    disable_kv_events: bool = option(
        False, help="cache_aware: do not subscribe to workers' KV events (approximate radix-tree "
                    "mode only).")
    cache_threshold: float = option(
        0.3, help="cache_aware: share of the prompt that must be cached on some worker for the "
                  "request to follow the cache (else it goes to the least-loaded worker).")
    balance_abs_threshold: float = option(
        64, help="cache_aware: spill to the least-loaded worker when the chosen one has more "
                 "than mean + this many requests in flight (and the relative threshold holds).")
    balance_rel_threshold: float = option(
        1.5, help="cache_aware: ... and more than this times the mean in flight.")
    max_tree_size: int = option(
        2 ** 26, help="cache_aware: tokens kept in each model's radix tree (LRU eviction).")
    selection_accounting_ttl_ms: float = option(
        2000.0, help="cache_aware precise: how long a dispatched prompt counts as cached on its "
                     "worker before the worker's KV event reports it (0 disables; SMG's flag, "
                     "whose default is 0).")
    kv_pressure_window_secs: float = option(
        0.0, help="cache_aware precise: a worker whose KV events reported an eviction within "
                  "this many seconds is under cache pressure; a request that only shares a "
                  "popular prefix with it goes to a worker with room instead (0, the default: "
                  "off; see docs/routing.md for when it pays).")
    eviction_interval_secs: float = option(
        60.0, help="cache_aware: seconds between radix-tree evictions.")
    prefix_token_count: int = option(256, help="prefix_hash: leading tokens hashed.")
    prefix_hash_load_factor: float = option(
        1.25, help="prefix_hash: the ring's pick is overloaded above this times the mean load.")
    prefix_hash_balance_abs_threshold: float = option(
        10, help="prefix_hash: ... and more than this many requests above the least loaded.")
    max_idle_secs: float = option(
        14400.0, help="manual: a routing key idle this long forgets its worker.")
    worker_transport: str = option(
        "grpclib", help="gRPC workers: how Generate streams are read. grpclib: HTTP/2 on the "
                        "router's event loop, less CPU and latency per streamed token than "
                        "grpcio, the grpc.aio channel every other worker call uses.",
        metadata={"choices": ("grpcio", "grpclib")})
    health_check_interval_secs: float = option(
        60.0, help="Seconds between health checks (SMG's default; a failing request trips the "
                   "worker's circuit breaker long before a check notices).")
    health_check_endpoint: str = option(
        "/health", help="HTTP workers: the health probe path (/health_generate: SGLang's deep "
                        "check, a one-token generation).")
    lease_timeout_secs: float = option(
        900.0, help="HTTP workers: a lease the gateway has not released after this many seconds "
                    "is dropped (its load and admission slot freed).")
    health_check_timeout_secs: float = option(
        10.0, help="Seconds a deep HealthCheck may take before it counts as a failure (SMG: 5; "
                   "the check is a one-token generation, which a busy CPU worker queues).")
    health_success_threshold: int = option(
        2, help="Consecutive successes that make a pending/not-ready worker ready (met back to "
                "back when a worker registers).")
    health_failure_threshold: int = option(
        3, help="Consecutive failures that make a ready worker not ready.")
    worker_startup_timeout_secs: float = option(
        1800.0, help="How long registration waits for a worker to answer GetModelInfo (SMG's "
                     "default: a large model's SGLang worker can take many minutes to serve).")
    abort_timeout_secs: float = option(5.0, help="Timeout of the Abort sent on cancellation.")
    remove_unhealthy_workers: bool | None = option(
        None, help="Remove a worker that stays unhealthy (not ready for 3x, or pending for 10x "
                   "--health-failure-threshold consecutive failed checks); SMG's flag. "
                   "Default: on with --service-discovery, else off.")
    load_monitor_interval: float = option(
        10.0, help="Seconds between GetLoads polls (skipped for workers whose KV-event stream "
                   "pushes their load).")
    disable_load_monitoring: bool = option(False, help="Do not poll workers' GetLoads.")

    # admission (SMG names and defaults)
    max_concurrent_requests: int = option(
        -1, help="Requests in flight at once (-1 = 1024 per core, at least 4096; 0 = no limit). "
                 "A request holds its slot until its stream ends.")
    queue_size: int = option(
        100, help="Requests that may wait (FIFO) for a slot; beyond it RESOURCE_EXHAUSTED (429).")
    queue_timeout_secs: float = option(
        60.0, help="Seconds a queued request waits for a slot before UNAVAILABLE (503).")
    rate_limit_tokens_per_second: float = option(
        0.0, help="Admissions per second (token bucket, burst = max(1, rate)); 0 = unlimited.")

    # retries (SMG defaults)
    retry_max_retries: int = option(
        5, help="Retries of a request that failed before its first token (new worker each).")
    retry_initial_backoff_ms: float = option(50.0, help="Backoff before the first retry (ms).")
    retry_max_backoff_ms: float = option(30000.0, help="Cap on the backoff between retries (ms).")
    retry_backoff_multiplier: float = option(1.5, help="Backoff growth per retry.")
    retry_jitter_factor: float = option(
        0.2, help="Uniform jitter as a fraction of the backoff (0.2 = +-20%%).")
    disable_retries: bool = option(False, help="Never retry a failed request.")

    # circuit breaker (SMG defaults)
    cb_failure_threshold: int = option(
        10, help="Consecutive failures that open a worker's circuit breaker.")
    cb_success_threshold: int = option(
        3, help="Consecutive successes that close a half-open breaker.")
    cb_timeout_duration_secs: float = option(
        60.0, help="Seconds an open breaker waits before letting trial requests through.")
    cb_window_duration_secs: float = option(
        120.0, help="Failure window (accepted for SMG compatibility; unused, as in SMG).")
    disable_circuit_breaker: bool = option(False, help="Never open circuit breakers.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag, urls in (("--worker-urls", self.worker_urls), ("--decode", self.decode),
                           ("--prefill", [url for url, _ in parse_prefill(self.prefill)])):
            for url in urls:
                if (problem := worker_url_problem(url)) is not None:
                    raise ValueError(f"{flag}: {problem}")
        if self.health_check_interval_secs <= 0:
            raise ValueError("--health-check-interval-secs must be positive")
        if self.health_success_threshold < 1 or self.health_failure_threshold < 1:
            raise ValueError("--health-success-threshold/--health-failure-threshold must be >= 1")
        if self.retry_max_retries < 0:
            raise ValueError("--retry-max-retries must be >= 0")
        if self.retry_initial_backoff_ms < 0 or self.retry_max_backoff_ms < 0:
            raise ValueError("--retry-initial-backoff-ms/--retry-max-backoff-ms must be >= 0")
        if self.retry_backoff_multiplier < 1:
            raise ValueError("--retry-backoff-multiplier must be >= 1")
        if not 0 <= self.retry_jitter_factor <= 1:
            raise ValueError("--retry-jitter-factor must be between 0 and 1")
        if self.cb_failure_threshold < 1 or self.cb_success_threshold < 1:
            raise ValueError("--cb-failure-threshold/--cb-success-threshold must be >= 1")
        if self.cb_timeout_duration_secs < 0:
            raise ValueError("--cb-timeout-duration-secs must be >= 0")
        if self.max_concurrent_requests < -1:
            raise ValueError("--max-concurrent-requests must be -1 (auto), 0 (off) or positive")
        if self.queue_size < 0:
            raise ValueError("--queue-size must be >= 0")
        if self.queue_timeout_secs <= 0:
            raise ValueError("--queue-timeout-secs must be positive")
        if self.rate_limit_tokens_per_second < 0:
            raise ValueError("--rate-limit-tokens-per-second must be >= 0")
        if self.remove_unhealthy_workers is None:
            self.remove_unhealthy_workers = self.service_discovery
        if self.service_discovery:
            from services.router.discovery import parse_selector

            for flag, value in (("--selector", self.selector),
                                ("--prefill-selector", self.prefill_selector),
                                ("--decode-selector", self.decode_selector)):
                try:
                    parse_selector(value)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from None
            if not (self.selector or self.prefill_selector or self.decode_selector):
                raise ValueError("--service-discovery needs --selector (or --prefill-selector/"
                                 "--decode-selector)")
            if not 0 < self.service_discovery_port < 65536:
                raise ValueError("--service-discovery-port must be 1-65535")
        self.prefill_workers = parse_prefill(self.prefill)
        if self.pd_disaggregation and not (self.prefill_workers and self.decode):
            raise ValueError("--pd-disaggregation needs at least one --prefill and one --decode")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError("--cache-threshold must be between 0 and 1")
        if self.balance_rel_threshold < 1 or self.balance_abs_threshold < 0:
            raise ValueError("--balance-rel-threshold must be >= 1 and "
                             "--balance-abs-threshold >= 0")
        if self.max_tree_size < 1:
            raise ValueError("--max-tree-size must be >= 1")
        if self.eviction_interval_secs <= 0:
            raise ValueError("--eviction-interval-secs must be positive")
        if self.kv_pressure_window_secs < 0:
            raise ValueError("--kv-pressure-window-secs must be >= 0 (0: off)")
        if self.prefix_token_count < 1:
            raise ValueError("--prefix-token-count must be >= 1")
        if self.lease_timeout_secs <= 0:
            raise ValueError("--lease-timeout-secs must be positive")
        if self.load_monitor_interval <= 0:
            raise ValueError("--load-monitor-interval must be positive")

    @property
    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            cache_threshold=self.cache_threshold,
            balance_abs_threshold=self.balance_abs_threshold,
            balance_rel_threshold=self.balance_rel_threshold, max_tree_size=self.max_tree_size,
            prefix_token_count=self.prefix_token_count,
            prefix_hash_load_factor=self.prefix_hash_load_factor,
            prefix_hash_balance_abs_threshold=self.prefix_hash_balance_abs_threshold,
            max_idle_secs=self.max_idle_secs,
            selection_accounting_ttl_ms=self.selection_accounting_ttl_ms,
            kv_pressure_window_secs=self.kv_pressure_window_secs)

    @property
    def retry(self) -> RetryConfig:
        return RetryConfig(
            max_retries=self.retry_max_retries, initial_backoff_ms=self.retry_initial_backoff_ms,
            max_backoff_ms=self.retry_max_backoff_ms,
            backoff_multiplier=self.retry_backoff_multiplier,
            jitter_factor=self.retry_jitter_factor, enabled=not self.disable_retries)

    @property
    def circuit_breaker(self) -> CircuitBreakerConfig:
        return CircuitBreakerConfig(
            failure_threshold=self.cb_failure_threshold,
            success_threshold=self.cb_success_threshold,
            timeout_secs=self.cb_timeout_duration_secs, window_secs=self.cb_window_duration_secs,
            enabled=not self.disable_circuit_breaker)
