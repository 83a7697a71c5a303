"""Admission: concurrency limit, FIFO queue, queue timeout, rate limit, permits held per stream.

Unit tests drive :class:`Admission` directly; the last tests go through the router's real gRPC
server to real ``sim`` workers (in this process) and read the ErrorInfo a caller gets.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import ErrorCode, ServiceError, error_details
from services.common.net import create_channel
from services.router.admission import Admission, auto_max_concurrent
from services.router.config import RouterConfig
from tests.router.fleet import gen, router_server, running_router, sim_config, sim_fleet


async def test_concurrency_limit_then_fifo_queue() -> None:
    adm = Admission(max_concurrent=2, queue_size=3, queue_timeout=5)
    p1, p2 = await adm.acquire(), await adm.acquire()
    assert adm.in_flight == 2
    order: list[int] = []

    async def wait(i: int) -> None:
        permit = await adm.acquire()
        order.append(i)
        await asyncio.sleep(0)
        permit.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert adm.queue_depth == 3
    with pytest.raises(ServiceError) as exc:  # a fourth waiter finds the queue full
        await adm.acquire()
    assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert exc.value.reason == "ADMISSION_QUEUE_FULL" and adm.rejected_full == 1
    p1.release()
    p1.release()  # idempotent
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    p2.release()
    assert adm.in_flight == 0 and adm.queue_depth == 0


async def test_queue_timeout_is_unavailable() -> None:
    adm = Admission(max_concurrent=1, queue_size=5, queue_timeout=0.05)
    held = await adm.acquire()
    with pytest.raises(ServiceError) as exc:
        await adm.acquire()
    assert exc.value.code is ErrorCode.UNAVAILABLE
    assert exc.value.reason == "ADMISSION_QUEUE_TIMEOUT"
    assert exc.value.metadata["retry_after_secs"] == "1"
    assert adm.queue_depth == 0 and adm.rejected_timeout == 1
    held.release()
    assert adm.in_flight == 0


async def test_no_queue_rejects_at_once() -> None:
    adm = Admission(max_concurrent=1, queue_size=0)
    held = await adm.acquire()
    with pytest.raises(ServiceError) as exc:
        await adm.acquire()
    assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED
    held.release()


async def test_cancelled_waiter_leaves_no_trace() -> None:
    adm = Admission(max_concurrent=1, queue_size=5, queue_timeout=5)
    held = await adm.acquire()
    task = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert adm.queue_depth == 0
    held.release()
    assert adm.in_flight == 0
    (await adm.acquire()).release()


async def test_rate_limit_meters_admissions() -> None:
    adm = Admission(max_concurrent=0, queue_size=100, queue_timeout=5, rate=50)
    loop = asyncio.get_running_loop()
    start = loop.time()
    permits = [await adm.acquire() for _ in range(60)]  # burst of 50, then 10 more at 50/s
    elapsed = loop.time() - start
    assert 0.12 <= elapsed < 1.0
    for p in permits:
        p.release()


def test_disabled_admission_admits_everything() -> None:
    adm = Admission(max_concurrent=0, rate=0)
    assert not adm.enabled and all(adm.try_acquire() for _ in range(10000))


def test_config_defaults_and_validation() -> None:
    cfg = RouterConfig()
    assert (cfg.max_concurrent_requests, cfg.queue_size, cfg.queue_timeout_secs,
            cfg.rate_limit_tokens_per_second) == (-1, 100, 60.0, 0.0)
    assert auto_max_concurrent() >= 4096
    with pytest.raises(ValueError, match="--queue-size"):
        RouterConfig(queue_size=-1)
    with pytest.raises(ValueError, match="--max-concurrent-requests"):
        RouterConfig(max_concurrent_requests=-2)


async def test_permit_is_held_until_the_stream_ends_over_grpc() -> None:
    async with sim_fleet(sim_config(sim_decode_ms=20.0)) as workers, \
            running_router(workers, max_concurrent_requests=1, queue_size=1,
                           queue_timeout_secs=0.3) as router, \
            router_server(router) as target:
        channel = create_channel(target)
        stub = pb_grpc.SglangSchedulerStub(channel)
        try:
            first = stub.Generate(gen(range(5, 20), "long", max_new=30))
            await first.read()  # streaming: the permit is held
            assert router.admission.in_flight == 1
            # One may queue; it times out while the first still streams -> UNAVAILABLE.
            with pytest.raises(grpc.aio.AioRpcError) as queued:
                async for _ in stub.Generate(gen(range(5, 20), "q")):
                    pass
            assert queued.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_details(queued.value).reason == "ADMISSION_QUEUE_TIMEOUT"
            # With the queue taken, the next is refused at once -> RESOURCE_EXHAUSTED.
            waiting = asyncio.ensure_future(_drain(stub, "w"))
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                async for _ in stub.Generate(gen(range(5, 20), "f")):
                    pass
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error_details(full.value)
            assert details.reason == "ADMISSION_QUEUE_FULL" and details.domain == "sglmesh.router"
            first.cancel()  # the first stream ends (cancelled): its permit goes to the waiter
            assert await waiting == "complete"
            assert router.admission.in_flight == 0 and router.admission.queue_depth == 0
        finally:
            await channel.close()


async def _drain(stub: pb_grpc.SglangSchedulerStub, rid: str) -> str:
    last = None
    async for response in stub.Generate(gen(range(5, 20), rid)):
        last = response
    assert last is not None
    return str(last.WhichOneof("response"))
