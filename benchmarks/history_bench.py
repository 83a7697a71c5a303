"""History service throughput and latency over gRPC, against the real service process.

For each backend (SQLite file, PostgreSQL database) it starts ``python -m services.history``,
then measures:

* item appends: W concurrent writers, each appending one ~300-byte message per
  CreateConversationItems call (with a request_id) to a conversation of its own, for
  ``--duration`` seconds after a warm-up; appends/s and p50/p99 latency;
* conversation read: ListConversationItems of a 100-item conversation (page_size=100),
  ``--reads`` times in a row; p50/p99 latency.

    .venv/bin/python benchmarks/history_bench.py                       # both backends
    .venv/bin/python benchmarks/history_bench.py --backends sqlite --writers 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import grpc  # noqa: E402
from google.protobuf import json_format, struct_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from sglmesh.history.v1 import history_pb2 as pb  # noqa: E402
from sglmesh.history.v1 import history_pb2_grpc  # noqa: E402

from services.common.net import CHANNEL_OPTIONS, free_port  # noqa: E402


def message(text: str, role: str = "user") -> pb.Item:
    data = struct_pb2.Struct()
    json_format.ParseDict({"content": [{"type": "input_text", "text": text}]}, data)
    return pb.Item(type="message", role=role, data=data)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@contextmanager
def history_process(db_url: str, extra: list[str]) -> Iterator[str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="history-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.history", "--host", "127.0.0.1", "--port", str(port),
         "--history-db", db_url, "--log-level", "warning", *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    try:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"history exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("history not SERVING in 60 s")
            time.sleep(0.2)
        channel.close()
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)


@contextmanager
def pg_database(admin_dsn: str) -> Iterator[str]:
    name = f"sglmesh_bench_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def appends(target: str, writers: int, duration: float, warmup: float) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = history_pb2_grpc.HistoryServiceStub(channel)
    tenant = f"bench-{secrets.token_hex(4)}"
    convs = [(await stub.CreateConversation(pb.CreateConversationRequest(tenant=tenant),
                                            timeout=30)).conversation.id
             for _ in range(writers)]
    text = "lorem ipsum dolor sit amet " * 10
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def writer(conv: str, w: int) -> None:
        n = 0
        while (now := time.perf_counter()) < stop_at:
            n += 1
            await stub.CreateConversationItems(pb.CreateConversationItemsRequest(
                tenant=tenant, conversation_id=conv, items=[message(text)],
                request_id=f"{conv}-{n}"), timeout=30)
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(writer(c, i) for i, c in enumerate(convs)))
    await channel.close()
    return {"writers": writers, "appends_per_s": len(latencies) / duration,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "samples": len(latencies)}


async def reads(target: str, count: int) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = history_pb2_grpc.HistoryServiceStub(channel)
    tenant = f"bench-{secrets.token_hex(4)}"
    conv = (await stub.CreateConversation(pb.CreateConversationRequest(tenant=tenant),
                                          timeout=30)).conversation.id
    for batch in range(5):
        await stub.CreateConversationItems(pb.CreateConversationItemsRequest(
            tenant=tenant, conversation_id=conv,
            items=[message(f"turn {batch * 20 + i}: " + "lorem ipsum " * 20,
                           "user" if i % 2 == 0 else "assistant") for i in range(20)]),
            timeout=30)
    request = pb.ListConversationItemsRequest(tenant=tenant, conversation_id=conv, page_size=100)
    for _ in range(10):  # warm-up
        await stub.ListConversationItems(request, timeout=30)
    latencies = []
    for _ in range(count):
        t = time.perf_counter()
        reply = await stub.ListConversationItems(request, timeout=30)
        latencies.append(time.perf_counter() - t)
        assert len(reply.items) == 100
    await channel.close()
    return {"items": 100, "reads": count, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000}


def run_backend(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--pool-size", str(args.pool_size)]
    out: dict[str, Any] = {"backend": name, "appends": []}
    with history_process(url, extra) as target:
        for writers in args.writers:
            result = asyncio.run(appends(target, writers, args.duration, args.warmup))
            out["appends"].append(result)
            print(f"{name:10s} appends  writers={writers:<3d} {result['appends_per_s']:8.1f}/s  "
                  f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                  f"({result['samples']} calls)", flush=True)
        out["read"] = asyncio.run(reads(target, args.reads))
        print(f"{name:10s} read 100 items             p50 {out['read']['p50_ms']:7.2f} ms  "
              f"p99 {out['read']['p99_ms']:7.2f} ms  ({args.reads} reads)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--writers", default="1,16",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--pool-size", type=int, default=5, help="the service's --pool-size")
    parser.add_argument("--pg-admin-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print(f"history benchmark: {os.cpu_count()} CPUs, pool size {args.pool_size}, "
          f"{args.duration:g} s per append run", flush=True)
    results = []
    for backend in args.backends.split(","):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                results.append(run_backend("sqlite", f"sqlite+aiosqlite:///{tmp}/bench.db",
                                           args))
        elif backend == "postgresql":
            with pg_database(args.pg_admin_dsn) as url:
                results.append(run_backend("postgresql", url, args))
        else:
            parser.error(f"unknown backend {backend!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
