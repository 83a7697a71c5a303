"""Does a fleet of sim workers fit in one process on this machine?

Starts ``python -m services.worker.sim_fleet --count N`` as a subprocess, subscribes to every
worker's KV events, drives ``--streams`` concurrent streamed Generate calls per worker
(``--requests`` each, prompts sharing a prefix), and reports:

* start-up time and RSS of the fleet process,
* the fleet process's CPU use (its CPU-time clock) during the load,
* the achieved decode rate per stream against the modelled one (``decode_ms`` + per-running
  growth): a ratio near 1.0 means the process keeps the simulated timing, i.e. it is not
  CPU-bound,
* KV event batches received.

    .venv/bin/python benchmarks/sim_fleet.py --count 32 --streams 4 --requests 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.proc_cpu import cpu_seconds  # noqa: E402
from services.common.net import CHANNEL_OPTIONS  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_stream(stub: pb_grpc.SglangSchedulerStub, worker: int, stream: int,
                     requests: int, prompt: int, output: int) -> list[float]:
    """Returns per-token intervals (ms) after the first token."""
    gaps: list[float] = []
    for r in range(requests):
        shared = [1000 + worker] * (prompt // 2)
        ids = shared + [(stream * 131 + r * 7 + i) % 40000 + 3 for i in range(prompt - len(shared))]
        req = pb.GenerateRequest(
            request_id=f"w{worker}-s{stream}-r{r}", stream=True,
            tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=output))
        last = None
        async for reply in stub.Generate(req):
            now = time.perf_counter()
            if reply.WhichOneof("response") == "chunk":
                if last is not None:
                    gaps.append((now - last) * 1000)
                last = now
    return gaps


async def count_events(stub: pb_grpc.SglangSchedulerStub, counter: list[int]) -> None:
    try:
        async for batch in stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()):
            if not batch.load.load_only:
                counter[0] += 1
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


async def drive(urls: list[str], args: argparse.Namespace, pid: int) -> dict[str, object]:
    channels = [grpc.aio.insecure_channel(u.removeprefix("grpc://"), options=CHANNEL_OPTIONS)
                for u in urls]
    stubs = [pb_grpc.SglangSchedulerStub(c) for c in channels]
    events = [0]
    subs = [asyncio.create_task(count_events(s, events)) for s in stubs]
    await asyncio.sleep(0.5)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    results = await asyncio.gather(*(
        one_stream(stub, w, s, args.requests, args.prompt, args.output)
        for w, stub in enumerate(stubs) for s in range(args.streams)))
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    for task in subs:
        task.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    for c in channels:
        await c.close()
    gaps = sorted(g for r in results for g in r)
    modelled = args.decode_ms + args.decode_ms_per_running * (args.streams - 1)
    tokens = len(urls) * args.streams * args.requests * args.output
    return {"workers": len(urls), "concurrent_streams": len(urls) * args.streams,
            "tokens": tokens, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed), "fleet_cpu_percent": round(100 * cpu / elapsed),
            "itl_modelled_ms": modelled, "itl_p50_ms": round(statistics.median(gaps), 2),
            "itl_p99_ms": round(gaps[int(0.99 * (len(gaps) - 1))], 2),
            "itl_ratio_p50": round(statistics.median(gaps) / modelled, 3),
            "kv_event_batches": events[0], "fleet_rss_mib": round(rss_mib(pid), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams per worker")
    parser.add_argument("--requests", type=int, default=3, help="requests per stream")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--decode-ms", type=float, default=20.0)
    parser.add_argument("--decode-ms-per-running", type=float, default=0.5)
    args = parser.parse_args()
    ports = Path(tempfile.mkdtemp()) / "fleet.json"
    cmd = [sys.executable, "-m", "services.worker.sim_fleet", "--count", str(args.count),
           "--ports-file", str(ports), "--log-level", "warning",
           "--sim-decode-ms", str(args.decode_ms),
           "--sim-decode-ms-per-running", str(args.decode_ms_per_running)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        while not ports.exists():
            if proc.poll() is not None:
                raise SystemExit(f"fleet exited with {proc.returncode}")
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        info = json.loads(ports.read_text())
        idle_rss = rss_mib(proc.pid)
        result = asyncio.run(drive([w["url"] for w in info["workers"]], args, proc.pid))
        result = {"process_start_to_serving_s": round(ready, 2),
                  "fleet_rss_idle_mib": round(idle_rss, 1), **result}
        print(json.dumps(result, indent=1))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
