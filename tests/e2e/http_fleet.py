"""Process helpers for the HTTP-worker, provider and rerank tests: real sglmesh services.

An "HTTP worker" here is a real OpenAI-compatible server: another sglmesh gateway (in front
of its own router and a sim worker). No stand-ins: every hop is a real process on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai

from tests.procs import ServiceProcess

MODEL = "SmolLM2-135M-Instruct"
FAST_SIM = ["--sim-decode-ms", "2", "--sim-decode-ms-per-running", "0",
            "--sim-prefill-ms-per-token", "0", "--sim-output-tokens", "8"]
FAST_ROUTER = ["--health-check-interval-secs", "1", "--retry-initial-backoff-ms", "5",
               "--retry-max-backoff-ms", "50", "--load-monitor-interval", "1"]


def sim_worker(stack: ExitStack, model_dir: Path, *args: str) -> ServiceProcess:
    return stack.enter_context(ServiceProcess(
        "worker", ["--engine", "sim", "--model-path", str(model_dir), *FAST_SIM, *args]))


def router(stack: ExitStack, *args: str) -> ServiceProcess:
    return stack.enter_context(ServiceProcess("router", [*FAST_ROUTER, *args]))


def wait_http(url: str, proc: ServiceProcess, path: str = "/liveness",
              timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}{path}", trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.proc is not None and proc.proc.poll() is None, proc.logs()[-3000:]
        assert time.monotonic() < deadline, proc.logs()[-3000:]
        time.sleep(0.1)


@contextmanager
def gateway_proc(*args: str, env: dict[str, str] | None = None
                 ) -> Iterator[tuple[str, ServiceProcess]]:
    proc = ServiceProcess("gateway", list(args), env=env, wait_ready=False)
    proc.start()
    url = f"http://127.0.0.1:{proc.port}"
    try:
        wait_http(url, proc)
        yield url, proc
    finally:
        proc.stop()


def gateway(stack: ExitStack, *args: str, env: dict[str, str] | None = None
            ) -> tuple[str, ServiceProcess]:
    return stack.enter_context(gateway_proc(*args, env=env))


def wait_workers(gateway_url: str, count: int, timeout: float = 60.0, key: str = ""
                 ) -> list[dict]:
    """Waits until the gateway's router lists ``count`` ready workers."""
    deadline = time.monotonic() + timeout
    headers = {"authorization": f"Bearer {key}"} if key else {}
    while True:
        workers = httpx.get(f"{gateway_url}/workers", trust_env=False, timeout=5,
                            headers=headers).json()
        workers = workers.get("workers", [])
        if sum(w.get("health") == "WORKER_HEALTH_READY" for w in workers) >= count:
            return workers
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)


def sdk(base_url: str, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=retries,
                         http_client=httpx.Client(trust_env=False, timeout=60))
