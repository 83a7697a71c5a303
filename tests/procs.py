"""Start sglmesh services as real processes on free loopback ports (test harness).

    with ServiceProcess("worker", ["--model-path", d]) as worker:
        channel = grpc.aio.insecure_channel(worker.target)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.net import CHANNEL_OPTIONS, dial_target, free_port

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """``python -m services.<name>`` on a free port; waits for grpc.health SERVING."""

    def __init__(self, name: str, args: list[str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 180.0, wait_ready: bool = True) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.args = list(args or [])
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"sglmesh-{name}-", suffix=".log")[1])

    @property
    def target(self) -> str:
        return dial_target(self.host, self.port)

    def start(self) -> ServiceProcess:
        cmd = [sys.executable, "-m", f"services.{self.name}", "--host", self.host,
               "--port", str(self.port), *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if self.wait_ready:
            self.wait_serving()
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, service: str = "") -> None:
        deadline = time.monotonic() + self.ready_timeout
        channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
            raise TimeoutError(f"{self.name} not SERVING after {self.ready_timeout}s:\n"
                               f"{self.logs()[-4000:]}")
        finally:
            channel.close()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
