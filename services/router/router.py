"""The router's core: registry + policies + worker clients + health checking + jobs.

Transport-free except for holding each worker's client; ``server.py`` maps gRPC onto this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.common.errors import ErrorCode, ServiceError
from services.common.net import strip_scheme
from services.router.config import RouterConfig
from services.router.jobs import Job, JobKind, JobQueue
from services.router.policies import LoadBalancingPolicy, SelectionInfo, create_policy
from services.router.worker_client import WorkerClient
from services.router.workers import Health, Worker, WorkerRegistry, WorkerType

log = logging.getLogger(__name__)

DOMAIN = "sglmesh.router"


def normalize_url(url: str) -> str:
    """One spelling per worker: ``grpc://host:port``."""
    return "grpc://" + strip_scheme(url)


class Router:
    def __init__(self, config: RouterConfig,
                 client_factory: Callable[[str], WorkerClient] = WorkerClient) -> None:
        self.config = config
        self.registry = WorkerRegistry()
        self.jobs = JobQueue()
        self._client_factory = client_factory
        self._clients: dict[str, WorkerClient] = {}
        self._policies: dict[str, LoadBalancingPolicy] = {}
        self._in_flight: dict[str, Worker] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()

    # lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.jobs.start()
        for url in self.config.worker_urls:
            self.submit_add_worker(url)
        self._health_task = asyncio.create_task(self._health_loop(), name="router-health")

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.jobs.stop()
        for client in self._clients.values():
            await client.close()

    # control plane -----------------------------------------------------------------------

    def submit_add_worker(self, url: str, worker_type: WorkerType = WorkerType.REGULAR,
                          labels: dict[str, str] | None = None, model_id: str = "") -> Job:
        url = normalize_url(url)
        return self.jobs.submit(
            JobKind.ADD_WORKER, url,
            lambda: self._add_worker(url, worker_type, labels or {}, model_id),
        )

    def submit_remove_worker(self, url: str) -> Job:
        url = normalize_url(url)
        return self.jobs.submit(JobKind.REMOVE_WORKER, url, lambda: self._remove_worker(url))

    async def _add_worker(self, url: str, worker_type: WorkerType, labels: dict[str, str],
                          model_id: str) -> str:
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
        worker = Worker(url=url, card=card, worker_type=worker_type, labels=labels)
        self.registry.add(worker)
        self._clients[url] = client
        self._policies.setdefault(card.model_id, create_policy(self.config.policy))
        await self._check(worker)
        log.info("registered %s serving %s (%s)", url, card.model_id, worker.health.value)
        return f"registered, model {card.model_id}, {worker.health.value}"

    async def _remove_worker(self, url: str) -> str:
        worker = self.registry.remove(url)
        if worker is None:
            raise ValueError(f"worker {url} is not registered")
        client = self._clients.pop(url)
        # In-flight calls keep their own reference to the channel; close once they drain.
        while worker.in_flight:
            await asyncio.sleep(0.05)
        await client.close()
        if not self.registry.for_model(worker.model_id):
            self._policies.pop(worker.model_id, None)
        return "removed"

    # data plane --------------------------------------------------------------------------

    def select(self, model: str, info: SelectionInfo, target_url: str = "") -> Worker:
        """The worker for one request, or a ServiceError saying why there is none."""
        if target_url:
            worker = self.registry.get(normalize_url(target_url))
            if worker is None:
                raise ServiceError(ErrorCode.NOT_FOUND, "WORKER_NOT_FOUND",
                                   f"target worker {target_url!r} is not registered",
                                   {"worker": target_url}, DOMAIN)
            return worker
        model_id = self.registry.resolve_model(model)
        if model_id is None:
            if not model and len(self.registry.models()) > 1:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, "MODEL_REQUIRED",
                                   "several models are served: name one in x-sglmesh-model",
                                   {"field": "model"}, DOMAIN)
            raise ServiceError(ErrorCode.NOT_FOUND, "MODEL_NOT_FOUND",
                               f"model {model!r} is not served by any worker",
                               {"model": model}, DOMAIN)
        candidates = [w for w in self.registry.for_model(model_id) if w.is_routable]
        worker = self._policies[model_id].select_worker(candidates, info) if candidates else None
        if worker is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "NO_HEALTHY_WORKER",
                               f"no healthy worker serves model {model_id!r}",
                               {"model": model_id}, DOMAIN)
        return worker

    def client(self, worker: Worker) -> WorkerClient:
        return self._clients[worker.url]

    def any_client(self, model: str) -> tuple[Worker, WorkerClient]:
        worker = self.select(model, SelectionInfo())
        return worker, self.client(worker)

    def begin_request(self, request_id: str, worker: Worker) -> None:
        if request_id:
            self._in_flight[request_id] = worker

    def end_request(self, request_id: str) -> None:
        self._in_flight.pop(request_id, None)

    def worker_of_request(self, request_id: str) -> Worker | None:
        return self._in_flight.get(request_id)

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

    # health ------------------------------------------------------------------------------

    async def _check(self, worker: Worker) -> None:
        client = self._clients.get(worker.url)
        if client is None:
            return
        healthy, message = await client.health_check(self.config.health_check_timeout_secs)
        if worker.record_health(healthy, message, self.config.health_success_threshold,
                                self.config.health_failure_threshold):
            log.info("worker %s is now %s (%s)", worker.url, worker.health.value, message)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_secs)
            workers = self.registry.all()
            await asyncio.gather(*(self._check(w) for w in workers), return_exceptions=True)

    def ready_workers(self) -> list[Worker]:
        return [w for w in self.registry.all() if w.health is Health.READY]
