"""Real ``sim`` workers (services.worker.sim_server) served in this process, and a Router on them.

The sim workers are the real worker contract over the simulated engine: real gRPC servers on
loopback ports, real failure injection (``sim_error_rate`` fails requests with UNAVAILABLE),
real KV events. Running them in-process keeps the router tests fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.router.config import RouterConfig
from services.router.router import DispatchState, RequestHints, Router
from services.router.workers import Health
from services.worker.config import WorkerConfig
from services.worker.sim_server import SimWorker, build_sim_worker

FAST_SIM: dict[str, Any] = dict(sim_decode_ms=1.0, sim_decode_ms_per_running=0.0,
                                sim_prefill_ms_per_token=0.0, sim_block_size=4,
                                sim_max_total_tokens=4096)


def sim_config(**kw: Any) -> WorkerConfig:
    return WorkerConfig(**{"engine": "sim", "host": "127.0.0.1", "port": 0, **FAST_SIM, **kw})


@asynccontextmanager
async def sim_fleet(*configs: WorkerConfig) -> AsyncIterator[list[SimWorker]]:
    workers = [build_sim_worker(c) for c in configs]
    try:
        for w in workers:
            await w.start()
        yield workers
    finally:
        await asyncio.gather(*(w.stop(0) for w in workers), return_exceptions=True)


def url(worker: SimWorker) -> str:
    return f"grpc://127.0.0.1:{worker.port}"


def router_config(**kw: Any) -> RouterConfig:
    base: dict[str, Any] = dict(health_check_interval_secs=3600, health_success_threshold=1,
                                retry_initial_backoff_ms=1, retry_max_backoff_ms=5,
                                disable_load_monitoring=True)
    return RouterConfig(**{**base, **kw})


@asynccontextmanager
async def running_router(workers: Sequence[SimWorker], **kw: Any) -> AsyncIterator[Router]:
    config = router_config(worker_urls=[url(w) for w in workers], **kw)
    router = Router(config)
    await router.start()
    try:
        await wait_registered(router, len(workers))
        yield router
    finally:
        await router.stop()


async def wait_registered(router: Router, count: int, timeout: float = 10.0) -> None:
    async def ready() -> None:
        while sum(w.health is Health.READY for w in router.registry.all()) < count:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(ready(), timeout)


def gen(ids: Sequence[int], rid: str, max_new: int = 4, stream: bool = True) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid, tokenized=pb.TokenizedInput(input_ids=list(ids)), stream=stream,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new))


async def generate(router: Router, request: pb.GenerateRequest,
                   hints: RequestHints | None = None) -> tuple[list[pb.GenerateResponse],
                                                                DispatchState]:
    state = DispatchState()
    out = [r async for r in router.generate(request, hints or RequestHints(), state)]
    return out, state


def replace(config: WorkerConfig, **kw: Any) -> WorkerConfig:
    return dataclasses.replace(config, **kw)


@asynccontextmanager
async def router_server(router: Router) -> AsyncIterator[str]:
    """The router's real gRPC server (data plane + admin) on a free loopback port."""
    from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    from services.common.grpc_server import GrpcServer
    from services.router.server import RouterAdmin, SchedulerProxy

    server = GrpcServer(router.config)
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server, SchedulerProxy(router),
                       "sglang.grpc.scheduler.SglangScheduler")
    server.add_service(admin_grpc.add_RouterAdminServiceServicer_to_server, RouterAdmin(router),
                       "sglmesh.router.v1.RouterAdminService")
    port = await server.start()
    await server.set_serving(True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
