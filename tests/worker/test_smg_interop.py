"""Wire compatibility with the contract's reference implementation: the real SMG gateway
(PyPI ``smg==1.13.0``, Rust) in gRPC mode in front of two sglmesh ``torch`` workers.

SMG registers the workers over ``sglang.grpc.scheduler.SglangScheduler`` (GetModelInfo,
GetServerInfo, HealthCheck, GetLoads), renders the chat template and tokenizes itself, streams
``Generate`` from a worker and detokenizes. The test asks it the France question through its
OpenAI HTTP API (streamed and not) and expects "Paris".

Skips with the reason when smg is not installed (``pip install smg==1.13.0``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.net import free_port
from tests.procs import ServiceProcess

SMG_VERSION = "1.13.0"
QUESTION = "What is the capital of France?"


def smg_installed() -> str | None:
    try:
        version = importlib.metadata.version("smg")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version


@pytest.fixture(scope="module")
def workers(embedded_model_dir: Path) -> Iterator[list[ServiceProcess]]:
    procs = [ServiceProcess("worker", ["--model-path", str(embedded_model_dir),
                                       "--max-running-requests", "4"]) for _ in range(2)]
    try:
        for p in procs:  # start both, then wait: they load side by side
            p.wait_ready = False
            p.start()
        for p in procs:
            p.wait_serving()
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextlib.contextmanager
def run_smg(worker_urls: list[str], model_dir: Path, policy: str) -> Iterator[str]:
    """``python -m smg.launch_router`` in gRPC mode; yields its base URL once every worker is
    healthy in its registry."""
    version = smg_installed()
    if version is None:
        pytest.skip(f"the SMG gateway is not installed (pip install smg=={SMG_VERSION})")
    if version != SMG_VERSION:
        pytest.skip(f"smg {version} is installed; this test pins smg=={SMG_VERSION}")
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="sglmesh-smg-", suffix=".log")[1])
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost,::1", "NO_PROXY": "127.0.0.1,localhost,::1",
           "no_grpc_proxy": "127.0.0.1,localhost,::1"}
    cmd = [sys.executable, "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", policy, "--model-path", str(model_dir),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
           "--log-level", "warn"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"smg exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    workers_json = client.get(f"{base}/workers").json()
                    ready = [w for w in workers_json.get("workers", []) if w.get("is_healthy")]
                    if len(ready) == len(worker_urls):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"smg never saw {len(worker_urls)} healthy workers:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def smg(workers: list[ServiceProcess], embedded_model_dir: Path) -> Iterator[str]:
    with run_smg([f"grpc://{w.target}" for w in workers], embedded_model_dir, "round_robin") as url:
        yield url


def model_id(client: httpx.Client, base: str) -> str:
    models = client.get(f"{base}/v1/models").json()["data"]
    assert models, "smg lists no model"
    return str(models[0]["id"])


def post_chat(client: httpx.Client, url: str, body: dict[str, object]) -> httpx.Response:
    """POST, retrying SMG's 503 while it still registers the model's tokenizer."""
    deadline = time.monotonic() + 60
    while True:
        reply = client.post(url, json=body)
        if reply.status_code != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


@pytest.mark.slow
def test_chat_completion_through_smg(smg: str) -> None:
    with httpx.Client(trust_env=False, timeout=120) as client:
        model = model_id(client, smg)
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}],
                "temperature": 0, "max_tokens": 16}
        seen = []
        for _ in range(2):  # round robin: both workers answer
            reply = post_chat(client, f"{smg}/v1/chat/completions", body)
            assert reply.status_code == 200, reply.text
            data = reply.json()
            seen.append(data)
            assert "Paris" in data["choices"][0]["message"]["content"]
            assert data["choices"][0]["finish_reason"] == "stop"
            assert data["usage"]["prompt_tokens"] > 10
        assert seen[0]["choices"][0]["message"]["content"] == \
            seen[1]["choices"][0]["message"]["content"]

        text = ""
        with client.stream("POST", f"{smg}/v1/chat/completions",
                           json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    for choice in chunk.get("choices", []):
                        text += choice.get("delta", {}).get("content") or ""
        assert "Paris" in text


@pytest.mark.slow
def test_smg_sees_worker_loads(smg: str, workers: list[ServiceProcess]) -> None:
    with httpx.Client(trust_env=False, timeout=10) as client:
        listed = client.get(f"{smg}/workers").json()["workers"]
    urls = {w["url"] for w in listed}
    assert urls == {f"grpc://{w.target}" for w in workers}
    assert all(w["connection_mode"] == "grpc" for w in listed)


def test_smg_cache_aware_routes_on_sim_kv_events(embedded_model_dir: Path, tmp_path: Path) -> None:
    """SMG's cache_aware policy subscribes to the sim workers' KV events: repeats of a prompt
    go to the worker that caches it, and the usage reports the cached tokens."""
    ports = tmp_path / "fleet.json"
    fleet = subprocess.Popen(
        [sys.executable, "-m", "services.worker.sim_fleet", "--count", "4", "--ports-file",
         str(ports), "--model-path", str(embedded_model_dir), "--sim-decode-ms", "2",
         "--log-level", "warning"], start_new_session=True, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        while not ports.exists():
            assert fleet.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        urls = [w["url"] for w in json.loads(ports.read_text())["workers"]]
        with run_smg(urls, embedded_model_dir, "cache_aware") as base, \
                httpx.Client(trust_env=False, timeout=30) as client:
            body = {"model": model_id(client, base), "max_tokens": 4, "messages": [
                {"role": "user", "content": "Tell me, in as many words as you like, about the "
                                            "history of the city of Paris and its bridges."}]}
            usages = []
            for _ in range(4):
                reply = post_chat(client, f"{base}/v1/chat/completions", body)
                assert reply.status_code == 200, reply.text
                usages.append(reply.json()["usage"])
            cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
            prompt = usages[0]["prompt_tokens"]
            assert cached[0] == 0
            assert all(c == (prompt // 16) * 16 or c == prompt - 1 for c in cached[1:]), cached
    finally:
        os.killpg(fleet.pid, signal.SIGTERM)
        fleet.wait(15)
