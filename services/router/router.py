"""The router's core: registry + policies + worker clients + health checking + jobs + dispatch.

Transport-free except for holding each worker's client (whose failures arrive as
``UpstreamError``); ``server.py`` maps gRPC onto this.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.common.errors import ErrorCode, ServiceError
from services.common.metrics import child
from services.common.net import split_host_port, strip_scheme
from services.common.telemetry import internal_span, tracing_enabled
from services.router import metrics
from services.router.admission import Admission, auto_max_concurrent
from services.router.config import RouterConfig
from services.router.discovery import Action as DiscoveryAction
from services.router.discovery import KubernetesDiscovery, PodReconciler, parse_selector
from services.router.http_client import HttpWorkerClient
from services.router.jobs import Job, JobKind, JobQueue
from services.router.kv_index import KvIndex
from services.router.kv_sync import KvSubscription
from services.router.leases import Lease, LeaseTable, Release
from services.router.policies import (
    CacheAwarePolicy,
    LoadBalancingPolicy,
    SelectionInfo,
    create_policy,
)
from services.router.resilience import (
    CircuitBreaker,
    CircuitState,
    Outcome,
    UpstreamError,
    backoff_secs,
    classify,
)
from services.router.resilience import is_retryable as is_retryable_code
from services.router.worker_client import WorkerClient
from services.router.workers import ConnectionMode, Health, Worker, WorkerRegistry, WorkerType

log = logging.getLogger(__name__)

PENDING_PROBE_SECS = 1.0  # how often a not-yet-ready worker is probed between regular checks
tracer = trace.get_tracer("sglmesh.router")

DOMAIN = "sglmesh.router"


DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default --disaggregation-bootstrap-port


def normalize_url(url: str) -> str:
    """One spelling per worker: ``grpc://host:port``; HTTP workers keep their ``http://`` or
    ``https://`` url (without a trailing slash)."""
    if url.startswith(("http://", "https://")):
        return url.rstrip("/")
    return "grpc://" + strip_scheme(url)


GRPC_ONLY: frozenset[ConnectionMode] = frozenset({ConnectionMode.GRPC})
ANY_MODE: frozenset[ConnectionMode] = frozenset(ConnectionMode)


def _apply_server_args(worker: Worker, args: dict[str, object]) -> None:
    """dp size and PD bootstrap port from GetServerInfo's server_args (when present)."""
    for key in ("dp_size", "data_parallel_size"):
        value = args.get(key)
        if isinstance(value, int | float) and value >= 1:
            worker.dp_size = int(value)
            break
    mode = args.get("disaggregation_mode")
    if worker.worker_type is WorkerType.REGULAR and mode in ("prefill", "decode"):
        worker.worker_type = WorkerType(mode)
    port = args.get("disaggregation_bootstrap_port", args.get("bootstrap_port"))
    if worker.bootstrap_port is None and isinstance(port, int | float) and port > 0:
        worker.bootstrap_port = int(port)


def _code_of(exc: BaseException) -> str:
    """The status code name a failed request ends with (for metrics)."""
    if isinstance(exc, ServiceError):
        return exc.code.grpc_code.name
    if isinstance(exc, UpstreamError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return str(code().name)
        except Exception:
            return "UNKNOWN"
    return "UNKNOWN"


@dataclass
class RequestHints:
    """What the caller said about a request besides the request itself (gRPC metadata)."""

    model: str = ""
    routing_key: str = ""
    target_worker: str = ""
    forward: tuple[tuple[str, str], ...] = ()  # metadata relayed to the worker as is


@dataclass
class DispatchState:
    """How one request was served; filled in as it goes (read by the transport and metrics)."""

    worker: Worker | None = None  # the worker whose stream is relayed (decode leg in PD)
    prefill_worker: Worker | None = None
    bootstrap_room: int | None = None
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    first_token_time: float | None = None


class Router:
    def __init__(self, config: RouterConfig,
                 client_factory: Callable[[str], WorkerClient] | None = None,
                 rng: random.Random | None = None, kube_api: object = None) -> None:
        self.config = config
        self.leases = LeaseTable(config.retry, config.lease_timeout_secs)
        self._kube_api = kube_api  # a kubernetes CoreV1Api (tests); None = in-cluster/kubeconfig
        self.registry = WorkerRegistry()
        self.jobs = JobQueue()
        self._client_factory = client_factory or self._default_client
        self._clients: dict[str, WorkerClient] = {}
        self._policies: dict[tuple[str, WorkerType], LoadBalancingPolicy] = {}
        self._in_flight: dict[str, list[Worker]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[object]] = set()
        self._rng = rng or random.Random()
        self.discovery: KubernetesDiscovery | None = None
        self.kv_indexes: dict[str, KvIndex] = {}
        self.kv_subscriptions: dict[str, tuple[KvSubscription, asyncio.Task[None]]] = {}
        self.admission = Admission(
            max_concurrent=(auto_max_concurrent() if config.max_concurrent_requests == -1
                            else config.max_concurrent_requests),
            queue_size=config.queue_size, queue_timeout=config.queue_timeout_secs,
            rate=config.rate_limit_tokens_per_second)

    def _default_client(self, url: str) -> WorkerClient:
        """The client for a worker url: gRPC, or HTTP for ``http(s)://`` urls."""
        if ConnectionMode.of_url(url) is ConnectionMode.HTTP:
            return HttpWorkerClient(  # type: ignore[return-value]
                url, self.config.health_check_endpoint)
        return WorkerClient(url, self.config.worker_transport)

    # lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        metrics.COLLECTOR.router = self
        self.admission.on_reject = lambda why: metrics.ADMISSION_REJECTED.labels(why).inc()
        self.jobs.start()
        for url in self.config.worker_urls:
            self.submit_add_worker(url)
        if self.config.pd_disaggregation:
            for url, port in self.config.prefill_workers:
                self.submit_add_worker(url, WorkerType.PREFILL, bootstrap_port=port)
            for url in self.config.decode:
                self.submit_add_worker(url, WorkerType.DECODE)
        if self.config.service_discovery:
            self.discovery = self._make_discovery(self._kube_api)
            self.discovery.start()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="router-health"))
        self._tasks.append(asyncio.create_task(self._maintenance_loop(), name="router-evict"))
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="router-leases"))
        if not self.config.disable_load_monitoring:
            self._tasks.append(asyncio.create_task(self._load_loop(), name="router-loads"))

    def _make_discovery(self, api: object = None) -> KubernetesDiscovery:
        cfg = self.config
        groups = [PodReconciler(parse_selector(sel), kind, cfg.service_discovery_port,
                                cfg.bootstrap_port_annotation)
                  for sel, kind in ((cfg.selector, WorkerType.REGULAR),
                                    (cfg.prefill_selector, WorkerType.PREFILL),
                                    (cfg.decode_selector, WorkerType.DECODE)) if sel]
        return KubernetesDiscovery(groups, cfg.service_discovery_namespace,
                                   self.apply_discovery, cfg.service_discovery_relist_secs, api)

    def apply_discovery(self, actions: list[DiscoveryAction]) -> None:
        """Discovery decisions become the same add/remove jobs as the admin API's."""
        for action in actions:
            if action.remove:
                # Queued even if not registered yet: jobs run in order, so a pending add of
                # the same url is undone rather than left behind.
                self.submit_remove_worker(action.remove)
            if action.add is not None:
                target = action.add
                self.submit_add_worker(target.url, target.worker_type, dict(target.labels),
                                       bootstrap_port=target.bootstrap_port)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.jobs.stop()
        for url in list(self.kv_subscriptions):
            await self._stop_kv(url)
        for client in self._clients.values():
            await client.close()

    # control plane -----------------------------------------------------------------------

    def submit_add_worker(self, url: str, worker_type: WorkerType = WorkerType.REGULAR,
                          labels: dict[str, str] | None = None, model_id: str = "",
                          bootstrap_port: int | None = None) -> Job:
        url = normalize_url(url)
        return self.jobs.submit(
            JobKind.ADD_WORKER, url,
            lambda: self._add_worker(url, worker_type, labels or {}, model_id, bootstrap_port),
        )

    def submit_remove_worker(self, url: str) -> Job:
        url = normalize_url(url)
        return self.jobs.submit(JobKind.REMOVE_WORKER, url, lambda: self._remove_worker(url))

    def _new_breaker(self, url: str) -> CircuitBreaker:
        def on_transition(_b: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
            log.warning("circuit breaker of %s: %s -> %s", url, old.value, new.value)
            metrics.CB_TRANSITIONS.labels(url, old.value, new.value).inc()

        return CircuitBreaker(self.config.circuit_breaker, on_transition=on_transition)

    async def _add_worker(self, url: str, worker_type: WorkerType, labels: dict[str, str],
                          model_id: str, bootstrap_port: int | None = None) -> str:
        if self.registry.get(url):
            raise ValueError(f"worker {url} is already registered")
        client = self._client_factory(url)
        try:
            card = await client.model_card(timeout=self.config.worker_startup_timeout_secs)
        except Exception as exc:
            await client.close()
            raise RuntimeError(f"worker {url} did not answer GetModelInfo: {exc}") from exc
        if model_id:
            card.model_id = model_id
        server_args = await client.server_info(timeout=self.config.health_check_timeout_secs)
        worker = Worker(url=url, card=card, worker_type=worker_type, labels=labels,
                        bootstrap_port=bootstrap_port, breaker=self._new_breaker(url),
                        connection_mode=ConnectionMode.of_url(url))
        _apply_server_args(worker, server_args)
        worker_type = worker.worker_type
        self.registry.add(worker)
        self._clients[url] = client
        policy = self.policy_for(card.model_id, worker_type)
        if (isinstance(policy, CacheAwarePolicy) and not self.config.disable_kv_events
                and worker.connection_mode is ConnectionMode.GRPC):
            self._start_kv(worker, policy, server_args.get("kv_events"))
        # As SMG's registration, a worker is activated once it passes its health checks: the
        # success threshold is met here, back to back, not over the first check intervals.
        for _ in range(self.config.health_success_threshold):
            await self._check(worker)
            if worker.health is Health.READY or worker.consecutive_failures:
                break
        log.info("registered %s serving %s (%s)", url, card.model_id, worker.health.value)
        return f"registered, model {card.model_id}, {worker.health.value}"

    async def _remove_worker(self, url: str) -> str:
        worker = self.registry.remove(url)
        if worker is None:
            raise ValueError(f"worker {url} is not registered")
        policy = self._policies.get((worker.model_id, worker.worker_type))
        if policy is not None:
            policy.on_worker_removed(worker)
        await self._stop_kv(url)
        client = self._clients.pop(url)
        # In-flight calls keep their own reference to the channel; close once they drain.
        while worker.in_flight:
            await asyncio.sleep(0.05)
        await client.close()
        if not any(w.worker_type is worker.worker_type
                   for w in self.registry.for_model(worker.model_id)):
            self._policies.pop((worker.model_id, worker.worker_type), None)
        return "removed"

    def _start_kv(self, worker: Worker, policy: CacheAwarePolicy, descriptor: object) -> None:
        """Precise cache_aware: follow the worker's KV events (UNIMPLEMENTED -> approximate)."""
        index = self.kv_indexes.setdefault(worker.model_id, KvIndex())
        policy.kv_index = index
        if isinstance(descriptor, dict) and not index.block_size:
            index.block_size = int(descriptor.get("block_size") or 0)
        client = self._clients[worker.url]
        sub = KvSubscription(worker, index, client.kv_events)
        sub.on_failure = lambda code: metrics.KV_SUBSCRIPTION_FAILURES.labels(
            worker.url, code).inc()
        task = asyncio.create_task(sub.run(), name=f"kv-events {worker.url}")
        self.kv_subscriptions[worker.url] = (sub, task)

    async def _stop_kv(self, url: str) -> None:
        entry = self.kv_subscriptions.pop(url, None)
        if entry is None:
            return
        sub, task = entry
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sub.index.drop_worker(url)

    def policy_name(self, worker_type: WorkerType) -> str:
        if worker_type is WorkerType.PREFILL and self.config.prefill_policy:
            return self.config.prefill_policy
        if worker_type is WorkerType.DECODE and self.config.decode_policy:
            return self.config.decode_policy
        return self.config.policy

    def policy_for(self, model_id: str, worker_type: WorkerType = WorkerType.REGULAR
                   ) -> LoadBalancingPolicy:
        """The policy of one model (and PD leg); the first worker of a model creates it."""
        key = (model_id, worker_type)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = create_policy(
                self.policy_name(worker_type), self.config.policy_config)
        return policy

    # data plane --------------------------------------------------------------------------

    def resolve_model(self, model: str) -> str:
        model_id = self.registry.resolve_model(model)
        if model_id is None:
            if not model and len(self.registry.models()) > 1:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, "MODEL_REQUIRED",
                                   "several models are served: name one in x-sglmesh-model",
                                   {"field": "model"}, DOMAIN)
            raise ServiceError(ErrorCode.NOT_FOUND, "MODEL_NOT_FOUND",
                               f"model {model!r} is not served by any worker",
                               {"model": model}, DOMAIN)
        return model_id

    def select(self, model: str, info: SelectionInfo, target_url: str = "",
               worker_type: WorkerType = WorkerType.REGULAR,
               exclude: frozenset[str] | set[str] = frozenset(),
               modes: frozenset[ConnectionMode] = GRPC_ONLY) -> Worker:
        """The worker for one request, or a ServiceError saying why there is none.

        Only routable workers (healthy, breaker not open) of the model and leg are offered to
        the policy; ``exclude`` (urls already tried) is honoured while another worker remains.
        ``modes``: the connection modes the caller can reach (the gRPC data plane: gRPC only;
        leases: any).
        """
        if target_url:
            worker = self.registry.get(normalize_url(target_url))
            if worker is None:
                raise ServiceError(ErrorCode.NOT_FOUND, "WORKER_NOT_FOUND",
                                   f"target worker {target_url!r} is not registered",
                                   {"worker": target_url}, DOMAIN)
            if worker.connection_mode not in modes:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, "HTTP_WORKER",
                                   f"target worker {worker.url} is an HTTP worker: the gateway "
                                   "reaches it under a lease (RouterLeaseService)",
                                   {"worker": worker.url}, DOMAIN)
            return worker
        model_id = self.resolve_model(model)
        ready = Health.READY
        candidates = [w for w in self.registry.for_model(model_id)
                      if w.health is ready and w.worker_type is worker_type
                      and w.connection_mode in modes
                      and (w.breaker.closed or w.breaker.allows())]
        if exclude:
            fresh = [w for w in candidates if w.url not in exclude]
            candidates = fresh or candidates
        policy = self.policy_for(model_id, worker_type)
        with internal_span(tracer, "router.select", {
                "sglmesh.model": model_id, "sglmesh.policy": policy.name,
                "sglmesh.leg": worker_type.value, "sglmesh.candidates": len(candidates)}) as span:
            worker = policy.select_worker(candidates, info) if candidates else None
            if worker is not None:
                span.set_attribute("sglmesh.worker", worker.url)
                child(metrics.SELECTIONS, worker.url, policy.name).inc()
        if worker is None:
            leg = "" if worker_type is WorkerType.REGULAR else f" {worker_type.value}"
            if modes != ANY_MODE:
                leg += "".join(f" {m.value}" for m in modes)
            raise ServiceError(ErrorCode.UNAVAILABLE, "NO_HEALTHY_WORKER",
                               f"no healthy{leg} worker serves model {model_id!r}",
                               {"model": model_id}, DOMAIN)
        return worker

    def client(self, worker: Worker) -> WorkerClient:
        return self._clients[worker.url]

    @property
    def default_leg(self) -> WorkerType:
        """The workers that answer calls without a prompt (model info, tokenizer, loads)."""
        return WorkerType.DECODE if self.config.pd_disaggregation else WorkerType.REGULAR

    def any_client(self, model: str) -> tuple[Worker, WorkerClient]:
        worker = self.select(model, SelectionInfo(), worker_type=self.default_leg)
        return worker, self.client(worker)

    async def generate(self, request: pb.GenerateRequest, hints: RequestHints,
                       state: DispatchState | None = None) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Streams one Generate: select, dispatch, retry before the first token, relay.

        A failed attempt is retried on another worker (SMG's backoff with jitter) while its
        status is retryable, retries are left and nothing has been relayed yet; after that the
        worker's own status goes to the caller. Load counters and the in-flight map are released
        however the stream ends; a caller that goes away makes the worker get Abort at once.
        """
        state = state if state is not None else DispatchState()
        model = hints.model if hints.model in self.registry.models() else (
            self.registry.resolve_model(hints.model) or "other")
        mode = "pd" if self.config.pd_disaggregation else "regular"
        code = "OK"
        with await self.admission.acquire() as permit:
            if permit.waited:
                metrics.ADMISSION_WAIT.observe(permit.waited)
            start = time.monotonic()
            first = True
            try:
                async with aclosing(self._dispatch(request, hints, state)) as stream:
                    async for response in stream:
                        if first:
                            first = False
                            child(metrics.TTFT, model).observe(time.monotonic() - start)
                        yield response
            except BaseException as exc:
                code = _code_of(exc)
                raise
            finally:
                child(metrics.REQUESTS, model, mode, code).inc()
                if code != "OK":
                    metrics.REQUEST_ERRORS.labels(model, code).inc()
                child(metrics.DURATION, model).observe(time.monotonic() - start)

    async def _dispatch(self, request: pb.GenerateRequest, hints: RequestHints,
                        state: DispatchState) -> AsyncGenerator[pb.GenerateResponse, None]:
        info = SelectionInfo(token_ids=request.tokenized.input_ids,
                             routing_key=hints.routing_key, request_id=request.request_id)
        retry = self.config.retry
        last: UpstreamError | None = None
        for attempt in range(retry.max_attempts):
            if attempt:
                delay = backoff_secs(attempt - 1, retry, self._rng)
                metrics.RETRY_BACKOFF.observe(delay)
                await asyncio.sleep(delay)
            try:
                if self.config.pd_disaggregation and not hints.target_worker:
                    prefill = self.select(hints.model, info, worker_type=WorkerType.PREFILL,
                                          exclude=set(state.tried))
                    worker = self.select(hints.model, info, worker_type=WorkerType.DECODE,
                                         exclude=set(state.tried))
                    state.prefill_worker = prefill
                    state.tried.append(prefill.url)
                    attempt_stream = self._attempt_pd(prefill, worker, request, hints, state)
                else:
                    worker = self.select(hints.model, info, hints.target_worker,
                                         exclude=set(state.tried))
                    leg = request
                    if self.config.dp_aware and worker.dp_size > 1:
                        leg = pb.GenerateRequest()
                        leg.CopyFrom(request)
                        leg.data_parallel_rank = worker.next_dp_rank()
                    attempt_stream = self._attempt(worker, leg, hints)
            except ServiceError:
                if last is not None:  # nobody left to retry on: the worker's error stands
                    raise last.cause or last from None
                raise
            state.worker, state.attempts = worker, attempt + 1
            state.tried.append(worker.url)
            relayed = False
            try:
                async with aclosing(attempt_stream) as stream:
                    async for response in stream:
                        if not relayed:
                            relayed = True
                            state.first_token_time = time.monotonic()
                        yield response
                return
            except UpstreamError as err:
                last = err
                if relayed or not err.retryable or hints.target_worker:
                    raise err.cause or err from None
                log.info("request %s: attempt %d on %s failed (%s), %s", request.request_id,
                         attempt + 1, worker.url, err,
                         "retrying" if attempt + 1 < retry.max_attempts else "giving up")
                if attempt + 1 < retry.max_attempts:
                    metrics.RETRIES.labels(worker.url).inc()
        assert last is not None
        metrics.RETRIES_EXHAUSTED.labels(hints.model or "default").inc()
        raise last.cause or last

    async def _attempt(self, worker: Worker, request: pb.GenerateRequest,
                       hints: RequestHints) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One dispatch to one worker, with its load guard and breaker outcome."""
        client = self._clients.get(worker.url)
        if client is None:
            raise UpstreamError("UNAVAILABLE", f"worker {worker.url} was removed")
        finished = False
        outcome = Outcome.IGNORED
        span = tracer.start_span("router.attempt", attributes={
            "sglmesh.worker": worker.url, "sglmesh.leg": worker.worker_type.value,
            "sglmesh.request_id": request.request_id}) if tracing_enabled() else (
            trace.get_current_span())  # tracing off: the caller's context goes on as it is
        code = "CANCELLED"
        self.begin_request(request.request_id, worker)
        rank = request.data_parallel_rank if request.HasField("data_parallel_rank") else None
        if rank is not None:
            span.set_attribute("sglmesh.dp_rank", rank)
        with worker.track(rank):
            try:
                stream = client.generate(request, hints.forward,
                                         trace.set_span_in_context(span))
                async with aclosing(stream):
                    async for response in stream:
                        yield response
                finished = True
                outcome = Outcome.SUCCESS
                code = "OK"
            except UpstreamError as err:
                finished = True
                code = err.code
                outcome = classify(err.code)
                metrics.WORKER_ERRORS.labels(worker.url, err.code).inc()
                if err.code == "DEADLINE_EXCEEDED":  # the worker may still be running it
                    self.abort_in_background(worker, request.request_id, "router timeout")
                raise
            finally:
                worker.breaker.record(outcome)
                child(metrics.CB_OUTCOMES, worker.url, outcome.value).inc()
                span.set_attribute("rpc.grpc.status_code", code)
                if code not in ("OK", "CANCELLED"):
                    span.set_status(Status(StatusCode.ERROR, code))
                span.end()
                self.end_request(request.request_id, worker)
                if not finished:
                    # The caller went away: stop the worker's work now.
                    self.abort_in_background(worker, request.request_id, "client cancelled")

    async def _attempt_pd(self, prefill: Worker, decode: Worker, request: pb.GenerateRequest,
                          hints: RequestHints, state: DispatchState
                          ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One PD attempt: both legs at once with the same bootstrap room; the decode stream is
        relayed, the prefill stream drained. If either leg fails the other is cancelled (and
        its worker gets Abort), so no bootstrap room is left waiting."""
        room = self._rng.randrange(0, 2 ** 31 - 1)  # bootstrap_room is an int32
        state.bootstrap_room = room
        host, _port = split_host_port(prefill.url)
        legs = []
        for worker in (prefill, decode):
            leg = pb.GenerateRequest()
            leg.CopyFrom(request)
            params = leg.disaggregated_params
            params.bootstrap_host = host
            params.bootstrap_port = prefill.bootstrap_port or DEFAULT_BOOTSTRAP_PORT
            params.bootstrap_room = room
            if self.config.dp_aware and worker.dp_size > 1:
                leg.data_parallel_rank = worker.next_dp_rank()
            legs.append(leg)
        queue: asyncio.Queue[tuple[str, str, object]] = asyncio.Queue()

        async def pump(name: str, worker: Worker, leg: pb.GenerateRequest) -> None:
            try:
                async with aclosing(self._attempt(worker, leg, hints)) as stream:
                    async for response in stream:
                        if name == "decode":
                            await queue.put((name, "data", response))
                await queue.put((name, "done", None))
            except UpstreamError as err:
                await queue.put((name, "error", err))

        tasks = {name: asyncio.create_task(pump(name, w, leg), name=f"pd-{name}")
                 for name, w, leg in (("prefill", prefill, legs[0]), ("decode", decode, legs[1]))}
        try:
            while True:
                name, kind, payload = await queue.get()
                if kind == "data":
                    yield payload  # type: ignore[misc]
                elif kind == "error":
                    err = payload
                    assert isinstance(err, UpstreamError)
                    log.info("request %s: PD %s leg on %s failed: %s", request.request_id, name,
                             (prefill if name == "prefill" else decode).url, err)
                    metrics.PD_BOOTSTRAP_FAILURES.labels(name).inc()
                    raise err
                elif name == "decode":
                    # Done; give the prefill leg a moment to finish on its own.
                    await asyncio.wait({tasks["prefill"]}, timeout=self.config.abort_timeout_secs)
                    return
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    # leases (HTTP workers: the gateway relays, the router selects and accounts) -----------

    async def acquire_lease(self, model: str, info: SelectionInfo, attempt: int = 0,
                            exclude: frozenset[str] | set[str] = frozenset(),
                            target_url: str = "") -> Lease:
        """Admission, then the model's policy over every routable worker (gRPC and HTTP alike);
        the worker then carries the request as in-flight load until :meth:`release_lease`."""
        permit = await self.admission.acquire()
        if permit.waited:
            metrics.ADMISSION_WAIT.observe(permit.waited)
        try:
            worker = self.select(model, info, target_url, self.default_leg, exclude, ANY_MODE)
        except BaseException:
            permit.release()
            raise
        lease = self.leases.open(worker, worker.model_id, info.request_id, attempt, permit,
                                 pinned=bool(target_url))
        self.begin_request(info.request_id, worker)
        return lease

    def release_lease(self, lease_id: str, code: str, relayed: bool, message: str = ""
                      ) -> Release:
        closed = self.leases.close(lease_id, code or "OK", relayed)
        if closed is None:
            raise ServiceError(ErrorCode.NOT_FOUND, "LEASE_NOT_FOUND",
                               f"lease {lease_id!r} is not held (released or expired)",
                               {"lease": lease_id}, DOMAIN)
        lease, release = closed
        self._account_lease(lease, code or "OK", release, message)
        return release

    def _account_lease(self, lease: Lease, code: str, release: Release, message: str) -> None:
        worker = lease.worker
        self.end_request(lease.request_id, worker)
        if not release.final and not release.retry:
            return  # handed back unused: the request goes on through the data plane
        child(metrics.CB_OUTCOMES, worker.url, release.outcome.value).inc()
        if code != "OK":
            metrics.WORKER_ERRORS.labels(worker.url, code).inc()
        if release.retry:
            log.info("request %s: attempt %d on %s failed (%s %s), retrying", lease.request_id,
                     lease.attempt + 1, worker.url, code, message)
            metrics.RETRIES.labels(worker.url).inc()
            metrics.RETRY_BACKOFF.observe(release.backoff)
            return
        mode = worker.connection_mode.value
        child(metrics.REQUESTS, lease.model_id, mode, code).inc()
        child(metrics.DURATION, lease.model_id).observe(time.monotonic() - lease.start)
        if code != "OK":
            metrics.REQUEST_ERRORS.labels(lease.model_id, code).inc()
            if lease.attempt and is_retryable_code(code):
                metrics.RETRIES_EXHAUSTED.labels(lease.model_id).inc()

    def expire_leases(self) -> int:
        gone = self.leases.expired()
        for lease in gone:
            try:
                self.release_lease(lease.id, "CANCELLED", relayed=True, message="expired")
            except ServiceError:
                pass
        return len(gone)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, max(0.5, self.config.lease_timeout_secs / 4)))
            self.expire_leases()

    def begin_request(self, request_id: str, worker: Worker) -> None:
        if request_id:
            self._in_flight.setdefault(request_id, []).append(worker)

    def end_request(self, request_id: str, worker: Worker) -> None:
        workers = self._in_flight.get(request_id)
        if workers is not None and worker in workers:
            workers.remove(worker)
            if not workers:
                del self._in_flight[request_id]

    def workers_of_request(self, request_id: str) -> list[Worker]:
        """The workers a request is running on now (two for a PD request)."""
        return list(self._in_flight.get(request_id, ()))

    def worker_of_request(self, request_id: str) -> Worker | None:
        workers = self._in_flight.get(request_id)
        return workers[-1] if workers else None

    def abort_in_background(self, worker: Worker, request_id: str, reason: str) -> None:
        """Sends Abort to ``worker`` without blocking (used when a client goes away)."""
        client = self._clients.get(worker.url)
        if client is None or not request_id:
            return
        task = asyncio.create_task(
            client.abort(request_id, reason, self.config.abort_timeout_secs))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def healthy(self) -> bool:
        return any(w.is_routable for w in self.registry.all())

    # health and loads --------------------------------------------------------------------

    async def _check(self, worker: Worker, count_failure: bool = True) -> None:
        client = self._clients.get(worker.url)
        if client is None:
            return
        healthy, message = await client.health_check(self.config.health_check_timeout_secs)
        metrics.HEALTH_CHECKS.labels(worker.url, "ok" if healthy else "failed").inc()
        if worker.record_health(healthy, message, self.config.health_success_threshold,
                                self.config.health_failure_threshold, count_failure):
            log.info("worker %s is now %s (%s)", worker.url, worker.health.value, message)
        if (self.config.remove_unhealthy_workers
                and worker.should_remove(self.config.health_failure_threshold)
                and self.registry.get(worker.url) is worker and not worker.removing):
            worker.removing = True
            log.warning("removing unhealthy worker %s (%s)", worker.url, message)
            self.submit_remove_worker(worker.url)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.registry.all()),
                             return_exceptions=True)

    async def _health_loop(self) -> None:
        """Every worker every --health-check-interval-secs; in between, a worker still pending
        (its registration checks failed: busy, still warming up) is probed every
        PENDING_PROBE_SECS, so it serves as soon as it can instead of up to two intervals
        later. Only its successes count there: the failures that decide a removal come from
        the regular checks alone, as in SMG."""
        interval = self.config.health_check_interval_secs
        regular_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, min(PENDING_PROBE_SECS, regular_at - time.monotonic())))
            if time.monotonic() >= regular_at:
                regular_at = time.monotonic() + interval
                await self.check_all()
                continue
            pending = [w for w in self.registry.all() if w.health is Health.PENDING]
            if pending:
                await asyncio.gather(*(self._check(w, count_failure=False) for w in pending),
                                     return_exceptions=True)

    async def poll_loads(self) -> None:
        """One GetLoads round over workers whose load is not pushed by their event stream."""
        now = time.monotonic()
        stale_after = 2 * self.config.load_monitor_interval

        async def poll(worker: Worker) -> None:
            load = worker.engine_load
            if load is not None and load.source == "events" and now - load.update_time < stale_after:
                return
            client = self._clients.get(worker.url)
            if client is None:
                return
            try:
                worker.engine_load = await client.get_loads(self.config.health_check_timeout_secs)
            except UpstreamError as err:
                log.debug("GetLoads on %s failed: %s", worker.url, err)

        await asyncio.gather(*(poll(w) for w in self.registry.all()), return_exceptions=True)

    async def _load_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_monitor_interval)
            await self.poll_loads()

    def maintenance(self) -> None:
        """Periodic policy upkeep: radix-tree eviction, idle sticky keys."""
        for policy in list(self._policies.values()):
            policy.maintenance()

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            self.maintenance()

    def policies(self) -> dict[tuple[str, WorkerType], LoadBalancingPolicy]:
        return dict(self._policies)

    def ready_workers(self) -> list[Worker]:
        return [w for w in self.registry.all() if w.health is Health.READY]
