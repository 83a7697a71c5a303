"""Router transport: the SglangScheduler data plane and the RouterAdminService control plane."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from sglmesh.router.v1 import router_lease_pb2 as lease_pb
from sglmesh.router.v1 import router_lease_pb2_grpc as lease_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import invalid_argument, not_found
from services.common.telemetry import metadata_dict
from services.router.config import worker_url_problem
from services.router.jobs import Job, JobKind, JobState
from services.router.policies import SelectionInfo
from services.router.resilience import CircuitState
from services.router.router import DOMAIN, DispatchState, RequestHints, Router, normalize_url
from services.router.workers import ConnectionMode, Health, Worker, WorkerType

# Routing hints (see proto/sglmesh/router/v1/router_admin.proto).
MODEL_KEY = "x-sglmesh-model"
ROUTING_KEY = "x-sglmesh-routing-key"
TARGET_WORKER_KEY = "x-sglmesh-target-worker"
REQUEST_ID_KEY = "x-request-id"
WORKER_KEY = "x-sglmesh-worker"
_FORWARDED = (MODEL_KEY, ROUTING_KEY, REQUEST_ID_KEY)

_START = time.time()


def _forward_metadata(md: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, md[k]) for k in _FORWARDED if k in md)


class SchedulerProxy(pb_grpc.SglangSchedulerServicer):
    """Serves the worker contract by forwarding to a worker the policy picks."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def _pick(self, context: grpc.aio.ServicerContext) -> tuple[Worker, dict[str, str]]:
        """A worker of the requested model for a call that carries no prompt."""
        md = metadata_dict(context.invocation_metadata())
        worker = self.router.select(md.get(MODEL_KEY, ""), SelectionInfo(),
                                    md.get(TARGET_WORKER_KEY, ""),
                                    worker_type=self.router.default_leg)
        return worker, md

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        md = metadata_dict(context.invocation_metadata())
        hints = RequestHints(model=md.get(MODEL_KEY, ""), routing_key=md.get(ROUTING_KEY, ""),
                             target_worker=md.get(TARGET_WORKER_KEY, ""),
                             forward=_forward_metadata(md))
        state = DispatchState()
        sent_metadata = False
        async with aclosing(self.router.generate(request, hints, state)) as stream:
            async for response in stream:
                if not sent_metadata and state.worker is not None:
                    sent_metadata = True
                    await context.send_initial_metadata(((WORKER_KEY, state.worker.url),))
                yield response

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        with await self.router.admission.acquire():
            worker, md = self._pick(context)
            with worker.track():
                return await self.router.client(worker).stub.Embed(
                    request, metadata=_forward_metadata(md))

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        workers = self.router.workers_of_request(request.request_id)
        if not workers:
            return pb.AbortResponse(success=False, message="request not in flight on this router")
        results = [await self.router.client(w).abort(
            request.request_id, request.reason, self.router.config.abort_timeout_secs)
            for w in workers]
        return pb.AbortResponse(success=any(results),
                                message=f"forwarded to {', '.join(w.url for w in workers)}")

    async def HealthCheck(self, request: pb.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> pb.HealthCheckResponse:
        ready = self.router.ready_workers()
        return pb.HealthCheckResponse(
            healthy=bool(ready),
            message=f"{len(ready)}/{len(self.router.registry)} workers ready",
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        worker, md = self._pick(context)
        return await self.router.client(worker).stub.GetModelInfo(request)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        args = struct_pb2.Struct()
        args.update({"policy": self.router.config.policy,
                     "worker_urls": [w.url for w in self.router.registry.all()]})
        start = timestamp_pb2.Timestamp()
        start.FromSeconds(int(_START))
        return pb.GetServerInfoResponse(
            server_args=args,
            active_requests=sum(w.in_flight for w in self.router.registry.all()),
            uptime_seconds=time.time() - _START,
            sglang_version="sglmesh-router 0.1.0",
            server_type="grpc",
            start_time=start,
        )

    async def GetLoads(self, request: pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        worker, md = self._pick(context)
        return await self.router.client(worker).stub.GetLoads(request)

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        worker, md = self._pick(context)
        async for chunk in self.router.client(worker).stub.GetTokenizer(request):
            yield chunk


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


_HEALTH = {Health.PENDING: admin_pb.WORKER_HEALTH_PENDING, Health.READY: admin_pb.WORKER_HEALTH_READY,
           Health.NOT_READY: admin_pb.WORKER_HEALTH_NOT_READY}
_WORKER_TYPE = {WorkerType.REGULAR: admin_pb.WORKER_TYPE_REGULAR,
                WorkerType.PREFILL: admin_pb.WORKER_TYPE_PREFILL,
                WorkerType.DECODE: admin_pb.WORKER_TYPE_DECODE}
_WORKER_TYPE_IN = {v: k for k, v in _WORKER_TYPE.items()}
_CIRCUIT = {CircuitState.CLOSED: admin_pb.CIRCUIT_STATE_CLOSED,
            CircuitState.OPEN: admin_pb.CIRCUIT_STATE_OPEN,
            CircuitState.HALF_OPEN: admin_pb.CIRCUIT_STATE_HALF_OPEN}
_CONNECTION_MODE = {ConnectionMode.GRPC: admin_pb.CONNECTION_MODE_GRPC,
                    ConnectionMode.HTTP: admin_pb.CONNECTION_MODE_HTTP}
_JOB_KIND = {JobKind.ADD_WORKER: admin_pb.JOB_KIND_ADD_WORKER,
             JobKind.REMOVE_WORKER: admin_pb.JOB_KIND_REMOVE_WORKER}
_JOB_STATE = {JobState.PENDING: admin_pb.JOB_STATE_PENDING, JobState.RUNNING: admin_pb.JOB_STATE_RUNNING,
              JobState.SUCCEEDED: admin_pb.JOB_STATE_SUCCEEDED, JobState.FAILED: admin_pb.JOB_STATE_FAILED}


def worker_to_proto(worker: Worker) -> admin_pb.Worker:
    return admin_pb.Worker(
        url=worker.url, model_id=worker.model_id, worker_type=_WORKER_TYPE[worker.worker_type],
        connection_mode=_CONNECTION_MODE[worker.connection_mode], health=_HEALTH[worker.health],
        health_message=worker.health_message, circuit_state=_CIRCUIT[worker.breaker.state],
        in_flight_requests=worker.in_flight, processed_requests=worker.processed,
        dp_size=worker.dp_size, bootstrap_port=worker.bootstrap_port,
        labels=worker.labels, max_context_length=worker.card.max_context_length,
        register_time=_timestamp(worker.register_time),
    )


def job_to_proto(job: Job) -> admin_pb.Job:
    return admin_pb.Job(
        id=job.id, kind=_JOB_KIND[job.kind], state=_JOB_STATE[job.state],
        worker_url=job.worker_url, message=job.message,
        create_time=_timestamp(job.create_time), update_time=_timestamp(job.update_time),
    )


class RouterAdmin(admin_grpc.RouterAdminServiceServicer):
    """The control plane: workers, jobs, models, loads."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def AddWorker(self, request: admin_pb.AddWorkerRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb.AddWorkerResponse:
        if (problem := worker_url_problem(request.url)) is not None:
            raise invalid_argument("url", problem, domain=DOMAIN)
        job = self.router.submit_add_worker(
            request.url, _WORKER_TYPE_IN.get(request.worker_type, WorkerType.REGULAR),
            dict(request.labels), request.model_id,
            request.bootstrap_port if request.HasField("bootstrap_port") else None)
        return admin_pb.AddWorkerResponse(job=job_to_proto(job))

    async def RemoveWorker(self, request: admin_pb.RemoveWorkerRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb.RemoveWorkerResponse:
        if not request.url:
            raise invalid_argument("url", "url is required", domain=DOMAIN)
        job = self.router.submit_remove_worker(request.url)
        return admin_pb.RemoveWorkerResponse(job=job_to_proto(job))

    async def ListWorkers(self, request: admin_pb.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb.ListWorkersResponse:
        workers = self.router.registry.all()
        if request.model_id:
            workers = [w for w in workers if w.model_id == request.model_id]
        if request.worker_type:
            wanted = _WORKER_TYPE_IN[request.worker_type]
            workers = [w for w in workers if w.worker_type is wanted]
        return admin_pb.ListWorkersResponse(workers=[worker_to_proto(w) for w in workers])

    async def GetWorker(self, request: admin_pb.GetWorkerRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb.GetWorkerResponse:
        worker = self.router.registry.get(normalize_url(request.url))
        if worker is None:
            raise not_found("worker", request.url, DOMAIN)
        return admin_pb.GetWorkerResponse(worker=worker_to_proto(worker))

    async def GetJob(self, request: admin_pb.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb.GetJobResponse:
        job = self.router.jobs.get(request.id)
        if job is None:
            raise not_found("job", request.id, DOMAIN)
        return admin_pb.GetJobResponse(job=job_to_proto(job))

    async def ListModels(self, request: admin_pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb.ListModelsResponse:
        models = []
        for model_id, workers in sorted(self.router.registry.models().items()):
            ready = [w for w in workers if w.is_routable]
            # The tokenizer comes from a gRPC worker (GetTokenizer); HTTP workers serve none.
            grpc_workers = [w for w in workers if w.connection_mode is ConnectionMode.GRPC]
            ready_grpc = [w for w in ready if w.connection_mode is ConnectionMode.GRPC]
            tokenizer_from = (ready_grpc or grpc_workers or ready or workers)[0]
            models.append(admin_pb.Model(
                id=model_id, worker_count=len(workers), ready_worker_count=len(ready),
                max_context_length=max(w.card.max_context_length for w in workers),
                policy=self.router.config.policy,
                is_generation=workers[0].card.is_generation,
                tokenizer_worker_url=tokenizer_from.url,
                create_time=_timestamp(min(w.register_time for w in workers)),
                http_worker_count=len(workers) - len(grpc_workers),
                is_reranker=any(w.card.is_reranker for w in workers),
            ))
        return admin_pb.ListModelsResponse(models=models)

    async def GetLoads(self, request: admin_pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb.GetLoadsResponse:
        workers = self.router.registry.all()
        if request.model_id:
            workers = [w for w in workers if w.model_id == request.model_id]
        now = _timestamp(time.time())
        loads = []
        for w in workers:
            load = admin_pb.WorkerLoad(url=w.url, in_flight_requests=w.in_flight, update_time=now)
            if w.engine_load is not None:
                load.running_requests = w.engine_load.running_requests
                load.waiting_requests = w.engine_load.waiting_requests
                load.token_usage = w.engine_load.token_usage
                load.gen_throughput = w.engine_load.gen_throughput
                load.update_time.CopyFrom(_timestamp(
                    time.time() - (time.monotonic() - w.engine_load.update_time)))
            loads.append(load)
        return admin_pb.GetLoadsResponse(loads=loads)

    async def FlushCache(self, request: admin_pb.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb.FlushCacheResponse:
        workers = self.router.registry.all()
        if request.url:
            workers = [w for w in workers if w.url == normalize_url(request.url)]
            if not workers:
                raise not_found("worker", request.url, DOMAIN)
        results = []
        for worker in workers:
            client = self.router.client(worker)
            if worker.connection_mode is ConnectionMode.HTTP:
                ok, message = await client.flush_cache(30)  # type: ignore[attr-defined]
                results.append(admin_pb.FlushCacheResult(url=worker.url, success=ok,
                                                         message=message))
                continue
            try:
                reply = await self.router.client(worker).stub.FlushCache(
                    common_pb2.FlushCacheRequest(), timeout=30)
                results.append(admin_pb.FlushCacheResult(
                    url=worker.url, success=reply.success, message=reply.message))
            except grpc.aio.AioRpcError as exc:
                results.append(admin_pb.FlushCacheResult(
                    url=worker.url, success=False, message=f"{exc.code().name}: {exc.details()}"))
        return admin_pb.FlushCacheResponse(results=results)


class RouterLeases(lease_grpc.RouterLeaseServiceServicer):
    """Worker leases: the gateway relays HTTP workers' requests, the router selects and accounts
    (see proto/sglmesh/router/v1/router_lease.proto)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def AcquireWorker(self, request: lease_pb.AcquireWorkerRequest,
                            context: grpc.aio.ServicerContext) -> lease_pb.AcquireWorkerResponse:
        if request.attempt < 0:
            raise invalid_argument("attempt", "attempt must be >= 0", domain=DOMAIN)
        info = SelectionInfo(routing_key=request.routing_key, request_id=request.request_id,
                             text=request.routing_text)
        lease = await self.router.acquire_lease(
            request.model_id, info, request.attempt, set(request.exclude_urls),
            request.target_worker)
        return lease_pb.AcquireWorkerResponse(lease=lease_pb.WorkerLease(
            id=lease.id, url=lease.worker.url,
            connection_mode=_CONNECTION_MODE[lease.worker.connection_mode],
            model_id=lease.model_id, attempt=lease.attempt,
            expire_time=_timestamp(time.time() + (lease.expires - time.monotonic()))))

    async def ReleaseWorker(self, request: lease_pb.ReleaseWorkerRequest,
                            context: grpc.aio.ServicerContext) -> lease_pb.ReleaseWorkerResponse:
        if not request.id:
            raise invalid_argument("id", "the lease id is required", domain=DOMAIN)
        code = request.status_code or "OK"
        if code not in grpc.StatusCode.__members__:
            raise invalid_argument("status_code", f"unknown status code name {code!r}",
                                   domain=DOMAIN)
        release = self.router.release_lease(request.id, code, request.relayed, request.message)
        backoff = duration_pb2.Duration()
        backoff.FromNanoseconds(int(release.backoff * 1e9))
        return lease_pb.ReleaseWorkerResponse(retry=release.retry, backoff=backoff)


__all__ = ["SchedulerProxy", "RouterAdmin", "RouterLeases"]
