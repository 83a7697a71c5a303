"""``sglmesh status``: the running suite's services, workers and models, as a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc

from services.common.net import CHANNEL_OPTIONS

_SERVICES = ("history", "tokenizer", "router")


def _grpc_health(target: str) -> str:
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=3)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as exc:
        return f"DOWN ({exc.code().name})"  # type: ignore[attr-defined]


def _enum(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def collect(state: dict[str, Any]) -> dict[str, Any]:
    """Asks every service how it is; returns a JSON-able report."""
    ports = state.get("ports", {})
    report: dict[str, Any] = {"services": {}, "workers": [], "models": []}
    gateway_url = state.get("gateway_url", "")
    if gateway_url:
        try:
            health = httpx.get(f"{gateway_url}/health", timeout=5, trust_env=False)
            report["services"]["gateway"] = ("SERVING" if health.status_code == 200
                                             else f"UNHEALTHY ({health.status_code})")
        except httpx.HTTPError as exc:
            report["services"]["gateway"] = f"DOWN ({type(exc).__name__})"
    for name in _SERVICES:
        if name in ports:
            report["services"][name] = _grpc_health(f"127.0.0.1:{ports[name]}")
    for name, port in sorted(ports.items()):
        if name.startswith("worker"):
            report["services"][name] = _grpc_health(f"127.0.0.1:{port}")
    if "router" in ports:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ports['router']}",
                                       options=CHANNEL_OPTIONS) as channel:
                admin = admin_grpc.RouterAdminServiceStub(channel)
                for w in admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=5).workers:
                    report["workers"].append({
                        "url": w.url, "model": w.model_id,
                        "type": _enum(w.worker_type, admin_pb.WorkerType, "WORKER_TYPE_"),
                        "health": _enum(w.health, admin_pb.WorkerHealth, "WORKER_HEALTH_"),
                        "breaker": _enum(w.circuit_state, admin_pb.CircuitState, "CIRCUIT_STATE_"),
                        "in_flight": w.in_flight_requests, "processed": w.processed_requests,
                    })
                for m in admin.ListModels(admin_pb.ListModelsRequest(), timeout=5).models:
                    report["models"].append({
                        "id": m.id, "workers": m.worker_count, "ready": m.ready_worker_count,
                        "context": m.max_context_length, "policy": m.policy})
        except grpc.RpcError as exc:
            report["router_error"] = exc.code().name  # type: ignore[attr-defined]
    elif gateway_url:  # the router is embedded in the gateway: its admin API over HTTP
        try:
            listed = httpx.get(f"{gateway_url}/workers", timeout=5, trust_env=False).json()
            for w in listed.get("workers", []):
                report["workers"].append({
                    "url": w["url"], "model": w["model_id"],
                    "type": w["worker_type"].removeprefix("WORKER_TYPE_").lower(),
                    "health": w["health"].removeprefix("WORKER_HEALTH_").lower(),
                    "breaker": w["circuit_state"].removeprefix("CIRCUIT_STATE_").lower(),
                    "in_flight": int(w["in_flight_requests"]),
                    "processed": int(w["processed_requests"]),
                })
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            report["router_error"] = f"gateway /workers: {exc!r}"
    return report


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "  (none)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  " + "  ".join(k.upper().ljust(widths[k]) for k in keys)]
    lines += ["  " + "  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def render(report: dict[str, Any], gateway_url: str) -> str:
    services = [{"service": k, "status": v} for k, v in report["services"].items()]
    parts = [f"sglmesh at {gateway_url or '?'}", "services:", _table(services),
             "workers:", _table(report["workers"]), "models:", _table(report["models"])]
    if "router_error" in report:
        parts.append(f"router admin API failed: {report['router_error']}")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sglmesh status", description=__doc__)
    parser.add_argument("--state-file", type=Path, default=Path(".sglmesh") / "state.json",
                        help="Written by `sglmesh up` in its working directory.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    if not args.state_file.exists():
        print(f"no running suite: {args.state_file} not found (start one with `sglmesh up`)",
              file=sys.stderr)
        return 1
    state = json.loads(args.state_file.read_text())
    report = collect(state)
    print(json.dumps(report, indent=2) if args.json else render(report, state.get("gateway_url", "")))
    healthy = all(v == "SERVING" for v in report["services"].values())
    return 0 if healthy else 3
