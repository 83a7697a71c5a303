"""What reading a worker's ``Generate`` costs the router, per transport: grpc.aio
(``--worker-transport grpcio``) against grpclib (the default, services/router/generate_h2.py).

One ``sim`` worker process with every timing 0 (it answers at once); this process calls its
``Generate`` the way the router does (``WorkerClient.generate``, uvloop), with each transport
in turn, rounds interleaved. Per call: this process's CPU (the client's cost: the router's
share of a request), the worker's CPU (what the client's framing costs the worker), p50
latency and throughput. Non-streaming (one message) and streaming (``--max-tokens`` chunks
and the finish).

    .venv/bin/python benchmarks/worker_transport.py --concurrency 1 16 --calls 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_overhead import Proc, pct, run_level, wait_grpc  # noqa: E402
from benchmarks.proc_cpu import cpu_seconds  # noqa: E402
from services.common.net import free_port  # noqa: E402

TRANSPORTS = ("grpcio", "grpclib")


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    from services.router.worker_client import WorkerClient
    from services.worker.model_store import ensure_embedded_model

    model_dir = ensure_embedded_model(Path(args.model_cache).expanduser())
    port = free_port()
    worker = Proc("worker", [
        "-m", "services.worker", "--port", str(port), "--engine", "sim",
        "--model-path", str(model_dir), "--sim-decode-ms", "0",
        "--sim-decode-ms-per-running", "0", "--sim-prefill-ms-per-token", "0",
        "--max-running-requests", "256", "--log-level", "warning"],
        Path(tempfile.mkdtemp(prefix="sglmesh-transport-")))
    clients: dict[str, WorkerClient] = {}
    rows: list[dict[str, Any]] = []
    try:
        wait_grpc(f"127.0.0.1:{port}", worker)
        clients = {t: WorkerClient(f"grpc://127.0.0.1:{port}", t) for t in TRANSPORTS}
        counter = [0]

        def one(client: WorkerClient, stream: bool) -> Any:
            async def call() -> None:
                counter[0] += 1
                request = pb.GenerateRequest(
                    request_id=f"t-{counter[0]}",
                    tokenized=pb.TokenizedInput(input_ids=list(range(100, 130))),
                    sampling_params=pb.SamplingParams(
                        temperature=0, max_new_tokens=args.max_tokens), stream=stream)
                async for _ in client.generate(request, ()):
                    pass
            return call

        for stream in (False, True):
            for concurrency in args.concurrency:
                samples: dict[str, list[dict[str, float]]] = {t: [] for t in TRANSPORTS}
                for round_ in range(args.repeat):
                    order = TRANSPORTS if round_ % 2 == 0 else TRANSPORTS[::-1]
                    for transport in order:
                        call = one(clients[transport], stream)
                        await run_level(call, args.warmup, min(concurrency, args.warmup))
                        cpu, worker_cpu = time.process_time(), cpu_seconds(worker.proc.pid)
                        start = time.perf_counter()
                        latencies = await run_level(call, args.calls, concurrency)
                        wall = time.perf_counter() - start
                        samples[transport].append({
                            "client_cpu_ms": (time.process_time() - cpu) * 1000 / args.calls,
                            "worker_cpu_ms": (cpu_seconds(worker.proc.pid) - worker_cpu)
                            * 1000 / args.calls,
                            "p50_ms": pct(latencies, 0.5), "rps": args.calls / wall})
                row: dict[str, Any] = {"stream": stream, "concurrency": concurrency}
                for transport, runs in samples.items():
                    row[transport] = {k: round(statistics.median(r[k] for r in runs), 3)
                                      for k in runs[0]}
                row["client_cpu_ratio"] = round(row["grpclib"]["client_cpu_ms"]
                                                / row["grpcio"]["client_cpu_ms"], 3)
                rows.append(row)
                print(summary(row), flush=True)
    finally:
        for client in clients.values():
            await client.close()
        worker.stop()
    return rows


def summary(row: dict[str, Any]) -> str:
    mode = "stream" if row["stream"] else "non-stream"
    parts = [f"{mode:10s} c={row['concurrency']:<3d}"]
    for transport in TRANSPORTS:
        r = row[transport]
        parts.append(f"{transport}: client cpu {r['client_cpu_ms']:.3f} ms/call, worker cpu "
                     f"{r['worker_cpu_ms']:.3f}, p50 {r['p50_ms']:.2f} ms, {r['rps']:.0f}/s")
    parts.append(f"grpclib/grpcio client cpu {row['client_cpu_ratio']:.2f}")
    return " | ".join(parts)


def main() -> None:
    import uvloop  # the router's event loop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--calls", type=int, default=1000, help="calls per level and transport")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per level, transports interleaved; medians reported")
    parser.add_argument("--model-cache", default=os.environ.get(
        "SGLMESH_MODEL_CACHE", "~/.cache/sglmesh/models"))
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = uvloop.run(bench(args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
