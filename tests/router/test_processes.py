"""The router as a process (``python -m services.router``) over sim worker processes
(``python -m services.worker --engine sim``): flags, precise cache_aware, PD, admin API."""

from __future__ import annotations

import asyncio
import time

from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel, free_port
from tests.procs import ServiceProcess
from tests.router.fleet import gen

SIM = ["--engine", "sim", "--sim-decode-ms", "2", "--sim-prefill-ms-per-token", "0",
       "--sim-block-size", "4"]


async def _ready_workers(admin: admin_grpc.RouterAdminServiceStub, count: int) -> list:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = await admin.ListWorkers(admin_pb.ListWorkersRequest())
        if sum(w.health == admin_pb.WORKER_HEALTH_READY for w in listed.workers) >= count:
            return list(listed.workers)
        await asyncio.sleep(0.1)
    raise TimeoutError("workers not ready")


async def _generate(stub: pb_grpc.SglangSchedulerStub, ids: list[int], rid: str
                    ) -> tuple[str, int]:
    call = stub.Generate(gen(ids, rid, max_new=3))
    last = None
    async for response in call:
        last = response
    worker = dict(await call.initial_metadata()).get("x-sglmesh-worker", "")
    assert last is not None
    return str(worker), last.complete.cached_tokens


async def test_router_process_routes_by_kv_events_of_sim_worker_processes() -> None:
    with ServiceProcess("worker", SIM) as w1, ServiceProcess("worker", SIM) as w2, \
            ServiceProcess("router", ["--worker-urls", f"grpc://{w1.target}",
                                      f"grpc://{w2.target}", "--health-success-threshold",
                                      "1"]) as router:
        channel = create_channel(router.target)
        try:
            admin = admin_grpc.RouterAdminServiceStub(channel)
            stub = pb_grpc.SglangSchedulerStub(channel)
            workers = await _ready_workers(admin, 2)
            assert {w.circuit_state for w in workers} == {admin_pb.CIRCUIT_STATE_CLOSED}
            models = await admin.ListModels(admin_pb.ListModelsRequest())
            assert models.models[0].policy == "cache_aware"  # the default, as in SMG
            await asyncio.sleep(0.5)  # the KV-event subscriptions come up
            placed = {}
            for p in range(4):
                prompt = list(range(1000 * (p + 1), 1000 * (p + 1) + 40))
                placed[p], cached = await _generate(stub, prompt, f"first-{p}")
                assert cached == 0
            assert len(set(placed.values())) == 2  # misses spread over both workers
            await asyncio.sleep(0.3)  # the stored blocks reach the router as events
            for p in range(4):
                prompt = list(range(1000 * (p + 1), 1000 * (p + 1) + 40)) + [5, 6, 7]
                worker, cached = await _generate(stub, prompt, f"again-{p}")
                assert worker == placed[p] and cached >= 36
        finally:
            await channel.close()


async def test_router_process_in_pd_mode() -> None:
    bootstrap = free_port()
    with ServiceProcess("worker", SIM + ["--disaggregation-mode", "prefill",
                                         "--bootstrap-port", str(bootstrap)]) as prefill, \
            ServiceProcess("worker", SIM + ["--disaggregation-mode", "decode"]) as decode, \
            ServiceProcess("router", ["--pd-disaggregation",
                                      "--prefill", f"grpc://{prefill.target}", str(bootstrap),
                                      "--decode", f"grpc://{decode.target}",
                                      "--prefill-policy", "round_robin",
                                      "--health-success-threshold", "1"]) as router:
        channel = create_channel(router.target)
        try:
            admin = admin_grpc.RouterAdminServiceStub(channel)
            workers = {w.url: w for w in await _ready_workers(admin, 2)}
            p = workers[f"grpc://{prefill.target}"]
            assert p.worker_type == admin_pb.WORKER_TYPE_PREFILL and p.bootstrap_port == bootstrap
            assert workers[f"grpc://{decode.target}"].worker_type == admin_pb.WORKER_TYPE_DECODE
            stub = pb_grpc.SglangSchedulerStub(channel)
            worker, cached = await _generate(stub, list(range(10, 50)), "pd-1")
            assert worker == f"grpc://{decode.target}" and cached == 39
        finally:
            await channel.close()


def test_bad_flags_name_the_flag() -> None:
    proc = ServiceProcess("router", ["--pd-disaggregation", "--decode", "grpc://x:1"],
                          wait_ready=False).start()
    assert proc.proc is not None
    assert proc.proc.wait(30) != 0
    assert "--pd-disaggregation" in proc.logs()
