"""Front doors for ``benchmarks/router_quality.py``: the real SMG gateway (PyPI ``smg==1.13.0``,
Rust) in gRPC mode, and sglmesh routers (``python -m services.router``), each its own process
in front of the benchmark's in-process sim fleet, with a client that sends the benchmark's
token prompts to the front door.

SMG is started as ``python -m smg.launch_router --worker-urls grpc://... --policy cache_aware
--model-path DIR`` (the tokenizer directory the sim workers serve too). In gRPC mode it
registers each worker (GetModelInfo / GetServerInfo), sees the ``kv_events`` descriptor and
subscribes to the workers' KV event streams, so its cache_aware policy runs event-driven (the
per-model positional block index, as with real SGLang workers). The client posts SGLang's
native ``/generate`` with ``input_ids`` (the same token prompt the sglmesh arms put in
``GenerateRequest.tokenized``), ``stream: true``, greedy, the same ``max_new_tokens``; SMG
forwards the ids unchanged (no chat template, no re-tokenization) and streams SSE back.

sglmesh routers are started as ``python -m services.router --worker-urls grpc://...
--policy P`` (one process per replica); the client calls their data plane, the
``SglangScheduler.Generate`` contract, with ``tokenized.input_ids`` (same prompt, greedy, same
``max_new_tokens``) and picks a random replica per request, as behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel, free_port

SMG_VERSION = "1.13.0"
LOOPBACK = "127.0.0.1,localhost,::1"


def smg_version() -> str | None:
    try:
        return importlib.metadata.version("smg")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class SmgReply:
    client_ttft: float  # request sent -> first streamed token (seconds)
    output_ids: list[int]
    worker_url: str  # SMG's x-smg-routed-worker-id header
    prompt_tokens: int
    cached_tokens: int


class SmgGateway:
    """One SMG process; ``base`` is its HTTP front door."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log_path: Path,
                 model: str) -> None:
        self.proc = proc
        self.base = base
        self.log_path = log_path
        self.model = model
        self.client = httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(120, connect=10),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_ready(self, worker_urls: list[str], timeout: float = 90) -> None:
        """Every worker healthy in SMG's registry with loads pushed on its KV-event stream
        (the subscription is live), then one throw-away 1-token request (SMG answers 503 while
        it still registers the model's tokenizer). A 1-token prompt stores no full KV block."""
        deadline = time.monotonic() + timeout
        want = set(worker_urls)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                listed = (await self.client.get(f"{self.base}/workers")).json()["workers"]
                live = {w["url"] for w in listed if w.get("is_healthy")
                        and (w.get("engine_load") or {}).get("version") == "pushed"}
                if want <= live:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"smg never saw {len(want)} live workers:\n{self.log_tail()}")
            await asyncio.sleep(0.25)
        while True:
            reply = await self.client.post(f"{self.base}/generate", json={
                "model": self.model, "input_ids": [1000],
                "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
            if reply.status_code == 200:
                return
            if reply.status_code != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"smg warm-up request: {reply.status_code} {reply.text}")
            await asyncio.sleep(0.25)

    async def generate(self, input_ids: list[int], max_new_tokens: int) -> SmgReply:
        body = {"model": self.model, "input_ids": input_ids, "stream": True,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
        start = time.monotonic()
        first: float | None = None
        output: list[int] = []
        prompt = cached = 0
        async with self.client.stream("POST", f"{self.base}/generate", json=body) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"smg /generate: {reply.status_code} "
                                   f"{(await reply.aread()).decode(errors='replace')[:500]}")
            worker = reply.headers.get("x-smg-routed-worker-id", "")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"smg stream error: {chunk['error']}")
                meta = chunk.get("meta_info", {})
                ids = chunk.get("output_ids") or []
                if ids and first is None:
                    first = time.monotonic() - start
                # The finishing chunk repeats the last delta: keep completion_tokens ids.
                room = int(meta.get("completion_tokens", len(output) + len(ids))) - len(output)
                output += ids[:max(0, room)]
                prompt = int(meta.get("prompt_tokens", prompt))
                cached = int(meta.get("cached_tokens", cached))
        if first is None:
            raise RuntimeError("smg streamed no token")
        return SmgReply(first, output, worker, prompt, cached)

    async def close(self) -> None:
        await self.client.aclose()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 5)


@contextlib.asynccontextmanager
async def run_smg(worker_urls: list[str], model_dir: Path, model: str,
                  extra_args: list[str]) -> AsyncIterator[SmgGateway]:
    """``python -m smg.launch_router`` in gRPC mode with ``--policy cache_aware`` (plus
    ``extra_args``); yields once every worker is live in it."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="sglmesh-bench-smg-", suffix=".log")[1])
    env = {**os.environ, "no_proxy": LOOPBACK, "NO_PROXY": LOOPBACK, "no_grpc_proxy": LOOPBACK}
    cmd = [sys.executable, "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", "cache_aware",
           "--model-path", str(model_dir), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--log-level", "warn", *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    gateway = SmgGateway(proc, f"http://127.0.0.1:{port}", log_path, model)
    try:
        await gateway.wait_ready(worker_urls)
        yield gateway
    finally:
        await gateway.close()


REPO = Path(__file__).resolve().parent.parent


class SglmeshRouters:
    """``replicas`` router processes over the same workers; ``generate`` picks one at random."""

    def __init__(self, policy: str, worker_urls: list[str], replicas: int, precise: bool,
                 rng_seed: int, extra_args: Sequence[str] = ()) -> None:
        import random

        self.policy = policy
        self.worker_urls = worker_urls
        self.precise = precise
        self.rng = random.Random(rng_seed)
        self.procs: list[tuple[subprocess.Popen[bytes], int, int, Path]] = []
        env = {**os.environ, "no_proxy": LOOPBACK, "NO_PROXY": LOOPBACK,
               "no_grpc_proxy": LOOPBACK}
        for _ in range(replicas):
            port, mport = free_port(), free_port()
            log_path = Path(tempfile.mkstemp(prefix="sglmesh-bench-router-", suffix=".log")[1])
            cmd = [sys.executable, "-m", "services.router", "--host", "127.0.0.1",
                   "--port", str(port), "--metrics-port", str(mport),
                   "--worker-urls", *worker_urls, "--policy", policy,
                   "--health-check-interval-secs", "3600", "--disable-load-monitoring",
                   "--health-success-threshold", "1", "--log-level", "warning",
                   *([] if precise else ["--disable-kv-events"]), *extra_args]
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO, start_new_session=True)
            self.procs.append((proc, port, mport, log_path))
        self.channels = [create_channel(f"127.0.0.1:{port}") for _, port, _, _ in self.procs]
        self.stubs = [pb_grpc.SglangSchedulerStub(ch) for ch in self.channels]

    async def wait_ready(self, timeout: float = 60) -> None:
        """Every replica lists every worker READY (admin API) and, for cache_aware with KV
        events, follows every worker's events live (its ``sglmesh_kv_index_live_workers``)."""
        from sglmesh.router.v1 import router_admin_pb2 as admin_pb
        from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc

        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            for (proc, _, mport, log_path), channel in zip(self.procs, self.channels,
                                                           strict=True):
                admin = admin_grpc.RouterAdminServiceStub(channel)
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"router exited with {proc.returncode}:\n"
                                           f"{log_path.read_text(errors='replace')[-3000:]}")
                    try:
                        listed = await admin.ListWorkers(admin_pb.ListWorkersRequest(),
                                                         timeout=5)
                        ready = sum(w.health == admin_pb.WORKER_HEALTH_READY
                                    for w in listed.workers)
                        live = len(self.worker_urls)
                        if self.precise and self.policy == "cache_aware":
                            text = (await http.get(f"http://127.0.0.1:{mport}/metrics")).text
                            live = sum(int(float(line.rsplit(" ", 1)[1]))
                                       for line in text.splitlines()
                                       if line.startswith("sglmesh_kv_index_live_workers{"))
                        if ready >= len(self.worker_urls) and live >= len(self.worker_urls):
                            break
                    except (grpc.aio.AioRpcError, httpx.HTTPError, ValueError, IndexError):
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"router never got ready:\n"
                                           f"{log_path.read_text(errors='replace')[-3000:]}")
                    await asyncio.sleep(0.1)

    async def generate(self, request_id: str, input_ids: list[int], max_new_tokens: int
                       ) -> tuple[float, list[int]]:
        request = pb.GenerateRequest(
            request_id=request_id, stream=True, tokenized=pb.TokenizedInput(input_ids=input_ids),
            sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        stub = self.stubs[self.rng.randrange(len(self.stubs))]
        start = time.monotonic()
        first: float | None = None
        output: list[int] = []
        async for response in stub.Generate(request):
            if first is None:
                first = time.monotonic() - start
            if response.HasField("complete"):
                output = list(response.complete.output_ids)
        if first is None:
            raise RuntimeError("the router streamed nothing")
        return first, output

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for proc, _, _, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, _, _ in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 5)


@contextlib.asynccontextmanager
async def run_routers(policy: str, worker_urls: list[str], replicas: int, precise: bool,
                      rng_seed: int, extra_args: Sequence[str] = ()
                      ) -> AsyncIterator[SglmeshRouters]:
    routers = SglmeshRouters(policy, worker_urls, replicas, precise, rng_seed, extra_args)
    try:
        await routers.wait_ready()
        yield routers
    finally:
        await routers.close()
