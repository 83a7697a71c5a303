"""``python -m services.worker.sim_fleet --count 32 --base-port 40000 [worker flags]``.

Many independent ``sim`` workers in ONE process: each has its own engine, radix cache, KV event
log and gRPC server (``sglang.grpc.scheduler.SglangScheduler`` + grpc.health) on its own
loopback port ``base-port + i`` (``--base-port 0`` picks free ports). A router or the real SMG
gateway sees ``--count`` separate workers. Every other flag is a worker flag
(``python -m services.worker --help``), applied to every worker.

PD fleets: ``--prefill-count N`` makes the first N workers prefill workers (bootstrap server on
``--bootstrap-port + i``, or free ports when it is 0) and the rest decode workers.

``--ports-file F`` writes ``{"workers": [{"url", "port", "role", "bootstrap_port"}...]}`` once
every worker is SERVING. One asyncio loop serves them all, so the fleet costs little CPU
beyond the requests it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from services.common.config import parse_config
from services.common.grpc_server import run, wait_for_shutdown
from services.common.logs import setup_logging
from services.common.net import dial_host, format_target
from services.worker.config import WorkerConfig
from services.worker.preflight import PreflightError, preflight_model_path
from services.worker.sim_server import SimWorker, build_sim_worker

log = logging.getLogger("services.worker.sim_fleet")


def fleet_configs(base: WorkerConfig, count: int, base_port: int,
                  prefill_count: int = 0) -> list[WorkerConfig]:
    """One config per worker: ports, roles, bootstrap ports and seeds spread out."""
    configs = []
    for i in range(count):
        role = "" if not prefill_count else ("prefill" if i < prefill_count else "decode")
        configs.append(dataclasses.replace(
            base, port=base_port + i if base_port else 0, metrics_port=-1,
            disaggregation_mode=role,
            bootstrap_port=(base.bootstrap_port + i if base.bootstrap_port else 0)
            if role == "prefill" else base.bootstrap_port,
            sim_seed=base.sim_seed + i))
    return configs


async def start_fleet(configs: list[WorkerConfig], model_dir: Path | None = None
                      ) -> list[SimWorker]:
    workers = [build_sim_worker(c, model_dir) for c in configs]
    try:
        for w in workers:
            await w.start(wait_ready=False)
        await asyncio.gather(*(w.ready() for w in workers))
    except BaseException:
        await stop_fleet(workers)
        raise
    return workers


async def stop_fleet(workers: list[SimWorker]) -> None:
    await asyncio.gather(*(w.stop(0.5) for w in workers), return_exceptions=True)


def describe(workers: list[SimWorker]) -> list[dict[str, object]]:
    return [{"url": f"grpc://{format_target(dial_host(w.config.host), w.port)}", "port": w.port,
             "role": w.config.disaggregation_mode or "regular",
             "bootstrap_port": w.bootstrap.port if w.bootstrap else None} for w in workers]


async def serve_fleet(base: WorkerConfig, count: int, base_port: int, prefill_count: int,
                      ports_file: str, model_dir: Path | None = None) -> None:
    start = time.monotonic()
    workers = await start_fleet(fleet_configs(base, count, base_port, prefill_count), model_dir)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {"workers": describe(workers), "pid": os.getpid(),
            "startup_seconds": round(time.monotonic() - start, 3), "max_rss_mib": round(rss_mib, 1)}
    if ports_file:
        tmp = Path(ports_file + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, ports_file)
    log.warning("sim fleet: %d workers SERVING on %s .. %s in %.2f s (max RSS %.0f MiB)",
                count, workers[0].port, workers[-1].port, info["startup_seconds"], rss_mib)
    await wait_for_shutdown()
    await stop_fleet(workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.worker.sim_fleet",
        description="Many sim workers (SglangScheduler servers) in one process; any other flag "
                    "is a worker flag applied to every worker.")
    parser.add_argument("--count", type=int, default=32, help="number of workers")
    parser.add_argument("--base-port", type=int, default=0,
                        help="worker i listens on base-port + i (0: free ports)")
    parser.add_argument("--prefill-count", type=int, default=0,
                        help="PD fleet: the first N workers are prefill, the rest decode")
    parser.add_argument("--ports-file", default="", help="write the workers' URLs here (JSON)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if not 0 <= args.prefill_count < args.count and args.prefill_count:
        parser.error("--prefill-count must leave at least one decode worker")
    if args.base_port and not 1 <= args.base_port <= 65535 - args.count:
        parser.error("--base-port + --count must stay within 1-65535")
    base = parse_config(WorkerConfig, ["--engine", "sim", *rest])
    if base.engine != "sim":
        parser.error("a fleet is made of sim workers (--engine sim)")
    setup_logging("worker", base.log_level, base.log_json, base.error_log)
    model_dir = None
    if base.model_path:  # a real tokenizer directory for every worker (no weights needed)
        try:
            model_dir = preflight_model_path(base.model_path, require_weights=False).resolve()
        except PreflightError as exc:
            parser.exit(2, f"sim_fleet: error: {exc}\n")
    try:
        run(lambda: serve_fleet(base, args.count, args.base_port, args.prefill_count,
                                args.ports_file, model_dir))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
