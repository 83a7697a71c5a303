#!/usr/bin/env python3
"""End-to-end proof of the suite in front of real SGLang workers (issue 10), with numbers.

Starts, as separate processes on loopback: two workers (``--engine sglang`` on the one GPU,
or ``sim``/``torch`` stand-ins for rehearsing on a CPU machine), history, one tokenizer service
(tokenizer fetched from worker 0 over GetTokenizer), and routers + gateways:

* A: router ``cache_aware`` over both workers (precise mode when the workers' KV events are
  live, else approximate) + gateway A (with history);
* B: router ``round_robin`` over both workers + gateway B (the baseline of the cache workload);
* C: router ``round_robin`` over worker 0 alone + gateway C (the overhead comparison: the same
  single worker direct vs through gateway+tokenizer+router);
* D: gateway D on router A with ``--reasoning-parser deepseek-r1`` (the reasoning path).

Then, through the ``openai`` SDK: a greedy chat answer (Paris), streaming == non-streaming,
tool calls (``tool_choice`` required and auto), reasoning, a shared-prefix multi-turn workload
(``cached_tokens`` and the router's hit rate, cache_aware vs round_robin), and the throughput /
TTFT benchmark at several concurrency levels, direct to worker 0 (gRPC ``Generate`` with the
same rendered prompt ids) vs through gateway C. Results go to ``OUT/results.json`` and
``OUT/results.md`` after every phase, so a run cut short still leaves what it measured.

    # CPU rehearsal (no GPU): two simulated workers with real KV events
    python scripts/gpu_e2e.py --engine sim --model-dir .gpu/smollm2 --out /tmp/e2e --quick
    # GPU host (see scripts/gpu_e2e.sh, which installs the wheels and converts the model)
    python scripts/gpu_e2e.py --engine sglang --model-dir HF_DIR --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
PARIS_Q = "What is the capital of France?"
LOOPBACK = "127.0.0.1"
for _k in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
    _cur = [h for h in os.environ.get(_k, "").split(",") if h]
    os.environ[_k] = ",".join(_cur + [h for h in ("127.0.0.1", "localhost", "::1") if h not in _cur])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            fh.write(f"$ {shlex.join(self.args)}\n".encode())
            fh.flush()
            self.popen = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, cwd=str(ROOT))

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def grep(self, pattern: str) -> bool:
        try:
            return re.search(pattern, self.log.read_text(errors="replace")) is not None
        except OSError:
            return False

    def stop(self, grace: float) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)


class ProcessSet:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        path = [str(ROOT), str(ROOT / "clients" / "python" / "src")]
        path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}

    def start(self, name: str, module: str, *args: str) -> Proc:
        proc = Proc(name, [sys.executable, "-m", module, *args], self.log_dir / f"{name}.log")
        proc.start(self.env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(40.0 if proc.name.startswith("worker") else 10.0)


async def wait_grpc(proc: Proc, port: int, timeout: float, service: str = "") -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    began = time.monotonic()
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode if proc.popen else '?'})"
                                   f"; log tail:\n{proc.tail()}")
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"{proc.name} not SERVING after {timeout:.0f}s; log tail:\n"
                                   f"{proc.tail()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - began
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)


async def wait_http(proc: Proc, url: str, timeout: float) -> None:
    import httpx

    began = time.monotonic()
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited; log tail:\n{proc.tail()}")
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"{proc.name} not healthy after {timeout:.0f}s:\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.3)


# ----------------------------------------------------------------------------- the suite


@dataclass
class Suite:
    args: argparse.Namespace
    procs: ProcessSet
    worker_ports: list[int] = field(default_factory=list)
    routers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (port, metrics)
    gateways: dict[str, str] = field(default_factory=dict)  # name -> base URL
    tokenizer_port: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def worker_args(self, index: int, port: int) -> list[str]:
        a = self.args
        common = ["--host", LOOPBACK, "--port", str(port), "--log-level", "info"]
        if a.engine == "sglang":
            sgl = ["--model-path", a.model_dir, "--served-model-name", MODEL,
                   "--dtype", a.dtype, "--attention-backend", "triton",
                   "--sampling-backend", "pytorch", "--mem-fraction-static", str(a.mem_fraction)]
            if a.tokenizer_dir:
                sgl += ["--tokenizer-path", a.tokenizer_dir]
            if a.dummy_weights:
                sgl += ["--load-format", "dummy"]
            sgl += shlex.split(a.sglang_extra)
            return [*common, "--engine", "sglang", "--sglang-ready-timeout",
                    str(a.worker_timeout), "--", *sgl]
        if a.engine == "sim":
            return [*common, "--engine", "sim", "--model-path", a.model_dir,
                    "--served-model-name", MODEL, "--sim-decode-ms", "2",
                    "--sim-prefill-ms-per-token", "0.02", "--sim-seed", str(index)]
        return [*common, "--engine", "torch", "--served-model-name", MODEL,
                *(["--model-path", a.model_dir] if a.model_dir else []),
                "--max-running-requests", "16"]

    async def start(self) -> None:
        a = self.args
        t0 = time.monotonic()
        self.worker_ports = [free_port() for _ in range(a.workers)]
        workers: list[Proc] = []
        for i, port in enumerate(self.worker_ports):
            proc = self.procs.start(f"worker{i}", "services.worker", *self.worker_args(i, port))
            workers.append(proc)
            if a.engine == "sglang" and i + 1 < len(self.worker_ports):
                # Two SGLang processes on one GPU size their KV pools from the memory free when
                # they profile it: let the first allocate its pool before the next one starts.
                began = time.monotonic()
                while time.monotonic() - began < a.stagger_timeout and proc.alive() and not \
                        proc.grep(r"KV Cache is allocated|max_total_num_tokens="):
                    await asyncio.sleep(1)
                self.timings[f"worker{i}_stagger_s"] = round(time.monotonic() - began, 1)
        history_port = free_port()
        history = None
        if not a.no_history:
            history = self.procs.start(
                "history", "services.history", "--host", LOOPBACK, "--port", str(history_port),
                "--history-db", f"sqlite+aiosqlite:///{Path(a.work) / 'history.db'}")
        ready = await asyncio.gather(*(wait_grpc(p, port, a.worker_timeout + 30)
                                       for p, port in zip(workers, self.worker_ports, strict=True)))
        for i, r in enumerate(ready):
            self.timings[f"worker{i}_ready_s"] = round(r, 1)
        self.timings["workers_ready_s"] = round(time.monotonic() - t0, 1)
        urls = [f"grpc://{LOOPBACK}:{p}" for p in self.worker_ports]
        router_specs = {"A": ("cache_aware", urls), "B": ("round_robin", urls),
                        "C": ("round_robin", urls[:1])}
        router_procs = {}
        for name, (policy, wurls) in router_specs.items():
            port, metrics = free_port(), free_port()
            self.routers[name] = (port, metrics)
            router_procs[name] = self.procs.start(
                f"router{name}", "services.router", "--host", LOOPBACK, "--port", str(port),
                "--metrics-port", str(metrics), "--policy", policy,
                "--health-check-interval-secs", "30", "--worker-urls", *wurls)
        self.tokenizer_port = free_port()
        tok = self.procs.start("tokenizer", "services.tokenizer", "--host", LOOPBACK, "--port",
                               str(self.tokenizer_port), "--cache-dir",
                               str(Path(a.work) / "tokenizers"),
                               "--tokenizer", f"{MODEL}=grpc://{LOOPBACK}:{self.worker_ports[0]}")
        if history is not None:
            await wait_grpc(history, history_port, 60)
        for name, proc in router_procs.items():
            await wait_grpc(proc, self.routers[name][0], 120)
        await wait_grpc(tok, self.tokenizer_port, 180)
        gw_specs = {"A": ("A", True, []), "B": ("B", False, []), "C": ("C", False, []),
                    "D": ("A", False, ["--reasoning-parser", "deepseek-r1"])}
        gw_procs = {}
        for name, (router, with_history, extra) in gw_specs.items():
            port = free_port()
            self.gateways[name] = f"http://{LOOPBACK}:{port}"
            args = ["--host", LOOPBACK, "--port", str(port), "--router",
                    f"{LOOPBACK}:{self.routers[router][0]}", "--tokenizer",
                    f"{LOOPBACK}:{self.tokenizer_port}", *extra]
            if with_history and history is not None:
                args += ["--history", f"{LOOPBACK}:{history_port}"]
            gw_procs[name] = self.procs.start(f"gateway{name}", "services.gateway", *args)
        for name, proc in gw_procs.items():
            await wait_http(proc, self.gateways[name], 120)
        self.timings["suite_ready_s"] = round(time.monotonic() - t0, 1)


# ----------------------------------------------------------------------------- clients


def openai_client(base: str) -> Any:
    import httpx
    import openai

    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                              http_client=httpx.AsyncClient(
                                  trust_env=False, timeout=300,
                                  limits=httpx.Limits(max_connections=512,
                                                      max_keepalive_connections=512)))


async def stream_chat(client: Any, messages: list[dict[str, Any]], max_tokens: int,
                      ignore_eos: bool = False, **extra: Any) -> dict[str, Any]:
    """One streamed chat completion: TTFT (first content/reasoning delta), text, usage."""
    began = time.perf_counter()
    ttft = None
    text, reasoning, usage, finish = [], [], None, None
    body = {"ignore_eos": True} if ignore_eos else {}
    body.update(extra.pop("extra_body", {}))
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=body, **extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get(
                "reasoning_content")
            if (d.content or r) and ttft is None:
                ttft = time.perf_counter() - began
            if d.content:
                text.append(d.content)
            if r:
                reasoning.append(r)
            if choice.finish_reason:
                finish = choice.finish_reason
    total = time.perf_counter() - began
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return {"ttft": ttft, "total": total, "text": "".join(text), "reasoning": "".join(reasoning),
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "cached_tokens": cached or 0, "finish_reason": finish}


async def render_ids(tokenizer_port: int, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
    import grpc
    from google.protobuf import struct_pb2
    from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
    from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc

    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{tokenizer_port}") as channel:
        stub = tok_grpc.TokenizerServiceStub(channel)
        structs = []
        for m in messages:
            s = struct_pb2.Struct()
            s.update(m)
            structs.append(s)
        reply = await stub.RenderChat(tok_pb.RenderChatRequest(model=MODEL, messages=structs),
                                      timeout=30)
        return reply.prompt, list(reply.token_ids)


async def direct_generate(stub: Any, pb: Any, prompt: str, ids: list[int], max_tokens: int
                          ) -> dict[str, Any]:
    """One streamed Generate straight to a worker: TTFT = first chunk with tokens."""
    began = time.perf_counter()
    ttft = None
    tokens = 0
    cached = 0
    request = pb.GenerateRequest(
        request_id=f"direct-{uuid.uuid4().hex[:12]}",
        tokenized=pb.TokenizedInput(original_text=prompt, input_ids=ids),
        # The gateway's defaults (proto zeros would mean top_p 0 and repetition_penalty 0,
        # which turn on SGLang's penalizer and slow decoding: not a fair baseline).
        sampling_params=pb.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0,
                                          repetition_penalty=1.0, frequency_penalty=0.0,
                                          presence_penalty=0.0, skip_special_tokens=True, n=1,
                                          max_new_tokens=max_tokens, ignore_eos=True),
        stream=True)
    async for response in stub.Generate(request, timeout=300):
        if response.HasField("chunk"):
            n = len(response.chunk.token_ids)
            if n and ttft is None:
                ttft = time.perf_counter() - began
            tokens += n
            cached = response.chunk.cached_tokens or cached
        elif response.HasField("complete"):
            cached = response.complete.cached_tokens or cached
    return {"ttft": ttft, "total": time.perf_counter() - began, "completion_tokens": tokens,
            "cached_tokens": cached}


async def run_level(fn: Any, jobs: list[Any], concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []
    errors: list[str] = []

    async def one(job: Any) -> None:
        async with sem:
            try:
                results.append(await fn(job))
            except Exception as exc:  # recorded, the level goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    began = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    wall = time.perf_counter() - began
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    per_req = [(r["completion_tokens"] or 0) / (r["total"] - r["ttft"])
               for r in results if r["ttft"] is not None and r["total"] > r["ttft"]]
    return {"concurrency": concurrency, "requests": len(jobs), "ok": len(results),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 3),
            "output_tokens": tokens, "output_tok_s": round(tokens / wall, 1) if wall else None,
            "ttft_p50_ms": ms(pct(ttfts, 0.5)), "ttft_p99_ms": ms(pct(ttfts, 0.99)),
            "per_request_decode_tok_s_median": round(statistics.median(per_req), 1)
            if per_req else None}


# ----------------------------------------------------------------------------- metrics


async def scrape(port: int) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"http://{LOOPBACK}:{port}/metrics", timeout=5)).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)", line)
        if m:
            key = m.group(1) + (m.group(2) or "")
            with contextlib.suppress(ValueError):
                out[key] = float(m.group(3))
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items()
               if k.split("{", 1)[0] in (name, name + "_total"))


async def router_workers(port: int) -> list[dict[str, Any]]:
    import grpc
    from sglmesh.router.v1 import router_admin_pb2 as admin_pb
    from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc

    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        reply = await admin_grpc.RouterAdminServiceStub(channel).ListWorkers(
            admin_pb.ListWorkersRequest(), timeout=10)
    return [{"url": w.url, "processed": w.processed_requests,
             "health": admin_pb.WorkerHealth.Name(w.health)} for w in reply.workers]


# ----------------------------------------------------------------------------- phases


WORDS = ("river mountain lantern harbor meadow copper violet orchard thunder pebble canyon "
         "falcon glacier willow ember prairie lagoon quartz saffron tundra beacon cinder maple "
         "nebula oasis pylon quiver raven sequoia tidal umber vortex walnut zephyr").split()


def system_prompt(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return (f"You are archivist {rng.randrange(10**6)}. Keep this ledger in mind and answer "
            f"briefly. Ledger: {body}.")


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessSet(self.work / "logs")
        self.suite = Suite(args, self.procs)
        self.t0 = time.monotonic()
        self.results: dict[str, Any] = {
            "engine": args.engine, "dummy_weights": args.dummy_weights,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv, "phases": {}, "errors": {}}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(self.results))

    async def phase(self, name: str, coro_fn: Any, min_left: float = 0) -> None:
        if self.left() < min_left:
            self.results["phases"][name] = {"skipped": f"only {self.left():.0f}s of budget left"}
            self.save()
            return
        began = time.monotonic()
        print(f"[{time.monotonic() - self.t0:6.1f}s] phase {name}", flush=True)
        try:
            self.results["phases"][name] = await coro_fn()
        except Exception as exc:
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.results["phases"].setdefault(name, {})
            print(f"phase {name} failed:\n{traceback.format_exc()}", flush=True)
        if isinstance(self.results["phases"].get(name), dict):
            self.results["phases"][name]["phase_s"] = round(time.monotonic() - began, 1)
        self.save()
        summary = json.dumps(self.results["phases"].get(name), default=str)
        print(f"    {summary[:1500]}", flush=True)

    # -- environment ----------------------------------------------------------------------------

    async def environment(self) -> dict[str, Any]:
        import importlib.metadata as md

        env: dict[str, Any] = {"python": sys.version.split()[0]}
        for name in ("sglang", "smg-grpc-servicer", "smg-grpc-proto", "torch", "transformers",
                     "grpcio", "protobuf", "openai", "triton", "sglang-kernel", "xgrammar"):
            try:
                env[name] = md.version(name)
            except md.PackageNotFoundError:
                env[name] = None
        with contextlib.suppress(Exception):
            env["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        return env

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        await self.suite.start()
        return {"timings": self.suite.timings, "workers": self.suite.worker_ports,
                "gateways": self.suite.gateways,
                "routers": {k: v[0] for k, v in self.suite.routers.items()}}

    async def worker_info(self) -> dict[str, Any]:
        import grpc
        from google.protobuf import json_format
        from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
        from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

        out: dict[str, Any] = {}
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{self.suite.worker_ports[0]}") as ch:
            stub = pb_grpc.SglangSchedulerStub(ch)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            out["model_info"] = {k: v for k, v in json_format.MessageToDict(
                info, preserving_proto_field_name=True).items()
                if k in ("model_path", "served_model_name", "vocab_size", "eos_token_ids",
                         "bos_token_id", "pad_token_id", "max_context_length",
                         "max_req_input_len", "is_generation", "num_labels", "model_type",
                         "architectures")}
            server = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            args = json_format.MessageToDict(server.server_args)
            out["server_info"] = {
                "sglang_version": server.sglang_version, "server_type": server.server_type,
                "kv_events": args.get("kv_events"), "sglmesh_wrapper": args.get("sglmesh_wrapper"),
                "page_size": args.get("page_size"),
                "max_total_num_tokens": json_format.MessageToDict(server.scheduler_info).get(
                    "max_total_num_tokens") if server.HasField("scheduler_info") else None}
            began = time.perf_counter()
            health = await stub.HealthCheck(pb.HealthCheckRequest(), timeout=30)
            out["health_check"] = {"healthy": health.healthy, "message": health.message,
                                   "ms": ms(time.perf_counter() - began)}
        metrics = await scrape(self.suite.routers["A"][1])
        out["router_A_kv_index_live_workers"] = metric_sum(metrics, "sglmesh_kv_index_live_workers")
        out["router_A_mode"] = ("precise (KV events live on "
                                f"{int(out['router_A_kv_index_live_workers'])} workers)"
                                if out["router_A_kv_index_live_workers"] else "approximate")
        return out

    # -- functional checks ----------------------------------------------------------------------

    async def functional(self) -> dict[str, Any]:
        gw = openai_client(self.suite.gateways["A"])
        q = [{"role": "user", "content": PARIS_Q}]
        out: dict[str, Any] = {}
        plain = await gw.chat.completions.create(model=MODEL, messages=q, temperature=0,
                                                 max_tokens=48)
        answer = plain.choices[0].message.content or ""
        out["paris"] = {"answer": answer, "contains_paris": "Paris" in answer,
                        "finish_reason": plain.choices[0].finish_reason,
                        "usage": plain.usage.model_dump() if plain.usage else None}
        streamed = await stream_chat(gw, q, 48)
        out["stream_equals_nonstream"] = {"equal": streamed["text"] == answer,
                                          "streamed": streamed["text"],
                                          "ttft_ms": ms(streamed["ttft"])}
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]
        tq = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
        for choice in ("required", "auto"):
            key = f"tool_choice_{choice}"
            try:
                r = await gw.chat.completions.create(model=MODEL, messages=tq, tools=tools,
                                                     tool_choice=choice, temperature=0,
                                                     max_tokens=64)
                m = r.choices[0].message
                out[key] = {"finish_reason": r.choices[0].finish_reason,
                            "content": m.content,
                            "tool_calls": [{"name": c.function.name,
                                            "arguments": c.function.arguments}
                                           for c in (m.tool_calls or [])]}
                s = await stream_chat(gw, tq, 64, tools=tools, tool_choice=choice)
                out[key]["stream_finish_reason"] = s["finish_reason"]
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        rd = openai_client(self.suite.gateways["D"])
        try:
            r = await rd.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Think step by step: what is "
                                        "2+2? Close your thoughts with </think>."}],
                temperature=0, max_tokens=64, extra_body={"separate_reasoning": True})
            m = r.choices[0].message
            out["reasoning"] = {"parser": "deepseek-r1", "content": m.content,
                                "reasoning_content": (m.model_extra or {}).get(
                                    "reasoning_content"),
                                "finish_reason": r.choices[0].finish_reason}
        except Exception as exc:
            out["reasoning"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        # The Responses API through history (gateway A has history).
        if not self.args.no_history:
            try:
                r1 = await gw.responses.create(model=MODEL, input=PARIS_Q, temperature=0,
                                               max_output_tokens=32, store=True)
                r2 = await gw.responses.create(model=MODEL, input="And of Germany?",
                                               previous_response_id=r1.id, temperature=0,
                                               max_output_tokens=32, store=True)
                out["responses_chain"] = {"first": r1.output_text, "second": r2.output_text}
            except Exception as exc:
                out["responses_chain"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        await gw.close()
        await rd.close()
        return out

    # -- shared-prefix multi-turn workload ------------------------------------------------------

    async def cache_workload(self, gateway: str, router: str, seed: int) -> dict[str, Any]:
        a = self.args
        rng = random.Random(seed)
        groups = [system_prompt(rng, a.prefix_words) for _ in range(a.groups)]
        client = openai_client(self.suite.gateways[gateway])
        router_metrics = self.suite.routers[router][1]
        before = await scrape(router_metrics)
        workers_before = {w["url"]: w["processed"]
                          for w in await router_workers(self.suite.routers[router][0])}
        records: list[dict[str, Any]] = []
        sem = asyncio.Semaphore(a.cache_concurrency)

        async def conversation(g: int, u: int) -> None:
            messages = [{"role": "system", "content": groups[g]}]
            for t in range(a.turns):
                messages.append({"role": "user", "content":
                                 f"User {u}, question {t}: name a word from the ledger that "
                                 f"starts with '{WORDS[(u * 7 + t) % len(WORDS)][0]}'."})
                async with sem:
                    r = await stream_chat(client, messages, a.cache_max_tokens)
                r.update(group=g, user=u, turn=t)
                records.append(r)
                messages.append({"role": "assistant", "content": r["text"]})

        began = time.perf_counter()
        await asyncio.gather(*(conversation(g, u) for g in range(a.groups)
                               for u in range(a.users)))
        wall = time.perf_counter() - began
        after = await scrape(router_metrics)
        await client.close()
        prompt = sum(r["prompt_tokens"] or 0 for r in records)
        cached = sum(r["cached_tokens"] or 0 for r in records)
        ttfts = [r["ttft"] for r in records if r["ttft"] is not None]
        later = [r["ttft"] for r in records if r["ttft"] is not None and r["turn"] > 0]
        hits = metric_sum(after, "sglmesh_cache_aware_hits") - metric_sum(
            before, "sglmesh_cache_aware_hits")
        misses = metric_sum(after, "sglmesh_cache_aware_misses") - metric_sum(
            before, "sglmesh_cache_aware_misses")
        return {
            "requests": len(records), "wall_s": round(wall, 2),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": round(cached / prompt, 4) if prompt else None,
            "requests_with_cache_hit": sum(1 for r in records if r["cached_tokens"]),
            "ttft_p50_ms": ms(pct(ttfts, 0.5)), "ttft_p99_ms": ms(pct(ttfts, 0.99)),
            "ttft_mean_ms": ms(statistics.fmean(ttfts)) if ttfts else None,
            "ttft_p50_ms_turns_after_first": ms(pct(later, 0.5)),
            "router_hits": hits, "router_misses": misses,
            "router_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "router_kv_index_live_workers": metric_sum(after, "sglmesh_kv_index_live_workers"),
            "router_kv_index_blocks": metric_sum(after, "sglmesh_kv_index_blocks"),
            "per_worker_processed": [
                {**w, "processed": w["processed"] - workers_before.get(w["url"], 0)}
                for w in await router_workers(self.suite.routers[router][0])],
            "sample": {k: records[-1][k] for k in ("text", "prompt_tokens", "cached_tokens")}
            if records else None,
        }

    async def cache_compare(self) -> dict[str, Any]:
        out: dict[str, Any] = {"groups": self.args.groups, "users": self.args.users,
                               "turns": self.args.turns, "prefix_words": self.args.prefix_words,
                               "max_tokens": self.args.cache_max_tokens,
                               "concurrency": self.args.cache_concurrency}
        # Different ledgers per policy, so neither run profits from the other's cache.
        out["cache_aware"] = await self.cache_workload("A", "A", seed=1001)
        out["round_robin"] = await self.cache_workload("B", "B", seed=2002)
        return out

    # -- throughput / TTFT ----------------------------------------------------------------------

    async def bench(self) -> dict[str, Any]:
        import grpc
        from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
        from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

        a = self.args
        levels = [int(x) for x in a.levels.split(",")]
        topics = ["a lighthouse", "a desert caravan", "a clockmaker", "the first snowfall",
                  "a lost violin", "an orbiting station", "a night market", "an old map"]

        def messages(i: int, path: str) -> list[dict[str, Any]]:
            return [{"role": "user", "content": f"[{path} {i}] Write a long story about "
                     f"{topics[i % len(topics)]}."}]

        out: dict[str, Any] = {"max_tokens": a.bench_tokens, "levels": levels,
                               "direct": {}, "suite": {}}
        channel = grpc.aio.insecure_channel(
            f"{LOOPBACK}:{self.suite.worker_ports[0]}",
            options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.SglangSchedulerStub(channel)
        client = openai_client(self.suite.gateways["C"])

        async def direct(job: tuple[str, list[int]]) -> dict[str, Any]:
            return await direct_generate(stub, pb, job[0], job[1], a.bench_tokens)

        async def through(msgs: list[dict[str, Any]]) -> dict[str, Any]:
            return await stream_chat(client, msgs, a.bench_tokens, ignore_eos=True)

        # warm-up both paths (CUDA graphs, connections)
        warm = [await render_ids(self.suite.tokenizer_port, messages(i, "warm")) for i in range(4)]
        await run_level(direct, warm, 4)
        await run_level(through, [messages(i, "warmgw") for i in range(4)], 4)
        for c in levels:
            n = max(a.min_requests, c * a.rounds)
            if self.left() < 60:
                out["skipped_levels"] = out.get("skipped_levels", []) + [c]
                continue
            jobs = [await render_ids(self.suite.tokenizer_port, messages(i, f"d{c}"))
                    for i in range(n)]
            out["direct"][str(c)] = await run_level(direct, jobs, c)
            out["suite"][str(c)] = await run_level(
                through, [messages(i, f"s{c}") for i in range(n)], c)
            d, s = out["direct"][str(c)], out["suite"][str(c)]
            print(f"    c={c}: direct {d['output_tok_s']} tok/s p50 {d['ttft_p50_ms']} ms | "
                  f"suite {s['output_tok_s']} tok/s p50 {s['ttft_p50_ms']} ms", flush=True)
            self.results["phases"]["bench"] = out
            self.save()
        out["prompt_tokens_example"] = len(warm[0][1])
        await channel.close()
        await client.close()
        return out

    async def run(self) -> int:
        try:
            await self.phase("environment", self.environment)
            await self.phase("start", self.start)
            if "start" in self.results["errors"]:
                return 1
            await self.phase("worker_info", self.worker_info)
            await self.phase("functional", self.functional, min_left=30)
            await self.phase("cache", self.cache_compare, min_left=60)
            await self.phase("bench", self.bench, min_left=60)
            return 0 if not self.results["errors"] else 1
        finally:
            self.procs.stop_all()
            self.results["logs"] = {p.name: str(p.log) for p in self.procs.procs}
            self.save()


# ----------------------------------------------------------------------------- report


def markdown(r: dict[str, Any]) -> str:
    p = r.get("phases", {})
    env = p.get("environment", {})
    lines = [f"# sglmesh GPU end-to-end ({r.get('engine')}"
             f"{', dummy weights' if r.get('dummy_weights') else ''})", "",
             f"started {r.get('started')}, {r.get('elapsed_s')} s; "
             f"sglang {env.get('sglang')}, smg-grpc-servicer {env.get('smg-grpc-servicer')}, "
             f"torch {env.get('torch')}, GPU {env.get('gpu') or '-'}", ""]
    start = p.get("start", {})
    if start.get("timings"):
        lines += ["start-up: " + ", ".join(f"{k} {v}" for k, v in start["timings"].items()), ""]
    wi = p.get("worker_info", {})
    if wi:
        lines += [f"router A mode: {wi.get('router_A_mode')}; GetModelInfo (via the wrapper): "
                  f"{json.dumps(wi.get('model_info'))}", ""]
    f = p.get("functional", {})
    if f:
        lines += ["## Functional", "", "| check | result |", "|---|---|"]
        par = f.get("paris", {})
        lines.append(f"| greedy chat contains Paris | {par.get('contains_paris')}: "
                     f"{json.dumps(par.get('answer'))} |")
        se = f.get("stream_equals_nonstream", {})
        lines.append(f"| streaming == non-streaming | {se.get('equal')} |")
        for key in ("tool_choice_required", "tool_choice_auto", "reasoning", "responses_chain"):
            if key in f:
                lines.append(f"| {key} | {json.dumps(f[key])[:300].replace('|', '/')} |")
        lines.append("")
    c = p.get("cache", {})
    if c.get("cache_aware") or c.get("round_robin"):
        lines += [f"## Shared-prefix multi-turn workload ({c.get('groups')} prefixes x "
                  f"{c.get('users')} users x {c.get('turns')} turns, ~{c.get('prefix_words')} "
                  f"ledger words, concurrency {c.get('concurrency')})", "",
                  "| policy | requests | cached / prompt tokens | router hit rate | "
                  "TTFT p50 ms | TTFT p99 ms | TTFT p50 ms (turns 2+) | per-worker requests |",
                  "|---|---|---|---|---|---|---|---|"]
        for pol in ("cache_aware", "round_robin"):
            x = c.get(pol)
            if not x:
                continue
            per = ", ".join(str(w.get("processed")) for w in x.get("per_worker_processed", []))
            lines.append(f"| {pol} | {x['requests']} | {x['cached_tokens']} / {x['prompt_tokens']}"
                         f" = {x['cached_share']} | {x['router_hit_rate']} | {x['ttft_p50_ms']} | "
                         f"{x['ttft_p99_ms']} | {x['ttft_p50_ms_turns_after_first']} | {per} |")
        lines.append("")
    b = p.get("bench", {})
    if b.get("direct"):
        lines += [f"## Throughput and TTFT ({b.get('max_tokens')} output tokens per request, "
                  "ignore_eos, greedy, distinct prompts)", "",
                  "| streams | direct tok/s | suite tok/s | ratio | direct TTFT p50 / p99 ms | "
                  "suite TTFT p50 / p99 ms | added TTFT p50 ms |", "|---|---|---|---|---|---|---|"]
        for lvl, d in b["direct"].items():
            s = b.get("suite", {}).get(lvl, {})
            ratio = (round(s["output_tok_s"] / d["output_tok_s"], 3)
                     if s.get("output_tok_s") and d.get("output_tok_s") else None)
            added = (round(s["ttft_p50_ms"] - d["ttft_p50_ms"], 1)
                     if s.get("ttft_p50_ms") is not None and d.get("ttft_p50_ms") is not None
                     else None)
            lines.append(f"| {lvl} | {d.get('output_tok_s')} | {s.get('output_tok_s')} | {ratio} | "
                         f"{d.get('ttft_p50_ms')} / {d.get('ttft_p99_ms')} | "
                         f"{s.get('ttft_p50_ms')} / {s.get('ttft_p99_ms')} | {added} |")
        lines.append("")
    if r.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {str(v)[:400]}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("sglang", "sim", "torch"), default="sglang")
    ap.add_argument("--model-dir", default="", help="HF model dir (sglang/torch) or config + "
                    "tokenizer dir (sim)")
    ap.add_argument("--tokenizer-dir", default="", help="sglang: --tokenizer-path")
    ap.add_argument("--dummy-weights", action="store_true", help="sglang: --load-format dummy")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--sglang-extra", default="", help="more SGLang flags (one string)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-timeout", type=float, default=420)
    ap.add_argument("--stagger-timeout", type=float, default=90)
    ap.add_argument("--no-history", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_e2e_out"))
    ap.add_argument("--work", default="")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x streams")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=400)
    ap.add_argument("--cache-max-tokens", type=int, default=48)
    ap.add_argument("--cache-concurrency", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small workloads (rehearsal)")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.rounds, args.min_requests = "1,4,16", 1, 2
        args.bench_tokens, args.groups, args.users, args.turns = 32, 3, 2, 3
        args.prefix_words, args.cache_max_tokens = 120, 16
    if not args.work:
        args.work = str(Path(args.out) / "work")
    sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python" / "src")]

    async def go() -> int:
        # SIGTERM/SIGINT cancel the run, so every process it started is stopped on the way out.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        try:
            return await Driver(args).run()
        except asyncio.CancelledError:
            return 130

    return asyncio.run(go())


if __name__ == "__main__":
    raise SystemExit(main())
