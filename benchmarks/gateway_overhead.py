"""Added latency and CPU per request of gateway + tokenizer + router over calling a worker
directly, non-streaming and streaming, at several concurrencies; optionally the same requests
through SMG (``smg.launch_router``, gRPC mode, the same worker) for sglmesh/SMG ratios.

The worker is ``--engine sim`` with every timing set to 0, so it answers (almost) instantly and
what is measured is the serving path. Latency: client-side p50/p99 per request. CPU: the
user+system time the serving processes (gateway, tokenizer, router; or SMG) used during a
level, divided by its requests (the processes' CPU-time clocks, :mod:`benchmarks.proc_cpu`).

    .venv/bin/python benchmarks/gateway_overhead.py --concurrency 1 16 64 --requests 300 --smg

``--embedded`` adds one gateway process with the router and the tokenizer embedded
(``--router embedded --tokenizer embedded``), and a gateway with only the tokenizer embedded in
front of a router process (path ``tok_embedded``). ``--floor`` adds what any Python gateway pays
before its own work: path ``bare_http`` (FastAPI + uvicorn with the gateway's settings, parsing
the request and answering a fixed reply: ``bare_http_app.py``), and the CPU the benchmark's own
process spends on the ``direct`` path, i.e. one grpc.aio Generate call from Python.

Before/after: ``--baseline DIR`` starts a second gateway + tokenizer + router from another
source tree (e.g. ``git archive <rev> | tar -x -C DIR``) on the same worker and measures it as
path ``baseline`` in the same levels (with ``--embedded``, also that tree's embedded gateway
as path ``baseline_embedded``); ``--repeat N`` runs every level N times with the paths
interleaved (order rotated per round) and reports medians, so slow drift on a shared machine
hits every path alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.proc_cpu import cpu_seconds  # noqa: E402
from services.common.net import CHANNEL_OPTIONS, free_port  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello! Please tell me about the weather today."}]
LOOPBACK = "127.0.0.1,localhost,::1"


class Proc:
    def __init__(self, name: str, args: list[str], logs: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        env = {**os.environ, "no_proxy": LOOPBACK, "NO_PROXY": LOOPBACK,
               "no_grpc_proxy": LOOPBACK}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def wait_grpc(target: str, proc: Proc, timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            proc.check()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not serving")


def wait_http(url: str, proc: Proc, ok: Callable[[httpx.Response], bool],
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            proc.check()
            try:
                if ok(client.get(url)):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{proc.name} not ready at {url}")


async def run_level(one: Callable[[], Awaitable[None]], requests: int, concurrency: int
                    ) -> list[float]:
    latencies: list[float] = []
    remaining = [requests]

    async def loop() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            start = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(name: str, one: Callable[[], Awaitable[None]], pids: dict[str, int],
                  concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    await run_level(one, warmup, min(concurrency, warmup))
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    wall = time.perf_counter()
    latencies = await run_level(one, requests, concurrency)
    wall = time.perf_counter() - wall
    used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    cpu = sum(used.values())
    return {"cpu_ms_per_request_by_process": {
                k: round(v * 1000 / requests, 3) for k, v in used.items()},
            "path": name, "concurrency": concurrency, "requests": requests,
            "p50_ms": round(pct(latencies, 0.5), 2), "p99_ms": round(pct(latencies, 0.99), 2),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
            "rps": round(requests / wall, 1),
            "cpu_ms_per_request": round(cpu * 1000 / requests, 3) if pids else None}


def http_call(client: httpx.AsyncClient, url: str, model: str, stream: bool, max_tokens: int
              ) -> Callable[[], Awaitable[None]]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}

    async def one() -> None:
        if stream:
            async with client.stream("POST", url, json=body) as reply:
                assert reply.status_code == 200, await reply.aread()
                async for _ in reply.aiter_bytes():
                    pass
        else:
            reply = await client.post(url, json=body)
            assert reply.status_code == 200, reply.text

    return one


def direct_call(stub: Any, ids: list[int], stream: bool, max_tokens: int
                ) -> Callable[[], Awaitable[None]]:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    counter = [0]

    async def one() -> None:
        counter[0] += 1
        request = pb.GenerateRequest(
            request_id=f"direct-{counter[0]}", tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=pb.SamplingParams(temperature=0, top_p=1, top_k=-1,
                                              repetition_penalty=1, max_new_tokens=max_tokens,
                                              skip_special_tokens=True),
            stream=stream)
        async for _ in stub.Generate(request):
            pass

    return one


def combine(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one path at one level."""
    if len(samples) == 1:
        return samples[0]
    out = dict(samples[0])
    for key in ("p50_ms", "p99_ms", "mean_ms", "rps", "cpu_ms_per_request"):
        if samples[0][key] is not None:
            out[key] = round(statistics.median(s[key] for s in samples), 3)
    out["cpu_ms_per_request_by_process"] = {
        k: round(statistics.median(s["cpu_ms_per_request_by_process"][k] for s in samples), 3)
        for k in samples[0]["cpu_ms_per_request_by_process"]}
    out["repeats"] = len(samples)
    out["p50_ms_each"] = [s["p50_ms"] for s in samples]
    if samples[0]["cpu_ms_per_request"] is not None:
        out["cpu_ms_per_request_each"] = [s["cpu_ms_per_request"] for s in samples]
    return out


def start_embedded(start: Callable[..., Proc], wport: int, policy: str, router: bool = True,
                   root: Path = ROOT, label: str = "", router_extra: Sequence[str] = ()
                   ) -> tuple[str, dict[str, int]]:
    """A gateway from the source tree ``root`` with the tokenizer embedded, and the router too
    (``router``) or as its own process: (base url, pids). ``router_extra``: more router flags."""
    gport = free_port()
    pids: dict[str, int] = {}
    if router:
        label, router_args = label or "embedded", [
            "--router", "embedded", "--router-args",
            " ".join([f"--worker-urls grpc://127.0.0.1:{wport} --policy {policy}",
                      *router_extra])]
    else:
        rport = free_port()
        proc = start("tok-embedded-router", [
            "-m", "services.router", "--port", str(rport), "--worker-urls",
            f"grpc://127.0.0.1:{wport}", "--policy", policy, "--log-level", "warning",
            *router_extra])
        wait_grpc(f"127.0.0.1:{rport}", proc)
        pids["router"] = proc.proc.pid
        label, router_args = "tok-embedded", ["--router", f"127.0.0.1:{rport}"]
    gateway = start(f"{label}-gateway", [
        "-m", "services.gateway", "--port", str(gport), *router_args,
        "--tokenizer", "embedded", "--log-level", "warning"], root)
    base = f"http://127.0.0.1:{gport}"
    wait_http(f"{base}/health", gateway, lambda r: r.status_code == 200)
    return base, {"gateway": gateway.proc.pid, **pids}


def start_stack(start: Callable[..., Proc], label: str, root: Path, wport: int, policy: str,
                router_extra: Sequence[str] = ()) -> tuple[str, dict[str, int]]:
    """gateway + tokenizer + router from the source tree ``root``: (base url, pids)."""
    rport, tport, gport = free_port(), free_port(), free_port()
    router = start(f"{label}-router", ["-m", "services.router", "--port", str(rport),
                                       "--worker-urls", f"grpc://127.0.0.1:{wport}",
                                       "--policy", policy, "--log-level", "warning",
                                       *router_extra], root)
    tokenizer = start(f"{label}-tokenizer", ["-m", "services.tokenizer", "--port", str(tport),
                                             "--log-level", "warning"], root)
    wait_grpc(f"127.0.0.1:{rport}", router)
    wait_grpc(f"127.0.0.1:{tport}", tokenizer)
    gateway = start(f"{label}-gateway", ["-m", "services.gateway", "--port", str(gport),
                                         "--router", f"127.0.0.1:{rport}",
                                         "--tokenizer", f"127.0.0.1:{tport}",
                                         "--log-level", "warning"], root)
    base = f"http://127.0.0.1:{gport}"
    wait_http(f"{base}/health", gateway, lambda r: r.status_code == 200)
    return base, {"router": router.proc.pid, "tokenizer": tokenizer.proc.pid,
                  "gateway": gateway.proc.pid, "tport": tport}


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    from services.worker.model_store import ensure_embedded_model

    model_dir = ensure_embedded_model(Path(args.model_cache).expanduser())
    logs = Path(tempfile.mkdtemp(prefix="sglmesh-bench-"))
    procs: list[Proc] = []
    results: list[dict[str, Any]] = []

    def start(name: str, args_: list[str], root: Path = ROOT) -> Proc:
        proc = Proc(name, args_, logs, root)
        procs.append(proc)
        return proc

    try:
        wport = free_port()
        worker = start("worker", [
            "-m", "services.worker", "--port", str(wport), "--engine", "sim",
            "--model-path", str(model_dir), "--sim-decode-ms", "0",
            "--sim-decode-ms-per-running", "0", "--sim-prefill-ms-per-token", "0",
            "--max-running-requests", "256", "--stream-interval", str(args.stream_interval),
            "--log-level", "warning"])
        wait_grpc(f"127.0.0.1:{wport}", worker)
        # Flags for this tree's routers only (a baseline tree may predate them).
        router_extra = (["--worker-transport", args.worker_transport]
                        if args.worker_transport else [])
        base, serving = start_stack(start, "sglmesh", ROOT, wport, args.policy, router_extra)
        tport = serving.pop("tport")
        baseline_base, baseline_pids = "", {}
        if args.baseline:
            baseline_base, baseline_pids = start_stack(
                start, "baseline", Path(args.baseline).resolve(), wport, args.policy)
            baseline_pids.pop("tport")
        embedded_base, embedded_pids = "", {}
        tok_base, tok_pids = "", {}
        if args.embedded:
            embedded_base, embedded_pids = start_embedded(start, wport, args.policy,
                                                          router_extra=router_extra)
            tok_base, tok_pids = start_embedded(start, wport, args.policy, router=False,
                                                router_extra=router_extra)
        base_emb_base, base_emb_pids = "", {}
        if args.embedded and args.baseline:
            base_emb_base, base_emb_pids = start_embedded(
                start, wport, args.policy, root=Path(args.baseline).resolve(),
                label="baseline-embedded")
        bare_base, bare_pids = "", {}
        if args.floor:
            bare_port = free_port()
            bare = start("bare-http", [str(ROOT / "benchmarks" / "bare_http_app.py"),
                                       str(bare_port)])
            bare_base = f"http://127.0.0.1:{bare_port}"
            wait_http(f"{bare_base}/v1/models", bare, lambda r: r.status_code == 200)
            bare_pids = {"bare_http": bare.proc.pid}
        smg_base = ""
        smg: Proc | None = None
        if args.smg:
            sport = free_port()
            smg = start("smg", [
                "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(sport),
                "--worker-urls", f"grpc://127.0.0.1:{wport}", "--policy", args.policy,
                "--model-path", str(model_dir), "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn"])
            smg_base = f"http://127.0.0.1:{sport}"
            wait_http(f"{smg_base}/workers", smg, lambda r: any(
                w.get("is_healthy") for w in r.json().get("workers", [])))

        limits = httpx.Limits(max_connections=max(args.concurrency) + 8,
                              max_keepalive_connections=max(args.concurrency) + 8)
        async with httpx.AsyncClient(trust_env=False, timeout=120, limits=limits) as client:
            model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
            smg_model = ""
            if smg_base:
                smg_model = (await client.get(f"{smg_base}/v1/models")).json()["data"][0]["id"]
                deadline = time.monotonic() + 60  # SMG answers 503 until its tokenizer loads
                while (await client.post(f"{smg_base}/v1/chat/completions", json={
                        "model": smg_model, "messages": MESSAGES, "max_tokens": 1})
                       ).status_code == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
            # The first chat request makes the gateway load the tokenizer from the worker.
            for url in filter(None, (base, baseline_base, embedded_base, tok_base,
                                     base_emb_base)):
                first = await client.post(f"{url}/v1/chat/completions", json={
                    "model": model, "messages": MESSAGES, "max_tokens": 1})
                assert first.status_code == 200, first.text
            ids = await prompt_ids(f"127.0.0.1:{tport}", model)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{wport}", options=CHANNEL_OPTIONS)
            from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

            stub = pb_grpc.SglangSchedulerStub(channel)
            for stream in (False, True):
                for c in args.concurrency:
                    n = max(args.requests, c * 4)
                    row: dict[str, Any] = {"stream": stream, "concurrency": c}
                    paths = [
                        ("direct", direct_call(stub, ids, stream, args.max_tokens),
                         {"client": os.getpid()} if args.floor else {}),
                        ("sglmesh", http_call(client, f"{base}/v1/chat/completions", model,
                                              stream, args.max_tokens), serving),
                    ] + ([("baseline", http_call(
                        client, f"{baseline_base}/v1/chat/completions", model, stream,
                        args.max_tokens), baseline_pids)] if baseline_base else []
                    ) + ([("bare_http", http_call(
                        client, f"{bare_base}/v1/chat/completions", model, stream,
                        args.max_tokens), bare_pids)] if bare_base else []
                    ) + ([("embedded", http_call(
                        client, f"{embedded_base}/v1/chat/completions", model, stream,
                        args.max_tokens), embedded_pids),
                          ("tok_embedded", http_call(
                              client, f"{tok_base}/v1/chat/completions", model, stream,
                              args.max_tokens), tok_pids)] if embedded_base else []
                    ) + ([("baseline_embedded", http_call(
                        client, f"{base_emb_base}/v1/chat/completions", model, stream,
                        args.max_tokens), base_emb_pids)] if base_emb_base else []
                    ) + ([("smg", http_call(client, f"{smg_base}/v1/chat/completions",
                                            smg_model, stream, args.max_tokens),
                           {"smg": smg.proc.pid})] if smg is not None else [])
                    samples: dict[str, list[dict[str, Any]]] = {p[0]: [] for p in paths}
                    for round_ in range(args.repeat):
                        shift = round_ % len(paths)
                        for path, one, pids in paths[shift:] + paths[:shift]:
                            samples[path].append(
                                await measure(path, one, pids, c, n, args.warmup))
                    for path, got in samples.items():
                        row[path] = combine(got)
                    if "baseline" in row:
                        row["baseline_added_p50_ms"] = round(
                            row["baseline"]["p50_ms"] - row["direct"]["p50_ms"], 2)
                    row["added_p50_ms"] = round(row["sglmesh"]["p50_ms"]
                                                - row["direct"]["p50_ms"], 2)
                    if "smg" in row:
                        smg_added = row["smg"]["p50_ms"] - row["direct"]["p50_ms"]
                        row["smg_added_p50_ms"] = round(smg_added, 2)
                        row["cpu_ratio_sglmesh_smg"] = round(
                            row["sglmesh"]["cpu_ms_per_request"]
                            / max(row["smg"]["cpu_ms_per_request"], 1e-6), 2)
                        row["added_p50_ratio_sglmesh_smg"] = round(
                            row["added_p50_ms"] / max(smg_added, 1e-3), 2)
                    if "tok_embedded" in row:
                        row["tok_embedded_added_p50_ms"] = round(
                            row["tok_embedded"]["p50_ms"] - row["direct"]["p50_ms"], 2)
                    if "baseline_embedded" in row:
                        row["baseline_embedded_added_p50_ms"] = round(
                            row["baseline_embedded"]["p50_ms"] - row["direct"]["p50_ms"], 2)
                    if "embedded" in row:
                        added = row["embedded"]["p50_ms"] - row["direct"]["p50_ms"]
                        row["embedded_added_p50_ms"] = round(added, 2)
                        if "smg" in row:
                            row["cpu_ratio_embedded_smg"] = round(
                                row["embedded"]["cpu_ms_per_request"]
                                / max(row["smg"]["cpu_ms_per_request"], 1e-6), 2)
                            row["added_p50_ratio_embedded_smg"] = round(
                                added / max(row["smg_added_p50_ms"], 1e-3), 2)
                    results.append(row)
                    print(summary(row), flush=True)
            await channel.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
    return results


async def prompt_ids(tokenizer: str, model: str) -> list[int]:
    """The same prompt the gateway renders, for the direct calls."""
    from google.protobuf import struct_pb2
    from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
    from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc

    async with grpc.aio.insecure_channel(tokenizer, options=CHANNEL_OPTIONS) as channel:
        message = struct_pb2.Struct()
        message.update(MESSAGES[0])
        reply = await tok_grpc.TokenizerServiceStub(channel).RenderChat(
            tok_pb.RenderChatRequest(model=model, messages=[message]))
    return list(reply.token_ids)


def summary(row: dict[str, Any]) -> str:
    mode = "stream" if row["stream"] else "non-stream"
    d, s = row["direct"], row["sglmesh"]
    text = (f"{mode:10} c={row['concurrency']:<3} direct p50 {d['p50_ms']:7.2f} ms | sglmesh "
            f"p50 {s['p50_ms']:7.2f} ms (+{row['added_p50_ms']:.2f}) p99 {s['p99_ms']:7.2f} "
            f"{s['rps']:6.1f} req/s cpu {s['cpu_ms_per_request']:6.2f} ms/req "
            f"{s['cpu_ms_per_request_by_process']}")
    if "baseline" in row:
        b = row["baseline"]
        text += (f" | baseline p50 {b['p50_ms']:7.2f} (+{row['baseline_added_p50_ms']:.2f}) "
                 f"{b['rps']:6.1f} req/s cpu {b['cpu_ms_per_request']:6.2f} ms/req "
                 f"{b['cpu_ms_per_request_by_process']}")
    if "bare_http" in row:
        text += (f" | floor: bare http cpu {row['bare_http']['cpu_ms_per_request']:.2f} ms/req, "
                 f"grpc.aio client cpu {row['direct']['cpu_ms_per_request']:.2f} ms/call")
    if "embedded" in row:
        e = row["embedded"]
        text += (f" | embedded p50 {e['p50_ms']:7.2f} (+{row['embedded_added_p50_ms']:.2f}) "
                 f"{e['rps']:6.1f} req/s cpu {e['cpu_ms_per_request']:6.2f} ms/req")
    if "baseline_embedded" in row:
        e = row["baseline_embedded"]
        text += (f" | baseline embedded p50 {e['p50_ms']:7.2f} "
                 f"(+{row['baseline_embedded_added_p50_ms']:.2f}) {e['rps']:6.1f} req/s cpu "
                 f"{e['cpu_ms_per_request']:6.2f} ms/req")
    if "tok_embedded" in row:
        t = row["tok_embedded"]
        text += (f" | tokenizer-embedded p50 {t['p50_ms']:7.2f} "
                 f"(+{row['tok_embedded_added_p50_ms']:.2f}) {t['rps']:6.1f} req/s cpu "
                 f"{t['cpu_ms_per_request']:6.2f} ms/req {t['cpu_ms_per_request_by_process']}")
    if "smg" in row:
        m = row["smg"]
        text += (f" | smg p50 {m['p50_ms']:7.2f} (+{row['smg_added_p50_ms']:.2f}) "
                 f"{m['rps']:6.1f} req/s cpu {m['cpu_ms_per_request']:6.2f} ms/req | ratios "
                 f"cpu {row['cpu_ratio_sglmesh_smg']} added-p50 "
                 f"{row['added_p50_ratio_sglmesh_smg']}")
        if "embedded" in row:
            text += (f" | embedded/smg cpu {row['cpu_ratio_embedded_smg']} added-p50 "
                     f"{row['added_p50_ratio_embedded_smg']}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=300, help="requests per level")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the sim worker's tokens per streamed message (every path reads "
                             "the same worker)")
    parser.add_argument("--policy", default="cache_aware",
                        help="load-balancing policy of every router, SMG's included (both "
                             "default to cache_aware)")
    parser.add_argument("--worker-transport", choices=("grpcio", "grpclib"), default="",
                        help="this tree's routers read the worker's Generate with this "
                             "(default: the router's own default; a --baseline tree keeps its)")
    parser.add_argument("--smg", action="store_true", help="also measure smg.launch_router")
    parser.add_argument("--floor", action="store_true",
                        help="also measure a bare FastAPI app and the Python gRPC client")
    parser.add_argument("--embedded", action="store_true",
                        help="also measure a gateway with --router embedded --tokenizer "
                             "embedded, and one with only --tokenizer embedded")
    parser.add_argument("--baseline", default="", metavar="DIR",
                        help="also measure a gateway+tokenizer+router started from this source "
                             "tree (before/after in one run)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per level, paths interleaved; medians reported")
    parser.add_argument("--model-cache", default=os.environ.get(
        "SGLMESH_MODEL_CACHE", "~/.cache/sglmesh/models"))
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
