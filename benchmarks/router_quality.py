"""Routing quality on a sim fleet: cache hit rate, TTFT and load spread per policy, and SMG.

    .venv/bin/python benchmarks/router_quality.py                 # 8 workers, every arm
    .venv/bin/python benchmarks/router_quality.py --arms round_robin cache_aware_precise smg

One process holds ``--workers`` real ``sim`` workers (each its own gRPC server on loopback, a
finite radix KV cache of ``--kv-tokens`` tokens, prefill time per *uncached* prompt token, real
KV events; the embedded SmolLM2 tokenizer directory gives them their model info) and the
client. The workload is multi-turn chat with shared system prompts: ``--conversations``
conversations, each opened with one of ``--systems`` system prompts of ``--system-tokens``
tokens, then ``--turns`` turns that append the previous answer and a new user message, so
every turn's prompt extends the last one. ``--concurrency`` clients run conversations in
parallel (all starting at once, or staggered over ``--ramp-secs``). Every arm starts from
cold (flushed) caches and sends the same token prompts, greedy, ``--output-tokens`` each (sim
outputs are a function of the prompt, so histories match too).

Arms:

* sglmesh: round_robin, power_of_two, cache_aware_approx (KV events ignored),
  cache_aware_precise (and cache_aware_precise_pressure: the same with
  ``--kv-pressure-window-secs 5``): ``python -m services.router`` processes (like SMG, their own process;
  the client calls their gRPC front door, ``SglangScheduler.Generate`` with the token ids), or
  with ``--router-placement inproc`` Router objects in this process; the two cache_aware arms
  again with ``--replicas`` routers (each request to a random replica, as behind a load
  balancer).
* ``smg``: the real SMG gateway (``smg==1.13.0``, Rust, its own process) in gRPC mode,
  ``--policy cache_aware`` with its defaults; it subscribes to the same workers' KV events
  (event-driven mode). The client posts ``/generate`` with the same ``input_ids``
  (:mod:`benchmarks.router_smg`). ``smg_warmup_off``: the same with
  ``--worker-warmup-secs 0`` (SMG's 1.13 warm-up slice targets workers registered < 60 s
  ago, which every worker of a fresh benchmark gateway is). With ``--replicas`` the SMG arms
  run again as that many SMG gateways, each request to a random one.

Measured the same way for every arm, at the workers (an in-process probe around each sim
engine's ``generate``): cache hit rate (cached prompt tokens / prompt tokens), worker TTFT
(the request reaching the engine -> its first token: queueing behind other requests plus the
prefill of the uncached tokens, i.e. what placement decides), and load spread (coefficient of
variation over workers of the prompt tokens each prefilled, and of requests). Client TTFT is
also reported but is not like for like: for sglmesh a gRPC call to a Python router process,
for SMG an HTTP/SSE round trip through a Rust gateway (JSON, detokenization). Results: docs/routing.md.

``--rounds`` repeats the whole plan (workload seed + round), arms interleaved; figures pool the
rounds' samples (hit rate = sum cached / sum prompt) and the hit-rate range over rounds is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb  # noqa: E402

from benchmarks.router_smg import SMG_VERSION, run_routers, run_smg, smg_version  # noqa: E402
from services.router.config import RouterConfig  # noqa: E402
from services.router.router import DispatchState, RequestHints, Router  # noqa: E402
from services.router.workers import Health  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.engine_api import EngineOutput, SamplingOptions  # noqa: E402
from services.worker.sim_server import SimWorker, build_sim_worker  # noqa: E402

SGLMESH_ARMS = ("round_robin", "power_of_two", "cache_aware_approx", "cache_aware_precise",
                "cache_aware_precise_pressure")
PRESSURE_WINDOW_SECS = 5.0
# Router flags per arm beyond --policy (the pressure arm turns the cache-pressure moves on).
SGLMESH_ARM_FLAGS = {"cache_aware_precise_pressure": [
    "--kv-pressure-window-secs", str(PRESSURE_WINDOW_SECS)]}
SMG_ARMS = {"smg": [], "smg_warmup_off": ["--worker-warmup-secs", "0"]}
ARMS = (*SGLMESH_ARMS, *SMG_ARMS)

Send = Callable[[str, list[int]], Awaitable[tuple[float, list[int]]]]


def make_workload(args: argparse.Namespace, seed: int) -> list[list[list[int]]]:
    """Per conversation, the user/system token chunks: [system, user1, user2, ...]."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000, 40_000) for _ in range(args.system_tokens)]
               for _ in range(args.systems)]
    conversations = []
    for c in range(args.conversations):
        chunks = [systems[c % args.systems]]
        for _ in range(args.turns):
            chunks.append([rng.randrange(1000, 40_000) for _ in range(args.user_tokens)])
        conversations.append(chunks)
    return conversations


def hit_rate_ceiling(conversations: list[list[list[int]]], output_tokens: int,
                     block: int = 16) -> float:
    """The hit rate with unbounded KV and perfect affinity: a turn reuses the whole previous
    turn (prompt + answer, whole blocks), a first turn its system prompt if any earlier
    conversation used it."""
    seen: set[tuple[int, ...]] = set()
    cached = prompt = 0
    for chunks in conversations:
        system = tuple(chunks[0])
        length = len(system)
        reusable = len(system) if system in seen else 0
        seen.add(system)
        for chunk in chunks[1:]:
            length += len(chunk)
            cached += min(reusable // block * block, length - 1)
            prompt += length
            length += output_tokens
            reusable = length
    return cached / prompt if prompt else 0.0


class WorkerProbe:
    """Wraps each sim engine's ``generate``: per request (health probes excluded) the worker,
    prompt and cached tokens, and the time from the engine call to the first token."""

    def __init__(self, key_len: int) -> None:
        self.records: list[tuple[str, int, int, float, int]] = []
        self.key_len = key_len  # the conversation key: hash of its first system+user tokens

    def install(self, worker: SimWorker, url: str) -> None:
        inner = worker.engine.generate
        records = self.records
        key_len = self.key_len

        async def generate(request_id: str, input_ids: list[int],
                           options: SamplingOptions) -> AsyncIterator[EngineOutput]:
            start = time.monotonic()
            first: float | None = None
            async with aclosing(inner(request_id, input_ids, options)) as stream:
                async for out in stream:
                    if first is None and out.new_token_ids:
                        first = time.monotonic() - start
                    if out.finished and not request_id.startswith("health-") \
                            and out.finish_reason != "abort":
                        records.append((url, out.prompt_tokens, out.cached_tokens,
                                        first if first is not None else float("nan"),
                                        hash(tuple(input_ids[:key_len]))))
                    yield out

        worker.engine.generate = generate  # type: ignore[method-assign]


async def start_fleet(args: argparse.Namespace, model_dir: Path | None) -> list[SimWorker]:
    workers = []
    for i in range(args.workers):
        config = WorkerConfig(
            engine="sim", host="127.0.0.1", port=0, sim_block_size=16,
            sim_max_total_tokens=args.kv_tokens, sim_decode_ms=args.decode_ms,
            sim_decode_ms_per_running=0.5, sim_prefill_ms_per_token=args.prefill_ms_per_token,
            max_running_requests=args.max_running, sim_seed=i)
        worker = build_sim_worker(config, model_dir)
        await worker.start()
        workers.append(worker)
    return workers


async def start_routers(arm: str, urls: list[str], replicas: int) -> list[Router]:
    policy = "cache_aware" if arm.startswith("cache_aware") else arm
    routers = []
    for _ in range(replicas):
        config = RouterConfig(worker_urls=urls, policy=policy,
                              disable_kv_events=(arm == "cache_aware_approx"),
                              kv_pressure_window_secs=(
                                  PRESSURE_WINDOW_SECS if arm == "cache_aware_precise_pressure"
                                  else 0.0),
                              health_check_interval_secs=3600, disable_load_monitoring=True,
                              health_success_threshold=1)
        router = Router(config)
        await router.start()
        routers.append(router)
    deadline = time.monotonic() + 30
    while any(sum(w.health is Health.READY for w in r.registry.all()) < len(urls)
              for r in routers):
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not register")
        await asyncio.sleep(0.05)
    if arm.startswith("cache_aware_precise"):
        while any(not all(idx.is_live(u) for u in urls)
                  for r in routers for idx in r.kv_indexes.values()) or \
                any(not r.kv_indexes for r in routers):
            await asyncio.sleep(0.05)
    return routers


@contextlib.asynccontextmanager
async def front_door(arm: str, replicas: int, urls: list[str], args: argparse.Namespace
                     ) -> AsyncIterator[Send]:
    """How the client reaches this arm: ``send(request_id, prompt) -> (ttft, output_ids)``."""
    if arm in SMG_ARMS:
        # Several SMG gateways over the same workers, as behind a load balancer: each request
        # to a random one (SMG keeps its cache view per gateway, fed by the same KV events).
        async with contextlib.AsyncExitStack() as stack:
            gateways = [await stack.enter_async_context(run_smg(
                urls, args.model_dir, args.model_dir.name, [*SMG_ARMS[arm], *args.smg_args]))
                for _ in range(replicas)]
            pick = random.Random(args.seed + 1)

            async def send_smg(request_id: str, prompt: list[int]) -> tuple[float, list[int]]:
                gateway = gateways[pick.randrange(len(gateways))]
                reply = await gateway.generate(prompt, args.output_tokens)
                return reply.client_ttft, reply.output_ids

            yield send_smg
        return
    policy = "cache_aware" if arm.startswith("cache_aware") else arm
    if args.router_placement == "process":
        async with run_routers(policy, urls, replicas, arm != "cache_aware_approx",
                               args.seed + 1, SGLMESH_ARM_FLAGS.get(arm, [])) as procs:
            async def send_proc(request_id: str, prompt: list[int]) -> tuple[float, list[int]]:
                return await procs.generate(request_id, prompt, args.output_tokens)

            yield send_proc
        return
    routers = await start_routers(arm, urls, replicas)
    rng = random.Random(args.seed + 1)

    async def send_router(request_id: str, prompt: list[int]) -> tuple[float, list[int]]:
        request = pb.GenerateRequest(
            request_id=request_id, stream=True, tokenized=pb.TokenizedInput(input_ids=prompt),
            sampling_params=pb.SamplingParams(temperature=0.0,
                                              max_new_tokens=args.output_tokens))
        router = routers[rng.randrange(len(routers))]
        start = time.monotonic()
        first = None
        output: list[int] = []
        async for response in router.generate(request, RequestHints(), DispatchState()):
            if first is None:
                first = time.monotonic() - start
            if response.HasField("complete"):
                output = list(response.complete.output_ids)
        assert first is not None
        return first, output

    try:
        yield send_router
    finally:
        for router in routers:
            await router.stop()


async def run_arm(arm: str, replicas: int, workers: list[SimWorker], probe: WorkerProbe,
                  conversations: list[list[list[int]]], args: argparse.Namespace
                  ) -> dict[str, Any]:
    urls = [f"grpc://127.0.0.1:{w.port}" for w in workers]
    for w in workers:  # start every arm from cold caches (a cleared KV event for the routers)
        ok, message = w.engine.flush_cache()
        assert ok, message
    client_ttfts: list[float] = []
    async with front_door(arm, replicas, urls, args) as send:
        probe.records.clear()  # readiness / warm-up traffic is not measured
        queue: asyncio.Queue[int] = asyncio.Queue()
        for c in range(len(conversations)):
            queue.put_nowait(c)
        counter = 0

        async def client(i: int) -> None:
            nonlocal counter
            await asyncio.sleep(args.ramp_secs * i / args.concurrency)
            while not queue.empty():
                c = queue.get_nowait()
                history: list[int] = []
                for turn, chunk in enumerate(conversations[c]):
                    history += chunk
                    if turn == 0:
                        continue
                    counter += 1
                    ttft, output = await send(f"{arm}-{c}-{turn}-{counter}", list(history))
                    client_ttfts.append(ttft)
                    history += output

        lags: list[float] = []

        async def lag_monitor() -> None:  # how late this process's event loop wakes up
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.005)
                lags.append(time.monotonic() - before - 0.005)

        monitor = asyncio.create_task(lag_monitor())
        started = time.monotonic()
        cpu = time.process_time()
        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu
        monitor.cancel()
        records = list(probe.records)
    if len(records) != len(client_ttfts):
        print(f"  warning: {arm}: {len(client_ttfts)} client requests, {len(records)} at the "
              f"workers", flush=True)
    return {"arm": arm, "replicas": replicas, "records": records, "client_ttfts": client_ttfts,
            "elapsed_s": elapsed, "urls": urls, "lags": lags, "cpu_s": cpu}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool one arm's rounds."""
    urls = runs[0]["urls"]
    records = [r for run in runs for r in run["records"]]
    client = [t for run in runs for t in run["client_ttfts"]]
    prompt = sum(r[1] for r in records)
    cached = sum(r[2] for r in records)
    worker_ttfts = [r[3] for r in records]
    per_round = [sum(r[2] for r in run["records"]) / max(1, sum(r[1] for r in run["records"]))
                 for run in runs]
    prefill = dict.fromkeys(urls, 0)
    requests = dict.fromkeys(urls, 0)
    first_turn = [0, 0]  # cached, prompt
    follow_up = [0, 0]
    same = moved = 0
    for run in runs:
        last_worker: dict[int, str] = {}
        for url, p, c, _, key in run["records"]:  # in completion order, turns in order
            prefill[url] += p - c
            requests[url] += 1
            bucket = follow_up if key in last_worker else first_turn
            bucket[0] += c
            bucket[1] += p
            if key in last_worker:
                same += last_worker[key] == url
                moved += last_worker[key] != url
            last_worker[key] = url

    def cov(values: list[int]) -> float:
        mean = statistics.fmean(values)
        return statistics.pstdev(values) / mean if mean else 0.0

    return {
        "arm": runs[0]["arm"], "replicas": runs[0]["replicas"], "rounds": len(runs),
        "requests": len(records),
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_min": min(per_round), "hit_rate_max": max(per_round),
        "worker_ttft_p50_ms": 1000 * pct(worker_ttfts, 0.50),
        "worker_ttft_p99_ms": 1000 * pct(worker_ttfts, 0.99),
        "client_ttft_p50_ms": 1000 * pct(client, 0.50),
        "client_ttft_p99_ms": 1000 * pct(client, 0.99),
        "prefill_cov": cov(list(prefill.values())),
        "requests_cov": cov(list(requests.values())),
        "first_turn_hit_rate": first_turn[0] / max(1, first_turn[1]),
        "follow_up_hit_rate": follow_up[0] / max(1, follow_up[1]),
        "follow_ups_moved": moved / max(1, same + moved),
        "requests_per_worker": sorted(requests.values(), reverse=True),
        "loop_lag_p99_ms": 1000 * pct([x for run in runs for x in run["lags"]] or [0.0], 0.99),
        "fleet_cpu_ms_per_request": 1000 * sum(run["cpu_s"] for run in runs)
        / max(1, len(records)),
        "elapsed_s": sum(run["elapsed_s"] for run in runs),
    }


HEADER = (f"{'arm':20} {'routers':>7} {'hit rate':>9} {'(range)':>13} {'wTTFT p50':>10} "
          f"{'wTTFT p99':>10} {'cTTFT p50':>10} {'cTTFT p99':>10} {'prefill CoV':>11} "
          f"{'req CoV':>8} {'lag p99':>8} {'wall s':>7}")


def row(s: dict[str, Any]) -> str:
    return (f"{s['arm']:20} {s['replicas']:7d} {s['hit_rate']:9.3f} "
            f"{s['hit_rate_min']:6.3f}-{s['hit_rate_max']:.3f} "
            f"{s['worker_ttft_p50_ms']:8.1f}ms {s['worker_ttft_p99_ms']:8.1f}ms "
            f"{s['client_ttft_p50_ms']:8.1f}ms {s['client_ttft_p99_ms']:8.1f}ms "
            f"{s['prefill_cov']:11.2f} {s['requests_cov']:8.2f} {s['loop_lag_p99_ms']:6.1f}ms "
            f"{s['elapsed_s']:7.1f}")


def verdicts(summary: dict[tuple[str, int], dict[str, Any]], replicas: int) -> list[str]:
    lines = []
    precise = summary.get(("cache_aware_precise", 1))
    smg = summary.get(("smg", 1))
    if precise and smg:
        for key, label in (("hit_rate", "hit rate"), ("worker_ttft_p50_ms", "worker TTFT p50"),
                           ("worker_ttft_p99_ms", "worker TTFT p99")):
            a, b = precise[key], smg[key]
            better = a > b if key == "hit_rate" else a < b
            lines.append(f"precise vs smg, {label}: {a:.3f} vs {b:.3f} -> "
                         f"{'sglmesh better' if better else 'SMG better or equal'}")
    precise_many, smg_many = (summary.get(("cache_aware_precise", replicas)),
                              summary.get(("smg", replicas)))
    if precise_many and smg_many and replicas > 1:
        for key, label in (("hit_rate", "hit rate"), ("worker_ttft_p50_ms", "worker TTFT p50")):
            a, b = precise_many[key], smg_many[key]
            better = a > b if key == "hit_rate" else a < b
            lines.append(f"{replicas} precise vs {replicas} smg, {label}: {a:.3f} vs {b:.3f} -> "
                         f"{'sglmesh better' if better else 'SMG better or equal'}")
    for arm in ("cache_aware_precise", "cache_aware_approx", "smg"):
        one, many = summary.get((arm, 1)), summary.get((arm, replicas))
        if one and many and replicas > 1:
            delta = 100 * (one["hit_rate"] - many["hit_rate"])
            lines.append(f"{arm}: {replicas} replicas lose {delta:.1f} hit-rate points vs 1 "
                         f"({'within' if abs(delta) <= 2 else 'OUTSIDE'} 2 points)")
    return lines


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workers = await start_fleet(args, args.model_dir)
    probe = WorkerProbe(args.system_tokens + args.user_tokens)
    for w in workers:
        probe.install(w, f"grpc://127.0.0.1:{w.port}")
    plan = [(arm, 1) for arm in args.arms]
    if args.replicas > 1:
        plan += [(arm, args.replicas) for arm in args.arms
                 if arm.startswith("cache_aware") or arm in SMG_ARMS]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    ceilings = []
    try:
        for rnd in range(args.rounds):
            conversations = make_workload(args, args.seed + rnd)
            ceilings.append(hit_rate_ceiling(conversations, args.output_tokens))
            for arm, replicas in plan:
                run = await run_arm(arm, replicas, workers, probe, conversations, args)
                runs.setdefault((arm, replicas), []).append(run)
                s = summarize([run])
                print(f"  round {rnd + 1}/{args.rounds} {arm:20} x{replicas}: hit "
                      f"{s['hit_rate']:.3f}, wTTFT p50/p99 {s['worker_ttft_p50_ms']:.1f}/"
                      f"{s['worker_ttft_p99_ms']:.1f} ms, {s['elapsed_s']:.1f} s", flush=True)
    finally:
        await asyncio.gather(*(w.stop(0) for w in workers), return_exceptions=True)
    summary = {key: summarize(rs) for key, rs in runs.items()}
    print()
    print(HEADER)
    for key in plan:
        print(row(summary[key]))
    ceiling = statistics.fmean(ceilings)
    print(f"hit-rate ceiling (unbounded KV, perfect affinity): {ceiling:.3f}")
    print()
    print(f"{'arm':20} {'routers':>7} {'1st-turn hit':>12} {'follow-up hit':>13} "
          f"{'follow-ups moved':>16}  requests per worker")
    for key in plan:
        s = summary[key]
        print(f"{s['arm']:20} {s['replicas']:7d} {s['first_turn_hit_rate']:12.3f} "
              f"{s['follow_up_hit_rate']:13.3f} {s['follow_ups_moved']:16.3f}  "
              f"{s['requests_per_worker']}")
    print()
    lines = verdicts(summary, args.replicas)
    for line in lines:
        print(line)
    return {"results": list(summary.values()), "verdicts": lines, "hit_rate_ceiling": ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the whole plan; figures pool the rounds")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=96)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ramp-secs", type=float, default=0.0,
                        help="stagger the clients' starts over this many seconds (0: all "
                             "conversations of the first wave start at once)")
    parser.add_argument("--kv-tokens", type=int, default=16384,
                        help="KV capacity of each sim worker (tokens)")
    parser.add_argument("--decode-ms", type=float, default=5.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-placement", choices=("process", "inproc"), default="process",
                        help="sglmesh routers as their own processes behind their gRPC front "
                             "door (like SMG), or Router objects in the fleet's process")
    parser.add_argument("--smg-args", nargs="*", default=[],
                        help="extra flags for every SMG arm (e.g. --smg-args=--overlap-decay=1)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from services.worker.model_store import default_cache_dir, ensure_embedded_model

    # The tokenizer directory: SMG needs it (--model-path), the sim workers serve its model
    # info to every arm, so every arm sees the same fleet.
    args.model_dir = ensure_embedded_model(default_cache_dir())
    if any(arm in SMG_ARMS for arm in args.arms):
        version = smg_version()
        if version != SMG_VERSION:
            print(f"skipping the SMG arms: smg {version or 'is not installed'} "
                  f"(pip install smg=={SMG_VERSION})", flush=True)
            args.arms = [a for a in args.arms if a not in SMG_ARMS]
    out = asyncio.run(main_async(args))
    if args.json:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps({"args": params, **out}, indent=2))


if __name__ == "__main__":
    main()
