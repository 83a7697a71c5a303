"""grpc.health follows the database: NOT_SERVING while it is unreachable, SERVING again after.

The database is real PostgreSQL; the outage is a cut TCP link (tests/history/netcut.py), so
the shared server keeps running for everyone else. test_durability.py restarts the server
itself.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.history.v1 import history_pb2 as pb
from sglmesh.history.v1 import history_pb2_grpc

from services.common.errors import ErrorCode, error_details
from services.common.net import CHANNEL_OPTIONS
from services.history.domain import StorageUnavailable
from services.history.health import DatabaseProbe
from tests.procs import ServiceProcess

from .conftest import fresh_pg_database
from .netcut import TcpRelay
from .test_server import message

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_probe_transitions_and_pokes() -> None:
    reachable = True
    pings = 0
    changes: list[bool] = []

    async def ping() -> None:
        nonlocal pings
        pings += 1
        if not reachable:
            raise StorageUnavailable("connection refused")

    async def on_change(up: bool) -> None:
        changes.append(up)

    probe = DatabaseProbe(ping, on_change, interval=30.0, min_gap=0.01)
    task = asyncio.create_task(probe.run())
    try:
        await asyncio.sleep(0.05)
        assert pings == 1 and changes == []  # up at start: no transition
        reachable = False
        probe.poke()  # a request failed: probe at once, not in 30 s
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.01)
        assert changes == [False] and not probe.up
        reachable = True  # while down it probes every 0.5 s
        for _ in range(150):
            if len(changes) == 2:
                break
            await asyncio.sleep(0.01)
        assert changes == [False, True] and probe.up
    finally:
        task.cancel()


def _health(stub: health_pb2_grpc.HealthStub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _wait_health(stub: health_pb2_grpc.HealthStub, want: int, within: float) -> float:
    start = time.monotonic()
    while _health(stub) != want:
        assert time.monotonic() - start < within, f"health not {want} after {within}s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_health_follows_database_reachability() -> None:
    with fresh_pg_database() as url, TcpRelay("127.0.0.1", 5432) as relay:
        relayed = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        args = ["--history-db", relayed, "--probe-interval", "0.5", "--op-timeout", "2"]
        with ServiceProcess("history", args, ready_timeout=60) as proc:
            channel = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
            try:
                health = health_pb2_grpc.HealthStub(channel)
                stub = history_pb2_grpc.HistoryServiceStub(channel)
                conv = stub.CreateConversation(pb.CreateConversationRequest(
                    tenant="t", items=[message("before")]), timeout=10).conversation

                relay.cut()
                _wait_health(health, NOT_SERVING, within=5)
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetConversation(pb.GetConversationRequest(
                        tenant="t", conversation_id=conv.id), timeout=10)
                assert time.monotonic() - start < 4
                info = error_details(err.value)
                assert info.code is ErrorCode.UNAVAILABLE and info.reason == "STORAGE_UNAVAILABLE"
                time.sleep(1.0)
                assert _health(health) == NOT_SERVING  # stays down while the link is cut

                relay.restore()
                _wait_health(health, SERVING, within=10)
                got = stub.ListConversationItems(pb.ListConversationItemsRequest(
                    tenant="t", conversation_id=conv.id), timeout=10).items
                assert len(got) == 1
                stub.CreateConversationItems(pb.CreateConversationItemsRequest(
                    tenant="t", conversation_id=conv.id, items=[message("after")]), timeout=10)
            finally:
                channel.close()
