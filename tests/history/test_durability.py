"""Durability under failure, real processes: concurrent gRPC writers while the history service
is killed with SIGKILL (SQLite), or while PostgreSQL itself is restarted under load.

Every writer sends creates (a conversation with 1-5 items) and appends (1-4 items) with a
request_id, and retries a failed call with the same request_id until it is acknowledged; a
few failed calls are abandoned instead. Afterwards every acknowledged write must be present
and intact, exactly once, and every write that exists at all (acknowledged or abandoned)
must be whole: no conversation or batch with part of its items, no duplicate from a retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.history.v1 import history_pb2 as pb
from sglmesh.history.v1 import history_pb2_grpc

from services.common.errors import ErrorCode, error_details
from services.common.net import CHANNEL_OPTIONS, free_port
from tests.procs import ServiceProcess

from .conftest import fresh_pg_database

CLIENTS = 4
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED}
# Reconnect quickly after a restart (the default backoff grows to seconds).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 500)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _text(op: str, j: int, k: int) -> str:
    pad = hashlib.sha256(f"{op}:{j}".encode()).hexdigest() * 8  # 512 checkable characters
    return f"{op}:{j}/{k}:{pad}"


def _item(op: str, j: int, k: int) -> pb.Item:
    data = struct_pb2.Struct()
    json_format.ParseDict({"content": [{"type": "input_text", "text": _text(op, j, k)}]}, data)
    return pb.Item(type="message", role="user" if j % 2 == 0 else "assistant", data=data)


@dataclass(eq=False)
class Writer(threading.Thread):
    """One client thread: creates and appends for its own tenant until ``stop``."""

    target: str
    tenant: str
    stop: threading.Event
    seed: int
    convs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # id -> (op, ids)
    appends: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # op -> (conv, ids)
    abandoned: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    failures: int = 0

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True, name=f"writer-{self.tenant}")
        self.rng = random.Random(self.seed)
        self.ops = 0

    def call(self, method: Any, request: Any, op: str) -> Any | None:
        """Retries with the same request until acknowledged; may abandon at the first failure."""
        deadline = time.monotonic() + 60
        first = True
        while True:
            try:
                return method(request, timeout=5)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    self.errors.append(f"{op}: {exc.code().name} {exc.details()}")
                    return None
                self.failures += 1
                if first and not self.stop.is_set() and self.rng.random() < 0.2:
                    self.abandoned.add(op)
                    return None
                first = False
                if time.monotonic() > deadline:
                    self.errors.append(f"{op}: not acknowledged within 60 s")
                    return None
                time.sleep(0.05)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS + FAST_RECONNECT)
        stub = history_pb2_grpc.HistoryServiceStub(channel)
        try:
            while not self.stop.is_set() and not self.errors:
                self.ops += 1
                if not self.convs or self.rng.random() < 0.3:
                    op, n = f"{self.tenant}-c{self.ops}", self.rng.randint(1, 5)
                    reply = self.call(stub.CreateConversation, pb.CreateConversationRequest(
                        tenant=self.tenant, metadata={"op": op, "n": str(n)},
                        items=[_item(op, j, n) for j in range(n)], request_id=op), op)
                    if reply is not None:
                        self.convs[reply.conversation.id] = (op, [i.id for i in reply.items])
                else:
                    conv = self.rng.choice(sorted(self.convs))
                    op, k = f"{self.tenant}-a{self.ops}", self.rng.randint(1, 4)
                    reply = self.call(stub.CreateConversationItems,
                                      pb.CreateConversationItemsRequest(
                                          tenant=self.tenant, conversation_id=conv,
                                          items=[_item(op, j, k) for j in range(k)],
                                          request_id=op), op)
                    if reply is not None:
                        self.appends[op] = (conv, [i.id for i in reply.items])
        finally:
            channel.close()


def _all(method: Any, request: Any, field_name: str) -> list[Any]:
    out: list[Any] = []
    while True:
        reply = method(request, timeout=30)
        out += list(getattr(reply, field_name))
        if not reply.next_page_token:
            return out
        request.page_token = reply.next_page_token


def verify(target: str, writers: list[Writer]) -> dict[str, int]:
    """Checks every writer's ledger against what the service returns now."""
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = history_pb2_grpc.HistoryServiceStub(channel)
    totals = {"conversations": 0, "items": 0, "acked": 0, "abandoned": 0, "failures": 0}
    try:
        for w in writers:
            assert not w.errors, w.errors
            totals["acked"] += len(w.convs) + len(w.appends)
            totals["abandoned"] += len(w.abandoned)
            totals["failures"] += w.failures
            conv_of_op = {op: cid for cid, (op, _) in w.convs.items()}
            convs = _all(stub.ListConversations,
                         pb.ListConversationsRequest(tenant=w.tenant, page_size=100),
                         "conversations")
            seen_create_ops: set[str] = set()
            found: dict[str, list[str]] = {}  # op -> item ids, as stored
            for conv in convs:
                op, n = conv.metadata["op"], int(conv.metadata["n"])
                assert op not in seen_create_ops, f"create {op} stored twice"
                seen_create_ops.add(op)
                assert conv_of_op.get(op, conv.id) == conv.id, f"create {op}: other id"
                assert op in conv_of_op or op in w.abandoned, f"create {op} came from nowhere"
                items = _all(stub.ListConversationItems, pb.ListConversationItemsRequest(
                    tenant=w.tenant, conversation_id=conv.id, page_size=100), "items")
                totals["conversations"] += 1
                totals["items"] += len(items)
                groups: list[tuple[str, list[pb.Item]]] = []
                for item in items:
                    text = json_format.MessageToDict(item.data)["content"][0]["text"]
                    item_op, rest = text.split(":", 1)
                    j, k = (int(x) for x in rest.split(":", 1)[0].split("/"))
                    assert text == _text(item_op, j, k), f"item {item.id} corrupted"
                    assert item.role == ("user" if j % 2 == 0 else "assistant")
                    if not groups or groups[-1][0] != item_op:
                        groups.append((item_op, []))
                    groups[-1][1].append(item)
                    assert j == len(groups[-1][1]) - 1 and j < k, f"{item_op} out of order"
                assert groups and groups[0][0] == op and len(groups[0][1]) == n, \
                    f"conversation {conv.id} ({op}) lacks some of its {n} first items"
                for group_op, group in groups:
                    k = int(_text_k(group[0]))
                    assert len(group) == k, f"{group_op}: {len(group)} of {k} items stored"
                    assert group_op not in found, f"{group_op} stored twice"
                    found[group_op] = [i.id for i in group]
                    if group_op != op:
                        acked = w.appends.get(group_op)
                        assert acked is None or acked[0] == conv.id, f"{group_op} misplaced"
                        assert acked is not None or group_op in w.abandoned, \
                            f"append {group_op} came from nowhere"
            for cid, (op, ids) in w.convs.items():
                assert found.get(op) == ids, f"acknowledged create {op} ({cid}) lost"
            for op, (_cid, ids) in w.appends.items():
                assert found.get(op) == ids, f"acknowledged append {op} lost"
    finally:
        channel.close()
    return totals


def _text_k(item: pb.Item) -> str:
    text = json_format.MessageToDict(item.data)["content"][0]["text"]
    return text.split(":", 2)[1].split("/")[1]


@contextmanager
def writers_running(target: str, prefix: str) -> Iterator[list[Writer]]:
    stop = threading.Event()
    writers = [Writer(target, f"{prefix}-{i}", stop, seed=i) for i in range(CLIENTS)]
    for w in writers:
        w.start()
    try:
        yield writers
    finally:
        stop.set()
        for w in writers:
            w.join(90)
    assert not any(w.is_alive() for w in writers), "a writer did not finish"


def _kill(proc: ServiceProcess) -> None:
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def test_sigkill_under_load_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    args = ["--history-db", f"sqlite+aiosqlite:///{db}"]
    port = free_port()
    rng = random.Random(7)
    proc = ServiceProcess("history", args, port=port, ready_timeout=60).start()
    try:
        with writers_running(proc.target, "kill") as writers:
            for _ in range(5):
                time.sleep(rng.uniform(0.3, 1.2))
                _kill(proc)
                proc = ServiceProcess("history", args, port=port, ready_timeout=60).start()
            time.sleep(0.5)
        totals = verify(proc.target, writers)
    finally:
        proc.stop()
    print(f"sqlite durability: {totals}")
    assert totals["acked"] >= 20 and totals["failures"] >= 1, totals

    # The file itself: intact, and no item rows that nothing links to (a half-written write).
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = conn.execute("SELECT count(*) FROM items WHERE pk NOT IN "
                               "(SELECT item_pk FROM conversation_items)").fetchone()[0]
        assert orphans == 0
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == totals["items"]
    finally:
        conn.close()


# ---- PostgreSQL restarted under load ---------------------------------------------------------

def _pg_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster on port 5432 when this process may restart it."""
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster") or not shutil.which("pg_lsclusters"):
        return None
    done = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[2] == "5432":
            return cols[0], cols[1]
    return None


def _pg_ctl(action: str, *extra: str) -> None:
    cluster = _pg_cluster()
    assert cluster is not None
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action, *extra],
                   check=True, capture_output=True, timeout=60)


def _pg_running() -> bool:
    cluster = _pg_cluster()
    assert cluster is not None
    return subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "status"],
                          capture_output=True).returncode == 0


def _pg_wait_accepting(within: float = 30.0) -> None:
    async def ping() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=2)
        await conn.close()

    deadline = time.monotonic() + within
    while True:
        try:
            asyncio.run(ping())
            return
        except (OSError, asyncpg.PostgresError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _ensure_pg_started() -> None:
    if not _pg_running():
        _pg_ctl("start")
    _pg_wait_accepting()


def _health(target: str) -> int:
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5).status
    finally:
        channel.close()


def _wait_health(target: str, want: int, within: float) -> None:
    deadline = time.monotonic() + within
    while _health(target) != want:
        assert time.monotonic() < deadline, f"health not {want} within {within}s"
        time.sleep(0.1)


@pytest.mark.skipif(_pg_cluster() is None,
                    reason="needs root and pg_ctlcluster to restart the PostgreSQL on :5432")
def test_postgres_restarted_under_load() -> None:
    rng = random.Random(11)
    with fresh_pg_database() as url:
        args = ["--history-db", url, "--probe-interval", "0.5", "--op-timeout", "3"]
        with ServiceProcess("history", args, ready_timeout=60) as proc:
            try:
                with writers_running(proc.target, "pg") as writers:
                    for mode in ("fast", "immediate"):  # a clean stop, then a crash + recovery
                        time.sleep(rng.uniform(0.8, 1.5))
                        _pg_ctl("stop", "--mode", mode)
                        try:
                            _wait_health(proc.target, NOT_SERVING, within=5)
                            channel = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
                            try:
                                with pytest.raises(grpc.RpcError) as err:
                                    history_pb2_grpc.HistoryServiceStub(channel).GetConversation(
                                        pb.GetConversationRequest(tenant="x",
                                                                  conversation_id="conv_x"),
                                        timeout=10)
                            finally:
                                channel.close()
                            info = error_details(err.value)
                            assert info.code is ErrorCode.UNAVAILABLE, info
                            assert info.reason == "STORAGE_UNAVAILABLE"
                            time.sleep(0.5)
                        finally:
                            _ensure_pg_started()
                        _wait_health(proc.target, SERVING, within=20)
                    time.sleep(1.0)
            finally:
                _ensure_pg_started()
            totals = verify(proc.target, writers)
        orphans, stored = asyncio.run(_pg_counts(url))
    print(f"postgresql durability: {totals}")
    assert totals["acked"] >= 20 and totals["failures"] >= 1, totals
    assert orphans == 0 and stored == totals["items"]


async def _pg_counts(url: str) -> tuple[int, int]:
    """(items nothing links to, all items) straight from the database."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    try:
        orphans = await conn.fetchval("SELECT count(*) FROM items WHERE pk NOT IN "
                                      "(SELECT item_pk FROM conversation_items)")
        return int(orphans), int(await conn.fetchval("SELECT count(*) FROM items"))
    finally:
        await conn.close()
