"""``sglmesh up``: every service as its own process on loopback, health-gated, stopped together.

Start order follows dependencies: history and workers, then the router (registers the workers),
the tokenizer, and last the gateway. A child that dies is reported with its log file, and the
whole suite stops: nothing is restarted silently.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.net import CHANNEL_OPTIONS, dial_target, free_port, reserve_port

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the supervisor dies, so no process is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class StartupError(RuntimeError):
    pass


@dataclass
class SuiteConfig:
    """What ``sglmesh up`` starts."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    worker_engine: str = "torch"
    worker_args: list[str] = field(default_factory=list)
    prefill_workers: int = 0
    decode_workers: int = 0
    model_path: str = ""
    history_db: str = ""
    history_backend: str = "sql"
    policy: str = "cache_aware"
    embedded: bool = False  # router and tokenizer inside the gateway process (lowest overhead)
    log_dir: Path = field(default_factory=lambda: Path(".sglmesh") / "logs")
    log_level: str = "info"
    log_json: bool = False
    trace_file: str = ""
    otlp_endpoint: str = ""
    state_file: Path = field(default_factory=lambda: Path(".sglmesh") / "state.json")
    startup_timeout: float = 600.0
    stop_grace: float = 40.0  # above the gateway's --graceful-shutdown-secs (30)


class Suite:
    def __init__(self, config: SuiteConfig, out: object = sys.stdout,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.children: list[Child] = []
        self.out = out
        # Internal channels ignore HTTP proxies themselves (services.common.net), so the
        # environment is passed on unchanged.
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        reserve_port(config.port)

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)  # type: ignore[call-overload]

    def _service(self, name: str, port: int, *args: str, host: str = "127.0.0.1") -> Child:
        common = ["--host", host, "--port", str(port), "--log-level", self.config.log_level]
        if self.config.log_json:
            common.append("--log-json")
        if self.config.otlp_endpoint:
            common += ["--otlp-endpoint", self.config.otlp_endpoint]
        if name != "gateway":  # the gateway serves /metrics on its own port
            metrics_port = free_port()
            common += ["--metrics-port", str(metrics_port)]
            self.metrics_ports[f"{name}-{port}" if name == "worker" else name] = metrics_port
        if self.config.trace_file:
            common += ["--trace-file", self.config.trace_file]
        label = name if name != "worker" else f"worker-{port}"
        child = Child(label, [sys.executable, "-m", f"services.{name}", *common, *args],
                      self.config.log_dir / f"{label}.log")
        child.start(self.env)
        self.children.append(child)
        return child

    def _wait_grpc(self, child: Child, port: int, deadline: float, what: str) -> None:
        channel = grpc.insecure_channel(dial_target("127.0.0.1", port), options=CHANNEL_OPTIONS)
        stub = health_pb2_grpc.HealthStub(channel)
        began = time.monotonic()
        next_progress = began + 5
        try:
            while time.monotonic() < deadline:
                if time.monotonic() >= next_progress:
                    # Progress for slow starts (model conversion): the child's latest log line.
                    last = child.tail(1).strip()
                    self.say(f"  ... {child.name} {what} ({time.monotonic() - began:.0f}s)"
                             + (f": {last[-120:]}" if last else ""))
                    next_progress = time.monotonic() + 5
                if not child.alive():
                    raise StartupError(f"{child.name} exited while {what}; log {child.log_path}:\n"
                                       f"{child.tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == (
                            health_pb2.HealthCheckResponse.SERVING):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
            raise StartupError(f"{child.name} not ready after {self.config.startup_timeout:.0f}s "
                               f"({what}); log {child.log_path}:\n{child.tail()}")
        finally:
            channel.close()

    def start(self) -> str:
        """Starts everything; returns the gateway URL once /health says ok."""
        cfg = self.config
        deadline = time.monotonic() + cfg.startup_timeout
        started = time.monotonic()
        history_port, router_port, tokenizer_port = free_port(), free_port(), free_port()
        pd = cfg.prefill_workers > 0 or cfg.decode_workers > 0
        if pd and (cfg.prefill_workers < 1 or cfg.decode_workers < 1):
            raise StartupError("PD mode needs at least one prefill and one decode worker")
        roles = (["prefill"] * cfg.prefill_workers + ["decode"] * cfg.decode_workers if pd
                 else ["regular"] * cfg.workers)
        worker_ports = [free_port() for _ in roles]
        self.ports = ({"history": history_port, "gateway": cfg.port} if cfg.embedded else
                      {"history": history_port, "router": router_port,
                       "tokenizer": tokenizer_port, "gateway": cfg.port})
        self.ports.update({f"worker-{i}": port for i, port in enumerate(worker_ports)})
        history_db = cfg.history_db or f"sqlite+aiosqlite:///{Path.cwd() / 'sglmesh-history.db'}"

        backend = (history_db.split("://")[0] if cfg.history_backend == "sql"
                   else cfg.history_backend)
        self.say(f"starting history ({backend})")
        history = self._service("history", history_port, "--history-backend",
                                cfg.history_backend, "--history-db", history_db)
        model_path = cfg.model_path
        if cfg.worker_engine == "sim" and not model_path:
            # Sim workers have no model, but serving the embedded model's tokenizer and config
            # lets the whole chat path run against them.
            from services.worker.config import WorkerConfig
            from services.worker.model_store import ensure_embedded_model

            self.say("preparing the embedded model's tokenizer for the sim workers")
            model_path = str(ensure_embedded_model(
                Path(WorkerConfig(engine="sim").model_cache_dir).expanduser()))
        workers = []
        bootstrap_ports: dict[int, int] = {}
        for role, port in zip(roles, worker_ports, strict=True):
            args = ["--engine", cfg.worker_engine]
            if model_path:
                args += ["--model-path", model_path]
            if role != "regular":
                args += ["--disaggregation-mode", role]
                if role == "prefill":
                    bootstrap_ports[port] = free_port()
                    args += ["--bootstrap-port", str(bootstrap_ports[port])]
            args += cfg.worker_args
            note = " (first start converts the model, ~30 s)" if cfg.worker_engine == "torch" else ""
            self.say(f"starting {cfg.worker_engine} worker ({role}) on :{port}{note}")
            workers.append((self._service("worker", port, *args), port))
        self._wait_grpc(history, history_port, deadline, "starting history")
        for child, port in workers:
            self._wait_grpc(child, port, deadline, "loading the model")
            self.say(f"  {child.name} ready")
        worker_urls = [f"grpc://127.0.0.1:{port}" for port in worker_ports]
        if pd:
            router_args = ["--policy", cfg.policy, "--pd-disaggregation"]
            for role, port in zip(roles, worker_ports, strict=True):
                if role == "prefill":
                    router_args += ["--prefill", f"grpc://127.0.0.1:{port}",
                                    str(bootstrap_ports[port])]
            for role, port in zip(roles, worker_ports, strict=True):
                if role == "decode":
                    router_args += ["--decode", f"grpc://127.0.0.1:{port}"]
        else:
            router_args = ["--policy", cfg.policy, "--worker-urls", *worker_urls]
        if cfg.embedded:
            self.say(f"starting gateway on {cfg.host}:{cfg.port} with the router ({cfg.policy}, "
                     f"{len(worker_urls)} workers) and the tokenizer embedded")
            gateway = self._service(
                "gateway", cfg.port, "--router", "embedded", "--router-args",
                shlex.join(router_args), "--tokenizer", "embedded",
                "--history", f"127.0.0.1:{history_port}", host=cfg.host)
        else:
            self.say(f"starting router ({cfg.policy}, {len(worker_urls)} workers)")
            router = self._service("router", router_port, *router_args)
            self.say("starting tokenizer")
            tokenizer = self._service("tokenizer", tokenizer_port)
            self._wait_grpc(router, router_port, deadline, "starting")
            self._wait_grpc(tokenizer, tokenizer_port, deadline, "starting")
            self.say(f"starting gateway on {cfg.host}:{cfg.port}")
            # The gateway binds where the user asked; everything else stays on loopback.
            gateway = self._service(
                "gateway", cfg.port, "--router", f"127.0.0.1:{router_port}",
                "--tokenizer", f"127.0.0.1:{tokenizer_port}",
                "--history", f"127.0.0.1:{history_port}", host=cfg.host)
        url = f"http://{dial_target(cfg.host, cfg.port)}"
        with httpx.Client(trust_env=False) as client:
            while time.monotonic() < deadline:
                if not gateway.alive():
                    raise StartupError(f"gateway exited; log {gateway.log_path}:\n{gateway.tail()}")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        dead = self.first_dead()
                        if dead is not None:  # e.g. its port was taken by another process
                            raise StartupError(f"{dead.name} exited during start-up; log "
                                               f"{dead.log_path}:\n{dead.tail()}")
                        self.say(f"sglmesh is up in {time.monotonic() - started:.1f}s: {url}/v1 "
                                 f"(logs in {cfg.log_dir})")
                        metrics = ", ".join(f"{name} :{port}"
                                            for name, port in self.metrics_ports.items())
                        self.say(f"metrics: gateway {url}/metrics, {metrics}")
                        self.write_state(url)
                        return url
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise StartupError(f"gateway not healthy in time; log {gateway.log_path}:\n{gateway.tail()}")

    def write_state(self, url: str) -> None:
        """Where everything runs, for ``sglmesh status`` and for humans."""
        state = {
            "gateway_url": url,
            "ports": self.ports,
            "metrics_ports": self.metrics_ports,
            "supervisor_pid": os.getpid(),
            "children": [{"name": c.name, "pid": c.proc.pid if c.proc else None,
                          "log": str(c.log_path)} for c in self.children],
        }
        self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.config.state_file.write_text(json.dumps(state, indent=2))

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def stop(self) -> None:
        # Reverse start order: the gateway stops taking requests and drains first, then the
        # router lets in-flight streams finish, then the workers.
        for child in reversed(self.children):
            child.stop(self.config.stop_grace)
        try:
            self.config.state_file.unlink()
        except FileNotFoundError:
            pass


def run_suite(config: SuiteConfig) -> int:
    suite = Suite(config)
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        suite.start()
        suite.say("press Ctrl-C to stop")
        while not stop["signal"]:
            dead = suite.first_dead()
            if dead is not None:
                suite.say(f"{dead.name} exited with {dead.proc.returncode if dead.proc else '?'}; "
                          f"log {dead.log_path}:\n{dead.tail()}\nstopping sglmesh")
                return 1
            time.sleep(0.5)
        return 0
    except StartupError as exc:
        suite.say(f"sglmesh failed to start: {exc}")
        return 1
    finally:
        suite.say("stopping sglmesh")
        suite.stop()
