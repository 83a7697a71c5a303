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
    parser.add_argument("--workers", type=int, default=1, help="Embedded workers to start.")
    parser.add_argument("--model-path", default="",
                        help="Model directory for the workers (default: embedded SmolLM2-135M).")
    parser.add_argument("--history-db", default="",
                        help="History database URL (default: SQLite file ./sglmesh-history.db).")
    parser.add_argument("--policy", default="round_robin", help="Router policy.")
    parser.add_argument("--log-dir", type=Path, default=Path(".sglmesh") / "logs",
                        help="One log file per service.")
    parser.add_argument("--log-level", default="info", help="Log level of every service.")
    parser.add_argument("--trace-file", default="", help="Write every service's spans here.")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="Seconds to wait for the suite to become healthy.")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return run_suite(SuiteConfig(
        host=args.host, port=args.port, workers=args.workers, model_path=args.model_path,
        history_db=args.history_db, policy=args.policy, log_dir=args.log_dir,
        log_level=args.log_level, trace_file=args.trace_file,
        startup_timeout=args.startup_timeout))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: sglmesh {{up,{','.join(SERVICES)}}} [options]\n"
             "  sglmesh up             start the whole suite (gateway on :8000)\n"
             "  sglmesh <service> ...  run one service (see sglmesh <service> --help)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command == "up":
        sys.exit(_up(rest))
    if command in SERVICES:
        sys.argv = [f"sglmesh {command}", *rest]
        runpy.run_module(f"services.{command}", run_name="__main__", alter_sys=True)
        return
    print(f"sglmesh: unknown command {command!r}\n{usage}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
