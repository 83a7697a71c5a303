"""The ``sglmesh`` command: ``sglmesh up`` runs the suite; ``sglmesh <service> ...`` runs one."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

SERVICES = ("gateway", "tokenizer", "router", "history", "worker")


def _up(argv: list[str]) -> int:
    from services.supervisor import SuiteConfig, run_suite

    parser = argparse.ArgumentParser(
        prog="sglmesh up", description="Start every sglmesh service on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="Gateway bind address.")
    parser.add_argument("--port", type=int, default=8000, help="Gateway port.")
    parser.add_argument("--workers", type=int, default=1, help="Workers to start (non-PD mode).")
    parser.add_argument("--worker-engine", default="torch", choices=("torch", "sim"),
                        help="Engine of the started workers (sim: no model, for load tests).")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="Extra flag passed to every worker (repeatable), e.g. "
                             "--worker-arg=--max-running-requests=8.")
    parser.add_argument("--prefill-workers", type=int, default=0,
                        help="PD mode: prefill workers (with --decode-workers).")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="PD mode: decode workers (with --prefill-workers).")
    parser.add_argument("--model-path", default="",
                        help="Model directory for the workers (default: embedded SmolLM2-135M).")
    parser.add_argument("--history-db", default="",
                        help="History database URL (default: SQLite file ./sglmesh-history.db).")
    parser.add_argument("--history-backend", default="sql", choices=("sql", "memory", "none"),
                        help="Where conversations and stored responses live.")
    parser.add_argument("--policy", default="cache_aware", help="Router policy.")
    parser.add_argument("--embedded", action="store_true",
                        help="Run the router and the tokenizer inside the gateway process: "
                             "about half the CPU per request and a third of the added latency "
                             "(benchmarks/gateway_overhead.py); they can no longer be scaled "
                             "apart from the gateway.")
    parser.add_argument("--log-dir", type=Path, default=Path(".sglmesh") / "logs",
                        help="One log file per service.")
    parser.add_argument("--log-level", default="info", help="Log level of every service.")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines.")
    parser.add_argument("--trace-file", default="", help="Write every service's spans here.")
    parser.add_argument("--otlp-endpoint", default="", help="OTLP/gRPC collector for traces.")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="Seconds to wait for the suite to become healthy.")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if (args.prefill_workers > 0) != (args.decode_workers > 0):
        parser.error("PD mode needs both --prefill-workers and --decode-workers")
    return run_suite(SuiteConfig(
        host=args.host, port=args.port, workers=args.workers, worker_engine=args.worker_engine,
        worker_args=args.worker_arg, prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers, model_path=args.model_path,
        history_db=args.history_db, history_backend=args.history_backend, policy=args.policy,
        embedded=args.embedded, log_dir=args.log_dir,
        log_level=args.log_level, log_json=args.log_json, trace_file=args.trace_file,
        otlp_endpoint=args.otlp_endpoint, startup_timeout=args.startup_timeout))


def _status(argv: list[str]) -> int:
    from services.status import main as status_main

    return status_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: sglmesh {{up,status,{','.join(SERVICES)}}} [options]\n"
             "  sglmesh up             start the whole suite (gateway on :8000)\n"
             "  sglmesh status         services, workers and models of a running suite\n"
             "  sglmesh <service> ...  run one service (see sglmesh <service> --help)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command == "up":
        sys.exit(_up(rest))
    if command == "status":
        sys.exit(_status(rest))
    if command in SERVICES:
        sys.argv = [f"sglmesh {command}", *rest]
        runpy.run_module(f"services.{command}", run_name="__main__", alter_sys=True)
        return
    print(f"sglmesh: unknown command {command!r}\n{usage}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
