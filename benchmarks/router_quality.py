"""Routing quality on a sim fleet: cache hit rate, TTFT and load spread per policy.

    .venv/bin/python benchmarks/router_quality.py                 # 8 workers, every arm
    .venv/bin/python benchmarks/router_quality.py --arms round_robin cache_aware_precise

One process: ``--workers`` real ``sim`` workers (each its own gRPC server on loopback, a finite
radix KV cache of ``--kv-tokens`` tokens, prefill time per *uncached* prompt token, real KV
events) and one or more Router objects that call them over gRPC. The workload is multi-turn
chat with shared system prompts: ``--conversations`` conversations, each opened with one of
``--systems`` system prompts of ``--system-tokens`` tokens, then ``--turns`` turns that append
the previous answer and a new user message, so every turn's prompt extends the last one.
``--concurrency`` clients run conversations in parallel; each request goes to a random router
replica when ``--replicas`` > 1 (as behind a load balancer).

Per arm: cache hit rate (cached prompt tokens / prompt tokens, as the workers report them),
TTFT p50/p99 (router admission to first streamed token), and load spread (coefficient of
variation of the prompt tokens each worker prefilled, and of requests per worker).
Arms: round_robin, power_of_two, cache_aware_approx (KV events ignored), cache_aware_precise,
and the two cache_aware arms again with ``--replicas`` routers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb  # noqa: E402

from services.router.config import RouterConfig  # noqa: E402
from services.router.router import DispatchState, RequestHints, Router  # noqa: E402
from services.router.workers import Health  # noqa: E402
from services.worker.config import WorkerConfig  # noqa: E402
from services.worker.sim_server import SimWorker, build_sim_worker  # noqa: E402

ARMS = ("round_robin", "power_of_two", "cache_aware_approx", "cache_aware_precise")


def make_workload(args: argparse.Namespace) -> list[list[list[int]]]:
    """Per conversation, the user/system token chunks: [system, user1, user2, ...]."""
    rng = random.Random(args.seed)
    systems = [[rng.randrange(1000, 40_000) for _ in range(args.system_tokens)]
               for _ in range(args.systems)]
    conversations = []
    for c in range(args.conversations):
        chunks = [systems[c % args.systems]]
        for _ in range(args.turns):
            chunks.append([rng.randrange(1000, 40_000) for _ in range(args.user_tokens)])
        conversations.append(chunks)
    return conversations


async def start_fleet(args: argparse.Namespace) -> list[SimWorker]:
    workers = []
    for i in range(args.workers):
        config = WorkerConfig(
            engine="sim", host="127.0.0.1", port=0, sim_block_size=16,
            sim_max_total_tokens=args.kv_tokens, sim_decode_ms=args.decode_ms,
            sim_decode_ms_per_running=0.5, sim_prefill_ms_per_token=args.prefill_ms_per_token,
            max_running_requests=args.max_running, sim_seed=i)
        worker = build_sim_worker(config)
        await worker.start()
        workers.append(worker)
    return workers


async def start_routers(arm: str, urls: list[str], replicas: int) -> list[Router]:
    policy = "cache_aware" if arm.startswith("cache_aware") else arm
    routers = []
    for _ in range(replicas):
        config = RouterConfig(worker_urls=urls, policy=policy,
                              disable_kv_events=(arm == "cache_aware_approx"),
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
    if arm == "cache_aware_precise":
        while any(not all(idx.is_live(u) for u in urls)
                  for r in routers for idx in r.kv_indexes.values()) or \
                any(not r.kv_indexes for r in routers):
            await asyncio.sleep(0.05)
    return routers


async def run_arm(arm: str, replicas: int, workers: list[SimWorker],
                  conversations: list[list[list[int]]], args: argparse.Namespace
                  ) -> dict[str, Any]:
    urls = [f"grpc://127.0.0.1:{w.port}" for w in workers]
    for w in workers:  # start every arm from cold caches
        w.engine.flush_cache()
    routers = await start_routers(arm, urls, replicas)
    rng = random.Random(args.seed + 1)
    ttfts: list[float] = []
    prompt_tokens = cached_tokens = 0
    per_worker_requests = dict.fromkeys(urls, 0)
    per_worker_prefill = dict.fromkeys(urls, 0)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for c in range(len(conversations)):
        queue.put_nowait(c)
    counter = 0

    async def client() -> None:
        nonlocal prompt_tokens, cached_tokens, counter
        while not queue.empty():
            c = queue.get_nowait()
            history: list[int] = []
            for turn, chunk in enumerate(conversations[c]):
                if turn == 0:
                    history = list(chunk)
                    continue
                history += chunk
                counter += 1
                request = pb.GenerateRequest(
                    request_id=f"{arm}-{c}-{turn}-{counter}", stream=True,
                    tokenized=pb.TokenizedInput(input_ids=history),
                    sampling_params=pb.SamplingParams(temperature=0.0,
                                                      max_new_tokens=args.output_tokens))
                router = routers[rng.randrange(len(routers))]
                state = DispatchState()
                start = time.monotonic()
                first = None
                output: list[int] = []
                async for response in router.generate(request, RequestHints(), state):
                    if first is None:
                        first = time.monotonic() - start
                    if response.HasField("complete"):
                        done = response.complete
                        output = list(done.output_ids)
                        prompt_tokens += done.prompt_tokens
                        cached_tokens += done.cached_tokens
                        assert state.worker is not None
                        per_worker_requests[state.worker.url] += 1
                        per_worker_prefill[state.worker.url] += \
                            done.prompt_tokens - done.cached_tokens
                assert first is not None
                ttfts.append(first)
                history += output

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    for router in routers:
        await router.stop()

    def cov(values: list[int]) -> float:
        mean = statistics.fmean(values)
        return statistics.pstdev(values) / mean if mean else 0.0

    ttfts.sort()
    return {
        "arm": arm, "replicas": replicas, "requests": len(ttfts),
        "hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p99_ms": 1000 * ttfts[int(0.99 * (len(ttfts) - 1))],
        "prefill_cov": cov(list(per_worker_prefill.values())),
        "requests_cov": cov(list(per_worker_requests.values())),
        "elapsed_s": elapsed,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    conversations = make_workload(args)
    workers = await start_fleet(args)
    results = []
    try:
        plan = [(arm, 1) for arm in args.arms]
        if args.replicas > 1:
            plan += [(arm, args.replicas) for arm in args.arms if arm.startswith("cache_aware")]
        print(f"{'arm':22} {'routers':>7} {'hit rate':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'prefill CoV':>12} {'req CoV':>8} {'wall s':>7}")
        for arm, replicas in plan:
            r = await run_arm(arm, replicas, workers, conversations, args)
            results.append(r)
            print(f"{arm:22} {replicas:7d} {r['hit_rate']:9.3f} {r['ttft_p50_ms']:8.0f}ms "
                  f"{r['ttft_p99_ms']:8.0f}ms {r['prefill_cov']:12.2f} {r['requests_cov']:8.2f} "
                  f"{r['elapsed_s']:7.1f}", flush=True)
    finally:
        await asyncio.gather(*(w.stop(0) for w in workers), return_exceptions=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, default=96)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kv-tokens", type=int, default=16384,
                        help="KV capacity of each sim worker (tokens)")
    parser.add_argument("--decode-ms", type=float, default=5.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
